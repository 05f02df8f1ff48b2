"""Benchmarks, reported as ratios to a baseline measured in the same run.

Section ``gradcam``: the handler's whole batch path (decode, preprocess, one forward,
softmax, response building) with and without Grad-CAM explanations, per image, at batch
sizes 1 and 8, for JPEG and PNG overlays. Predict and explain rounds are interleaved so
that machine noise hits both alike; the figure is the median of the rounds.

Example:
    python scripts/bench.py --out runs/bench            # writes bench.json and updates docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.inference import HandlerSettings, handle_batch  # noqa: E402
from handler.model import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = ROOT.parent / "shared" / "data" / "samples-600x450"


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "skin_lesion.pt"))
    parser.add_argument("--samples", default=str(DEFAULT_SAMPLES), help="folder of real 600x450 JPEG payloads")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved predict/explain rounds per setting")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="folder for bench.json")
    parser.add_argument("--report", default=str(ROOT / "docs" / "PERFORMANCE.md"), help="markdown report to write")
    return parser


def per_image_ms(loaded, settings: HandlerSettings, payloads: list[bytes], explain: bool) -> float:
    """Milliseconds per image for one batch through the handler path."""
    rows = [{"body": data} for data in payloads]
    started = time.perf_counter()
    responses = handle_batch(loaded, settings, rows, "bench", [explain] * len(rows))
    elapsed = time.perf_counter() - started
    if any(r.status != 200 for r in responses):
        raise RuntimeError(f"benchmark request failed: {[r.body for r in responses if r.status != 200][:1]}")
    return elapsed * 1000 / len(rows)


def bench_gradcam(loaded, payloads: list[bytes], batch_sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    """Explain cost / predict cost per image, interleaved, for each batch size and overlay format."""
    results = []
    for batch_size in batch_sizes:
        batch = [payloads[i % len(payloads)] for i in range(batch_size)]
        for image_format in ("jpeg", "png"):
            settings = HandlerSettings(gradcam_format=image_format)
            per_image_ms(loaded, settings, batch, True)  # warm-up
            predict, explain = [], []
            for _ in range(rounds):
                predict.append(per_image_ms(loaded, settings, batch, False))
                explain.append(per_image_ms(loaded, settings, batch, True))
            row = {"batch_size": batch_size, "overlay_format": image_format,
                   "predict_ms_per_image": statistics.median(predict), "explain_ms_per_image": statistics.median(explain)}
            row["gradcam_cost_ratio"] = row["explain_ms_per_image"] / row["predict_ms_per_image"]
            print(f"batch {batch_size} {image_format}: predict {row['predict_ms_per_image']:.1f} ms/image, "
                  f"explain {row['explain_ms_per_image']:.1f} ms/image, ratio {row['gradcam_cost_ratio']:.3f}", flush=True)
            results.append(row)
    return results


def machine_description() -> str:
    """CPU model, core count, torch version and threads."""
    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"


def write_report(path: Path, result: dict[str, Any]) -> None:
    """The markdown performance report."""
    lines = [
        "# Performance",
        "",
        f"Measured {result['date']} on: {result['machine']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "## Grad-CAM cost (in-process handler path, per image)",
        "",
        "Explain = the same batch through the same handler with Grad-CAM on for every request:",
        "closed-form maps from the one forward pass, full-resolution decode of the original,",
        "overlay render, encode and base64. Ratio = explain / predict, interleaved rounds, medians.",
        "",
        "| batch size | overlay | predict ms/image | explain ms/image | gradcam_cost_ratio |",
        "|---|---|---|---|---|",
    ]
    for row in result["gradcam"]:
        lines.append(f"| {row['batch_size']} | {row['overlay_format']} | {row['predict_ms_per_image']:.1f} | "
                     f"{row['explain_ms_per_image']:.1f} | {row['gradcam_cost_ratio']:.3f} |")
    lines += ["", "The served default is JPEG overlays (`gradcam_format` in `config/model-config.yaml`); PNG is "
              "available per request with `\"overlay_format\": \"png\"` at the cost shown.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmarks and write ``bench.json`` and the markdown report."""
    samples = Path(args.samples)
    if not samples.is_dir():
        raise SystemExit(f"no sample payloads at {samples}; pass --samples with real dermoscopic JPEGs")
    payloads = [p.read_bytes() for p in sorted(samples.glob("*.jpg"))][:16]
    loaded = load_checkpoint(args.checkpoint)
    rounds = 3 if args.quick else args.rounds
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_description(),
        "command": "python scripts/bench.py " + " ".join(sys.argv[1:]),
        "gradcam": bench_gradcam(loaded, payloads, args.batch_sizes, rounds),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    write_report(Path(args.report), result)
    print(f"wrote {out / 'bench.json'} and {args.report}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
