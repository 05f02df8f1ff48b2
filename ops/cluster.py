"""A replicated cluster on this machine: N TorchServe replicas on loopback ports behind HAProxy.

``make cluster-up REPLICAS=3`` (:func:`up`) starts the replicas (each a plain
:func:`ops.rollout.start_serving` in its own run folder, so a restarted replica comes back with
its rolled-out default), then HAProxy (Debian package ``haproxy``) in front of them, then a
supervisor process that restarts a replica whose TorchServe died. ``make cluster-down``
(:func:`down`) stops all of it by the pids recorded in the cluster folder.

Authentication: the balancer checks one bearer token for the whole cluster (the ``token`` file,
created mode 0600) and removes it before forwarding. The replicas keep TorchServe's token
authorization on and listen on 127.0.0.1 only; TorchServe generates each replica's keys itself
at every start, so HAProxy forwards through a small proxy per replica (a unix socket in the
0700 ``haproxy`` folder) that adds that replica's inference token, read from a map file
(``replica_tokens.map``, 0600) that :func:`sync_tokens` keeps current through the stats socket
after every (re)start and renewal. Nobody without a replica's key file (or HAProxy's copy) can
call a replica, management API included.

Failover at every size: HAProxy's buffer holds the largest request TorchServe accepts, so every
request is retried whole on another replica when its replica dies under it (the template says
how memory stays bounded).

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

import calendar
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

from handler.open_inference import model_metadata
from ops import client as ops_client
from ops import rollout as rollouts
from ops.loadgen import ServedTarget, closed_loop
from ops.paths import DATA, GOLDEN_SMOKE, MODEL_NAME, MODEL_STORE, ROOT, RUN_DIR, SERVER_CONFIG
from ops.private import create_private, private_dir, write_private
from ops.torchserve import PortTaken, Server, free_port, read_properties, retry_on_taken_port, stop

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
TOKEN_MAP = "replica_tokens.map"
# The largest request TorchServe accepts (config.properties max_request_size) and what HAProxy
# needs to hold it whole with its headers, so that it can be retried on another replica.
HEADER_ROOM = 256 * 1024
# Client requests in flight at the balancer; each holds at most ~3 buffers there and 2 in the
# per-replica tier (memory = this x buffer size x 5 at worst).
MAX_CLIENT_CONNECTIONS = 16
# Replicas' tokens live this long (minutes); the supervisor renews one a day before it expires.
REPLICA_TOKEN_MINUTES = 43200
RENEW_BEFORE_SECONDS = 86400


class ClusterError(RuntimeError):
    """The cluster could not be started, changed or stopped as asked."""


def _write_json(path: Path, value: Any) -> None:
    """Write atomically (readers never see half a file), mode 0600 from creation."""
    write_private(path, json.dumps(value, indent=2) + "\n")


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
                # Token authorization stays on (the base config's default); HAProxy adds this
                # replica's inference token, and the supervisor renews it before it expires.
                "token_expiration_min": str(REPLICA_TOKEN_MINUTES)}

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
        return cls(name, directory / "replicas" / name, *(free_port() for _ in range(5)))


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
    def token_map(self) -> Path:
        return self.directory / "haproxy" / TOKEN_MAP

    def replica_socket(self, name: str) -> Path:
        """The unix socket of the proxy that adds replica ``name``'s token."""
        return self.directory / "haproxy" / f"{name}.sock"

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
    private_dir(directory)
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


def max_request_bytes(config: Path) -> int:
    """TorchServe's ``max_request_size`` in the replicas' config (its default, 6.5 MB, without one)."""
    return int(read_properties(config).get("max_request_size", 6553500))


def render_haproxy_config(cluster: Cluster, replicas: list[Replica]) -> str:
    """``deploy/haproxy/haproxy.cfg.template`` filled in for these replicas."""
    servers = "\n".join(f"    server {r.name} unix@{cluster.replica_socket(r.name)} check" for r in replicas)
    proxies = "\n".join(
        f"listen replica_{r.name}\n"
        f"    # Replica {r.name}: adds its own TorchServe inference token. No retry here (retries 0):\n"
        f"    # a dead replica answers 503 at once and the balancer retries on another one.\n"
        f"    bind unix@{cluster.replica_socket(r.name)} mode 600\n"
        f"    maxconn {MAX_CLIENT_CONNECTIONS}\n"
        f"    retries 0\n"
        f"    http-request set-header Authorization \"Bearer %[str({r.name}),map({cluster.token_map})]\"\n"
        f"    server {r.name} 127.0.0.1:{r.inference_port}\n" for r in replicas)
    max_body = max_request_bytes(cluster.config)
    bufsize = max_body + HEADER_ROOM
    return string.Template(HAPROXY_TEMPLATE.read_text()).substitute(
        stats_socket=cluster.stats_socket, bind=cluster.layout["bind"],
        authorization_acl=cluster.directory / "haproxy" / "authorization.acl", servers=servers,
        v2_metadata=json.dumps(model_metadata(MODEL_NAME), separators=(",", ":")),
        replica_proxies=proxies, bufsize=bufsize, max_body=max_body, maxconn=MAX_CLIENT_CONNECTIONS,
        global_maxconn=2 * MAX_CLIENT_CONNECTIONS + 4 * len(replicas) + 8,
        worst_case_mib=round(5 * MAX_CLIENT_CONNECTIONS * bufsize / 2**20))


def replica_tokens(replicas: list[Replica]) -> dict[str, str]:
    """Each replica's current inference token, from its key file."""
    tokens = {}
    for replica in replicas:
        token = replica.server.token("inference")
        if token is None:
            raise ClusterError(f"replica {replica.name} has no key file ({replica.run_dir / 'key_file.json'}): "
                               "its token authorization must be on")
        tokens[replica.name] = token
    return tokens


def write_token_map(cluster: Cluster, tokens: dict[str, str]) -> None:
    """HAProxy's map of replica name to inference token (0600 from creation)."""
    write_private(cluster.token_map, "".join(f"{name} {token}\n" for name, token in sorted(tokens.items())))


def sync_tokens(cluster: Cluster, replicas: list[Replica] | None = None) -> list[str]:
    """Give HAProxy the replicas' current inference tokens (after a restart or a renewal); returns who changed."""
    replicas = replicas if replicas is not None else cluster.replicas
    current = dict(line.split(" ", 1) for line in cluster.token_map.read_text().splitlines() if " " in line)
    fresh = replica_tokens(replicas)
    changed = [name for name, token in fresh.items() if current.get(name) != token]
    if changed:
        write_token_map(cluster, {**current, **fresh})
        for name in changed:
            answer = cluster.haproxy_command(f"set map {cluster.token_map} {name} {fresh[name]}").strip()
            if answer:
                raise ClusterError(f"HAProxy refused the new token of {name}: {answer}")
    return changed


def renew_expiring_tokens(cluster: Cluster, now: float | None = None) -> list[str]:
    """Renew a replica's inference token a day before it expires (TorchServe never renews it itself).

    A renewal replaces the token at once: requests HAProxy forwards between the renewal and
    :func:`sync_tokens` (a few milliseconds, once a month) are refused with 400 by that replica.
    """
    now = time.time() if now is None else now
    renewed = []
    for replica in cluster.replicas:
        keys = replica.server.keys() or {}
        expires = (keys.get("inference") or {}).get("expiration time")
        if not expires:
            continue
        stamp = calendar.timegm(time.strptime(expires.split(".")[0].rstrip("Z"), "%Y-%m-%dT%H:%M:%S"))
        if stamp - now < RENEW_BEFORE_SECONDS:
            ops_client.renew_token(replica.server, "inference", keys["inference"]["key"])
            renewed.append(replica.name)
    if renewed:
        sync_tokens(cluster)
    return renewed


def write_prometheus_config(cluster: Cluster, scrape_interval: str = "15s") -> Path:
    """A Prometheus config with one ``torchserve`` job over every replica, each labelled ``replica``.

    The targets are a file_sd file next to it, rewritten when replicas change; the alert rules
    are the project's (``config/prometheus/alerts.yml``), which aggregate over replicas like
    the Grafana dashboard does.
    """
    folder = private_dir(cluster.directory / "prometheus")
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
    folder = private_dir(cluster.directory / "haproxy")
    write_private(folder / "authorization.acl", f"Bearer {cluster.token()}\n")
    write_token_map(cluster, replica_tokens(replicas))
    config = write_private(folder / "haproxy.cfg", render_haproxy_config(cluster, replicas))
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
    private_dir(directory)
    with cluster_lock(directory):
        if (directory / LAYOUT).exists() and running_pids(cluster):
            raise ClusterError(f"a cluster is already running from {directory}; `make cluster-down` first")
        store = (model_store or MODEL_STORE).resolve()
        members = [Replica.allocate(directory, index) for index in range(replicas)]
        _write_json(directory / LAYOUT, {"bind": bind, "model_store": str(store), "config": str(config.resolve()),
                                         "replicas": [r.to_json() for r in members], "haproxy_pid": None,
                                         "supervisor_pid": None})
        if not cluster.token_file.exists():
            create_private(cluster.token_file, secrets.token_urlsafe(32) + "\n")
        elif cluster.token_file.stat().st_mode & 0o077:
            raise ClusterError(f"{cluster.token_file} is readable by other users: replace it (delete it and "
                               "`make cluster-up` makes a new one)")
        try:
            errors: list[BaseException] = []

            def start_one(index: int) -> None:
                def start_once() -> None:
                    try:
                        start_replica(members[index], store, config, timeout)
                    except PortTaken:
                        # Nothing routes to the replica yet (HAProxy starts below, from `members`): the
                        # retry starts it on newly picked ports.
                        members[index] = Replica.allocate(directory, index)
                        raise

                try:
                    retry_on_taken_port(start_once)
                except BaseException as error:  # noqa: BLE001 - reported below, with the replica's name
                    errors.append(ClusterError(f"replica {members[index].name} failed to start: {error}"))

            threads = [threading.Thread(target=start_one, args=(index,), daemon=True) for index in range(replicas)]
            for thread in threads:
                thread.start()
            # Joined with a timeout so that Ctrl-C reaches this thread (and stops what started).
            while alive := [thread for thread in threads if thread.is_alive()]:
                alive[0].join(0.5)
            if errors:
                raise errors[0]
            cluster.update_layout(replicas=[r.to_json() for r in members])
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
    # Its new TorchServe generated new keys: HAProxy gets the new token before any traffic.
    sync_tokens(cluster, [replica])
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
        try:
            renew_expiring_tokens(cluster)
            sync_tokens(cluster, [replica for replica in cluster.replicas if replica.is_alive()])
        except (ClusterError, OSError, requests.RequestException, ValueError) as error:
            log(cluster, f"token check failed: {error}")
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


def bench(cluster: Cluster, images: Path, requests_: int, concurrency: int) -> dict[str, Any]:
    """Closed-loop throughput through the balancer (after a short warm-up), with ``concurrency`` clients.

    Raises:
        ClusterError: No JPEG images in ``images``.
    """
    payloads = [path.read_bytes() for path in sorted(images.glob("*.jpg"))[:20]]
    if not payloads:
        raise ClusterError(f"no JPEG images in {images}")
    target = ServedTarget(f"{cluster.url}/predictions/{MODEL_NAME}", {**cluster.headers(), "Content-Type": "image/jpeg"})
    closed_loop(target, payloads, concurrency, 2 * concurrency, 60)
    return {"replicas": len(cluster.replicas), **closed_loop(target, payloads, concurrency, requests_, 600)}
