"""Soak test: measure peak throughput, then hold a fixed share of it and watch errors, latency and memory.

Phase 1 drives the server closed-loop (``--concurrency`` clients back to back) to find
its peak images/s. Phase 2 sends requests open-loop at ``--load`` x peak for
``--duration`` seconds, sampling the workers' resident memory. After a warm-up share of
the run, it checks: zero errors, worker RSS growth under ``--max-rss-growth``, and p99
latency stable: the second half's p99 at most ``--max-p99-drift`` times the first half's
(a growth check; 80 % load is a queue, so single windows scatter both ways).

Example:
    python scripts/soak.py --duration 600            # make soak: 10 minutes at 80 % of peak
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = ROOT.parent / "shared" / "data" / "samples-600x450"


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=str(ROOT / "run"),
                        help="use the server running from this folder; if none runs, start one in a temporary folder")
    parser.add_argument("--model-store", default=str(ROOT / "model_store"))
    parser.add_argument("--samples", default=str(DEFAULT_SAMPLES), help="real dermoscopic JPEG payloads")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of open-loop load")
    parser.add_argument("--peak-seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients while measuring the peak")
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured peak to hold")
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--max-p99-drift", type=float, default=2.0)
    parser.add_argument("--out", default=str(ROOT / "runs" / "soak"), help="folder for soak.json")
    return parser


class Client:
    """Sends real images to one server and records (start, latency, status)."""

    def __init__(self, server: serve.Server, payloads: list[bytes]) -> None:
        self.url = f"{server.url('inference')}/predictions/{serve.MODEL_NAME}"
        self.headers = server.headers("inference")
        self.payloads = payloads
        self.records: list[tuple[float, float, int]] = []
        self.lock = threading.Lock()
        self.counter = 0
        self.session = threading.local()

    def send(self) -> None:
        """One request; failures are recorded, never raised."""
        with self.lock:
            payload = self.payloads[self.counter % len(self.payloads)]
            self.counter += 1
        session = getattr(self.session, "value", None) or requests.Session()
        self.session.value = session
        started = time.monotonic()
        try:
            status = session.post(self.url, data=payload, headers=self.headers, timeout=60).status_code
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


def worker_rss(server: serve.Server) -> int:
    """Total resident memory of the model's worker processes, in bytes."""
    description = requests.get(f"{server.url('management')}/models/{serve.MODEL_NAME}",
                               headers=server.headers("management"), timeout=10).json()[0]
    total = 0
    for worker in description["workers"]:
        try:
            total += psutil.Process(int(worker["pid"])).memory_info().rss
        except (psutil.NoSuchProcess, ValueError):
            continue
    return total


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_soak(server: serve.Server, payloads: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """Both phases against a ready server; returns the report."""
    peak = measure_peak(Client(server, payloads), args.peak_seconds, args.concurrency)
    rate = args.load * peak
    client = Client(server, payloads)
    rss: list[tuple[float, int]] = []
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=64) as pool:
        sent = 0
        next_sample = started
        while (now := time.monotonic()) - started < args.duration:
            if now >= next_sample:
                rss.append((now - started, worker_rss(server)))
                next_sample += 2.0
            due = started + sent / rate
            if now >= due:
                pool.submit(client.send)
                sent += 1
            else:
                time.sleep(min(due - now, 0.01))
    warmup = args.warmup_fraction * args.duration
    steady = [r for r in client.records if r[0] - started >= warmup]
    middle = warmup + (args.duration - warmup) / 2
    halves = [[r[1] for r in steady if r[0] - started < middle], [r[1] for r in steady if r[0] - started >= middle]]
    p99s = [percentile(half, 0.99) * 1000 for half in halves]
    steady_rss = [value for t, value in rss if t >= warmup]
    window = max(1, len(steady_rss) // 10)
    rss_start, rss_end = statistics.median(steady_rss[:window]), statistics.median(steady_rss[-window:])
    errors = sum(1 for record in client.records if record[2] != 200)
    report = {
        "peak_images_per_s": peak,
        "target_images_per_s": rate,
        "achieved_images_per_s": len(client.records) / args.duration,
        "duration_s": args.duration,
        "requests": len(client.records),
        "errors": errors,
        "p50_ms": percentile([r[1] for r in steady], 0.5) * 1000,
        "p99_ms": percentile([r[1] for r in steady], 0.99) * 1000,
        "p99_ms_by_half": p99s,
        "p99_drift": p99s[-1] / p99s[0],
        "worker_rss_mb_start": rss_start / 2**20,
        "worker_rss_mb_end": rss_end / 2**20,
        "worker_rss_growth": (rss_end - rss_start) / rss_start,
    }
    report["passed"] = (errors == 0 and report["worker_rss_growth"] < args.max_rss_growth
                        and report["p99_drift"] <= args.max_p99_drift)
    return report


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak against the running server, or a temporary one; write ``soak.json``."""
    payloads = [p.read_bytes() for p in sorted(Path(args.samples).glob("*.jpg"))]
    if not payloads:
        raise SystemExit(f"no JPEG payloads in {args.samples}")
    server = serve.Server(Path(args.run_dir).resolve())
    temporary = None
    if not server.is_running():
        temporary = tempfile.TemporaryDirectory(prefix="soak-")
        server = serve.start(Path(temporary.name), Path(args.model_store), ROOT / "config" / "config.properties")
    try:
        serve.wait_ready(server)
        report = run_soak(server, payloads, args)
    finally:
        if temporary is not None:
            serve.stop(server)
            temporary.cleanup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print("soak", "PASSED" if report["passed"] else "FAILED")
    return report


if __name__ == "__main__":
    sys.exit(0 if main(get_args_parser().parse_args())["passed"] else 1)
