"""Soak test: measure peak throughput, then hold a fixed share of it and watch errors, latency and memory (``make soak``).

Uses the server running from ``--run-dir``, or starts one in a temporary folder. The logic
and the checks are :mod:`ops.soak`.

Example:
    python scripts/soak.py --duration 600            # make soak: 10 minutes at 80 % of peak
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from ops.paths import DATA, MODEL_STORE, ROOT, RUN_DIR, SERVER_CONFIG
from ops.soak import SoakPlan, run_soak
from ops.torchserve import Server, start, stop, wait_ready


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    defaults = SoakPlan()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=str(RUN_DIR),
                        help="use the server running from this folder; if none runs, start one in a temporary folder")
    parser.add_argument("--model-store", default=str(MODEL_STORE))
    parser.add_argument("--samples", default=str(DATA / "samples-600x450"), help="real dermoscopic JPEG payloads")
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds of open-loop load")
    parser.add_argument("--peak-seconds", type=float, default=defaults.peak_seconds)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency,
                        help="closed-loop clients while measuring the peak")
    parser.add_argument("--load", type=float, default=defaults.load, help="share of the measured peak to hold")
    parser.add_argument("--warmup-fraction", type=float, default=defaults.warmup_fraction)
    parser.add_argument("--max-rss-growth", type=float, default=defaults.max_rss_growth)
    parser.add_argument("--drift-quantile", type=float, default=defaults.drift_quantile,
                        help="latency quantile compared between the two halves (0.99 = p99; lower for short runs)")
    parser.add_argument("--max-tail-drift", type=float, default=defaults.max_tail_drift,
                        help="largest accepted ratio of the second half's quantile latency to the first half's")
    parser.add_argument("--out", default=str(ROOT / "runs" / "soak"), help="folder for soak.json")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak against the running server, or a temporary one; write ``soak.json``."""
    payloads = [p.read_bytes() for p in sorted(Path(args.samples).glob("*.jpg"))]
    if not payloads:
        raise SystemExit(f"no JPEG payloads in {args.samples}")
    plan = SoakPlan(args.duration, args.peak_seconds, args.concurrency, args.load, args.warmup_fraction,
                    args.max_rss_growth, args.drift_quantile, args.max_tail_drift)
    server = Server(Path(args.run_dir).resolve())
    temporary = None
    if not server.is_running():
        temporary = tempfile.TemporaryDirectory(prefix="soak-")
        server = start(Path(temporary.name), Path(args.model_store), SERVER_CONFIG)
    try:
        wait_ready(server)
        report = run_soak(server, payloads, plan)
    finally:
        if temporary is not None:
            stop(server)
            temporary.cleanup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print("soak", "PASSED" if report["passed"] else "FAILED")
    return report


if __name__ == "__main__":
    sys.exit(0 if main(get_args_parser().parse_args())["passed"] else 1)
