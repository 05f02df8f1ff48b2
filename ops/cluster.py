"""A replicated cluster on this machine: N TorchServe replicas on loopback ports behind HAProxy.

``make cluster-up REPLICAS=3`` (:func:`up`) starts the replicas (each a plain
:func:`ops.rollout.start_serving` in its own run folder, so a restarted replica comes back with
its rolled-out default), then HAProxy (Debian package ``haproxy``) in front of them, then a
supervisor process that restarts a replica whose TorchServe died. ``make cluster-down``
(:func:`down`) stops all of it by the pids recorded in the cluster folder.

Authentication: the balancer checks one bearer token for the whole cluster (the ``token`` file,
mode 0600) and removes it before forwarding. The replicas run with TorchServe's token
authorization disabled and listen on 127.0.0.1 only: TorchServe generates its keys itself at
every start (they cannot be set, shared or predicted) and HAProxy cannot attach a per-replica
header after it has picked, or re-picked on a retry, the replica. SECURITY.md says what that
leaves open on a shared host.

Health: HAProxy checks ``/ping`` on every replica and takes one out at the first failed
connection or after two failed checks, and retries a failed request on another replica
(predictions are idempotent). Because TorchServe's ``/ping`` answers "Healthy" while a new
worker is still loading, the supervisor also holds a replica it restarts in maintenance
(stats socket ``set server ... state maint``) until its model has a READY worker.

Rolling rollout (:func:`rolling_rollout`, ``make cluster-rollout VERSION=x``): replica by
replica, drain it at the balancer, run :func:`ops.rollout.rollout` on it (the same register,
READY, golden smoke test and set-default as ``make rollout``), put it back. A failure stops the
roll: the failing replica keeps its default (``ops.rollout`` aborts cleanly) and the replicas
already switched are rolled back with :func:`ops.rollout.rollback`, so every replica serves the
old version again.

Files in the cluster folder (default ``run/cluster``):

* ``cluster.json``: ``{"url", "token", "replicas": [{"name", "pid", "inference", "management"}]}``
  (``pid``: the replica's TorchServe frontend, the Java process), for clients and operators.
* ``layout.json``: what this module needs to restart and stop things (ports, run folders, pids
  of HAProxy and the supervisor).
* ``token``, ``haproxy/`` (config, ACL file, stats socket, log), ``replicas/<name>/`` (TorchServe
  run folders), ``prometheus/`` (a scrape config with one job and a ``replica`` label per
  replica), ``supervisor.log``.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import requests

from ops import rollout as rollouts
from ops.paths import DATA, GOLDEN_SMOKE, MODEL_STORE, ROOT, RUN_DIR, SERVER_CONFIG
from ops.torchserve import Server, stop

CLUSTER_DIR = RUN_DIR / "cluster"
HAPROXY_TEMPLATE = ROOT / "deploy" / "haproxy" / "haproxy.cfg.template"
ALERT_RULES = ROOT / "config" / "prometheus" / "alerts.yml"
BACKEND = "replicas"
LAYOUT = "layout.json"
DESCRIPTION = "cluster.json"
TOKEN = "token"
LOCK = "cluster.lock"
# TorchServe's launcher writes the Java frontend's pid here (ts/model_server.py, under TMPDIR,
# which ops.torchserve.start points at the run folder's tmp/).
FRONTEND_PID = Path("tmp") / ".model_server.pid"


class ClusterError(RuntimeError):
    """The cluster could not be started, changed or stopped as asked."""


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    """Write atomically (readers never see half a file)."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(value, indent=2) + "\n")
    os.chmod(staging, mode)
    staging.replace(path)


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process (a zombie is not), reaping it if it is our child."""
    if not pid:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


# ---------------------------------------------------------------------------------------------
# Replicas


@dataclass(frozen=True)
class Replica:
    """One TorchServe replica: its name, run folder and fixed loopback ports."""

    name: str
    run_dir: Path
    inference_port: int
    management_port: int
    metrics_port: int
    grpc_inference_port: int
    grpc_management_port: int

    @property
    def server(self) -> Server:
        return Server(self.run_dir)

    @property
    def inference(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def overrides(self) -> dict[str, str]:
        """The config.properties keys this replica is started with."""
        return {"inference_address": self.inference, "management_address": self.management,
                "metrics_address": self.metrics, "grpc_inference_port": str(self.grpc_inference_port),
                "grpc_management_port": str(self.grpc_management_port),
                # Loopback only; the balancer checks the cluster token (module docstring).
                "disable_token_authorization": "true"}

    def frontend_pid(self) -> int | None:
        """The pid of the replica's TorchServe frontend (Java), or None before it has one."""
        path = self.run_dir / FRONTEND_PID
        try:
            return int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def is_alive(self) -> bool:
        """Whether both the launcher and the frontend of the replica are running."""
        return pid_alive(self.server.launcher_pid) and pid_alive(self.frontend_pid())

    def stop(self) -> bool:
        """Stop the replica's whole process group (launcher, frontend, workers), even if its launcher is gone."""
        pgid = self.server.launcher_pid
        stopped = stop(self.server)
        if pgid:
            # ops.torchserve.stop leaves a group alone once its launcher has exited (a frontend
            # killed under it, say); its workers may still be there.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
                stopped = True
        return stopped

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "run_dir": str(self.run_dir), "inference_port": self.inference_port,
                "management_port": self.management_port, "metrics_port": self.metrics_port,
                "grpc_inference_port": self.grpc_inference_port, "grpc_management_port": self.grpc_management_port}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Replica:
        return cls(**{**value, "run_dir": Path(value["run_dir"])})

    @classmethod
    def allocate(cls, directory: Path, index: int) -> Replica:
        """A new replica ``r<index>`` with free loopback ports."""
        name = f"r{index}"
        return cls(name, directory / "replicas" / name, *(free_loopback_port() for _ in range(5)))


def start_replica(replica: Replica, model_store: Path, config: Path, timeout: float) -> rollouts.Started:
    """Start one replica and wait until its default version has a READY worker."""
    replica.run_dir.mkdir(parents=True, exist_ok=True)
    return rollouts.start_serving(replica.run_dir, model_store, config, replica.overrides(), timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The cluster folder


@dataclass
class Cluster:
    """A cluster described by its folder (see the module docstring for the files in it)."""

    directory: Path

    @property
    def layout(self) -> dict[str, Any]:
        path = self.directory / LAYOUT
        if not path.exists():
            raise ClusterError(f"no cluster in {self.directory} (no {LAYOUT}); start one with `make cluster-up`")
        return json.loads(path.read_text())

    @property
    def replicas(self) -> list[Replica]:
        return [Replica.from_json(value) for value in self.layout["replicas"]]

    def replica(self, name: str) -> Replica:
        for replica in self.replicas:
            if replica.name == name:
                return replica
        raise ClusterError(f"no replica {name!r} in {self.directory}")

    @property
    def url(self) -> str:
        """Base URL of the balancer's inference API."""
        return f"http://{self.layout['bind']}"

    @property
    def token_file(self) -> Path:
        return self.directory / TOKEN

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def headers(self) -> dict[str, str]:
        """The Authorization header clients send to the balancer."""
        return {"Authorization": f"Bearer {self.token()}"}

    @property
    def stats_socket(self) -> Path:
        return self.directory / "haproxy" / "haproxy.sock"

    @property
    def model_store(self) -> Path:
        return Path(self.layout["model_store"])

    @property
    def config(self) -> Path:
        return Path(self.layout["config"])

    def describe(self) -> dict[str, Any]:
        """The public description written to ``cluster.json``."""
        return {"url": self.url, "token": str(self.token_file),
                "replicas": [{"name": r.name, "pid": r.frontend_pid(), "inference": r.inference,
                              "management": r.management} for r in self.replicas]}

    def write_description(self) -> dict[str, Any]:
        description = self.describe()
        _write_json(self.directory / DESCRIPTION, description)
        return description

    def update_layout(self, **changes: Any) -> None:
        _write_json(self.directory / LAYOUT, {**self.layout, **changes})

    # HAProxy's runtime API --------------------------------------------------------------------

    def haproxy_command(self, command: str, timeout: float = 5.0) -> str:
        """One command on HAProxy's stats socket; returns its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.stats_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's ``show stat`` CSV for the replicas' servers, by replica name.

        Fields used here and in the tests: ``status`` (UP, DOWN, MAINT, DRAIN, "UP 1/2"...),
        ``lbtot`` (times the balancer chose the server), ``stot`` (sessions), ``scur`` (current
        sessions), ``wretr`` / ``wredis`` (retries / redispatches), ``chkfail``, ``downtime``.
        """
        text = self.haproxy_command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows if row.get("pxname") == BACKEND
                and row.get("svname") not in ("BACKEND", "FRONTEND")}

    def set_state(self, name: str, state: str) -> None:
        """``ready``, ``drain`` or ``maint`` for one replica at the balancer."""
        if state not in ("ready", "drain", "maint"):
            raise ValueError(f"unknown server state {state!r}")
        answer = self.haproxy_command(f"set server {BACKEND}/{name} state {state}").strip()
        if answer:
            raise ClusterError(f"HAProxy refused `set server {BACKEND}/{name} state {state}`: {answer}")

    def wait_idle(self, name: str, timeout: float) -> bool:
        """Wait until the balancer has no request in flight on ``name``; returns whether it got there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if int(self.stats()[name].get("scur") or 0) == 0:
                return True
            time.sleep(0.1)
        return False


@contextlib.contextmanager
def cluster_lock(directory: Path) -> Iterator[None]:
    """Held by ``up``, ``down`` and rolling rollouts: one of them at a time on a cluster folder."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterError(f"another cluster command is running on {directory}") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# HAProxy and Prometheus configuration


def haproxy_binary() -> str:
    """The ``haproxy`` executable.

    Raises:
        ClusterError: If it is not installed.
    """
    path = shutil.which("haproxy")
    if path is None:
        raise ClusterError("haproxy is not installed: apt-get install -y --no-install-recommends haproxy")
    return path


def render_haproxy_config(cluster: Cluster, replicas: list[Replica]) -> str:
    """``deploy/haproxy/haproxy.cfg.template`` filled in for these replicas."""
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.inference_port} check" for r in replicas)
    return string.Template(HAPROXY_TEMPLATE.read_text()).substitute(
        stats_socket=cluster.stats_socket, bind=cluster.layout["bind"],
        authorization_acl=cluster.directory / "haproxy" / "authorization.acl", servers=servers)


def write_prometheus_config(cluster: Cluster, scrape_interval: str = "15s") -> Path:
    """A Prometheus config with one ``torchserve`` job over every replica, each labelled ``replica``.

    The targets are a file_sd file next to it, rewritten when replicas change; the alert rules
    are the project's (``config/prometheus/alerts.yml``), which aggregate over replicas like
    the Grafana dashboard does.
    """
    folder = cluster.directory / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    targets = [{"targets": [f"127.0.0.1:{r.metrics_port}"], "labels": {"replica": r.name}} for r in cluster.replicas]
    _write_json(folder / "targets.json", targets)
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(ALERT_RULES)],
        "scrape_configs": [{"job_name": "torchserve", "metrics_path": "/metrics",
                            "file_sd_configs": [{"files": [str(folder / "targets.json")], "refresh_interval": "30s"}]}],
    }
    path = folder / "prometheus.yml"
    path.write_text("# Written by ops/cluster.py: one job, one target per replica, labelled `replica`.\n"
                    + json.dumps(config, indent=2) + "\n")
    return path


def start_haproxy(cluster: Cluster, replicas: list[Replica]) -> int:
    """Write HAProxy's config and ACL file, check them, start HAProxy; returns its pid."""
    folder = cluster.directory / "haproxy"
    folder.mkdir(parents=True, exist_ok=True)
    acl = folder / "authorization.acl"
    acl.write_text(f"Bearer {cluster.token()}\n")
    os.chmod(acl, 0o600)
    config = folder / "haproxy.cfg"
    config.write_text(render_haproxy_config(cluster, replicas))
    os.chmod(config, 0o600)
    binary = haproxy_binary()
    check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ClusterError(f"HAProxy refuses {config}:\n{check.stdout}{check.stderr}")
    cluster.stats_socket.unlink(missing_ok=True)
    with open(folder / "haproxy.log", "ab") as log:
        process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ClusterError(f"HAProxy exited with {process.returncode}:\n{(folder / 'haproxy.log').read_text()[-2000:]}")
        try:
            if all(row["status"].startswith("UP") for row in cluster.stats().values()):
                return process.pid
        except (OSError, KeyError):
            pass
        time.sleep(0.2)
    raise ClusterError("HAProxy did not report every replica UP within 15 s")


# ---------------------------------------------------------------------------------------------
# Up, down, supervise


def up(directory: Path = CLUSTER_DIR, replicas: int = 3, model_store: Path | None = None,
       config: Path = SERVER_CONFIG, bind: str = "127.0.0.1:8090", timeout: float = 600.0,
       supervise_interval: float = 0.5) -> Cluster:
    """Start ``replicas`` TorchServe replicas, HAProxy in front of them and the supervisor.

    Args:
        directory: The cluster folder.
        replicas: How many replicas.
        model_store: Folder of ``.mar`` files (default: the project's ``model_store``).
        config: Base config.properties of the replicas.
        bind: The balancer's address (loopback).
        timeout: Seconds to wait for each replica's model.
        supervise_interval: Seconds between the supervisor's checks.

    Raises:
        ClusterError: A cluster is already running there, or something failed to start
            (whatever did start is stopped again).
    """
    if replicas < 1:
        raise ClusterError("a cluster needs at least one replica")
    if not bind.startswith("127."):
        raise ClusterError(f"the balancer listens on loopback only, not {bind}")
    directory = directory.resolve()
    cluster = Cluster(directory)
    with cluster_lock(directory):
        if (directory / LAYOUT).exists() and running_pids(cluster):
            raise ClusterError(f"a cluster is already running from {directory}; `make cluster-down` first")
        store = (model_store or MODEL_STORE).resolve()
        members = [Replica.allocate(directory, index) for index in range(replicas)]
        _write_json(directory / LAYOUT, {"bind": bind, "model_store": str(store), "config": str(config.resolve()),
                                         "replicas": [r.to_json() for r in members], "haproxy_pid": None,
                                         "supervisor_pid": None})
        if not cluster.token_file.exists():
            cluster.token_file.write_text(secrets.token_urlsafe(32) + "\n")
        os.chmod(cluster.token_file, 0o600)
        try:
            errors: list[BaseException] = []

            def start_one(replica: Replica) -> None:
                try:
                    start_replica(replica, store, config, timeout)
                except BaseException as error:  # noqa: BLE001 - reported below, with the replica's name
                    errors.append(ClusterError(f"replica {replica.name} failed to start: {error}"))

            threads = [threading.Thread(target=start_one, args=(r,), daemon=True) for r in members]
            for thread in threads:
                thread.start()
            # Joined with a timeout so that Ctrl-C reaches this thread (and stops what started).
            while alive := [thread for thread in threads if thread.is_alive()]:
                alive[0].join(0.5)
            if errors:
                raise errors[0]
            cluster.update_layout(haproxy_pid=start_haproxy(cluster, members))
            cluster.update_layout(supervisor_pid=start_supervisor(cluster, supervise_interval))
            write_prometheus_config(cluster)
            cluster.write_description()
        except BaseException:
            _stop_all(cluster)
            raise
    return cluster


def start_supervisor(cluster: Cluster, interval: float) -> int:
    """Start ``python -m ops.cluster supervise`` detached; returns its pid."""
    with open(cluster.directory / "supervisor.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "ops.cluster", "supervise", str(cluster.directory),
                                    "--interval", str(interval)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
    return process.pid


def running_pids(cluster: Cluster) -> dict[str, int]:
    """The cluster's processes that are alive: HAProxy, the supervisor and each replica's launcher."""
    layout = cluster.layout
    pids = {"haproxy": layout.get("haproxy_pid"), "supervisor": layout.get("supervisor_pid")}
    pids |= {replica.name: replica.server.launcher_pid for replica in cluster.replicas}
    return {name: pid for name, pid in pids.items() if pid_alive(pid)}


def _terminate(pid: int | None, timeout: float = 10.0) -> bool:
    if not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def _stop_all(cluster: Cluster) -> list[str]:
    """Stop the supervisor first (so it restarts nothing), then HAProxy, then every replica."""
    stopped = []
    layout = cluster.layout
    if _terminate(layout.get("supervisor_pid")):
        stopped.append("supervisor")
    if _terminate(layout.get("haproxy_pid")):
        stopped.append("haproxy")
    for replica in cluster.replicas:
        # A frontend whose launcher is gone would outlive the group: stop it by its own pid first.
        frontend = replica.frontend_pid()
        if not pid_alive(replica.server.launcher_pid) and _terminate(frontend):
            stopped.append(f"{replica.name} frontend")
        if replica.stop():
            stopped.append(replica.name)
    cluster.update_layout(haproxy_pid=None, supervisor_pid=None)
    (cluster.directory / DESCRIPTION).unlink(missing_ok=True)
    return stopped


def down(directory: Path = CLUSTER_DIR) -> list[str]:
    """Stop everything :func:`up` started, by pid; returns what was stopped."""
    cluster = Cluster(directory.resolve())
    if not (cluster.directory / LAYOUT).exists():
        return []
    with cluster_lock(cluster.directory):
        return _stop_all(cluster)


def log(cluster: Cluster, message: str) -> None:
    """One timestamped line on the supervisor's output (``supervisor.log``)."""
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}", flush=True)


def restart_replica(cluster: Cluster, replica: Replica, timeout: float) -> None:
    """Take a dead replica out at the balancer, start it again, and put it back once READY."""
    started = time.monotonic()
    cluster.set_state(replica.name, "maint")
    log(cluster, f"{replica.name} is down (frontend pid {replica.frontend_pid()}): held in maintenance, restarting")
    replica.stop()
    start_replica(replica, cluster.model_store, cluster.config, timeout)
    cluster.write_description()
    cluster.set_state(replica.name, "ready")
    log(cluster, f"{replica.name} READY again after {time.monotonic() - started:.1f} s "
                 f"(frontend pid {replica.frontend_pid()}): back in rotation")


def supervise(directory: Path, interval: float = 0.5, timeout: float = 600.0) -> None:
    """Restart replicas whose TorchServe died, until SIGTERM (``make cluster-down``)."""
    cluster = Cluster(directory.resolve())
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    log(cluster, f"supervising {[r.name for r in cluster.replicas]} every {interval} s")
    failures: dict[str, int] = {}
    while not stopping.is_set():
        for replica in cluster.replicas:
            if stopping.is_set() or replica.is_alive():
                continue
            try:
                restart_replica(cluster, replica, timeout)
                failures.pop(replica.name, None)
            except Exception as error:  # noqa: BLE001 - a failed restart is logged and tried again
                failures[replica.name] = failures.get(replica.name, 0) + 1
                log(cluster, f"restarting {replica.name} failed ({failures[replica.name]}x): {error}")
                stopping.wait(min(60.0, 2.0 ** failures[replica.name]))
        stopping.wait(interval)
    log(cluster, "supervisor stopped")


# ---------------------------------------------------------------------------------------------
# Rolling rollout


def default_versions(cluster: Cluster) -> dict[str, str | None]:
    """Each replica's default version as its management API reports it (None if unreadable)."""
    return {r.name: rollouts.Management(r.server).current_default() for r in cluster.replicas}


def rolling_rollout(cluster: Cluster, version: str, golden_file: Path = GOLDEN_SMOKE, images_root: Path | None = None,
                    timeout: float = 300.0, drain_timeout: float = 60.0) -> dict[str, Any]:
    """Roll ``version`` out replica by replica with ``make rollout``'s smoke gate.

    For each replica: drain it at the balancer (no new requests; those in flight finish), run
    :func:`ops.rollout.rollout` on it, put it back in rotation. If any replica fails, the roll
    stops there and the replicas already switched are rolled back, so every replica keeps (or
    gets back) the version it served before.

    Returns:
        ``{"version", "previous", "replicas": [names], "seconds"}``.

    Raises:
        ClusterError: The replicas do not agree on a default, or the rollout failed (the
            message says where and what was rolled back).
    """
    images_root = images_root or DATA
    started = time.monotonic()
    with cluster_lock(cluster.directory):
        before = default_versions(cluster)
        if len(set(before.values())) != 1 or None in before.values():
            raise ClusterError(f"replicas disagree on the default version ({before}); fix that before a rolling rollout")
        previous = next(iter(before.values()))
        if previous == version:
            raise ClusterError(f"version {version} is already the default on every replica")
        switched: list[Replica] = []
        for replica in cluster.replicas:
            cluster.set_state(replica.name, "drain")
            try:
                cluster.wait_idle(replica.name, drain_timeout)
                rollouts.rollout(replica.server, version, golden_file, images_root, timeout, cluster.model_store)
                switched.append(replica)
            except (rollouts.RolloutError, requests.RequestException) as error:
                undone = _roll_back(switched)
                raise ClusterError(f"rolling rollout of {version} stopped at {replica.name}: {error}. "
                                   + (f"Rolled {undone} back to {previous}; " if undone else "")
                                   + f"every replica serves {previous}") from error
            finally:
                cluster.set_state(replica.name, "ready")
        return {"version": version, "previous": previous, "replicas": [r.name for r in switched],
                "seconds": round(time.monotonic() - started, 1)}


def _roll_back(switched: list[Replica]) -> list[str]:
    """Give the replicas already switched their previous default back (reverse order)."""
    undone = []
    for replica in reversed(switched):
        try:
            rollouts.rollback(replica.server)
            undone.append(replica.name)
        except (rollouts.RolloutError, requests.RequestException) as error:
            raise ClusterError(f"rolling back {replica.name} failed ({error}); replicas are on mixed versions: "
                               "check `python scripts/cluster.py status`") from error
    return undone


def status(cluster: Cluster) -> dict[str, Any]:
    """Per replica: balancer state, pid, default version and the versions loaded."""
    stats = cluster.stats()
    replicas = {}
    for replica in cluster.replicas:
        management = rollouts.Management(replica.server)
        try:
            versions = {d["modelVersion"]: [w["status"] for w in d["workers"]] for d in management.versions()}
        except (requests.RequestException, ValueError):
            versions = None
        replicas[replica.name] = {"balancer": stats.get(replica.name, {}).get("status"), "pid": replica.frontend_pid(),
                                  "default": management.current_default(), "versions": versions}
    return {"url": cluster.url, "replicas": replicas}


if __name__ == "__main__":
    # `python -m ops.cluster supervise DIR [--interval S]`: the supervisor process `up` starts.
    import argparse

    parser = argparse.ArgumentParser(description="cluster supervisor (started by `make cluster-up`)")
    parser.add_argument("action", choices=("supervise",))
    parser.add_argument("directory")
    parser.add_argument("--interval", type=float, default=0.5)
    arguments = parser.parse_args()
    supervise(Path(arguments.directory), arguments.interval)
    sys.exit(0)
