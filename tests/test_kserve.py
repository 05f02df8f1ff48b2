"""The KServe bundle (ops/kserve.py, scripts/kserve_bundle.py, deploy/kserve/).

The bundle is started exactly as KServe's TorchServe runtime starts it (``torchserve --start
--model-store=.../model-store --ts-config=.../config/config.properties``, with ``/mnt/models``
replaced by the bundle folder and loopback ports substituted, and the runtime's
``TS_SERVICE_ENVELOPE=kserve`` in the environment), then answers through KServe's v1 paths are
compared with the plain endpoint of a TorchServe started with the project's own config from the
same archive, and with the golden diagnoses.

The archive is the release archive, built from the repository's checkpoint by
:func:`ops.archive.build_archive` with the release checks (input gate, operating point).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from ops import kserve
from ops.archive import ArchiveSpec, build_archive
from ops.loadgen import parse_histogram
from ops.paths import GOLDEN_SMOKE, MODEL_CONFIG, SERVER_CONFIG
from ops.cluster import FRONTEND_PID, pid_alive
from ops.torchserve import PORT_TAKEN_MARKER, PortTaken, free_port, read_properties, retry_on_taken_port
from scripts import kserve_bundle
from tests.conftest import RELEASED_CHECKPOINT, ROOT, held_port, post, same_answer

V1 = "/v1/models/skin_lesion"


@pytest.fixture(scope="module")
def release_archive(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("kserve_store")
    return build_archive(ArchiveSpec(RELEASED_CHECKPOINT, MODEL_CONFIG, store))


@pytest.fixture(scope="module")
def bundle(release_archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kserve") / "bundle"
    args = kserve_bundle.get_args_parser().parse_args(["--archive", str(release_archive), "--out", str(out)])
    assert kserve_bundle.main(args) == 0
    return out


def test_bundle_has_the_storage_layout_and_the_cluster_config(bundle, release_archive):
    files = sorted(str(path.relative_to(bundle)) for path in bundle.rglob("*") if path.is_file())
    assert files == ["config/config.properties", "config/metrics.yaml", "model-store/skin_lesion.mar"]
    assert (bundle / "model-store" / "skin_lesion.mar").read_bytes() == release_archive.read_bytes()
    props = read_properties(bundle / "config" / "config.properties")
    # Inference on the pod's port for the ServingRuntime, metrics on 8082, management pod-local.
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["model_store"] == "/mnt/models/model-store" and props["load_models"] == "skin_lesion=skin_lesion.mar"
    assert props["metrics_config"] == "/mnt/models/config/metrics.yaml"
    # No envelope (it breaks batching, measured in docs/SCALING.md), and the runtime's
    # TS_SERVICE_ENVELOPE variable cannot switch one on; tokens are checked at the ingress.
    assert "service_envelope" not in props and props["enable_envvars_config"] == "false"
    assert props["disable_token_authorization"] == "true" and props["enable_model_api"] == "false"
    # Batching is the archive's model-config.yaml, never overridden here.
    assert "models" not in props and "batch_size" not in props
    # The project's limits hold in the pod too.
    project = read_properties(SERVER_CONFIG)
    for key in ("max_request_size", "max_response_size", "default_response_timeout", "install_py_dep_per_model",
                "metrics_mode", "grpc_inference_address", "grpc_management_address"):
        assert props[key] == project[key], key
    assert (bundle / "config" / "metrics.yaml").read_text() == (ROOT / "config" / "metrics.yaml").read_text()


def test_bundle_refuses_a_config_that_does_not_load_from_mnt_models(tmp_path, release_archive):
    config = tmp_path / "config.properties"
    config.write_text(kserve.BUNDLE_CONFIG.read_text().replace("model_store=/mnt/models/model-store", "model_store=/srv"))
    with pytest.raises(ValueError, match="model_store"):
        kserve.write_bundle(release_archive, tmp_path / "out", config)
    args = kserve_bundle.get_args_parser().parse_args(["--archive", str(tmp_path / "missing.mar"), "--out", str(tmp_path / "o")])
    assert kserve_bundle.main(args) == 1
    # An archive without its recorded SHA-256 (copied away from it, or changed) is never bundled.
    copied = Path(shutil.copy(release_archive, tmp_path / "copied.mar"))
    args = kserve_bundle.get_args_parser().parse_args(["--archive", str(copied), "--out", str(tmp_path / "o")])
    assert kserve_bundle.main(args) == 1 and not (tmp_path / "o").exists()


def test_runtime_command_is_kserves_with_the_mount_replaced(tmp_path):
    assert kserve.runtime_command(tmp_path) == ["torchserve", "--start", f"--model-store={tmp_path}/model-store",
                                                f"--ts-config={tmp_path}/config/config.properties", "--ncs"]


def _golden_images(samples_dir: Path) -> list[tuple[str, str, bytes]]:
    golden = json.loads(GOLDEN_SMOKE.read_text())
    return [(case["image"], case["expected"], (samples_dir / case["image"]).read_bytes()) for case in golden["cases"]]


class RuntimeStarted:
    """TorchServe started from the bundle the way the KServe runtime starts it (daemonized ``torchserve --start``)."""

    def __init__(self, bundle: Path, work: Path) -> None:
        self.bundle, self.work = bundle, work
        work.mkdir(parents=True, exist_ok=True)
        (work / "tmp").mkdir(exist_ok=True)
        # TEMP too (the Java frontend's java.io.tmpdir): the workers' sockets (.ts.sock.9000, ...) go
        # there. In a pod /tmp is the pod's own; on this machine it is shared with every other
        # TorchServe that does not set it.
        self.env = {**os.environ, "TMPDIR": str(work / "tmp"), "TEMP": str(work / "tmp"),
                    "LOG_LOCATION": str(work / "logs"), "METRICS_LOCATION": str(work / "logs"),
                    "TS_SERVICE_ENVELOPE": "kserve", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.command = kserve.runtime_command(bundle)
        self.starts = 0

    def start(self, ports: dict[str, int]) -> None:
        """Start on newly picked free loopback ports (``ports`` replaces some of them)."""
        self.starts += 1
        self.ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc_inference",
                                                     "grpc_management")} | ports
        (self.bundle / "config" / "config.properties").write_text(kserve.localized_config(self.bundle, self.ports))
        # `torchserve --start` daemonizes: its output goes to a file, never to a pipe the daemon would hold open.
        with open(self.work / "start.log", "wb") as log:
            subprocess.run(self.command, cwd=self.work, env=self.env, check=True, stdin=subprocess.DEVNULL,
                           stdout=log, stderr=subprocess.STDOUT, timeout=120)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def wait_ready(self, timeout: float = 600) -> None:
        """Wait until every worker is READY.

        Raises:
            PortTaken: The daemon exited because a port was taken (:func:`ops.torchserve.retry_on_taken_port`).
            RuntimeError: It exited for another reason, with its output.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                workers = requests.get(f"{self.url('management')}/models/skin_lesion", timeout=5).json()[0]["workers"]
                if workers and all(w["status"] == "READY" for w in workers):
                    return
            except (requests.RequestException, ValueError, KeyError, IndexError):
                pass
            # The daemon's launcher wrote its Java frontend's pid under TMPDIR, as a cluster replica's does.
            frontend = self.work / FRONTEND_PID
            if not pid_alive(int(frontend.read_text()) if frontend.exists() else None):
                output = (self.work / "start.log").read_text(errors="replace")[-3000:]
                failure = PortTaken if PORT_TAKEN_MARKER in output else RuntimeError
                raise failure(f"the bundle's TorchServe exited during startup:\n{output}")
            time.sleep(1)
        raise TimeoutError(f"bundle not READY after {timeout} s:\n{(self.work / 'logs' / 'ts_log.log').read_text()[-3000:]}")

    def stop(self) -> None:
        with open(self.work / "stop.log", "wb") as log:
            subprocess.run(["torchserve", "--stop"], cwd=self.work, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                           stderr=subprocess.STDOUT, timeout=120)


def _batch_sizes(metrics_url: str) -> tuple[float, float]:
    return parse_histogram(requests.get(f"{metrics_url}/metrics", timeout=10).text, "skin_lesion_batch_size", "skin_lesion")


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.timeout(1800)
def test_bundle_started_like_the_kserve_runtime_answers_like_the_plain_endpoint(bundle, samples_dir, tmp_path, torchserve):
    cases = _golden_images(samples_dir)
    golden = json.loads(GOLDEN_SMOKE.read_text())
    # 1. The bundle, exactly as the runtime starts it, from a copy standing in for /mnt/models. Its first
    # start finds its gRPC management port held by another process (as a port picked free a moment
    # earlier can be; a CI run's 600-second wait ended in the same log lines), exits, and is started
    # again on new ports.
    runtime = RuntimeStarted(Path(shutil.copytree(bundle, tmp_path / "mnt-models")), tmp_path / "runtime")
    try:
        with held_port() as taken:

            def start_once() -> None:
                runtime.start({"grpc_management": taken} if runtime.starts == 0 else {})
                runtime.wait_ready()

            retry_on_taken_port(start_once)
        assert runtime.starts == 2
        description = requests.get(f"{runtime.url('management')}/models/skin_lesion", timeout=10).json()[0]
        import yaml

        model_config = yaml.safe_load(MODEL_CONFIG.read_text())
        assert description["batchSize"] == model_config["batchSize"]
        assert description["maxBatchDelay"] == model_config["maxBatchDelay"]
        assert len(description["workers"]) == model_config["minWorkers"]
        # No token inside the pod (the mesh checks it), /ping for the probes.
        assert requests.get(f"{runtime.url('inference')}/ping", timeout=10).json()["status"] == "Healthy"
        # No config snapshot was written (TorchServe writes them under LOG_LOCATION/config without --ncs).
        assert not (runtime.work / "logs" / "config").exists(), sorted((runtime.work / "logs" / "config").iterdir())
        via_v1, via_v1_raw = {}, {}
        for name, _, image in cases:
            response = requests.post(f"{runtime.url('inference')}{V1}:predict",
                                     json={"image": base64.b64encode(image).decode()}, timeout=120)
            assert response.status_code == 200, response.text
            via_v1[name] = response.json()
            raw = requests.post(f"{runtime.url('inference')}{V1}:predict", data=image,
                                headers={"Content-Type": "image/jpeg"}, timeout=120)
            via_v1_raw[name] = raw.json()
        # KServe v1 "instances" and the Open Inference Protocol, all golden images in one request each.
        encoded = [base64.b64encode(image).decode() for _, _, image in cases]
        instances = requests.post(f"{runtime.url('inference')}{V1}:predict", timeout=300,
                                  json={"instances": [{"image": {"b64": b64}} for b64 in encoded]})
        assert instances.status_code == 200, instances.text[:300]
        infer = requests.post(f"{runtime.url('inference')}/v2/models/skin_lesion/infer", timeout=300, json={
            "id": "golden", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(encoded)], "data": encoded}]})
        assert infer.status_code == 200 and infer.json()["id"] == "golden", infer.text[:300]
        v2_outputs = {output["name"]: output["data"] for output in infer.json()["outputs"]}
        # Grad-CAM through KServe's explain verb.
        explained = requests.post(f"{runtime.url('inference')}{V1}:explain",
                                  json={"image": base64.b64encode(cases[0][2]).decode()}, timeout=300)
        assert explained.status_code == 200 and explained.json()["gradcam"]["overlay"], explained.text[:300]
        # Dynamic batching still forms batches under concurrent requests through the v1 path.
        before = _batch_sizes(runtime.url("metrics"))
        payloads = [{"image": base64.b64encode(image).decode()} for _, _, image in cases] * 2
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda body: requests.post(f"{runtime.url('inference')}{V1}:predict", json=body,
                                                                timeout=300).status_code, payloads))
        assert statuses == [200] * len(payloads)
        deadline = time.monotonic() + 10
        while True:
            after = _batch_sizes(runtime.url("metrics"))
            if after[0] - before[0] >= len(payloads) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        images, batches = after[0] - before[0], after[1] - before[1]
        print(f"\nbundle: {len(payloads)} concurrent v1 requests -> {images:.0f} images in {batches:.0f} batches "
              f"(average {images / max(batches, 1):.2f})")
        assert images == len(payloads) and batches < images
    finally:
        runtime.stop()
    # 2. The plain endpoint of the project's own configuration: the session's server, whose archive is
    # built from the same checkpoint and model config as the bundle's.
    plain = {}
    for name, _, image in cases:
        response = post(torchserve, image, content_type="image/jpeg", timeout=120)
        assert response.status_code == 200, response.text
        plain[name] = response.json()
    # One image per request gives the plain endpoint's bytes; several share a batch, whose size moves
    # the last digits (see same_answer).
    assert same_answer(via_v1, plain) and same_answer(via_v1_raw, plain)
    assert same_answer(instances.json(), {"predictions": [plain[name] for name, _, _ in cases]})
    assert v2_outputs["prediction"] == [plain[name]["prediction"] for name, _, _ in cases]
    assert same_answer(v2_outputs["probabilities"], [plain[name]["probabilities"][code] for name, _, _ in cases
                                                     for code in v2_outputs["class_names"]])
    correct = sum(plain[name]["prediction"] == expected for name, expected, _ in cases)
    assert correct >= golden["min_matches"], f"{correct}/{len(cases)} golden diagnoses"
