"""Start, wait for, query and stop a TorchServe instance that this project owns.

Each instance lives in its own run folder: TorchServe's pid file (``TMPDIR``), its
token key file (working directory), logs and the launcher's pid all stay there, so
several instances (for example tests on free ports) never step on each other, and
each is stopped by its own pid.

Example:
    python scripts/serve.py start --run-dir run     # waits until the model is READY
    python scripts/serve.py stop --run-dir run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "skin_lesion"
LAUNCHER_PID = "launcher.pid"
# Lines in TorchServe's console output after which it will never become ready.
FATAL_STARTUP_MARKERS = ("Address already in use", 'Exception in thread "main"', "Failed to load model")
ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}


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

    def token(self, api: str) -> str | None:
        """The bearer token of ``inference`` or ``management``, or None without token authorization."""
        key_file = self.run_dir / "key_file.json"
        if not key_file.exists():
            return None
        return json.loads(key_file.read_text())[api]["key"]

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

    def log_tail(self, lines: int = 40) -> str:
        """The end of the model log and the console log, for error messages."""
        parts = []
        for name in ("logs/model_log.log", "logs/console.log"):
            path = self.run_dir / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
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
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "tmp").mkdir(exist_ok=True)
    (run_dir / "key_file.json").unlink(missing_ok=True)
    store = model_store.resolve()
    properties = {"model_store": str(store), "allowed_urls": f"file://{literal_pattern(str(store))}/[^/]+[.]mar",
                  "metrics_config": str(ROOT / "config" / "metrics.yaml"), **(overrides or {})}
    (run_dir / "config.properties").write_text(render_properties(config, properties))
    env = {**os.environ, "TMPDIR": str(run_dir / "tmp"), "TEMP": str(run_dir / "tmp"),
           "LOG_LOCATION": str(run_dir / "logs"), "METRICS_LOCATION": str(run_dir / "logs")}
    command = [sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs",
               "--ts-config", str(run_dir / "config.properties"), "--model-store", str(model_store.resolve())]
    if models:
        command += ["--models", models]
    with open(run_dir / "logs" / "console.log", "ab") as console:
        process = subprocess.Popen(command, cwd=run_dir, env=env, stdout=console, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    (run_dir / LAUNCHER_PID).write_text(str(process.pid))
    return server


def wait_ready(server: Server, model: str = MODEL_NAME, timeout: float = 180.0) -> dict:
    """Wait until ``model`` has a READY worker.

    Returns:
        The management API's description of the model.

    Raises:
        RuntimeError: If the server exits or the model fails to load, with the log tail.
        TimeoutError: If the model is not ready in time.
    """
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if not server.is_running():
            raise RuntimeError(f"TorchServe exited during startup\n{server.log_tail()}")
        model_log = server.run_dir / "logs" / "model_log.log"
        if model_log.exists() and "Traceback" in model_log.read_text(errors="replace"):
            raise RuntimeError(f"model {model} failed to load\n{server.log_tail()}")
        console = (server.run_dir / "logs" / "console.log").read_text(errors="replace")
        fatal = [marker for marker in FATAL_STARTUP_MARKERS if marker in console]
        if fatal:
            raise RuntimeError(f"TorchServe failed to start ({fatal[0]})\n{server.log_tail()}")
        try:
            response = requests.get(f"{server.url('management')}/models/{model}", headers=server.headers("management"), timeout=5)
            if response.ok:
                description = response.json()[0]
                if any(w.get("status") == "READY" for w in description.get("workers", [])):
                    return description
                last_error = f"workers {[w.get('status') for w in description.get('workers', [])]}"
            else:
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
        except (requests.ConnectionError, requests.Timeout, FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
            last_error = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"model {model} not READY after {timeout:.0f} s ({last_error})\n{server.log_tail()}")


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


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Run the skin-lesion TorchServe deployment")
    parser.add_argument("action", choices=("start", "stop", "predict"))
    parser.add_argument("--run-dir", default=str(ROOT / "run"), help="instance folder (config, keys, logs, pids)")
    parser.add_argument("--model-store", default=str(ROOT / "model_store"))
    parser.add_argument("--config", default=str(ROOT / "config" / "config.properties"))
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--image", help="image to send with 'predict'")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run one action; returns the process exit code."""
    server = Server(Path(args.run_dir).resolve())
    if args.action == "start":
        start(server.run_dir, Path(args.model_store), Path(args.config))
        try:
            description = wait_ready(server, timeout=args.timeout)
        except (RuntimeError, TimeoutError) as exc:
            stop(server)
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"TorchServe is up (pid {server.launcher_pid}), model {MODEL_NAME} version {description.get('modelVersion')} READY")
        print(f"logs: {server.run_dir / 'logs'}; inference token in {server.run_dir / 'key_file.json'}")
        print("try:\n  make predict IMAGE=../shared/data/samples-600x450/ISIC_0024354.jpg\nor:\n"
              f"  curl -H \"Authorization: Bearer $(python -c \"import json;print(json.load(open('{server.run_dir}/key_file.json'))['inference']['key'])\")\" "
              f"-T IMAGE.jpg {server.url('inference')}/predictions/{MODEL_NAME}")
        return 0
    if args.action == "stop":
        print("stopped" if stop(server) else "no server running")
        return 0
    if not server.is_running():
        print(f"no server running from {server.run_dir}", file=sys.stderr)
        return 1
    if not args.image:
        print("predict needs --image", file=sys.stderr)
        return 2
    with open(args.image, "rb") as handle:
        response = requests.post(f"{server.url('inference')}/predictions/{MODEL_NAME}", data=handle.read(),
                                 headers=server.headers("inference"), timeout=60)
    print(json.dumps(response.json(), indent=2))
    return 0 if response.ok else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
