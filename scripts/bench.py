"""Benchmarks, measured end to end through the real TorchServe, reported as ratios to baselines from the same run.

Sections (``--sections``; all by default) run one after another, never side by side, so that
no two of them compete for the CPU cores:

``gradcam``: the handler's whole batch path (decode, preprocess, one forward, softmax,
response building) with and without Grad-CAM explanations, per image, for JPEG and PNG
overlays. Predict and explain rounds are interleaved so that machine noise hits both alike;
the figure is the median of the rounds.

``inprocess``: the served ceiling: ``handler.inference.handle_batch`` (preprocessing and one
batched forward, no HTTP, no TorchServe) over the same real JPEGs, images/s at the configured
batch size and at batch size 1, measured while no server is running.

``decode``: JPEG decode + resize to the model's resize size, per image: the served Pillow
draft-mode path against a full Pillow decode and OpenCV ``imdecode`` with and without
``IMREAD_REDUCED_COLOR_2``, with the pixel difference each would make.

``runtime``: the forward pass alone (features + logits) per image, for eager fp32
(contiguous and channels-last), bf16 autocast, the served frozen TorchScript graph (with
all threads and with one), and ``torch.compile`` (full runs only: it compiles for about a
minute). On a GPU (``--device cuda``): eager fp32, fp16 autocast and TorchScript fp16 at
growing batch sizes.

``unbatched``: the real TorchServe with an archive built from a copy of the model config at
``batchSize: 1``, ``maxBatchDelay: 0``, driven with one request in flight.

``served``: the real TorchServe with the release model config (or a copy changed by
``--batch-size-config``, ``--max-batch-delay``, ``--workers``), or an already running server
(``--url``). A client in a separate process (threads with one ``requests`` session each)
warms up, then runs a closed-loop concurrency sweep (``--levels`` requests in flight, each
level bounded by ``--level-requests`` and ``--level-seconds``), then one open-loop level
(Poisson arrivals by default, ``--arrivals``) at ``--load-fraction`` x the peak, for the
tail-latency check. The average batch size the server formed in each level comes from the
handler's Prometheus histogram ``skin_lesion_batch_size`` (``_sum`` / ``_count`` deltas
scraped around the level).

Example:
    python scripts/bench.py                      # make bench: writes runs/bench/bench.json and docs/PERFORMANCE.md
    python scripts/bench.py --quick --out /tmp/bench --report /tmp/bench/PERFORMANCE.md
    python scripts/bench.py --sections served --workers 2 --batch-size-config 4 --max-batch-delay 20 --report /tmp/w2.md
    python scripts/bench.py --url http://127.0.0.1:8080 --token TOKEN --metrics-url http://127.0.0.1:8082
    python scripts/bench.py --sections inprocess served --workers 2 --handler torch_threads=1 --report /tmp/w2.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import random
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import serve  # noqa: E402

if TYPE_CHECKING:
    from handler.inference import HandlerSettings
    from handler.model import LoadedModel

# torch and the handler are imported inside the functions that need them: the load-generating
# client runs in a spawned process that imports this module, and must stay light.

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = ROOT.parent / "shared" / "data" / "samples-600x450"
DEFAULT_MODEL_CONFIG = ROOT / "config" / "model-config.yaml"
SECTIONS = ("decode", "runtime", "gradcam", "inprocess", "unbatched", "served")
BATCH_SIZE_METRIC = "skin_lesion_batch_size"
UNBATCHED_OVERRIDES = {"batchSize": 1, "maxBatchDelay": 0}
# (key in the summary, target as text, test on the value): the acceptance targets.
TARGETS = (
    ("served_throughput_ratio", ">= 0.85", lambda value: value >= 0.85),
    ("speedup_vs_unbatched", ">= 3", lambda value: value >= 3.0),
    ("gradcam_cost_ratio", "<= 1.3", lambda value: value <= 1.3),
    ("p99_over_p50_at_70pct", "<= 3", lambda value: value <= 3.0),
)


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "skin_lesion.pt"))
    parser.add_argument("--model-config", default=str(DEFAULT_MODEL_CONFIG), help="model config the archives start from")
    parser.add_argument("--samples", default=str(DEFAULT_SAMPLES), help="folder of real 600x450 JPEG payloads")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true",
                        help="levels 1 4 16, shorter levels and fewer rounds: about 2 minutes on 2 cores")
    # Served sweep.
    parser.add_argument("--levels", type=int, nargs="+", help="requests in flight per level (default 1 2 4 8 16 32)")
    parser.add_argument("--level-requests", type=int, help="most requests per level (default 2000, quick 300)")
    parser.add_argument("--level-seconds", type=float, help="most seconds per level (default 25, quick 6)")
    parser.add_argument("--warmup-seconds", type=float, help="closed-loop warm-up before measuring (default 5, quick 3)")
    parser.add_argument("--load-fraction", type=float, default=0.7,
                        help="open-loop level at this share of the peak, for the tail check; 0 skips it")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson",
                        help="open-loop arrivals: Poisson (bursty, like independent users) or evenly paced")
    parser.add_argument("--batch-size-config", type=int, help="batchSize of the swept archive (default: the model config's)")
    parser.add_argument("--max-batch-delay", type=int, help="maxBatchDelay (ms) of the swept archive")
    parser.add_argument("--workers", type=int, help="minWorkers = maxWorkers of the swept archive")
    parser.add_argument("--handler", action="append", default=[], metavar="KEY=VALUE",
                        help="override a handler setting (runtime, precision, torch_threads, tta...) for every section")
    parser.add_argument("--device", default="cpu", help="device of the runtime section (cpu or cuda)")
    parser.add_argument("--url", help="sweep this already running server (inference base URL) instead of starting one")
    parser.add_argument("--token", help="inference token for --url")
    parser.add_argument("--metrics-url", help="metrics base URL for --url, for the average batch size")
    # In-process sections.
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        help="Grad-CAM section batch sizes (default: 1 and the served batch size; quick: the served one)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved predict/explain rounds per setting")
    parser.add_argument("--inprocess-seconds", type=float, help="seconds per batch size in-process (default 10, quick 3)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="folder for bench.json")
    parser.add_argument("--report", default=str(ROOT / "docs" / "PERFORMANCE.md"), help="markdown report to write")
    return parser


# ---------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank: always one of the values, monotone in q.

    Raises:
        ValueError: If ``values`` is empty.
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def level_stats(latencies_s: Sequence[float], statuses: Sequence[int], seconds: float) -> dict[str, Any]:
    """Throughput, latency percentiles and errors of one level.

    Args:
        latencies_s: Per request, seconds from (intended) send to response.
        statuses: Per request, the HTTP status, or -1 for a client-side exception.
        seconds: Wall time of the level.

    Returns:
        ``requests``, ``errors`` (non-200 or exception), ``seconds``, ``images_per_s`` (200s
        per second) and ``p50_ms``, ``p95_ms``, ``p99_ms``, ``mean_ms`` over the 200s (None
        without any).
    """
    ok = [latency * 1000 for latency, status in zip(latencies_s, statuses) if status == 200]
    stats: dict[str, Any] = {"requests": len(statuses), "errors": len(statuses) - len(ok), "seconds": seconds,
                             "images_per_s": len(ok) / seconds if seconds > 0 else 0.0}
    for name, q in (("p50_ms", 0.50), ("p95_ms", 0.95), ("p99_ms", 0.99)):
        stats[name] = percentile(ok, q) if ok else None
    stats["mean_ms"] = statistics.fmean(ok) if ok else None
    return stats


# ---------------------------------------------------------------------------------------------
# Load-generating client (runs in its own process)


@dataclasses.dataclass(frozen=True)
class ServedTarget:
    """Where the client sends requests and scrapes the batch-size histogram."""

    predict_url: str
    headers: dict[str, str]
    metrics_url: str | None = None
    model_name: str = serve.MODEL_NAME


def parse_histogram(text: str, metric: str, model_name: str) -> tuple[float, float]:
    """``(sum, count)`` of a Prometheus histogram for one ModelName, added over its other labels.

    Args:
        text: A Prometheus text-format scrape.
        metric: Histogram name without the ``_sum``/``_count`` suffix.
        model_name: Value of the ``ModelName`` label to keep.
    """
    totals = {"sum": 0.0, "count": 0.0}
    pattern = re.compile(rf"^{re.escape(metric)}_(sum|count)\{{([^}}]*)\}}\s+(\S+)")
    for line in text.splitlines():
        match = pattern.match(line)
        if match and f'ModelName="{model_name}"' in match.group(2):
            totals[match.group(1)] += float(match.group(3))
    return totals["sum"], totals["count"]


def scrape_batch_sizes(target: ServedTarget) -> tuple[float, float] | None:
    """The batch-size histogram's ``(sum, count)`` now, or None without a metrics URL."""
    if target.metrics_url is None:
        return None
    text = requests.get(f"{target.metrics_url}/metrics", timeout=10).text
    return parse_histogram(text, BATCH_SIZE_METRIC, target.model_name)


def batches_formed(target: ServedTarget, before: tuple[float, float] | None, handled: int,
                   timeout: float = 5.0) -> tuple[float, float] | None:
    """``(images, batches)`` the server reported since ``before``.

    The worker's metrics reach the frontend through its log asynchronously, so this waits
    (up to ``timeout`` s) until the histogram's sum covers the ``handled`` requests.
    """
    if before is None:
        return None
    deadline = time.monotonic() + timeout
    while True:
        after = scrape_batch_sizes(target)
        images, batches = after[0] - before[0], after[1] - before[1]
        if images >= handled or time.monotonic() > deadline:
            return images, batches
        time.sleep(0.2)


def _post(session: requests.Session, target: ServedTarget, payload: bytes) -> int:
    """The HTTP status of one prediction request, -1 if it raised: failures are counted, never fatal."""
    try:
        return session.post(target.predict_url, data=payload, headers=target.headers, timeout=120).status_code
    except requests.RequestException:
        return -1


def closed_loop(target: ServedTarget, payloads: Sequence[bytes], concurrency: int, max_requests: int,
                max_seconds: float) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request as soon as the last one is answered.

    Stops issuing at ``max_requests`` or after ``max_seconds``, whichever comes first, and waits
    for the requests in flight.

    Returns:
        :func:`level_stats` plus ``concurrency``.
    """
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    statuses: list[int] = []
    started = time.monotonic()
    deadline = started + max_seconds

    def next_ticket() -> int | None:
        nonlocal issued
        with lock:
            if issued >= max_requests or time.monotonic() >= deadline:
                return None
            issued += 1
            return issued - 1

    def client() -> None:
        with requests.Session() as session:
            while (ticket := next_ticket()) is not None:
                sent = time.monotonic()
                status = _post(session, target, payloads[ticket % len(payloads)])
                with lock:
                    latencies.append(time.monotonic() - sent)
                    statuses.append(status)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"mode": "closed", "concurrency": concurrency,
            **level_stats(latencies, statuses, time.monotonic() - started)}


def open_loop(target: ServedTarget, payloads: Sequence[bytes], rate: float, max_requests: int,
              max_seconds: float, arrivals: str = "poisson", seed: int = 0) -> dict[str, Any]:
    """Requests at ``rate`` per second, whatever the server's answers.

    Latency counts from each request's scheduled time, so a stalled server shows up in the
    latencies rather than silently slowing the arrivals down.

    Args:
        arrivals: ``poisson`` (exponential gaps, seeded) or ``uniform`` (every 1/rate s).

    Returns:
        :func:`level_stats` plus ``offered_images_per_s`` and ``arrivals``.
    """
    arrivals_rng = random.Random(seed)
    schedule, offset = [], 0.0
    while len(schedule) < max_requests:
        offset += arrivals_rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
        if offset > max_seconds:
            break
        schedule.append(offset)
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    sessions = threading.local()

    def send(index: int, due: float) -> None:
        session = getattr(sessions, "value", None) or requests.Session()
        sessions.value = session
        status = _post(session, target, payloads[index % len(payloads)])
        with lock:
            latencies.append(time.monotonic() - due)
            statuses.append(status)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=64) as pool:
        for index, offset in enumerate(schedule):
            due = started + offset
            time.sleep(max(0.0, due - time.monotonic()))
            pool.submit(send, index, due)
    return {"mode": "open", "concurrency": None, "offered_images_per_s": rate, "arrivals": arrivals,
            **level_stats(latencies, statuses, time.monotonic() - started)}


def measured_level(target: ServedTarget, run_level: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one level and add the average batch size the server formed during it (and its batch count)."""
    before = scrape_batch_sizes(target)
    level = run_level()
    formed = batches_formed(target, before, level["requests"] - level["errors"])
    level["batches"] = formed[1] if formed else None
    level["avg_batch_size"] = formed[0] / formed[1] if formed and formed[1] > 0 else None
    return level


def client_sweep(target: ServedTarget, payload_paths: Sequence[str], levels: Sequence[int], max_requests: int,
                 max_seconds: float, warmup_seconds: float) -> list[dict[str, Any]]:
    """Warm up, then one closed-loop level per concurrency; meant to run in the client process.

    Returns:
        One :func:`closed_loop` result per level, with ``avg_batch_size`` and ``batches``.
    """
    payloads = [Path(path).read_bytes() for path in payload_paths]
    if warmup_seconds > 0:
        closed_loop(target, payloads, max(levels), max_requests, warmup_seconds)
    results = []
    for concurrency in levels:
        level = measured_level(target, lambda: closed_loop(target, payloads, concurrency, max_requests, max_seconds))
        print(f"  {concurrency:>3} in flight: {format_level(level)}", flush=True)
        results.append(level)
    return results


def client_paced(target: ServedTarget, payload_paths: Sequence[str], rate: float, max_requests: int,
                 max_seconds: float, arrivals: str) -> dict[str, Any]:
    """One open-loop level at ``rate``; meant to run in the client process."""
    payloads = [Path(path).read_bytes() for path in payload_paths]
    level = measured_level(target, lambda: open_loop(target, payloads, rate, max_requests, max_seconds, arrivals))
    print(f"  open loop ({arrivals}) at {rate:.1f}/s: {format_level(level)}", flush=True)
    return level


def format_level(level: dict[str, Any]) -> str:
    """One line: throughput, percentiles, errors, average batch size."""
    return (f"{level['images_per_s']:.1f} images/s, p50 {fmt(level['p50_ms'], 0)} / p95 {fmt(level['p95_ms'], 0)} / "
            f"p99 {fmt(level['p99_ms'], 0)} ms, {level['errors']} errors of {level['requests']}, "
            f"avg batch {fmt(level.get('avg_batch_size'), 2)}")


def fmt(value: float | None, digits: int) -> str:
    """A number with ``digits`` decimals, or ``n/a``."""
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Served sweeps


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """How to sweep one served configuration."""

    levels: tuple[int, ...]
    level_requests: int
    level_seconds: float
    warmup_seconds: float
    load_fraction: float = 0.0
    arrivals: str = "poisson"


def sweep_target(target: ServedTarget, payload_paths: Sequence[str], plan: SweepPlan) -> dict[str, Any]:
    """Sweep a ready server from a separate client process.

    The client is a spawned process (never a fork of this one, which may hold torch threads)
    that only imports ``requests``: it shares no interpreter with the model.

    Returns:
        ``levels`` (closed loop) and ``paced`` (the open-loop level at ``plan.load_fraction``
        x the best closed-loop throughput, or None).
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as client:
        levels = client.submit(client_sweep, target, list(payload_paths), list(plan.levels), plan.level_requests,
                               plan.level_seconds, plan.warmup_seconds).result()
        paced = None
        peak = max(level["images_per_s"] for level in levels)
        if plan.load_fraction > 0 and peak > 0:
            paced = client.submit(client_paced, target, list(payload_paths), plan.load_fraction * peak,
                                  plan.level_requests, plan.level_seconds, plan.arrivals).result()
            paced["load_fraction"] = plan.load_fraction
    return {"levels": levels, "paced": paced}


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


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_all_workers(server: serve.Server, count: int, timeout: float = 240.0) -> dict[str, Any]:
    """Wait until ``count`` workers are READY (``serve.wait_ready`` returns at the first one).

    Returns:
        The management API's description of the model.

    Raises:
        TimeoutError: If fewer are ready in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        description = serve.wait_ready(server, timeout=max(1.0, deadline - time.monotonic()))
        ready = sum(worker.get("status") == "READY" for worker in description.get("workers", []))
        if ready >= count:
            return description
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {ready} of {count} workers READY after {timeout:.0f} s\n{server.log_tail()}")
        time.sleep(0.5)


def served_sweep(model_config_overrides: dict[str, Any], payload_paths: Sequence[str], plan: SweepPlan,
                 checkpoint: Path, base_model_config: Path = DEFAULT_MODEL_CONFIG) -> dict[str, Any]:
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
    from scripts import package  # imports torch: kept out of the client process's imports

    config = model_config_with(base_model_config, model_config_overrides)
    with tempfile.TemporaryDirectory(prefix="bench-served-") as work:
        work_dir = Path(work)
        (work_dir / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        store = work_dir / "model_store"
        package.main(package.get_args_parser().parse_args(
            ["--checkpoint", str(checkpoint), "--model-config", str(work_dir / "model-config.yaml"),
             "--archive-name", serve.MODEL_NAME, "--export-path", str(store)]))
        # Free loopback ports for every listener (gRPC binds too), as the tests do: a server
        # started by `make serve` on the default ports is left alone.
        addresses = {key: f"http://127.0.0.1:{free_loopback_port()}" for key in serve.ADDRESS_KEYS.values()}
        addresses |= {"grpc_inference_port": str(free_loopback_port()), "grpc_management_port": str(free_loopback_port())}
        started = time.monotonic()
        server = serve.start(work_dir / "run", store, ROOT / "config" / "config.properties", addresses)
        try:
            description = wait_all_workers(server, int(config.get("minWorkers", 1)))
            startup_s = time.monotonic() - started
            target = ServedTarget(f"{server.url('inference')}/predictions/{serve.MODEL_NAME}",
                                  server.headers("inference"), server.url("metrics"))
            print(f"served {', '.join(f'{k}={v}' for k, v in model_config_overrides.items()) or 'as configured'}: "
                  f"READY in {startup_s:.1f} s", flush=True)
            result = sweep_target(target, payload_paths, plan)
        finally:
            serve.stop(server)
    served_settings = {key: description.get(key) for key in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")}
    return {"model_config": served_settings, "overrides": model_config_overrides, "startup_s": startup_s, **result}


# ---------------------------------------------------------------------------------------------
# In-process sections (this process, no server running)


def per_image_ms(loaded: LoadedModel, settings: HandlerSettings, payloads: list[bytes], explain: bool) -> float:
    """Milliseconds per image for one batch through the handler path."""
    from handler.inference import handle_batch

    rows = [{"body": data} for data in payloads]
    started = time.perf_counter()
    responses = handle_batch(loaded, settings, rows, "bench", [explain] * len(rows))
    elapsed = time.perf_counter() - started
    if any(r.status != 200 for r in responses):
        raise RuntimeError(f"benchmark request failed: {[r.body for r in responses if r.status != 200][:1]}")
    return elapsed * 1000 / len(rows)


def bench_gradcam(loaded: LoadedModel, settings: HandlerSettings, payloads: list[bytes], batch_sizes: list[int],
                  rounds: int) -> list[dict[str, Any]]:
    """Explain cost / predict cost per image, interleaved, for each batch size and overlay format."""
    results = []
    for batch_size in batch_sizes:
        batch = [payloads[i % len(payloads)] for i in range(batch_size)]
        for image_format in ("jpeg", "png"):
            format_settings = dataclasses.replace(settings, gradcam_format=image_format)
            per_image_ms(loaded, format_settings, batch, True)  # warm-up
            predict, explain = [], []
            for _ in range(rounds):
                predict.append(per_image_ms(loaded, format_settings, batch, False))
                explain.append(per_image_ms(loaded, format_settings, batch, True))
            row = {"batch_size": batch_size, "overlay_format": image_format,
                   "predict_ms_per_image": statistics.median(predict), "explain_ms_per_image": statistics.median(explain)}
            row["gradcam_cost_ratio"] = row["explain_ms_per_image"] / row["predict_ms_per_image"]
            print(f"batch {batch_size} {image_format}: predict {row['predict_ms_per_image']:.1f} ms/image, "
                  f"explain {row['explain_ms_per_image']:.1f} ms/image, ratio {row['gradcam_cost_ratio']:.3f}", flush=True)
            results.append(row)
    return results


def bench_in_process(loaded: LoadedModel, settings: HandlerSettings, payloads: list[bytes], batch_sizes: list[int],
                     seconds: float) -> list[dict[str, Any]]:
    """Images/s of ``handle_batch`` (decode, preprocess, one batched forward, responses), per batch size.

    Cycles through all payloads in batches for about ``seconds`` (at least 3 batches) after
    one warm-up batch.
    """
    results = []
    for batch_size in batch_sizes:
        batches = [[payloads[(start + i) % len(payloads)] for i in range(batch_size)]
                   for start in range(0, len(payloads), batch_size)]
        per_image_ms(loaded, settings, batches[0], False)  # warm-up
        images, elapsed, index = 0, 0.0, 0
        while elapsed < seconds or index < 3:
            batch = batches[index % len(batches)]
            elapsed += per_image_ms(loaded, settings, batch, False) * len(batch) / 1000
            images += len(batch)
            index += 1
        row = {"batch_size": batch_size, "images": images, "seconds": elapsed, "images_per_s": images / elapsed}
        print(f"in-process batch {batch_size}: {row['images_per_s']:.1f} images/s", flush=True)
        results.append(row)
    return results


def machine_description() -> str:
    """CPU model, core count, torch version and threads."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"


# ---------------------------------------------------------------------------------------------
# Summary and report


def nearest_level(levels: Sequence[dict[str, Any]], images_per_s: float) -> dict[str, Any]:
    """The level whose throughput is nearest ``images_per_s``."""
    return min(levels, key=lambda level: abs(level["images_per_s"] - images_per_s))


def summarize(result: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """The headline ratios and the issue's checks, from whichever sections ran.

    Args:
        result: ``in_process``, ``served``, ``unbatched`` and ``gradcam`` sections (any may be
            missing or None).
        batch_size: The served batch size, at which in-process throughput and the Grad-CAM
            ratio are taken.

    Returns:
        Ratios (None where a section is missing), the best served level, the tail check and
        ``checks``: ``{name, value, target, met}`` per target.
    """
    summary: dict[str, Any] = {"batch_size": batch_size}
    served = (result.get("served") or {}).get("levels") or []
    best = max(served, key=lambda level: level["images_per_s"]) if served else None
    in_process = {row["batch_size"]: row["images_per_s"] for row in result.get("in_process") or []}
    unbatched = (result.get("unbatched") or {}).get("levels") or []
    gradcam = [row for row in result.get("gradcam") or []
               if row["batch_size"] == batch_size and row["overlay_format"] == "jpeg"]
    summary["best_served_images_per_s"] = best["images_per_s"] if best else None
    summary["best_concurrency"] = best["concurrency"] if best else None
    summary["p99_ms_at_best"] = best["p99_ms"] if best else None
    summary["p50_ms_at_best"] = best["p50_ms"] if best else None
    summary["in_process_images_per_s"] = in_process.get(batch_size)
    summary["unbatched_images_per_s"] = unbatched[0]["images_per_s"] if unbatched else None
    summary["served_throughput_ratio"] = (best["images_per_s"] / in_process[batch_size]
                                          if best and in_process.get(batch_size) else None)
    summary["speedup_vs_unbatched"] = (best["images_per_s"] / summary["unbatched_images_per_s"]
                                       if best and summary["unbatched_images_per_s"] else None)
    summary["gradcam_cost_ratio"] = gradcam[0]["gradcam_cost_ratio"] if gradcam else None
    # Tail check: the open-loop level at ~70 % of peak when it ran, else the closed-loop level
    # whose throughput is nearest 70 % of the peak.
    paced = (result.get("served") or {}).get("paced")
    if paced and paced.get("p50_ms"):
        kind = "Poisson" if paced.get("arrivals", "poisson") == "poisson" else "evenly paced"
        tail, source = paced, f"open loop, {kind} arrivals at {paced['offered_images_per_s']:.1f}/s"
    elif best:
        tail = nearest_level(served, 0.7 * best["images_per_s"])
        source = f"closed loop, {tail['concurrency']} in flight (nearest 70 % of peak)"
    else:
        tail, source = None, None
    summary["tail_level"] = source
    summary["tail_images_per_s"] = tail["images_per_s"] if tail else None
    summary["tail_share_of_peak"] = (tail["images_per_s"] / best["images_per_s"]
                                     if tail and best and best["images_per_s"] else None)
    summary["tail_p50_ms"] = tail["p50_ms"] if tail else None
    summary["tail_p99_ms"] = tail["p99_ms"] if tail else None
    summary["p99_over_p50_at_70pct"] = (tail["p99_ms"] / tail["p50_ms"]) if tail and tail["p50_ms"] else None
    if served:
        nearest = nearest_level(served, 0.7 * best["images_per_s"])
        summary["closed_loop_nearest_70pct"] = {
            "concurrency": nearest["concurrency"], "images_per_s": nearest["images_per_s"],
            "p99_over_p50": nearest["p99_ms"] / nearest["p50_ms"] if nearest["p50_ms"] else None}
    summary["errors"] = sum(level["errors"] for level in served + unbatched + ([paced] if paced else []))
    summary["checks"] = [{"name": name, "value": summary[name], "target": target,
                          "met": None if summary[name] is None else bool(test(summary[name]))}
                         for name, target, test in TARGETS]
    return summary


def met_text(met: bool | None) -> str:
    """``yes``, ``NO`` or ``not measured``."""
    return "not measured" if met is None else ("yes" if met else "NO")


def level_row(label: str, level: dict[str, Any]) -> str:
    """One markdown table row for a level."""
    return (f"| {label} | {level['requests']} | {level['errors']} | {level['images_per_s']:.1f} | {fmt(level['p50_ms'], 0)} | "
            f"{fmt(level['p95_ms'], 0)} | {fmt(level['p99_ms'], 0)} | {fmt(level.get('avg_batch_size'), 2)} |")


def write_report(path: Path, result: dict[str, Any]) -> None:
    """The markdown performance report."""
    summary = result["summary"]
    load = result.get("load_average_1min") or {}
    lines = ["# Performance", "", f"Measured {result['date']} on: {result['machine']}.", "",
             f"Command: `{result['command']}`", ""]
    lines += [f"Note: {note}" for note in result.get("notes") or []] + ([""] if result.get("notes") else [])
    if load:
        lines += [f"1-minute load average at start {fmt(load.get('start'), 2)}, at end {fmt(load.get('end'), 2)} "
                  f"(with the benchmark itself idle at the start, a figure near or above the core count means other "
                  f"work was competing for the CPU). Run took {result.get('wall_s', 0):.0f} s.", ""]
    lines += ["How the serving settings were chosen, with before/after figures and what was rejected: "
              "[TUNING.md](TUNING.md).", ""]
    lines += ["## Summary", "", "| figure | value | target | met |", "|---|---|---|---|"]
    for check in summary["checks"]:
        lines.append(f"| `{check['name']}` | {fmt(check['value'], 3)} | {check['target']} | {met_text(check['met'])} |")
    lines += [f"| best served throughput (images/s) | {fmt(summary['best_served_images_per_s'], 1)} "
              f"({summary['best_concurrency']} in flight) | | |",
              f"| p99 latency at best throughput (ms) | {fmt(summary['p99_ms_at_best'], 0)} | | |",
              f"| in-process throughput at batch {summary['batch_size']} (images/s) | "
              f"{fmt(summary['in_process_images_per_s'], 1)} | | |",
              f"| unbatched served throughput, 1 in flight (images/s) | {fmt(summary['unbatched_images_per_s'], 1)} | | |",
              f"| errors (all served levels) | {summary['errors']} | 0 | {met_text(summary['errors'] == 0)} |", ""]
    lines += ["`served_throughput_ratio` = best served images/s ÷ in-process `handle_batch` images/s at the served "
              "batch size; `speedup_vs_unbatched` = best served images/s ÷ served images/s of an archive at "
              "`batchSize: 1`, `maxBatchDelay: 0` with one request in flight; `gradcam_cost_ratio` = explain ÷ "
              "predict per image, JPEG overlays, at the served batch size; `p99_over_p50_at_70pct` from "
              f"{summary['tail_level'] or 'no level'}"
              + (f", which achieved {summary['tail_share_of_peak']:.0%} of peak "
                 f"(p50 {fmt(summary['tail_p50_ms'], 0)} ms, p99 {fmt(summary['tail_p99_ms'], 0)} ms)."
                 if summary["tail_share_of_peak"] is not None else "."), ""]
    nearest = summary.get("closed_loop_nearest_70pct")
    if nearest:
        lines += [f"For comparison, the closed-loop level nearest 70 % of peak ({nearest['concurrency']} in flight, "
                  f"{nearest['images_per_s']:.1f} images/s) has p99/p50 = {fmt(nearest['p99_over_p50'], 2)}.", ""]
    served = result.get("served")
    if served:
        settings = served.get("model_config") or {}
        lines += ["## Served: concurrency sweep through TorchServe", "",
                  f"Target: {served.get('target', 'TorchServe started by this run')}"
                  + "".join(f", `{key}: {value}`" for key, value in settings.items()) + ". "
                  "Closed loop: each client sends its next real 600x450 JPEG (raw body, `POST /predictions/skin_lesion`) "
                  "when the last is answered, from a separate client process, after a warm-up. Each level stops at "
                  f"{result['plan']['level_requests']} requests or {result['plan']['level_seconds']:g} s. Latencies over "
                  "200 responses; average batch = Δ`skin_lesion_batch_size_sum` ÷ Δ`_count` scraped around the level.", "",
                  "| in flight | requests | errors | images/s | p50 ms | p95 ms | p99 ms | avg batch |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [level_row(str(level["concurrency"]), level) for level in served["levels"]]
        if served.get("paced"):
            paced = served["paced"]
            label = f"open loop ({paced.get('arrivals', 'poisson')}) {paced['offered_images_per_s']:.1f}/s ({paced['load_fraction']:.0%} of peak)"
            lines.append(level_row(label, paced))
        lines.append("")
    unbatched = result.get("unbatched")
    if unbatched:
        lines += ["## Served without batching", "",
                  "| setting | requests | errors | images/s | p50 ms | p95 ms | p99 ms | avg batch |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [level_row(f"batchSize 1, {level['concurrency']} in flight", level) for level in unbatched["levels"]]
        lines.append("")
    if result.get("runtime"):
        lines += ["## Model runtime (forward pass only, in-process, per image)", "",
                  "Ratio = time ÷ the served runtime's time at the same batch size (below 1 is faster). "
                  "Interleaved rounds, medians.", "",
                  "| variant | batch size | ms/image | images/s | ratio to served |", "|---|---|---|---|---|"]
        lines += [f"| {row['variant']} | {row['batch_size']} | {row['ms_per_image']:.2f} | {row['images_per_s']:.1f} | "
                  f"{row['ratio_to_served']:.3f} |" for row in result["runtime"]]
        lines.append("")
    if result.get("decode"):
        lines += ["## JPEG decode + resize (per 600x450 image, to the model's resize size)", "",
                  "Pixel difference = mean absolute difference, in 8-bit levels, from the served path's resized image.", "",
                  "| decoder | ms/image | ratio to served | pixel difference |", "|---|---|---|---|"]
        lines += [f"| {row['decoder']}{' (served)' if row['decoder'] == 'pillow_draft' else ''} | {row['ms_per_image']:.2f} | "
                  f"{row['ratio_to_served']:.3f} | {row['mean_abs_pixel_difference']:.2f} |" for row in result["decode"]]
        lines.append("")
    if result.get("in_process"):
        lines += ["## In-process limit (`handle_batch`, no HTTP, no server running)", "",
                  "| batch size | images | seconds | images/s |", "|---|---|---|---|"]
        lines += [f"| {row['batch_size']} | {row['images']} | {row['seconds']:.1f} | {row['images_per_s']:.1f} |"
                  for row in result["in_process"]]
        lines.append("")
    if result.get("gradcam"):
        lines += ["## Grad-CAM cost (in-process handler path, per image)", "",
                  "Explain = the same batch through the same handler with Grad-CAM on for every request:",
                  "closed-form maps from the one forward pass, full-resolution decode of the original,",
                  "overlay render, encode and base64. Ratio = explain / predict, interleaved rounds, medians.", "",
                  "| batch size | overlay | predict ms/image | explain ms/image | gradcam_cost_ratio |",
                  "|---|---|---|---|---|"]
        for row in result["gradcam"]:
            lines.append(f"| {row['batch_size']} | {row['overlay_format']} | {row['predict_ms_per_image']:.1f} | "
                         f"{row['explain_ms_per_image']:.1f} | {row['gradcam_cost_ratio']:.3f} |")
        lines += ["", "The served default is JPEG overlays (`gradcam_format` in `config/model-config.yaml`); PNG is "
                  "available per request with `\"overlay_format\": \"png\"` at the cost shown.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------


def sweep_plan(args: argparse.Namespace) -> SweepPlan:
    """Levels and bounds from the options, with quick or full defaults."""
    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if args.quick else full)

    return SweepPlan(levels=tuple(pick(args.levels, (1, 2, 4, 8, 16, 32), (1, 4, 16))),
                     level_requests=pick(args.level_requests, 2000, 300),
                     level_seconds=pick(args.level_seconds, 25.0, 6.0),
                     warmup_seconds=pick(args.warmup_seconds, 5.0, 3.0),
                     load_fraction=args.load_fraction, arrivals=args.arrivals)


def served_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Model-config changes for the swept archive from ``--batch-size-config``, ``--max-batch-delay``, ``--workers``."""
    overrides: dict[str, Any] = {}
    if args.batch_size_config is not None:
        overrides["batchSize"] = args.batch_size_config
    if args.max_batch_delay is not None:
        overrides["maxBatchDelay"] = args.max_batch_delay
    if args.workers is not None:
        overrides["minWorkers"] = overrides["maxWorkers"] = args.workers
    if args.handler:
        pairs = [item.split("=", 1) for item in args.handler]
        if any(len(pair) != 2 for pair in pairs):
            raise SystemExit(f"--handler takes KEY=VALUE, got {args.handler}")
        overrides["handler"] = {key: yaml.safe_load(value) for key, value in pairs}
    return overrides


def command_line(argv: Sequence[str]) -> str:
    """The command as typed, with the ``--token`` value masked: the report is committed."""
    shown, mask_next = [], False
    for arg in argv[1:]:
        shown.append("***" if mask_next else ("--token=***" if arg.startswith("--token=") else arg))
        mask_next = arg == "--token"
    return " ".join(["python scripts/bench.py", *shown])


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected sections and write ``bench.json`` and the markdown report."""
    started = time.monotonic()
    samples = Path(args.samples)
    payload_paths = sorted(str(path) for path in samples.glob("*.jpg")) if samples.is_dir() else []
    if not payload_paths:
        raise SystemExit(f"no sample payloads at {samples}; pass --samples with real dermoscopic JPEGs")
    payloads = [Path(path).read_bytes() for path in payload_paths]
    plan = sweep_plan(args)
    overrides = served_overrides(args)
    served_config = model_config_with(Path(args.model_config), overrides)
    batch_size = int(served_config["batchSize"])
    sections = set(args.sections)
    notes = []
    if args.url and "unbatched" in sections:
        notes.append("--url: the unbatched section needs a server of its own and was skipped.")
        sections.discard("unbatched")
    if args.url and sections & {"gradcam", "inprocess"}:
        notes.append(f"--url: the in-process sections ran while the server at {args.url} was up (idle).")
    for note in notes:
        print(note, flush=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_description(),
        "command": command_line(sys.argv) if Path(sys.argv[0]).name == "bench.py" else "scripts.bench.main(...)",
        "quick": args.quick,
        "plan": dataclasses.asdict(plan),
        "notes": notes,
        # Other work on the machine skews every figure; the load average makes that visible.
        "load_average_1min": {"start": os.getloadavg()[0]},
    }
    # In-process sections first, while no server started by this run is competing for the cores.
    if sections & {"decode", "runtime"}:
        from handler.model import load_checkpoint
        from scripts.bench_components import bench_decode, bench_runtimes

        rounds = 3 if args.quick else args.rounds
        if "decode" in sections:
            resize_size = load_checkpoint(args.checkpoint).preprocess.resize_size
            result["decode"] = bench_decode(payloads[:16], resize_size, rounds)
        if "runtime" in sections:
            result["runtime"] = bench_runtimes(args.checkpoint, payloads[:16], sorted({1, batch_size}), rounds,
                                               include_compile=not args.quick, device=args.device)
    if sections & {"gradcam", "inprocess"}:
        from handler.inference import HandlerSettings
        from handler.model import load_checkpoint

        from handler.inference import prepare_for_serving

        loaded = load_checkpoint(args.checkpoint)
        # The in-process limit is one process using every core, whatever a served worker's thread share is.
        settings = dataclasses.replace(HandlerSettings.from_mapping(served_config.get("handler")), torch_threads=0)
        prepare_for_serving(loaded, settings)
        if "gradcam" in sections:
            rounds = 3 if args.quick else args.rounds
            gradcam_batch_sizes = args.batch_sizes or ([batch_size] if args.quick else sorted({1, batch_size}))
            result["gradcam"] = bench_gradcam(loaded, settings, payloads[:16], gradcam_batch_sizes, rounds)
        if "inprocess" in sections:
            seconds = args.inprocess_seconds if args.inprocess_seconds is not None else (3.0 if args.quick else 10.0)
            result["in_process"] = bench_in_process(loaded, settings, payloads, sorted({batch_size, 1}, reverse=True), seconds)
        del loaded
    if "unbatched" in sections:
        unbatched_plan = dataclasses.replace(plan, levels=(1,), load_fraction=0.0)
        result["unbatched"] = served_sweep(UNBATCHED_OVERRIDES, payload_paths, unbatched_plan, Path(args.checkpoint),
                                           Path(args.model_config))
    if "served" in sections:
        if args.url:
            headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
            target = ServedTarget(f"{args.url.rstrip('/')}/predictions/{serve.MODEL_NAME}", headers,
                                  args.metrics_url.rstrip("/") if args.metrics_url else None)
            print(f"sweeping the running server at {args.url}", flush=True)
            result["served"] = {"target": args.url, "model_config": None, **sweep_target(target, payload_paths, plan)}
        else:
            result["served"] = served_sweep(overrides, payload_paths, plan, Path(args.checkpoint), Path(args.model_config))
            result["served"]["target"] = "TorchServe started by this run, release archive" + (
                f" with {overrides}" if overrides else "")
    result["wall_s"] = time.monotonic() - started
    result["load_average_1min"]["end"] = os.getloadavg()[0]
    result["summary"] = summarize(result, batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    write_report(Path(args.report), result)
    print("summary:")
    for check in result["summary"]["checks"]:
        print(f"  {check['name']}: {fmt(check['value'], 3)} (target {check['target']}: {met_text(check['met'])})")
    print(f"  p99 at best throughput: {fmt(result['summary']['p99_ms_at_best'], 0)} ms; "
          f"tail check from {result['summary']['tail_level']}")
    print(f"wrote {out / 'bench.json'} and {args.report}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
