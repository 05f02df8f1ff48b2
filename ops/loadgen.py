"""Load generation against a served model: closed- and open-loop levels, their statistics, and sweeps.

``scripts/bench.py`` sweeps concurrency with these (``make bench``); ``ops/soak.py`` holds a
fixed share of the peak with its own paced client. The client side runs in a spawned process
(:func:`sweep_target`) that imports only this module, ``requests`` and the light ``ops``
modules: it never loads torch or the model, so it does not compete with the server for
interpreter or threads.

Statistics are over 200 responses; an error (non-200 or exception) is counted, never fatal.
The average batch size the server formed in a level comes from the handler's Prometheus
histogram ``skin_lesion_batch_size`` (``_sum`` / ``_count`` deltas scraped around the level).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import random
import re
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import requests

from ops.client import is_token_refusal, renew_token
from ops.paths import MODEL_NAME
from ops.torchserve import Server

BATCH_SIZE_METRIC = "skin_lesion_batch_size"


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


@dataclasses.dataclass(frozen=True)
class ServedTarget:
    """Where the client sends requests and scrapes the batch-size histogram.

    Attributes:
        predict_url: ``.../predictions/<model>``.
        headers: Headers for every request (a fixed token, for a server this project did not start).
        metrics_url: Base URL of the metrics API, for the average batch size; None skips it.
        model_name: The ``ModelName`` label of the batch-size histogram.
        run_dir: The run folder of a server this project started: the inference token is then
            read from its key file for each request, and renewed when it has expired.
    """

    predict_url: str
    headers: dict[str, str]
    metrics_url: str | None = None
    model_name: str = MODEL_NAME
    run_dir: str | None = None

    def request_headers(self) -> dict[str, str]:
        """The headers for the next request, with the current token."""
        if self.run_dir is None:
            return self.headers
        return {**self.headers, **Server(Path(self.run_dir)).headers("inference")}


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
    """The HTTP status of one prediction request, -1 if it raised: failures are counted, never fatal.

    With a run folder, a request refused for an expired token is renewed and sent once more.
    """
    try:
        headers = target.request_headers()
        response = session.post(target.predict_url, data=payload, headers=headers, timeout=120)
        if target.run_dir is not None and is_token_refusal(response):
            stale = headers.get("Authorization", "").removeprefix("Bearer ") or None
            if renew_token(Server(Path(target.run_dir)), "inference", stale) is not None:
                response = session.post(target.predict_url, data=payload, headers=target.request_headers(), timeout=120)
        return response.status_code
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


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """How to sweep one served configuration."""

    levels: tuple[int, ...]
    level_requests: int
    level_seconds: float
    warmup_seconds: float
    load_fraction: float = 0.0
    arrivals: str = "poisson"


def default_plan(quick: bool, levels: Sequence[int] | None = None, level_requests: int | None = None,
                 level_seconds: float | None = None, warmup_seconds: float | None = None, load_fraction: float = 0.7,
                 arrivals: str = "poisson") -> SweepPlan:
    """A plan with the full (or ``quick``) defaults for every bound not given.

    Full: levels 1 2 4 8 16 32, 2000 requests or 25 s per level, 5 s warm-up. Quick: levels
    1 4 16, 300 requests or 6 s, 3 s warm-up.
    """
    def pick(value: Any, full: Any, fast: Any) -> Any:
        return value if value is not None else (fast if quick else full)

    return SweepPlan(levels=tuple(pick(levels, (1, 2, 4, 8, 16, 32), (1, 4, 16))),
                     level_requests=pick(level_requests, 2000, 300),
                     level_seconds=pick(level_seconds, 25.0, 6.0),
                     warmup_seconds=pick(warmup_seconds, 5.0, 3.0),
                     load_fraction=load_fraction, arrivals=arrivals)


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
