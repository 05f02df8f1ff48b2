"""The replicated cluster (ops/cluster.py, scripts/cluster.py) with real processes on loopback.

Three TorchServe replicas of a tiny archive (fast to load on 2 cores; the balancer, the
supervisor and the rollout gate do not care what the network is) behind a real HAProxy:

* kill -9 a replica's frontend, three times, while it has a request in flight, under closed-loop
  load of 50 KB, 400 KB and 4 MB images: no client request fails, HAProxy takes the replica out
  (read from its stats socket) and sends it nothing until the supervisor has it READY again (with
  its new token), and HAProxy's peak memory stays bounded;
* the replicas refuse any request without their own TorchServe token (only HAProxy's per-replica
  proxies hold it), and the cluster's secrets are 0600 in 0700 folders;
* a rolling rollout under load with the golden smoke gate: no client request fails; a version
  that fails the gate, or a failure half-way, leaves every replica on the old version;
* Prometheus scrapes every replica under one job with a ``replica`` label, and the dashboard's
  queries add the replicas up.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import io

import pytest
import requests
import torch
from PIL import Image

from handler.architectures import build_model, default_preprocess_config
from handler.calibration import Calibration
from handler.checkpoint import Meta, OperatingPoint, make_checkpoint
from handler.labels import CLASS_CODES
from handler.open_inference import model_metadata
from handler.settings import load_handler_settings
from ops import client as ops_client
from ops import cluster as clusters
from ops import rollout as rollouts
from ops.paths import MODEL_CONFIG, SERVER_CONFIG
from ops.torchserve import free_port
from scripts import cluster as cluster_script
from tests.conftest import DATA, ROOT, held_port
from tests.tiny_release import tiny_archive, tiny_checkpoint, tiny_model_config

pytestmark = [pytest.mark.slow, pytest.mark.data,
              pytest.mark.skipif(shutil.which("haproxy") is None,
                                 reason="Debian package 'haproxy' not installed (.ci/run installs it)")]

REPLICAS = 3
GOLDEN_COUNT = 6


class Load:
    """Closed-loop clients through the balancer, each pausing ``pause`` s between requests.

    Bounded: the clients stop at ``max_requests`` or ``max_seconds`` even if nobody stops them.
    """

    def __init__(self, cluster: clusters.Cluster, image: bytes | list[bytes], clients: int = 3, pause: float = 0.1,
                 max_requests: int = 900, max_seconds: float = 600.0) -> None:
        self.results: list[tuple[float, int, str | None, int]] = []
        payloads = image if isinstance(image, list) else [image]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        headers = {**cluster.headers(), "Content-Type": "image/jpeg"}
        deadline = time.monotonic() + max_seconds

        def client(offset: int) -> None:
            sent = offset
            with requests.Session() as session:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    with self._lock:
                        if len(self.results) >= max_requests:
                            return
                    body = payloads[sent % len(payloads)]
                    sent += 1
                    try:
                        response = session.post(f"{cluster.url}/predictions/skin_lesion", data=body, headers=headers,
                                                timeout=120)
                        version = response.json().get("model_version") if response.status_code == 200 else response.text[:200]
                        outcome = (time.monotonic(), response.status_code, version, len(body))
                    except (requests.RequestException, ValueError) as error:
                        outcome = (time.monotonic(), -1, repr(error), len(body))
                    with self._lock:
                        self.results.append(outcome)
                    self._stop.wait(pause)

        self._threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def failed(self) -> list:
        return [r for r in self.results if r[1] != 200]

    def wait_for(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < count and time.monotonic() < deadline:
            time.sleep(0.05)


def forced_checkpoint(path: Path, class_code: str) -> Path:
    """A tiny checkpoint whose calibration pushes every answer to ``class_code`` (it fails any golden set without it)."""
    torch.manual_seed(1)
    preprocess = default_preprocess_config("efficientnet_lite0", image_size=64)
    bias = [40.0 if code == class_code else 0.0 for code in CLASS_CODES]
    calibration = {tta: Calibration.from_dict({"temperature": 1.0, "class_bias": bias, "class_prior": [1 / 7] * 7})
                   for tta in ("none", "hflip", "flip4")}
    threshold = load_handler_settings(MODEL_CONFIG).referral_threshold
    meta = Meta(preprocess, version="6.6", calibration=calibration, operating_point=OperatingPoint("none", threshold))
    return make_checkpoint(build_model("efficientnet_lite0").eval(), "efficientnet_lite0", preprocess, meta).save(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory, samples_dir):
    root = tmp_path_factory.mktemp("cluster")
    store = root / "store"
    config = tiny_model_config(root)
    checkpoint = tiny_checkpoint(root / "tiny.pt")
    tiny_archive(store, checkpoint, config, "1.0", "skin_lesion")  # served at start (load_models)
    tiny_archive(store, checkpoint, config, "1.1")  # same weights: passes the golden gate
    # Replica r1's first ports include one another process holds (as a port picked free a moment
    # earlier can be): it fails to bind and is started again on new ports before HAProxy routes to it.
    allocated = []
    allocate = clusters.Replica.allocate
    with held_port() as taken, pytest.MonkeyPatch.context() as patch:

        def r1_first_pick_taken(directory: Path, index: int) -> clusters.Replica:
            replica = allocate(directory, index)
            allocated.append(replica.name)
            if allocated.count("r1") == 1 and replica.name == "r1":
                replica = dataclasses.replace(replica, inference_port=taken)
            return replica

        patch.setattr(clusters.Replica, "allocate", staticmethod(r1_first_pick_taken))
        cluster = clusters.up(root / "cluster", REPLICAS, store, SERVER_CONFIG, f"127.0.0.1:{free_port()}", timeout=500)
    try:
        images = sorted(samples_dir.glob("*.jpg"))[:GOLDEN_COUNT]
        yield SimpleNamespace(root=root, store=store, config=config, cluster=cluster, images=images,
                              image=images[0].read_bytes(), allocated=allocated, held_port=taken)
    finally:
        stopped = clusters.down(cluster.directory)
        print(f"\ncluster down: stopped {stopped}")


def test_cluster_json_and_balancer_authentication(env):
    cluster = env.cluster
    description = json.loads((cluster.directory / "cluster.json").read_text())
    assert set(description) == {"url", "token", "replicas"}
    assert description["url"] == cluster.url and Path(description["token"]) == cluster.token_file
    assert oct(cluster.token_file.stat().st_mode & 0o777) == "0o600"
    assert [r["name"] for r in description["replicas"]] == [f"r{i}" for i in range(REPLICAS)]
    # r1 found a port of its first pick taken and came up on its second; the balancer sends to that one.
    assert sorted(env.allocated) == sorted([f"r{i}" for i in range(REPLICAS)] + ["r1"])
    r1 = description["replicas"][1]["inference"].removeprefix("http://")
    assert r1 != f"127.0.0.1:{env.held_port}"
    assert f"server r1 {r1}\n" in (cluster.directory / "haproxy" / "haproxy.cfg").read_text()
    for replica in description["replicas"]:
        assert set(replica) == {"name", "pid", "inference", "management"}
        assert replica["inference"].startswith("http://127.0.0.1:") and replica["management"].startswith("http://127.0.0.1:")
        # The pid is the TorchServe frontend (Java), not the Python launcher.
        assert Path(f"/proc/{replica['pid']}/exe").resolve().name.startswith("java")
    url = f"{cluster.url}/predictions/skin_lesion"
    jpeg = {"Content-Type": "image/jpeg"}
    assert requests.post(url, data=env.image, headers=jpeg, timeout=60).status_code == 401
    wrong = requests.post(url, data=env.image, headers={**jpeg, "Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    good = requests.post(url, data=env.image, headers={**jpeg, **cluster.headers()}, timeout=60)
    assert good.status_code == 200 and good.json()["model_version"] == "1.0"
    # Only the inference API goes through the balancer; management stays on the replicas' loopback ports.
    assert requests.get(f"{cluster.url}/models", headers=cluster.headers(), timeout=10).status_code == 404
    assert requests.get(f"{cluster.url}/ping", headers=cluster.headers(), timeout=10).status_code == 200


def test_balancer_passes_the_kserve_protocols_and_answers_v2_health_and_metadata(env):
    cluster = env.cluster
    image = base64.b64encode(env.image).decode()
    v2 = requests.post(f"{cluster.url}/v2/models/skin_lesion/infer", headers=cluster.headers(), timeout=60,
                       json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]})
    assert v2.status_code == 200 and v2.json()["outputs"][0]["shape"] == [1, 7], v2.text[:300]
    v1 = requests.post(f"{cluster.url}/v1/models/skin_lesion:predict", headers=cluster.headers(), timeout=60,
                       json={"instances": [{"image": {"b64": image}}, image]})
    assert v1.status_code == 200 and len(v1.json()["predictions"]) == 2, v1.text[:300]
    # TorchServe has no v2 health or metadata routes: the balancer answers them, behind the same token.
    assert requests.get(f"{cluster.url}/v2/models/skin_lesion", headers=cluster.headers(),
                        timeout=10).json() == model_metadata("skin_lesion")
    assert requests.get(f"{cluster.url}/v2/health/live", headers=cluster.headers(), timeout=10).json() == {"live": True}
    assert requests.get(f"{cluster.url}/v2/health/ready", timeout=10).status_code == 401
    assert requests.get(f"{cluster.url}/v2/repository/index", headers=cluster.headers(), timeout=10).status_code == 404
    names = [f"r{i}" for i in range(REPLICAS)]
    for path in ("/v2/health/ready", "/v2/models/skin_lesion/ready"):
        assert requests.get(f"{cluster.url}{path}", headers=cluster.headers(), timeout=10).json() == {"ready": True}
    try:
        for name in names:  # no replica in rotation: not ready
            cluster.set_state(name, "maint")
        not_ready = requests.get(f"{cluster.url}/v2/health/ready", headers=cluster.headers(), timeout=10)
        assert not_ready.status_code == 503 and not_ready.json() == {"ready": False}
    finally:
        for name in names:
            cluster.set_state(name, "ready")


def _watch(cluster: clusters.Cluster, name: str, until: threading.Event, samples: list) -> None:
    while not until.is_set():
        row = cluster.stats()[name]
        samples.append((time.monotonic(), row["status"], int(row["lbtot"]), int(row["wretr"]), int(row["wredis"])))
        time.sleep(0.05)


def jpeg_near(image: Image.Image, target: int) -> bytes:
    """``image`` as a JPEG whose size is as close to ``target`` bytes as its quality allows."""
    best, low, high = b"", 5, 100
    while low <= high:
        quality = (low + high) // 2
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality, subsampling=0)
        data = buffer.getvalue()
        if not best or abs(len(data) - target) < abs(len(best) - target):
            best = data
        low, high = (quality + 1, high) if len(data) < target else (low, quality - 1)
    return best


# Request sizes of the failover test: a 600x450 JPEG, a mid-size photo, a full-resolution
# dermatoscope photo (the balancer's former 256 KiB buffer retried only the first).
SIZES = ((600, 450, 50_000), (1600, 1200, 400_000), (4000, 3000, 4_000_000))
KILLS = ("r1", "r2", "r1")


def mixed_payloads(samples_dir: Path, images: int = 2) -> list[bytes]:
    """50 KB, 400 KB and 4 MB JPEGs made from real 600x450 samples (upscaled, quality chosen for the size)."""
    payloads = []
    for path in sorted(samples_dir.glob("*.jpg"))[:images]:
        picture = Image.open(path).convert("RGB")
        payloads += [jpeg_near(picture.resize((width, height), Image.BICUBIC), target) for width, height, target in SIZES]
    return payloads


def _kill_when_busy_and_wait_back(cluster: clusters.Cluster, load: Load, name: str) -> dict:
    """SIGKILL replica ``name``'s frontend while the balancer has a request in flight on it, then wait until
    the supervisor has it READY and back in rotation, and it has answered requests again."""
    victim = cluster.replica(name)
    old_pid = victim.frontend_pid()
    samples: list = []
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(cluster, name, done, samples))
    watcher.start()
    # The kill follows the very stats read that saw a request in flight: reading them a second
    # time (as this did before) let that request finish in between and recorded 0 in flight.
    busy_deadline = time.monotonic() + 60
    in_flight = 0
    while time.monotonic() < busy_deadline:
        in_flight = int(cluster.stats()[name]["scur"])
        if in_flight:
            break
        time.sleep(0.005)
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    sent_at_kill = len(load.results)
    # The supervisor restarts it; wait (bounded) until the balancer has it UP again.
    deadline = killed_at + 900
    while time.monotonic() < deadline:
        if samples and samples[-1][0] > killed_at + 1 and samples[-1][1] == "UP" and victim.is_alive():
            break
        time.sleep(0.2)
    back_seen = time.monotonic()
    # Keep the load on until the restarted replica has answered some requests itself.
    lbtot_back = int(cluster.stats()[name]["lbtot"])
    while time.monotonic() < back_seen + 60 and int(cluster.stats()[name]["lbtot"]) < lbtot_back + 5:
        time.sleep(0.2)
    load_was_running = load.running()
    done.set()
    watcher.join()
    out = [sample for sample in samples if not sample[1].startswith("UP")]
    assert out, f"the balancer never took {name} out of rotation: {samples[-3:]}"
    first_out, last_out = out[0], out[-1]
    back = next(sample for sample in samples if sample[0] > last_out[0] and sample[1].startswith("UP"))
    final = cluster.stats()[name]
    print(f"\nkill {name} with {in_flight} request(s) in flight on it: {sent_at_kill} requests before the kill; "
          f"out of rotation {first_out[0] - killed_at:.2f} s after kill -9 (status {first_out[1]}), back after "
          f"{back[0] - killed_at:.1f} s; HAProxy retries {final['wretr']}, redispatches {final['wredis']}")
    assert load_was_running, "the load ended (request cap) before the replica was back: nothing was tested after it"
    assert first_out[0] - killed_at < 5.0
    # While it was out, the balancer chose it for nothing: its lbtot did not move.
    assert {sample[2] for sample in out} == {first_out[2]}, sorted({sample[2] for sample in out})
    assert int(final["lbtot"]) > back[2], "the restarted replica got no traffic after it came back"
    # A new frontend, recorded in cluster.json, with its model READY before it was put back.
    assert victim.frontend_pid() != old_pid and clusters.pid_alive(victim.frontend_pid())
    description = json.loads((cluster.directory / "cluster.json").read_text())
    assert {r["name"]: r["pid"] for r in description["replicas"]}[name] == victim.frontend_pid()
    return {"in_flight": in_flight}


@pytest.mark.timeout(2700)
def test_killing_replicas_under_mixed_size_load_loses_no_request(env, samples_dir):
    cluster = env.cluster
    payloads = mixed_payloads(samples_dir)
    sizes = sorted({len(body) for body in payloads})
    haproxy_pid = cluster.layout["haproxy_pid"]
    # Three clients, back to back: several requests of every size are on the wire at any moment.
    with Load(cluster, payloads, clients=3, pause=0.05, max_requests=6000, max_seconds=2400) as load:
        load.wait_for(3 * len(payloads))
        kills = [_kill_when_busy_and_wait_back(cluster, load, name) for name in KILLS]
    failed = load.failed()
    by_size: dict[str, list[int]] = {}
    for _, status, _, size in load.results:
        label = "4MB" if size > 2_000_000 else "400KB" if size > 200_000 else "50KB"
        by_size.setdefault(label, [0, 0])[0] += 1
        by_size[label][1] += status != 200
    with open(f"/proc/{haproxy_pid}/status") as handle:
        peak = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024
    print(f"\nfailover under mixed sizes {[f'{size / 1e3:.0f} KB' for size in sizes]}: {len(load.results)} requests, "
          f"{len(failed)} failed, by size (sent, failed) {by_size}; in flight on the victim at each kill "
          f"{[k['in_flight'] for k in kills]}; HAProxy peak RSS {peak:.0f} MiB")
    assert min(sizes) < 80_000 and any(300_000 < size < 600_000 for size in sizes) and max(sizes) > 3_000_000, sizes
    assert not failed, failed[:5]
    assert all(k["in_flight"] >= 1 for k in kills)
    assert all(count[0] >= 10 for count in by_size.values()), by_size
    # Memory stays bounded: buffers are what the requests in flight hold (3 clients here).
    assert peak < 512, f"HAProxy peak RSS {peak:.0f} MiB"
    log = (cluster.directory / "supervisor.log").read_text()
    assert all(f"{name} is down" in log and f"{name} READY again" in log for name in set(KILLS))


def test_replicas_refuse_requests_without_their_token_and_secrets_are_private(env):
    cluster = env.cluster
    jpeg = {"Content-Type": "image/jpeg"}
    for replica in cluster.replicas:
        # Not even a process on this host reaches a replica without its key file.
        refused = requests.post(f"{replica.inference}/predictions/skin_lesion", data=env.image, headers=jpeg, timeout=60)
        assert ops_client.is_token_refusal(refused), (refused.status_code, refused.text[:200])
        assert ops_client.is_token_refusal(requests.get(f"{replica.management}/models", timeout=10))
        assert ops_client.is_token_refusal(requests.get(f"{replica.inference}/ping", timeout=10))
        own = requests.post(f"{replica.inference}/predictions/skin_lesion", data=env.image,
                            headers={**jpeg, **replica.server.headers("inference")}, timeout=60)
        assert own.status_code == 200
        assert oct(replica.run_dir.stat().st_mode & 0o777) == "0o700"
        assert oct((replica.run_dir / "key_file.json").stat().st_mode & 0o777) == "0o600"
    # HAProxy holds each replica's current token, and only its user can read any of it.
    tokens = dict(line.split(" ", 1) for line in cluster.token_map.read_text().splitlines())
    assert tokens == {r.name: r.server.token("inference") for r in cluster.replicas}
    folder = cluster.directory / "haproxy"
    for path, mode in [(cluster.directory, "0o700"), (folder, "0o700"), (cluster.token_file, "0o600"),
                       (folder / "authorization.acl", "0o600"), (cluster.token_map, "0o600"),
                       (folder / "haproxy.cfg", "0o600"), (cluster.directory / "layout.json", "0o600")]:
        assert oct(path.stat().st_mode & 0o777) == mode, path
    # The token file is created with its mode (O_EXCL): an existing one readable by others is refused.
    directory = env.root / "cluster-with-an-open-token"
    directory.mkdir(mode=0o700)
    (directory / clusters.TOKEN).write_text("leaked\n")
    (directory / clusters.TOKEN).chmod(0o644)
    with pytest.raises(clusters.ClusterError, match="readable by other users"):
        clusters.up(directory, 1, env.store, SERVER_CONFIG, f"127.0.0.1:{free_port()}", timeout=5)


def _golden(env) -> Path:
    """Golden cases for the tiny model: what version 1.0 answers on real images (the gate then passes 1.0's weights)."""
    cases = []
    for path in env.images:
        response = requests.post(f"{env.cluster.url}/predictions/skin_lesion", data=path.read_bytes(),
                                 headers={**env.cluster.headers(), "Content-Type": "image/jpeg"}, timeout=60)
        cases.append({"image": path.name, "expected": response.json()["prediction"]})
    golden = env.root / "golden.json"
    golden.write_text(json.dumps({"images": env.images[0].parent.name, "min_matches": len(cases), "cases": cases}))
    return golden


@pytest.mark.timeout(2400)
def test_rolling_rollout_under_load_and_failing_versions_change_nothing(env, monkeypatch, capsys):
    cluster = env.cluster
    golden = _golden(env)
    expected = {case["expected"] for case in json.loads(golden.read_text())["cases"]}
    forced = next(code for code in CLASS_CODES if code not in expected)
    tiny_archive(env.store, forced_checkpoint(env.root / "forced.pt", forced), env.config, "6.6")

    def rollout(version):
        argv = ["rollout", "--cluster-dir", str(cluster.directory), "--version", version, "--golden", str(golden),
                "--golden-images", str(DATA), "--timeout", "600"]
        return cluster_script.main(cluster_script.get_args_parser().parse_args(argv))

    # About 2 requests/s: each replica loads the new version while the load goes on.
    with Load(cluster, env.image, clients=2, pause=0.6, max_requests=1500, max_seconds=1800) as load:
        load.wait_for(10)
        started = time.monotonic()
        assert rollout("1.1") == 0, capsys.readouterr().err
        good_seconds = time.monotonic() - started
        assert set(clusters.default_versions(cluster).values()) == {"1.1"}
        sent_good = len(load.results)

        # A version that fails the smoke gate stops at the first replica: nothing changes.
        assert rollout("6.6") == 1
        err = capsys.readouterr().err
        assert "stopped at r0" in err and "smoke test failed" in err, err
        assert set(clusters.default_versions(cluster).values()) == {"1.1"}
        for replica in cluster.replicas:
            assert rollouts.Management(replica.server).describe("6.6") is None

        # A failure half-way (r1 fails its gate): r0, already switched, is rolled back.
        real_smoke_test = rollouts.smoke_test

        def failing_on_r1(server, version, golden_file, images_root):
            if server.run_dir.name == "r1":
                raise rollouts.RolloutError("smoke test failed: injected on r1")
            return real_smoke_test(server, version, golden_file, images_root)

        monkeypatch.setattr(rollouts, "smoke_test", failing_on_r1)
        with pytest.raises(clusters.ClusterError, match=r"stopped at r1.*Rolled \['r0'\] back to 1\.1"):
            clusters.rolling_rollout(cluster, "1.0", golden, DATA, timeout=600)
        monkeypatch.setattr(rollouts, "smoke_test", real_smoke_test)
        assert set(clusters.default_versions(cluster).values()) == {"1.1"}
        time.sleep(1)
    served = [r[2] for r in load.results if r[1] == 200]
    print(f"\nrolling rollout: {sent_good} requests during the good roll ({good_seconds:.0f} s), "
          f"{len(load.results)} in all, {len(load.failed())} failed; versions answered {sorted(set(served))}")
    assert not load.failed(), load.failed()[:5]
    assert served[0] == "1.0" and served[-1] == "1.1" and set(served) == {"1.0", "1.1"}
    # Every replica is back in rotation at the balancer.
    assert all(row["status"] == "UP" for row in cluster.stats().values())


def test_haproxy_config_retries_elsewhere_and_checks_ping(env):
    text = (env.cluster.directory / "haproxy" / "haproxy.cfg").read_text()
    for line in ("option redispatch 1", "retry-on conn-failure empty-response junk-response response-timeout 502 503 504",
                 "http-check send meth GET uri /ping", "option http-buffer-request"):
        assert line in text
    # The balancer checks each replica through its token-adding proxy, which forwards to the replica.
    assert len(re.findall(r"^\s+server r\d+ unix@\S+\.sock check$", text, re.M)) == REPLICAS
    assert len(re.findall(r"^\s+server r\d+ 127\.0\.0\.1:\d+$", text, re.M)) == REPLICAS
    # The buffer holds the largest request TorchServe accepts, so that every request can be retried.
    bufsize = int(re.search(r"^\s+tune\.bufsize (\d+)$", text, re.M).group(1))
    assert bufsize > clusters.max_request_bytes(SERVER_CONFIG) >= 16 * 2**20
    check = subprocess.run(["haproxy", "-c", "-f", str(env.cluster.directory / "haproxy" / "haproxy.cfg")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                    reason="Debian package 'prometheus' not installed (.ci/run installs it)")
def test_prometheus_scrapes_every_replica_and_the_dashboard_adds_them_up(env, tmp_path):
    cluster = env.cluster
    config = clusters.write_prometheus_config(cluster, scrape_interval="1s")
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with Load(cluster, env.image, clients=2, pause=0.05, max_requests=60) as load:
        load.wait_for(60)
    assert not load.failed()
    port = free_port()
    prometheus = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path}",
                                   f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def query(expr):
        body = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    try:
        deadline = time.monotonic() + 90
        up, per_replica = [], []
        while time.monotonic() < deadline:
            try:
                up = query('up{job="torchserve"}')
                per_replica = query("sum by (replica) (ts_inference_requests_total)")
                if len(up) == REPLICAS and len(per_replica) == REPLICAS:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert sorted(r["metric"]["replica"] for r in up) == [f"r{i}" for i in range(REPLICAS)]
        assert all(r["value"][1] == "1" for r in up)
        counts = {r["metric"]["replica"]: float(r["value"][1]) for r in per_replica}
        assert sum(1 for value in counts.values() if value > 0) >= 2, counts  # the balancer spread the load
        total = float(query("sum(ts_inference_requests_total)")[0]["value"][1])
        assert total == pytest.approx(sum(counts.values()))
        # The dashboard's queries aggregate without grouping by instance or replica: they add replicas up.
        dashboard = json.loads((ROOT / "config" / "prometheus" / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
        for expr in exprs:
            assert "instance" not in expr and "replica" not in expr, expr
            assert re.match(r"^\s*(sum|histogram_quantile)\b", expr), expr
            query(expr)  # valid against the cluster's series
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
