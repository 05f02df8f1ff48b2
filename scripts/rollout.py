"""Release, roll out, roll back and inspect model versions through TorchServe's management API.

``rollout`` registers the new version next to the running one, waits for its worker, smoke-tests
it on ``/predictions/skin_lesion/<version>`` against golden images, and only then makes it the
default; the previous version stays loaded so that ``rollback`` is instant. Any failure leaves
the previous default serving, unregisters the candidate, and exits non-zero.

Example:
    make release VERSION=1.1 && make rollout VERSION=1.1
    make rollback
    make status
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import package, serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = serve.MODEL_NAME
STATE_FILE = "rollout_state.json"


class RolloutError(RuntimeError):
    """A rollout step failed; the previous default keeps serving."""


def archive_name(version: str) -> str:
    """File name (without .mar) of a released version."""
    return f"{MODEL}_v{version}"


class Management:
    """The management API of one running server, with its token."""

    def __init__(self, server: serve.Server) -> None:
        self.server = server
        self.url = server.url("management")

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.url}{path}", headers=self.server.headers("management"), timeout=60, **kwargs)

    def versions(self) -> list[dict[str, Any]]:
        """Descriptions of every registered version of the model."""
        response = self._call("GET", f"/models/{MODEL}/all")
        response.raise_for_status()
        return response.json()

    def default_version(self) -> str:
        """The version that unversioned requests go to."""
        response = self._call("GET", f"/models/{MODEL}")
        response.raise_for_status()
        return response.json()[0]["modelVersion"]

    def describe(self, version: str) -> dict[str, Any] | None:
        """One version's description, or None if it is not registered."""
        response = self._call("GET", f"/models/{MODEL}/{version}")
        return response.json()[0] if response.ok else None

    def register(self, archive: str) -> None:
        """Register an archive from the model store, without waiting for its workers."""
        # The archive's model-config.yaml minWorkers/maxWorkers take precedence over initial_workers
        # (TorchServe's registration); 1 only applies to an archive without them.
        response = self._call("POST", "/models", params={"url": archive, "model_name": MODEL, "initial_workers": 1,
                                                          "synchronous": "false"})
        if not response.ok:
            raise RolloutError(f"registering {archive} failed: HTTP {response.status_code} {response.text.strip()}")

    def unregister(self, version: str) -> None:
        """Remove a version (never the default)."""
        self._call("DELETE", f"/models/{MODEL}/{version}")

    def set_default(self, version: str) -> None:
        """Route unversioned requests to ``version``."""
        response = self._call("PUT", f"/models/{MODEL}/{version}/set-default")
        if not response.ok:
            raise RolloutError(f"set-default {version} failed: HTTP {response.status_code} {response.text.strip()}")


def wait_for_worker(management: Management, version: str, timeout: float) -> None:
    """Wait until ``version`` has a READY worker; a load failure in the model log ends the wait early."""
    deadline = time.monotonic() + timeout
    log = management.server.run_dir / "logs" / "model_log.log"
    log_start = log.stat().st_size if log.exists() else 0
    while time.monotonic() < deadline:
        description = management.describe(version)
        if description and any(w.get("status") == "READY" for w in description.get("workers", [])):
            return
        if log.exists():
            with open(log, errors="replace") as handle:
                handle.seek(log_start)
                # Only this version's workers: with several workers and versions, the log interleaves them.
                own_lines = [line for line in handle.read().splitlines() if f"{MODEL}_{version}-" in line]
            if any("Traceback" in line for line in own_lines):
                tail = "\n".join(own_lines[-12:])
                raise RolloutError(f"version {version} failed to load:\n{tail}")
        time.sleep(0.5)
    raise RolloutError(f"version {version} has no READY worker after {timeout:.0f} s")


def smoke_test(server: serve.Server, version: str, golden_file: Path, images_root: Path) -> str:
    """Send the golden images to ``/predictions/skin_lesion/<version>`` and compare classes.

    Returns:
        A one-line summary.

    Raises:
        RolloutError: On a malformed response, a wrong version, or too few matches.
    """
    golden = json.loads(golden_file.read_text())
    folder = images_root / golden["images"]
    if not folder.is_dir():
        raise RolloutError(f"golden images folder {folder} not found; pass --golden-images")
    url = f"{server.url('inference')}/predictions/{MODEL}/{version}"
    matches, misses = 0, []
    for case in golden["cases"]:
        response = requests.post(url, data=(folder / case["image"]).read_bytes(), headers=server.headers("inference"), timeout=60)
        if response.status_code != 200:
            raise RolloutError(f"smoke test: {case['image']} -> HTTP {response.status_code} {response.text[:200]}")
        body = response.json()
        if body.get("model_version") != version or abs(sum(body["probabilities"].values()) - 1) > 1e-3:
            raise RolloutError(f"smoke test: malformed response from version {version}: {body}")
        if body["prediction"] == case["expected"]:
            matches += 1
        else:
            misses.append(f"{case['image']}: {body['prediction']} (expected {case['expected']})")
    summary = f"{matches}/{len(golden['cases'])} golden images correct (need {golden['min_matches']})"
    if matches < golden["min_matches"]:
        raise RolloutError(f"smoke test failed: {summary}; misses: {misses}")
    return summary


def read_state(server: serve.Server) -> dict[str, Any]:
    """The rollout history kept in the run folder."""
    path = server.run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(server: serve.Server, state: dict[str, Any]) -> None:
    """Persist the rollout history."""
    (server.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2))


def rollout(server: serve.Server, version: str, golden_file: Path, images_root: Path, timeout: float) -> str:
    """Register, wait, smoke-test, then switch the default; the old default stays loaded.

    Returns:
        The previous default version.
    """
    management = Management(server)
    previous = management.default_version()
    if version == previous:
        raise RolloutError(f"version {version} is already the default")
    if management.describe(version) is None:
        print(f"registering {archive_name(version)}.mar next to {previous}")
        management.register(f"{archive_name(version)}.mar")
    try:
        wait_for_worker(management, version, timeout)
        print(f"version {version} READY; smoke test: {smoke_test(server, version, golden_file, images_root)}")
        management.set_default(version)
    except (RolloutError, requests.RequestException) as error:
        if management.default_version() != version:
            management.unregister(version)
        raise RolloutError(f"rollout of {version} aborted, {previous} is still the default: {error}") from error
    write_state(server, {"default": version, "previous": previous, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return previous


def rollback(server: serve.Server) -> str:
    """Make the previous default the default again (it was kept loaded).

    Returns:
        The restored version.
    """
    state = read_state(server)
    previous = state.get("previous")
    if not previous:
        raise RolloutError("no previous version recorded; nothing to roll back to")
    management = Management(server)
    current = management.default_version()
    description = management.describe(previous)
    if description is None or not any(w.get("status") == "READY" for w in description.get("workers", [])):
        raise RolloutError(f"previous version {previous} is not loaded with a READY worker")
    management.set_default(previous)
    write_state(server, {"default": previous, "previous": current, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return previous


def status(server: serve.Server) -> dict[str, Any]:
    """Versions, default, workers and health."""
    management = Management(server)
    ping = requests.get(f"{server.url('inference')}/ping", headers=server.headers("inference"), timeout=10)
    return {
        "health": ping.json().get("status"),
        "default": management.default_version(),
        "versions": {d["modelVersion"]: [w["status"] for w in d["workers"]] for d in management.versions()},
        "rollout": read_state(server),
    }


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("release", "rollout", "rollback", "status"))
    parser.add_argument("--version", help="model version, e.g. 1.1")
    parser.add_argument("--run-dir", default=str(ROOT / "run"))
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "skin_lesion.pt"), help="checkpoint to release")
    parser.add_argument("--model-store", default=str(ROOT / "model_store"))
    parser.add_argument("--golden", default=str(ROOT / "models" / "golden_smoke.json"))
    parser.add_argument("--golden-images", default=str(ROOT.parent / "shared" / "data"), help="folder holding the golden images' folder")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the new version's worker")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run one action; returns the exit code."""
    if args.action in ("release", "rollout") and not args.version:
        print(f"error: {args.action} needs --version (make {args.action} VERSION=x.y)", file=sys.stderr)
        return 2
    if args.action == "release":
        package.main(package.get_args_parser().parse_args(
            ["--checkpoint", args.checkpoint, "--version", args.version, "--archive-name", archive_name(args.version),
             "--export-path", args.model_store]))
        return 0
    server = serve.Server(Path(args.run_dir).resolve())
    if not server.is_running():
        print(f"error: no TorchServe running from {server.run_dir}; run `make serve` first", file=sys.stderr)
        return 1
    try:
        if args.action == "rollout":
            previous = rollout(server, args.version, Path(args.golden), Path(args.golden_images), args.timeout)
            print(f"rolled out {args.version}: it is the default now; {previous} stays loaded for `make rollback`")
        elif args.action == "rollback":
            print(f"rolled back: {rollback(server)} is the default again")
        else:
            print(json.dumps(status(server), indent=2))
    except RolloutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
