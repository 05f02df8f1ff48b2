"""Roll out, roll back and inspect model versions through TorchServe's management API.

:func:`rollout` registers the new version next to the running default, waits for its worker,
smoke-tests it on ``/predictions/skin_lesion/<version>`` against golden images, and only then
makes it the default. The previous default stays loaded so that :func:`rollback` is one API
call; versions older than those two are unregistered. Any failure leaves the previous default
serving, unregisters the candidate (if this rollout registered it) and raises
:class:`RolloutError`.

What the default is, and which archive each kept version came from, is recorded in the run
folder (``rollout_state.json``), so that :func:`start_serving` (``make serve``) brings a restarted
TorchServe back with the rolled-out default and its predecessor instead of the configured
``load_models``. A lock file in the run folder keeps two rollouts (or a rollout and a rollback)
from running at once. After ``set-default`` the default is read back from the management API:
a lost or failed reply neither reports a switch that did not happen nor hides one that did.

Crash safety: before asking for ``set-default``, a rollout or rollback records the switch it is
about to make as ``pending`` in the state file. A crash (or kill) between the switch and the
final state write leaves that record; the next rollout, rollback or status reconciles it with
what the server reports (:func:`reconcile`: the switch happened, so it is recorded, or it did
not, so the record is dropped), and a restart (:func:`start_serving`), which cannot ask the
server that died, drops it and serves the last confirmed default. Either way the recorded
``previous`` is one step behind what is served, so ``rollback`` never jumps two versions.
Archives are checked against the SHA-256 recorded when they were built (:mod:`ops.digests`)
before they are registered or served.

The command line is ``scripts/rollout.py`` (``make release``, ``make rollout``, ``make rollback``,
``make status``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import requests

from ops import digests
from ops.client import ServiceClient
from ops.paths import MODEL_NAME
from ops.torchserve import Server, read_properties, start, stop, wait_ready

STATE_FILE = "rollout_state.json"
LOCK_FILE = "rollout.lock"
# The archive `make archive` builds and config.properties' load_models serves before any rollout.
BASE_ARCHIVE = f"{MODEL_NAME}.mar"


class RolloutError(RuntimeError):
    """A rollout step failed; the previous default keeps serving."""


def archive_name(version: str) -> str:
    """File name (without .mar) of a released version."""
    return f"{MODEL_NAME}_v{version}"


def archive_version(archive: Path) -> str:
    """The model version written in an archive's manifest.

    Raises:
        RolloutError: If the archive is missing or is not a readable .mar.
    """
    if not archive.is_file():
        raise RolloutError(f"no archive {archive}; build it with `make release VERSION=...`")
    try:
        with zipfile.ZipFile(archive) as packed:
            manifest = json.loads(packed.read("MAR-INF/MANIFEST.json"))
        return str(manifest["model"]["modelVersion"])
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as error:
        raise RolloutError(f"{archive} is not a readable model archive: {error!r}") from error


def check_archive(archive: Path, version: str) -> None:
    """Fail fast unless ``archive`` exists and its manifest says ``version``.

    TorchServe registers an archive under the version in its manifest: a mismatch would load a
    version nobody waits for, and the rollout would only end at its timeout.
    """
    found = archive_version(archive)
    if found != version:
        raise RolloutError(f"{archive.name} holds version {found}, not {version}: it was built for another "
                           f"version; rebuild it with `make release VERSION={version}`")
    check_digest(archive)


def check_digest(archive: Path) -> None:
    """Refuse an archive that does not match the SHA-256 recorded when it was built (or has none)."""
    try:
        digests.verify(archive)
    except digests.DigestError as error:
        raise RolloutError(str(error)) from error


class Management:
    """The management API of one running server, with its (renewed) token."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.client = ServiceClient(server)

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.client.request("management", method, path, **kwargs)

    def versions(self) -> list[dict[str, Any]]:
        """Descriptions of every registered version of the model."""
        response = self._call("GET", f"/models/{MODEL_NAME}/all")
        response.raise_for_status()
        return response.json()

    def default_version(self) -> str:
        """The version that unversioned requests go to, as the server reports it now."""
        response = self._call("GET", f"/models/{MODEL_NAME}")
        response.raise_for_status()
        return response.json()[0]["modelVersion"]

    def describe(self, version: str) -> dict[str, Any] | None:
        """One version's description, or None if it is not registered."""
        response = self._call("GET", f"/models/{MODEL_NAME}/{version}")
        return response.json()[0] if response.ok else None

    def register(self, archive: str) -> None:
        """Register an archive from the model store, without waiting for its workers."""
        # The archive's model-config.yaml minWorkers/maxWorkers take precedence over initial_workers
        # (TorchServe's registration); 1 only applies to an archive without them.
        response = self._call("POST", "/models", params={"url": archive, "model_name": MODEL_NAME, "initial_workers": 1,
                                                          "synchronous": "false"})
        if not response.ok:
            raise RolloutError(f"registering {archive} failed: HTTP {response.status_code} {response.text.strip()}")

    def unregister(self, version: str) -> bool:
        """Remove a version (TorchServe refuses to remove the default); returns whether it was removed."""
        return self._call("DELETE", f"/models/{MODEL_NAME}/{version}").ok

    def set_default(self, version: str) -> None:
        """Ask TorchServe to route unversioned requests to ``version`` (check with :meth:`default_version`)."""
        response = self._call("PUT", f"/models/{MODEL_NAME}/{version}/set-default")
        if not response.ok:
            raise RolloutError(f"set-default {version} failed: HTTP {response.status_code} {response.text.strip()}")

    def current_default(self) -> str | None:
        """:meth:`default_version`, or None if the server cannot tell right now."""
        try:
            return self.default_version()
        except (requests.RequestException, ValueError, KeyError, IndexError):
            return None


def is_ready(description: dict[str, Any] | None) -> bool:
    """Whether a version's description has a READY worker."""
    return bool(description) and any(w.get("status") == "READY" for w in description.get("workers", []))


def wait_for_worker(management: Management, version: str, timeout: float) -> None:
    """Wait until ``version`` has a READY worker; a load failure in the model log ends the wait early."""
    deadline = time.monotonic() + timeout
    log = management.server.run_dir / "logs" / "model_log.log"
    log_start = log.stat().st_size if log.exists() else 0
    while time.monotonic() < deadline:
        if is_ready(management.describe(version)):
            return
        if log.exists():
            with open(log, errors="replace") as handle:
                handle.seek(log_start)
                # Only this version's workers: with several workers and versions, the log interleaves them.
                own_lines = [line for line in handle.read().splitlines() if f"{MODEL_NAME}_{version}-" in line]
            if any("Traceback" in line for line in own_lines):
                tail = "\n".join(own_lines[-12:])
                raise RolloutError(f"version {version} failed to load:\n{tail}")
        time.sleep(0.5)
    raise RolloutError(f"version {version} has no READY worker after {timeout:.0f} s")


def smoke_test(server: Server, version: str, golden_file: Path, images_root: Path) -> str:
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
    client = ServiceClient(server)
    matches, misses = 0, []
    for case in golden["cases"]:
        response = client.predict(version=version, data=(folder / case["image"]).read_bytes())
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


# ---------------------------------------------------------------------------------------------
# State and lock


def read_state(server: Server) -> dict[str, Any]:
    """The rollout record kept in the run folder: ``default``, ``previous``, ``archives`` (version -> .mar), ``at``."""
    path = server.run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _state(default: str, previous: str | None, archives: dict[str, str]) -> dict[str, Any]:
    return {"default": default, "previous": previous,
            "archives": {version: archive for version, archive in archives.items() if version in (default, previous)},
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _write_state_file(server: Server, state: dict[str, Any]) -> dict[str, Any]:
    """Replace the state file atomically (staged, flushed to disk, renamed)."""
    path = server.run_dir / STATE_FILE
    staging = path.with_suffix(".tmp")
    with open(staging, "w") as handle:
        handle.write(json.dumps(state, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    staging.replace(path)
    return state


def write_state(server: Server, default: str, previous: str | None, archives: dict[str, str]) -> dict[str, Any]:
    """Record the default, the previous default and the archives they came from (atomically); clears ``pending``."""
    return _write_state_file(server, _state(default, previous, archives))


def write_pending(server: Server, default: str, previous: str | None, archives: dict[str, str]) -> dict[str, Any]:
    """Record, next to the confirmed state, the switch about to be asked for (before ``set-default``)."""
    state = {key: value for key, value in read_state(server).items() if key != "pending"}
    return _write_state_file(server, {**state, "pending": _state(default, previous, archives)})


def drop_pending(server: Server) -> dict[str, Any]:
    """Forget an unconfirmed switch: the state file says what it said before it."""
    return _write_state_file(server, {key: value for key, value in read_state(server).items() if key != "pending"})


def reconcile(server: Server, management: Management | None = None) -> str | None:
    """Settle a switch that a crash left ``pending``, from what the server reports; returns a note, or None.

    Raises:
        RolloutError: A switch is pending and the server cannot tell its default now.
    """
    pending = read_state(server).get("pending")
    if not pending:
        return None
    actual = (management or Management(server)).current_default()
    if actual is None:
        raise RolloutError(f"an interrupted switch to {pending['default']} is recorded in {server.run_dir / STATE_FILE} "
                           "and the server cannot tell its default now: check `make status`, then try again")
    if actual == pending["default"]:
        write_state(server, pending["default"], pending["previous"], pending["archives"])
        return (f"an interrupted switch to {pending['default']} had taken effect: recorded (previous "
                f"{pending['previous']})")
    drop_pending(server)
    return f"an interrupted switch to {pending['default']} never took effect ({actual} serves): record dropped"


def recorded_archive(state: dict[str, Any], version: str) -> str:
    """The archive a recorded version was loaded from (states written before archives were recorded: by name)."""
    return (state.get("archives") or {}).get(version) or f"{archive_name(version)}.mar"


def loaded_archive(management: Management, version: str, state: dict[str, Any]) -> str:
    """The archive a loaded version came from: TorchServe's ``modelUrl``, else the record, else by name."""
    description = management.describe(version) or {}
    url = description.get("modelUrl")
    return Path(url).name if url else recorded_archive(state, version)


@contextlib.contextmanager
def rollout_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's rollout lock, or fail at once if another rollout or rollback holds it.

    Raises:
        RolloutError: If the lock is held (the message names the holder's pid).
    """
    path = run_dir / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RolloutError(f"another rollout or rollback is running on {run_dir} (pid {holder}); "
                           "wait for it to finish, then try again") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# ---------------------------------------------------------------------------------------------
# Actions


def _switch_default(management: Management, version: str) -> str | None:
    """Ask for ``version`` as the default, then return what the server reports.

    A failed or lost reply is not trusted either way: the switch may have happened anyway.

    Returns:
        None if the server now reports ``version`` as the default, else why not.
    """
    reply_error = None
    try:
        management.set_default(version)
    except (RolloutError, requests.RequestException) as error:
        reply_error = error
    actual = management.current_default()
    if actual == version:
        if reply_error is not None:
            print(f"note: the set-default reply was lost ({reply_error}), but the server reports {version} as the default")
        return None
    reason = f"set-default {version}: {reply_error}" if reply_error else f"set-default {version} did not take"
    return f"{reason}; the server reports {actual if actual is not None else 'no readable default'}"


def _abort(management: Management, version: str, previous: str, registered_here: bool, error: Any) -> RolloutError:
    """Unregister the candidate (if this rollout loaded it) and say what is serving now, read from the server."""
    actual = management.current_default()
    if registered_here and actual != version:
        management.unregister(version)
    if actual == previous:
        return RolloutError(f"rollout of {version} aborted, {previous} is still the default: {error}")
    if actual is None:
        return RolloutError(f"rollout of {version} aborted ({error}); the default version could not be read back "
                            "from the server: check `make status`")
    return RolloutError(f"rollout of {version} aborted, the server reports {actual} as the default: {error}")


def prune(management: Management, keep: set[str]) -> list[str]:
    """Unregister every loaded version not in ``keep``; returns those removed."""
    removed = []
    for description in management.versions():
        version = description["modelVersion"]
        if version not in keep:
            if management.unregister(version):
                removed.append(version)
            else:
                print(f"warning: could not unregister version {version}")
    return removed


def rollout(server: Server, version: str, golden_file: Path, images_root: Path, timeout: float,
            model_store: Path | None = None) -> str:
    """Register, wait, smoke-test, switch the default, then unload all but the new and the previous version.

    Args:
        server: The running instance.
        version: The version to roll out; its archive is ``skin_lesion_v<version>.mar`` in the model store.
        golden_file: ``models/golden_smoke.json``.
        images_root: The folder holding the golden images' folder.
        timeout: Seconds to wait for the new version's worker.
        model_store: The server's model store (default: the one it was started with).

    Returns:
        The previous default version.

    Raises:
        RolloutError: On any failure (the previous default keeps serving), or if another
            rollout holds the lock.
    """
    with rollout_lock(server.run_dir):
        management = Management(server)
        _report(reconcile(server, management))
        state = read_state(server)
        previous = management.default_version()
        if version == previous:
            raise RolloutError(f"version {version} is already the default")
        registered_here = False
        if management.describe(version) is None:
            archive = f"{archive_name(version)}.mar"
            check_archive(Path(model_store or server.properties["model_store"]) / archive, version)
            print(f"registering {archive} next to {previous}")
            management.register(archive)
            registered_here = True
        try:
            wait_for_worker(management, version, timeout)
            print(f"version {version} READY; smoke test: {smoke_test(server, version, golden_file, images_root)}")
        except (RolloutError, requests.RequestException) as error:
            raise _abort(management, version, previous, registered_here, error) from error
        archives = {version: loaded_archive(management, version, state),
                    previous: loaded_archive(management, previous, state)}
        write_pending(server, version, previous, archives)
        failure = _switch_default(management, version)
        if failure is not None:
            _settle_after_failure(server, management)
            raise _abort(management, version, previous, registered_here, failure)
        write_state(server, version, previous, archives)
        removed = prune(management, {version, previous})
        if removed:
            print(f"unloaded older versions {removed}: only {version} and {previous} stay loaded")
        return previous


def rollback(server: Server) -> str:
    """Make the previous default the default again (it was kept loaded).

    Returns:
        The restored version.
    """
    with rollout_lock(server.run_dir):
        management = Management(server)
        _report(reconcile(server, management))
        state = read_state(server)
        previous = state.get("previous")
        if not previous:
            raise RolloutError("no previous version recorded; nothing to roll back to")
        current = management.default_version()
        if current == previous:
            raise RolloutError(f"{previous} is already the default")
        if not is_ready(management.describe(previous)):
            raise RolloutError(f"previous version {previous} is not loaded with a READY worker")
        archives = {previous: loaded_archive(management, previous, state),
                    current: loaded_archive(management, current, state)}
        write_pending(server, previous, current, archives)
        failure = _switch_default(management, previous)
        if failure is not None:
            _settle_after_failure(server, management)
            raise RolloutError(f"rollback to {previous} failed: {failure}")
        write_state(server, previous, current, archives)
        return previous


def _report(note: str | None) -> None:
    if note:
        print(f"note: {note}")


def _settle_after_failure(server: Server, management: Management) -> None:
    """After a failed switch, settle the pending record now if the server can say what it serves."""
    try:
        reconcile(server, management)
    except RolloutError as error:
        print(f"warning: {error}")


def status(server: Server) -> dict[str, Any]:
    """Versions, default, workers and health."""
    management = Management(server)
    ping = management.client.ping(timeout=10)
    return {
        "health": ping.json().get("status"),
        "default": management.default_version(),
        "versions": {d["modelVersion"]: [w["status"] for w in d["workers"]] for d in management.versions()},
        "rollout": read_state(server),
    }


# ---------------------------------------------------------------------------------------------
# Starting with the recorded default


@dataclass
class Started:
    """A server started by :func:`start_serving`, READY.

    Attributes:
        server: The instance.
        description: The management API's description of the default version.
        notes: What could not be restored (shown to the operator; the default serves anyway).
    """

    server: Server
    description: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def start_serving(run_dir: Path, model_store: Path, config: Path, overrides: dict[str, str] | None = None,
                  timeout: float = 180.0) -> Started:
    """Start TorchServe from ``run_dir`` with the version its rollouts made the default, and the previous one.

    Without a rollout record this is a plain start of the configured ``load_models``. With one,
    the recorded default's archive is loaded at start (``--models``, so it is the default from
    the first request on), then the recorded previous version is registered again for
    ``make rollback``.

    Raises:
        RolloutError: If the recorded default's archive is missing or holds another version
            (nothing is started).
        RuntimeError, TimeoutError: From :func:`ops.torchserve.wait_ready`; the server is stopped.
    """
    server = Server(run_dir.resolve())
    interrupted = read_state(server).get("pending")
    if interrupted and not server.is_running():
        # The server that was switching is gone: nobody can say whether the switch took. The last
        # confirmed default (and its previous) is served, which keeps `rollback` one step back.
        drop_pending(server)
    state = read_state(server)
    default = state.get("default")
    models = None
    if not default:
        for archive in configured_archives(config, overrides):
            if (model_store / archive).exists():
                check_digest(model_store / archive)
    if default:
        archive = recorded_archive(state, default)
        try:
            check_archive(model_store / archive, default)
        except RolloutError as error:
            raise RolloutError(f"the rolled-out default {default} cannot be restored: {error}. Rebuild it, or delete "
                               f"{server.run_dir / STATE_FILE} to serve the configured release") from error
        models = f"{MODEL_NAME}={archive}"
    start(server.run_dir, model_store, config, overrides, models)
    try:
        description = wait_ready(server, timeout=timeout)
    except BaseException:
        stop(server)
        raise
    notes = []
    if interrupted:
        notes.append(f"an interrupted switch to {interrupted['default']} was never confirmed: serving the last confirmed "
                     f"default {default or 'from the configuration'}; roll {interrupted['default']} out again if wanted")
    if default:
        try:
            notes += restore_previous(server, state, model_store, timeout)
        except requests.RequestException as error:
            notes.append(f"could not restore the recorded versions: {error!r}; check `make status`")
    return Started(server, description, notes)


def configured_archives(config: Path, overrides: dict[str, str] | None = None) -> list[str]:
    """The archive files ``load_models`` names (``name=file.mar`` entries; ``all`` names none)."""
    value = {**read_properties(config), **(overrides or {})}.get("load_models", "")
    return [entry.split("=", 1)[1].strip() if "=" in entry else entry.strip()
            for entry in value.split(",") if entry.strip().endswith(".mar")]


def restore_previous(server: Server, state: dict[str, Any], model_store: Path, timeout: float) -> list[str]:
    """Load the recorded previous version next to the default again, and check the default.

    Returns:
        Notes on what could not be restored.
    """
    management = Management(server)
    notes = []
    previous = state.get("previous")
    if previous and management.describe(previous) is None:
        archive = recorded_archive(state, previous)
        try:
            check_archive(model_store / archive, previous)
            management.register(archive)
            wait_for_worker(management, previous, timeout)
        except RolloutError as error:
            management.unregister(previous)
            notes.append(f"previous version {previous} is not loaded ({error}); `make rollback` is unavailable")
    default = state["default"]
    failure = None if management.current_default() == default else _switch_default(management, default)
    if failure is not None:
        notes.append(f"the recorded default {default} is not the default: {failure}")
    return notes
