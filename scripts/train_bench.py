"""Training throughput of each CPU lever on this machine (``make train-bench``): geometry, memory
format, bf16, frozen early stages, torch.compile, side-by-side one-thread processes.

Method: :mod:`lab.training_bench`. Prints a table (and writes it as JSON with ``--out``); run it on
an otherwise idle machine, since every figure is a throughput.

Example:
    python scripts/train_bench.py --steps 5 --out runs/train-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from lab.training_bench import LEVERS, cpu_name, format_levers, measure


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed SGD steps per lever")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--levers", nargs="+", help="only the levers whose names contain one of these")
    parser.add_argument("--out", help="JSON file for the rows")
    return parser


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every lever and print the table."""
    levers = [lever for lever in LEVERS if not args.levers or any(part in lever.name for part in args.levers)]
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; {args.arch}, batch {args.batch_size}, "
          f"{args.steps} timed steps per lever", flush=True)
    rows = []
    for lever in levers:
        rows.append(measure(lever, args.arch, args.batch_size, args.steps, args.warmup))
        print(f"{lever.name}: {rows[-1]['images_per_s']:.1f} images/s {rows[-1]['note']}", flush=True)
    print(format_levers(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
