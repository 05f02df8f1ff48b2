"""Soak test: measure peak throughput, then hold a fixed share of it and watch errors, latency and memory.

Phase 1 drives the server closed-loop (``concurrency`` clients back to back) to find its peak
images/s. Phase 2 sends requests open-loop at ``load`` x peak for ``duration`` seconds,
sampling the workers' resident memory. After a warm-up share of the run, it checks: zero
errors, worker RSS growth under ``max_rss_growth``, and tail latency stable: the second half's
``drift_quantile`` latency (p99 by default) at most ``max_tail_drift`` times the first half's (a
growth check; 80 % load is a queue, so single windows scatter both ways). A p99 is only as steady as
the requests beyond it: 10 minutes at ~12/s leave ~30 per half, a 60-second run ~3, so short runs
check a lower quantile (the 60-second test in ``make test`` checks p95, ~14 per half).

The command line is ``scripts/soak.py`` (``make soak``).
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil
import requests

from ops.client import ServiceClient
from ops.loadgen import percentile
from ops.paths import MODEL_NAME
from ops.torchserve import Server


@dataclass(frozen=True)
class SoakPlan:
    """How long and how hard to soak, and what passes.

    Attributes:
        duration: Seconds of open-loop load.
        peak_seconds: Seconds of closed-loop load to measure the peak.
        concurrency: Closed-loop clients while measuring the peak.
        load: Share of the measured peak to hold.
        warmup_fraction: Share of ``duration`` left out of the checks.
        max_rss_growth: Largest accepted relative growth of the workers' RSS after warm-up.
        drift_quantile: The latency quantile compared between the halves (0.99 = p99).
        max_tail_drift: Largest accepted ratio of the second half's ``drift_quantile`` latency to the first half's.
    """

    duration: float = 600.0
    peak_seconds: float = 20.0
    concurrency: int = 8
    load: float = 0.8
    warmup_fraction: float = 0.2
    max_rss_growth: float = 0.05
    drift_quantile: float = 0.99
    max_tail_drift: float = 2.0


class Client:
    """Sends real images to one server and records (start, latency, status); tokens are renewed as needed."""

    def __init__(self, server: Server, payloads: list[bytes]) -> None:
        self.client = ServiceClient(server)
        self.payloads = payloads
        self.records: list[tuple[float, float, int]] = []
        self.lock = threading.Lock()
        self.counter = 0

    def send(self) -> None:
        """One request; failures are recorded, never raised."""
        with self.lock:
            payload = self.payloads[self.counter % len(self.payloads)]
            self.counter += 1
        started = time.monotonic()
        try:
            status = self.client.predict(data=payload, timeout=60).status_code
        except requests.RequestException:
            status = -1
        with self.lock:
            self.records.append((started, time.monotonic() - started, status))


def measure_peak(client: Client, seconds: float, concurrency: int) -> float:
    """Closed-loop images/s with ``concurrency`` clients."""
    deadline = time.monotonic() + seconds

    def loop() -> None:
        while time.monotonic() < deadline:
            client.send()

    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = sum(1 for record in client.records if record[2] == 200)
    return ok / (time.monotonic() - started)


def worker_rss(server: Server, client: ServiceClient | None = None) -> int:
    """Total resident memory of the model's worker processes, in bytes."""
    client = client or ServiceClient(server)
    description = client.request("management", "GET", f"/models/{MODEL_NAME}", timeout=10).json()[0]
    total = 0
    for worker in description["workers"]:
        try:
            total += psutil.Process(int(worker["pid"])).memory_info().rss
        except (psutil.NoSuchProcess, ValueError):
            continue
    return total


def run_soak(server: Server, payloads: list[bytes], plan: SoakPlan) -> dict[str, Any]:
    """Both phases against a ready server; returns the report (``passed`` says whether every check held)."""
    peak = measure_peak(Client(server, payloads), plan.peak_seconds, plan.concurrency)
    rate = plan.load * peak
    client = Client(server, payloads)
    management = ServiceClient(server)
    rss: list[tuple[float, int]] = []
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=64) as pool:
        sent = 0
        next_sample = started
        while (now := time.monotonic()) - started < plan.duration:
            if now >= next_sample:
                rss.append((now - started, worker_rss(server, management)))
                next_sample += 2.0
            due = started + sent / rate
            if now >= due:
                pool.submit(client.send)
                sent += 1
            else:
                time.sleep(min(due - now, 0.01))
    warmup = plan.warmup_fraction * plan.duration
    steady = [r for r in client.records if r[0] - started >= warmup]
    middle = warmup + (plan.duration - warmup) / 2
    halves = [[r[1] for r in steady if r[0] - started < middle], [r[1] for r in steady if r[0] - started >= middle]]
    tails = [percentile(half, plan.drift_quantile) * 1000 for half in halves]
    steady_rss = [value for t, value in rss if t >= warmup]
    window = max(1, len(steady_rss) // 10)
    rss_start, rss_end = statistics.median(steady_rss[:window]), statistics.median(steady_rss[-window:])
    errors = sum(1 for record in client.records if record[2] != 200)
    report = {
        "peak_images_per_s": peak,
        "target_images_per_s": rate,
        "achieved_images_per_s": len(client.records) / plan.duration,
        "duration_s": plan.duration,
        "requests": len(client.records),
        "errors": errors,
        "p50_ms": percentile([r[1] for r in steady], 0.5) * 1000,
        "p99_ms": percentile([r[1] for r in steady], 0.99) * 1000,
        "drift_quantile": plan.drift_quantile,
        "tail_ms_by_half": tails,
        "tail_drift": tails[-1] / tails[0],
        "worker_rss_mb_start": rss_start / 2**20,
        "worker_rss_mb_end": rss_end / 2**20,
        "worker_rss_growth": (rss_end - rss_start) / rss_start,
    }
    report["passed"] = (errors == 0 and report["worker_rss_growth"] < plan.max_rss_growth
                        and report["tail_drift"] <= plan.max_tail_drift)
    return report
