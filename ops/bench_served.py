"""Served benchmarks: build an archive from a changed copy of the model config, serve it on free loopback ports, sweep it.

A server started by ``make serve`` on the default ports is left alone. The sweep itself runs
in a separate client process (:func:`ops.loadgen.sweep_target`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from ops.archive import ArchiveSpec, build_archive
from ops.loadgen import ServedTarget, SweepPlan, format_level, sweep_target
from ops.paths import CHECKPOINT, MODEL_CONFIG, MODEL_NAME, ROOT, SERVER_CONFIG
from ops.torchserve import Server, start_on_free_ports, stop, wait_ready

# The unbatched baseline: one request per forward pass, no waiting for company.
UNBATCHED_OVERRIDES = {"batchSize": 1, "maxBatchDelay": 0}


def model_config_overrides(batch_size: int | None = None, max_batch_delay: int | None = None,
                           workers: int | None = None, handler: Sequence[str] = ()) -> dict[str, Any]:
    """Model-config changes for a swept archive.

    Args:
        batch_size: ``batchSize``.
        max_batch_delay: ``maxBatchDelay`` (ms).
        workers: ``minWorkers`` = ``maxWorkers``.
        handler: ``KEY=VALUE`` handler settings (values parsed as YAML).

    Raises:
        ValueError: A handler item without ``=``.
    """
    overrides: dict[str, Any] = {}
    if batch_size is not None:
        overrides["batchSize"] = batch_size
    if max_batch_delay is not None:
        overrides["maxBatchDelay"] = max_batch_delay
    if workers is not None:
        overrides["minWorkers"] = overrides["maxWorkers"] = workers
    if handler:
        pairs = [item.split("=", 1) for item in handler]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"handler settings take KEY=VALUE, got {list(handler)}")
        overrides["handler"] = {key: yaml.safe_load(value) for key, value in pairs}
    return overrides


def model_config_with(base: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The model config at ``base`` with top-level keys replaced (``batchSize``, ``maxBatchDelay``, ``minWorkers``...).

    A ``handler`` entry in ``overrides`` is merged into the config's ``handler:`` block.
    """
    config = yaml.safe_load(base.read_text())
    unknown = set(overrides) - set(config) - {"minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "handler"}
    if unknown:
        raise ValueError(f"unknown model-config keys {sorted(unknown)}")
    handler = {**(config.get("handler") or {}), **(overrides.get("handler") or {})}
    return {**config, **overrides, "handler": handler}


def wait_all_workers(server: Server, count: int, timeout: float = 240.0) -> dict[str, Any]:
    """Wait until ``count`` workers are READY (``wait_ready`` returns at the first one).

    Returns:
        The management API's description of the model.

    Raises:
        TimeoutError: If fewer are ready in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        description = wait_ready(server, timeout=max(1.0, deadline - time.monotonic()))
        ready = sum(worker.get("status") == "READY" for worker in description.get("workers", []))
        if ready >= count:
            return description
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {ready} of {count} workers READY after {timeout:.0f} s\n{server.log_tail()}")
        time.sleep(0.5)


def served_sweep(model_config_overrides: dict[str, Any], payload_paths: Sequence[str], plan: SweepPlan,
                 checkpoint: Path, base_model_config: Path = MODEL_CONFIG) -> dict[str, Any]:
    """Build an archive from a changed copy of the model config, serve it, sweep it, stop it.

    Args:
        model_config_overrides: Top-level model-config keys to change, e.g.
            ``{"batchSize": 1, "maxBatchDelay": 0}`` or ``{"minWorkers": 2, "maxWorkers": 2}``.
        payload_paths: Request bodies (real JPEG files).
        plan: Levels and bounds.
        checkpoint: Checkpoint to archive.
        base_model_config: Model config the copy starts from.

    Returns:
        :func:`sweep_target`'s result plus ``model_config`` (the served batch and worker
        settings) and ``startup_s`` (start until a READY worker).
    """
    config = model_config_with(base_model_config, model_config_overrides)
    with serving(config, checkpoint) as (server, description, startup_s):
        target = ServedTarget(f"{server.url('inference')}/predictions/{MODEL_NAME}", {}, server.url("metrics"),
                              run_dir=str(server.run_dir))
        print(f"served {', '.join(f'{k}={v}' for k, v in model_config_overrides.items()) or 'as configured'}: "
              f"READY in {startup_s:.1f} s", flush=True)
        result = sweep_target(target, payload_paths, plan)
    served_settings = {key: description.get(key) for key in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")}
    return {"model_config": served_settings, "overrides": model_config_overrides, "startup_s": startup_s, **result}


@contextlib.contextmanager
def serving(config: dict[str, Any], checkpoint: Path) -> Iterator[tuple[Server, dict[str, Any], float]]:
    """An archive of ``checkpoint`` with model config ``config``, served on free loopback ports until the block ends.

    Yields:
        ``(server, the management API's description once all workers are READY, seconds to that)``.
    """
    with tempfile.TemporaryDirectory(prefix="bench-served-") as work:
        work_dir = Path(work)
        (work_dir / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        store = work_dir / "model_store"
        # A benchmark archive measures speed, not decisions: no gate is required, and a changed
        # TTA mode (--handler tta=...) may serve a threshold measured for another mode.
        build_archive(ArchiveSpec(checkpoint, work_dir / "model-config.yaml", store, require_gate=False,
                                  force_threshold=True))
        # Free loopback ports for every listener (gRPC binds too), as the tests do: a server
        # started by `make serve` on the default ports is left alone.
        started = time.monotonic()
        server, description = start_on_free_ports(
            work_dir / "run", store, SERVER_CONFIG, ready=lambda server: wait_all_workers(server, int(config.get("minWorkers", 1))))
        try:
            yield server, description, time.monotonic() - started
        finally:
            stop(server)


# The request shapes the handler answers (handler/protocols.py), one image per request each.
PROTOCOLS = ("plain", "kserve_v1", "open_inference")


def protocol_request(protocol: str, image: bytes) -> tuple[str, str, bytes]:
    """``(path, Content-Type, body)`` of a one-image request in ``protocol``: the raw JPEG to
    ``/predictions``, KServe v1 ``instances`` to ``:predict``, or an Open Inference Protocol
    ``inputs`` tensor to ``/v2/.../infer``."""
    encoded = base64.b64encode(image).decode()
    if protocol == "plain":
        return f"/predictions/{MODEL_NAME}", "image/jpeg", image
    if protocol == "kserve_v1":
        return (f"/v1/models/{MODEL_NAME}:predict", "application/json",
                json.dumps({"instances": [{"image": {"b64": encoded}}]}).encode())
    if protocol == "open_inference":
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [encoded]}]}
        return f"/v2/models/{MODEL_NAME}/infer", "application/json", json.dumps(body).encode()
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def protocol_sweep(payload_paths: Sequence[str], plan: SweepPlan, checkpoint: Path, base_model_config: Path = MODEL_CONFIG,
                   concurrency: int = 16, rounds: int = 2) -> dict[str, Any]:
    """Throughput of each protocol against the plain endpoint, on one server with the release settings.

    Closed loop at ``concurrency`` in flight, the same JPEGs in each protocol's body, the
    protocols interleaved ``rounds`` times (plain, v1, v2, plain, ...) so that a change of load
    on the machine falls on all of them.

    Returns:
        ``levels`` (per protocol, one :func:`ops.loadgen.closed_loop` result per round),
        ``images_per_s`` (per protocol, the mean over rounds), ``ratio_to_plain``,
        ``concurrency``, ``rounds`` and ``startup_s``.
    """
    config = model_config_with(base_model_config, {})
    level_plan = SweepPlan(levels=(concurrency,), level_requests=plan.level_requests, level_seconds=plan.level_seconds,
                           warmup_seconds=plan.warmup_seconds, load_fraction=0.0)
    levels: dict[str, list[dict[str, Any]]] = {protocol: [] for protocol in PROTOCOLS}
    with serving(config, checkpoint) as (server, _, startup_s), tempfile.TemporaryDirectory(prefix="bench-bodies-") as bodies:
        targets = {}
        for protocol in PROTOCOLS:
            folder = Path(bodies) / protocol
            folder.mkdir()
            paths = []
            for source in payload_paths:
                path, content_type, body = protocol_request(protocol, Path(source).read_bytes())
                (folder / f"{Path(source).stem}.body").write_bytes(body)
                paths.append(str(folder / f"{Path(source).stem}.body"))
            targets[protocol] = (ServedTarget(f"{server.url('inference')}{path}", {"Content-Type": content_type},
                                              server.url("metrics"), run_dir=str(server.run_dir)), paths)
        for round_index in range(rounds):
            for protocol in PROTOCOLS:
                target, paths = targets[protocol]
                level = sweep_target(target, paths, level_plan)["levels"][0]
                print(f"protocol {protocol}, round {round_index + 1}: {format_level(level)}", flush=True)
                levels[protocol].append(level)
    images_per_s = {protocol: statistics.fmean(level["images_per_s"] for level in runs) for protocol, runs in levels.items()}
    plain = images_per_s["plain"]
    return {"concurrency": concurrency, "rounds": rounds, "startup_s": startup_s, "levels": levels,
            "images_per_s": images_per_s,
            "ratio_to_plain": {protocol: value / plain if plain > 0 else None for protocol, value in images_per_s.items()}}


# What a release chooses for its own speed: its batching, its workers and how its handler runs the
# networks. A ``git:REV`` baseline is served with REV's choices (``--baseline-serving released``), so
# that "release X's throughput" is X as it was released; every other setting (limits, the gate's
# policy) is this run's, so both archives refuse and answer alike.
RELEASE_SERVING_KEYS = ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")
RELEASE_HANDLER_KEYS = ("runtime", "precision", "torch_threads", "tta")


def released_serving(revision: str) -> dict[str, Any]:
    """The serving choices (:data:`RELEASE_SERVING_KEYS`, :data:`RELEASE_HANDLER_KEYS`) of the model
    config committed at ``revision``, as model-config overrides.

    Raises:
        SystemExit: ``revision`` is unknown or holds no model config.
    """
    config = yaml.safe_load(committed_file(revision, MODEL_CONFIG)) or {}
    overrides: dict[str, Any] = {key: config[key] for key in RELEASE_SERVING_KEYS if key in config}
    handler = config.get("handler") or {}
    overrides["handler"] = {key: handler[key] for key in RELEASE_HANDLER_KEYS if key in handler}
    return overrides


def merged_overrides(base: dict[str, Any], on_top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``on_top``'s keys replacing its own (their ``handler`` blocks merged key by key)."""
    handler = {**(base.get("handler") or {}), **(on_top.get("handler") or {})}
    return {**base, **on_top, **({"handler": handler} if handler else {})}


def baseline_checkpoint(reference: str, folder: Path) -> Path:
    """The checkpoint named by ``reference``: a path, or ``git:REV`` for the release checkpoint
    (``models/skin_lesion.pt``) as committed at REV, written into ``folder``.

    Raises:
        SystemExit: REV is unknown or holds no release checkpoint.
    """
    if not reference.startswith("git:"):
        return Path(reference)
    revision = reference[len("git:"):]
    path = folder / f"baseline-{revision.replace('/', '_')}.pt"
    path.write_bytes(committed_file(revision, CHECKPOINT))
    return path


def committed_file(revision: str, path: Path) -> bytes:
    """The bytes of ``path`` (inside the repository) as committed at ``revision``.

    Raises:
        SystemExit: ``revision`` is unknown or does not hold ``path``.
    """
    relative = path.relative_to(ROOT).as_posix()
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{relative}"], capture_output=True)
    if shown.returncode != 0:
        raise SystemExit(f"--baseline git:{revision}: {shown.stderr.decode(errors='replace').strip()}")
    return shown.stdout
