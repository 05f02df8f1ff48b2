"""Start, wait for, query and stop a TorchServe instance that this project owns.

Each instance lives in its own run folder: TorchServe's pid file (``TMPDIR``), its
token key file (working directory), logs and the launcher's pid all stay there, so
several instances (for example tests on free ports) never step on each other, and
each is stopped by its own pid.

A run folder outlives the instances started from it (``make serve`` after ``make stop``), and
TorchServe appends to the same ``logs/model_log.log`` and ``logs/console.log``: each start
records where those files ended (``log_offsets.json``), and :func:`wait_ready` and
:meth:`Server.log_tail` read only what the current start wrote, so a Traceback logged by an
earlier bad request or an earlier failed start never fails a later start.

The command line is ``scripts/serve.py`` (``make serve``, ``make stop``, ``make predict``); a start
that restores the rolled-out default version is :func:`ops.rollout.start_serving`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import requests

from ops.client import ServiceClient
from ops.paths import METRICS_CONFIG, MODEL_NAME
from ops.private import private_dir

LAUNCHER_PID = "launcher.pid"
KEY_FILE = "key_file.json"
# Where each log ended when the current instance was started (byte offsets).
LOG_OFFSETS = "log_offsets.json"
LOG_FILES = ("logs/model_log.log", "logs/console.log")
# Lines in TorchServe's console output after which it will never become ready.
PORT_TAKEN_MARKER = "Address already in use"
FATAL_STARTUP_MARKERS = (PORT_TAKEN_MARKER, 'Exception in thread "main"', "Failed to load model")
ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}


# Starts on newly picked ports before a taken port is an error (see PortTaken).
PORT_ATTEMPTS = 3
T = TypeVar("T")


class PortTaken(RuntimeError):
    """TorchServe could not bind a port: another process holds it.

    A port from :func:`free_port` is only free when it is picked; another process (or another
    server's outgoing connection) can take it before TorchServe binds it. TorchServe then loads
    its model, fails to bind and exits. Starting again on newly picked ports is the remedy.
    """


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the one helper for every server this project starts on a free port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_addresses() -> dict[str, str]:
    """``config.properties`` overrides that put every API and gRPC port of one instance on a free loopback port."""
    addresses = {key: f"http://127.0.0.1:{free_port()}" for key in ADDRESS_KEYS.values()}
    return addresses | {"grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}


@dataclass
class Server:
    """A TorchServe instance described by its run folder."""

    run_dir: Path

    @property
    def properties(self) -> dict[str, str]:
        """The config.properties the instance was started with."""
        return read_properties(self.run_dir / "config.properties")

    def url(self, api: str) -> str:
        """Base URL of ``inference``, ``management`` or ``metrics``."""
        return self.properties[ADDRESS_KEYS[api]].rstrip("/")

    def keys(self) -> dict[str, Any] | None:
        """The key file TorchServe wrote (``inference``, ``management`` and ``API`` keys), or None without one.

        TorchServe rewrites the file in place when a token is renewed; a read that meets it
        half-written is retried.
        """
        key_file = self.run_dir / KEY_FILE
        for attempt in range(20):
            if not key_file.exists():
                return None
            try:
                return json.loads(key_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                if attempt == 19:
                    raise
                time.sleep(0.05)
        return None

    def token(self, api: str) -> str | None:
        """The bearer token of ``inference`` or ``management``, or None without token authorization."""
        keys = self.keys()
        return None if keys is None else keys[api]["key"]

    def api_key(self) -> str | None:
        """The key of TorchServe's token API (it never expires; it renews the other two), or None."""
        keys = self.keys()
        return None if keys is None else (keys.get("API") or {}).get("key")

    def headers(self, api: str) -> dict[str, str]:
        """Authorization headers for ``api``."""
        token = self.token(api)
        return {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def launcher_pid(self) -> int | None:
        """Pid of the ``torchserve --foreground`` launcher, the leader of the server's process group."""
        path = self.run_dir / LAUNCHER_PID
        return int(path.read_text()) if path.exists() else None

    def is_running(self) -> bool:
        """Whether the launcher process is alive."""
        pid = self.launcher_pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_since_start(self, name: str) -> str:
        """What the current instance wrote to ``name`` (one of :data:`LOG_FILES`), or "" if nothing."""
        path = self.run_dir / name
        if not path.exists():
            return ""
        offsets_file = self.run_dir / LOG_OFFSETS
        offset = json.loads(offsets_file.read_text()).get(name, 0) if offsets_file.exists() else 0
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            # A log rotated (or truncated) since the start is read from its beginning.
            handle.seek(offset if offset <= handle.tell() else 0)
            return handle.read().decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        """The end of what the current instance wrote to the model log and the console log, for error messages."""
        parts = []
        for name in LOG_FILES:
            text = self.log_since_start(name)
            if text:
                parts.append(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)


def read_properties(path: Path) -> dict[str, str]:
    """Parse a Java properties file (``key=value`` lines, ``#`` comments)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def render_properties(base: Path, overrides: dict[str, str]) -> str:
    """The base config.properties with some keys replaced or added."""
    lines, seen = [], set()
    for line in base.read_text().splitlines():
        match = re.match(r"\s*([^#=\s]+)\s*=", line)
        if match and match.group(1) in overrides:
            key = match.group(1)
            lines.append(f"{key}={overrides[key]}")
            seen.add(key)
        else:
            lines.append(line)
    lines += [f"{key}={value}" for key, value in overrides.items() if key not in seen]
    return "\n".join(lines) + "\n"


def literal_pattern(text: str) -> str:
    """A regex matching ``text`` literally, written without backslashes (which Java properties files eat)."""
    return "".join(char if char.isalnum() or char == "/" else f"[{char}]" for char in text)


def start(run_dir: Path, model_store: Path, config: Path, overrides: dict[str, str] | None = None,
          models: str | None = None) -> Server:
    """Launch TorchServe in its own process group, detached from the caller.

    Args:
        run_dir: Folder for this instance's config, keys, pid files and logs.
        model_store: Folder holding the ``.mar`` files.
        config: Base ``config.properties``.
        overrides: Properties to replace (ports, for example).
        models: ``--models`` argument; defaults to the config's ``load_models``.

    Returns:
        The started (not yet ready) server.
    """
    run_dir = run_dir.resolve()
    server = Server(run_dir)
    if server.is_running():
        raise RuntimeError(f"a server from {run_dir} is already running (pid {server.launcher_pid}); stop it first")
    # The run folder holds the key file and logs: 0700 from the start, and TorchServe itself runs
    # under a 0o077 umask, so key_file.json (which it writes, then narrows), its logs and its
    # extracted archives are never readable by other users, not even for a moment.
    for folder in (run_dir, run_dir / "logs", run_dir / "tmp"):
        private_dir(folder)
    (run_dir / KEY_FILE).unlink(missing_ok=True)
    # Whatever earlier instances logged is theirs: remember where this start begins.
    offsets = {name: (run_dir / name).stat().st_size if (run_dir / name).exists() else 0 for name in LOG_FILES}
    (run_dir / LOG_OFFSETS).write_text(json.dumps(offsets))
    store = model_store.resolve()
    properties = {"model_store": str(store), "allowed_urls": f"file://{literal_pattern(str(store))}/[^/]+[.]mar",
                  "metrics_config": str(METRICS_CONFIG), **(overrides or {})}
    (run_dir / "config.properties").write_text(render_properties(config, properties))
    env = {**os.environ, "TMPDIR": str(run_dir / "tmp"), "TEMP": str(run_dir / "tmp"),
           "LOG_LOCATION": str(run_dir / "logs"), "METRICS_LOCATION": str(run_dir / "logs")}
    command = [sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs",
               "--ts-config", str(run_dir / "config.properties"), "--model-store", str(model_store.resolve())]
    if models:
        command += ["--models", models]
    with open(run_dir / "logs" / "console.log", "ab") as console:
        process = subprocess.Popen(command, cwd=run_dir, env=env, stdout=console, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
    (run_dir / LAUNCHER_PID).write_text(str(process.pid))
    return server


def wait_ready(server: Server, model: str = MODEL_NAME, timeout: float = 180.0) -> dict:
    """Wait until ``model`` has a READY worker (at once for a server that already serves it).

    The logs only count while no worker is READY, and only what the current start wrote: a
    Traceback that an earlier bad request (or an earlier instance) logged is not a load failure.

    Returns:
        The management API's description of the model.

    Raises:
        PortTaken: If a port it was given was taken before it could bind it.
        RuntimeError: If the server exits or the model fails to load, with the log tail.
        TimeoutError: If the model is not ready in time.
    """
    client = ServiceClient(server, timeout=5)
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        running = server.is_running()
        # A taken port is read before the exit: the frontend exits a moment after logging it.
        if PORT_TAKEN_MARKER in server.log_since_start("logs/console.log"):
            raise PortTaken(f"TorchServe failed to start ({PORT_TAKEN_MARKER})\n{server.log_tail()}")
        if not running:
            raise RuntimeError(f"TorchServe exited during startup\n{server.log_tail()}")
        try:
            response = client.request("management", "GET", f"/models/{model}")
            if response.ok:
                description = response.json()[0]
                if any(w.get("status") == "READY" for w in description.get("workers", [])):
                    return description
                last_error = f"workers {[w.get('status') for w in description.get('workers', [])]}"
            else:
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
        except (requests.ConnectionError, requests.Timeout, FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
            last_error = repr(exc)
        # Not READY yet: has this start already failed?
        if "Traceback" in server.log_since_start("logs/model_log.log"):
            raise RuntimeError(f"model {model} failed to load\n{server.log_tail()}")
        console = server.log_since_start("logs/console.log")
        fatal = [marker for marker in FATAL_STARTUP_MARKERS if marker in console]
        if fatal:
            raise RuntimeError(f"TorchServe failed to start ({fatal[0]})\n{server.log_tail()}")
        time.sleep(0.5)
    raise TimeoutError(f"model {model} not READY after {timeout:.0f} s ({last_error})\n{server.log_tail()}")


def retry_on_taken_port(start_once: Callable[[], T]) -> T:
    """``start_once()``, called again while it raises :class:`PortTaken`, :data:`PORT_ATTEMPTS` calls in all.

    ``start_once`` picks its ports anew on each call and leaves nothing running when it raises.
    """
    for _ in range(PORT_ATTEMPTS - 1):
        try:
            return start_once()
        except PortTaken:
            pass
    return start_once()


def start_on_free_ports(run_dir: Path, model_store: Path, config: Path, overrides: dict[str, str] | None = None,
                        models: str | None = None, ready: Callable[[Server], dict] | None = None) -> tuple[Server, dict]:
    """:func:`start` on free loopback ports (:func:`loopback_addresses`), then wait until it is ready.

    A picked port can be taken before TorchServe binds it: then it starts again on newly picked
    ports (:func:`retry_on_taken_port`). Any failure stops it.

    Args:
        run_dir, model_store, config, models: As for :func:`start`.
        overrides: Properties to set besides the ports (they win over the picked ports).
        ready: Waits for the started server and returns the model's description; defaults to
            :func:`wait_ready`.

    Returns:
        The ready server and its model's description.
    """
    ready = ready or wait_ready

    def start_once() -> tuple[Server, dict]:
        server = start(run_dir, model_store, config, {**loopback_addresses(), **(overrides or {})}, models)
        try:
            return server, ready(server)
        except BaseException:
            stop(server)
            raise

    return retry_on_taken_port(start_once)


def stop(server: Server, timeout: float = 30.0) -> bool:
    """Stop the server's whole process group (launcher, Java frontend, Python workers).

    Returns:
        True if a running server was stopped.
    """
    pid = server.launcher_pid
    if pid is None or not server.is_running():
        (server.run_dir / LAUNCHER_PID).unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.2)
    if _group_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    (server.run_dir / LAUNCHER_PID).unlink(missing_ok=True)
    return True


def _group_alive(pgid: int) -> bool:
    # The launcher may be our own child: reap it so that a zombie does not count as alive.
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
