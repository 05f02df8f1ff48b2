"""Rollout and rollback through the management API under continuous load, with zero failed client requests."""

import threading
import time

import pytest
import requests
import torch
import yaml

from handler.model import build_model, default_preprocess_config, make_checkpoint
from scripts import package, rollout, serve
from tests.conftest import DATA, RELEASED_CHECKPOINT, ROOT, start_server

pytestmark = [pytest.mark.slow, pytest.mark.data]


def release(store, version, checkpoint=RELEASED_CHECKPOINT):
    args = ["--checkpoint", str(checkpoint), "--export-path", str(store)]
    if version is not None:
        args += ["--version", version, "--archive-name", rollout.archive_name(version)]
    package.main(package.get_args_parser().parse_args(args))


def run(action, server, version=None):
    argv = [action, "--run-dir", str(server.run_dir), "--golden-images", str(DATA), "--timeout", "120"]
    return rollout.main(rollout.get_args_parser().parse_args(argv + (["--version", version] if version else [])))


@pytest.fixture()
def versioned_server(tmp_path, samples_dir):
    store = tmp_path / "store"
    release(store, None)  # skin_lesion.mar, the released version, served at start
    release(store, "1.1")
    wrong_shape = build_model("efficientnet_lite0", num_classes=5)
    checkpoint = make_checkpoint(wrong_shape, "efficientnet_lite0", default_preprocess_config("efficientnet_lite0"), {})
    checkpoint["config"]["num_classes"] = 7
    torch.save(checkpoint, tmp_path / "wrong_shape.pt")
    release(store, "9.0", tmp_path / "wrong_shape.pt")
    torch.manual_seed(0)
    untrained = make_checkpoint(build_model("efficientnet_lite0"), "efficientnet_lite0",
                                default_preprocess_config("efficientnet_lite0"),
                                {"calibration": {"none": {"temperature": 1.0, "class_bias": None, "class_prior": [1 / 7] * 7}}})
    torch.save(untrained, tmp_path / "untrained.pt")
    release(store, "9.1", tmp_path / "untrained.pt")
    server = start_server(tmp_path / "run", store)
    try:
        serve.wait_ready(server, timeout=240)
        yield server
    finally:
        serve.stop(server)


def test_rollout_and_rollback_under_load_lose_no_request(versioned_server, samples_dir, capsys, released_version):
    server = versioned_server
    image = (samples_dir / "ISIC_0025248.jpg").read_bytes()
    results, stop = [], threading.Event()

    def client():
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(f"{server.url('inference')}/predictions/skin_lesion", data=image,
                                        headers=server.headers("inference"), timeout=60)
                results.append((response.status_code, response.json().get("model_version")))
            except (requests.RequestException, ValueError) as error:
                results.append((-1, repr(error)))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(2)
        assert run("rollout", server, "1.1") == 0
        time.sleep(2)
        status = rollout.status(server)
        workers = ["READY"] * yaml.safe_load((ROOT / "config" / "model-config.yaml").read_text())["minWorkers"]
        assert status["default"] == "1.1" and status["versions"] == {released_version: workers, "1.1": workers}
        assert results[-1][1] == "1.1"
        assert run("rollback", server) == 0
        time.sleep(2)
        assert rollout.status(server)["default"] == released_version and results[-1][1] == released_version

        assert run("rollout", server, "9.0") == 1  # wrong-shaped checkpoint: fails to load
        err = capsys.readouterr().err
        assert f"9.0 aborted, {released_version} is still the default" in err and "size mismatch" in err
        assert run("rollout", server, "9.1") == 1  # loads, but fails the golden smoke test
        assert "smoke test failed" in capsys.readouterr().err
        time.sleep(1)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=90)
    final = rollout.status(server)
    assert final["default"] == released_version and set(final["versions"]) == {released_version, "1.1"}
    failed = [r for r in results if r[0] != 200]
    print(f"\nrollout under load: {len(results)} requests, {len(failed)} failed, versions served "
          f"{sorted({r[1] for r in results if r[0] == 200})}")
    assert not failed
    assert {r[1] for r in results} == {released_version, "1.1"}


def test_release_writes_a_versioned_archive(tmp_path):
    import json
    import zipfile

    args = rollout.get_args_parser().parse_args(["release", "--version", "2.3", "--model-store", str(tmp_path)])
    assert rollout.main(args) == 0
    manifest = json.loads(zipfile.ZipFile(tmp_path / "skin_lesion_v2.3.mar").read("MAR-INF/MANIFEST.json"))
    assert manifest["model"]["modelVersion"] == "2.3" and manifest["model"]["modelName"] == "skin_lesion"
    assert (ROOT / "models" / "golden_smoke.json").exists()
