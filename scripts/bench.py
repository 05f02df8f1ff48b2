"""Benchmarks, measured end to end through the real TorchServe, reported as ratios to baselines from the same run.

Sections (``--sections``; all by default) run one after another, never side by side, so that
no two of them compete for the CPU cores:

``gate``: the out-of-distribution gate's forward pass against the classifier's on the same
batch, and the handler path with the gate against the same path without it: the gate's cost
as a share of the release's predict cost (target at most 0.25).

``gradcam``: the handler's whole batch path (decode, preprocess, one forward, softmax,
response building) with and without Grad-CAM explanations, per image, for JPEG and PNG
overlays. Predict and explain rounds are interleaved so that machine noise hits both alike;
the figure is the median of the rounds.

``inprocess``: the served ceiling: ``handler.inference.handle_batch`` (preprocessing and one
batched forward, no HTTP, no TorchServe) over the same real JPEGs, images/s at the configured
batch size and at batch size 1, measured while no server is running, for each process layout
(one process with a thread per core, one single-thread process per core, ...; ``--layouts``):
the fastest is the limit the served throughput is divided by.

``decode``: JPEG decode + resize to the model's resize size, per image: the served Pillow
draft-mode path against a full Pillow decode and OpenCV ``imdecode`` with and without
``IMREAD_REDUCED_COLOR_2``, with the pixel difference each would make.

``runtime``: the forward pass alone (features + logits) per image, for eager fp32
(contiguous and channels-last), bf16 autocast, a frozen TorchScript graph, OpenVINO and
ONNX Runtime (each with all threads and with one), and ``torch.compile`` (full runs only: it
compiles for about a minute), as ratios to the served runtime, with each variant's largest
logit difference from eager fp32. On a GPU (``--device cuda``): eager fp32, fp16 autocast and TorchScript fp16 at
growing batch sizes.

``--baseline CHECKPOINT`` (or ``git:REV`` for the release checkpoint committed at REV) runs the
``inprocess`` and ``served`` sections a second time for that checkpoint, right after the
release's, and reports the release's throughput as a ratio to it (``make bench
BASELINE=git:360bf4d`` compares with release 1.5.0). A ``git:REV`` baseline serves as it was
released: with the batching, workers, runtime, precision, threads and TTA of REV's model config
(``--baseline-serving current`` serves it with this run's instead, to compare the networks alone).

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

``protocols``: one server with the release settings, the same JPEGs sent one per request as
the raw body to ``/predictions`` (plain), as KServe v1 ``instances`` to
``/v1/models/skin_lesion:predict`` and as an Open Inference Protocol ``inputs`` tensor to
``/v2/models/skin_lesion/infer``, closed loop at 16 in flight, the three interleaved for two
rounds (one with ``--quick``): each protocol's images/s as a ratio to the plain endpoint's
(target at least 0.95).

The pieces live in ``ops/``: :mod:`ops.loadgen` (closed- and open-loop load, statistics, the
client process), :mod:`ops.bench_served` (archives and servers for the sweeps),
:mod:`ops.bench_inprocess` (decode, runtime, Grad-CAM and ``handle_batch`` without a server),
:mod:`ops.bench_report` (summary and markdown) and :mod:`ops.bench_run` (the sections in order).

Example:
    python scripts/bench.py                      # make bench: writes runs/bench/bench.json and docs/PERFORMANCE.md
    python scripts/bench.py --quick --out /tmp/bench --report /tmp/bench/PERFORMANCE.md
    python scripts/bench.py --sections served --workers 2 --batch-size-config 4 --max-batch-delay 20 --report /tmp/w2.md
    python scripts/bench.py --url http://127.0.0.1:8080 --token TOKEN --metrics-url http://127.0.0.1:8082
    python scripts/bench.py --sections inprocess served --workers 2 --handler torch_threads=1 --report /tmp/w2.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ops.bench_report import command_line, summary_text, write_report
from ops.bench_run import SECTIONS, BenchOptions, run_bench
from ops.paths import CHECKPOINT, DATA, MODEL_CONFIG, ROOT


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--model-config", default=str(MODEL_CONFIG), help="model config the archives start from")
    parser.add_argument("--samples", default=str(DATA / "samples-600x450"), help="folder of real 600x450 JPEG payloads")
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
    parser.add_argument("--layouts", nargs="+", metavar="PxT",
                        help="in-process layouts, processes x threads each (default: 1x<cores> and <cores>x1)")
    parser.add_argument("--baseline", metavar="CHECKPOINT",
                        help="also bench this checkpoint (or git:REV, the release checkpoint at a commit) in the "
                             "same run, in-process and served, and report throughput ratios to it")
    parser.add_argument("--baseline-serving", choices=("released", "current"), default="released",
                        help="released (default): a git:REV baseline is served with the batching, workers, runtime, "
                             "precision, threads and TTA committed at REV, as it was released (--handler and the "
                             "batch/worker options still apply on top); current: with this run's model config, as "
                             "the release is")
    parser.add_argument("--inprocess-seconds", type=float, help="seconds per batch size in-process (default 10, quick 3)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="folder for bench.json")
    parser.add_argument("--report", default=str(ROOT / "docs" / "PERFORMANCE.md"), help="markdown report to write")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected sections and write ``bench.json`` and the markdown report."""
    command = command_line(sys.argv) if Path(sys.argv[0]).name == "bench.py" else "scripts.bench.main(...)"
    result = run_bench(BenchOptions.from_namespace(args), command)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    write_report(Path(args.report), result)
    print(summary_text(result))
    print(f"wrote {out / 'bench.json'} and {args.report}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
