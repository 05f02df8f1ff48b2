"""Score the served Grad-CAM and the candidate maps on the validation lesions' masks (localization,
deletion/insertion faithfulness, randomization sanity, cost); see lab/explanation_benchmark.py.

Example:
    python scripts/evaluate_explanations.py --out runs/explanations            # 150 lesions, stratified
    python scripts/evaluate_explanations.py --all --checkpoint runs/new.pt      # every validation lesion
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from handler.checkpoint import load_checkpoint
from handler.settings import load_handler_settings
from lab.explanation_benchmark import METHODS, development_lesions, run_benchmark, stratified_subset, validation_lesions
from ops.paths import CHECKPOINT, DATA, MODEL_CONFIG, VAL_SPLIT


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--model-config", default=str(MODEL_CONFIG), help="serving config (the decision rule)")
    parser.add_argument("--data", default=str(DATA / "ham10000-200x150"), help="folder with images/, masks/, metadata.csv")
    parser.add_argument("--split", default=str(VAL_SPLIT), help="JSON with val_image_ids")
    parser.add_argument("--lesions", type=int, default=150, help="stratified subset size (default 150)")
    parser.add_argument("--all", action="store_true", help="every validation lesion with a mask")
    parser.add_argument("--lesion-set", choices=["validation", "development"], default="validation",
                        help="development: training lesions with masks (none sharing a lesion with validation), "
                             "for tuning a method without touching the validation lesions that judge it")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--step", type=float, default=0.1, help="deletion/insertion step, as a fraction of the view")
    parser.add_argument("--sanity-lesions", type=int, default=30, help="lesions for the randomization check (0: skip)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/explanations")
    return parser


def main(args: argparse.Namespace) -> dict:
    """Run the benchmark and print its table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.checkpoint)
    rule = load_handler_settings(args.model_config).decision_rule
    pool = (validation_lesions if args.lesion_set == "validation" else development_lesions)(args.split, args.data)
    lesions = stratified_subset(pool, None if args.all else args.lesions, args.seed)
    steps = round(0.5 / args.step)
    fractions = [round(args.step * (i + 1), 6) for i in range(steps)]
    print(f"{len(lesions)} {args.lesion_set} lesions, checkpoint {loaded.version}, methods {args.methods}", flush=True)
    report = run_benchmark(loaded, lesions, {name: METHODS[name] for name in args.methods}, fractions, rule, args.out,
                           args.sanity_lesions, args.resamples, log=lambda line: print(line, flush=True),
                           lesion_set=args.lesion_set)
    print(Path(args.out, "report.md").read_text())
    print(f"report: {args.out}/report.json, {args.out}/report.md, {args.out}/curves.png ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
    sys.exit(0)
