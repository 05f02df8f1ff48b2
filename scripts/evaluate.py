"""Evaluate a checkpoint on a labelled image folder through the serving preprocessing.

Labels come as HAM10000 metadata (``image_id``, ``dx``) or ISIC 2018 Task 3 ground
truth (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``). Images named in the labels but missing
from the folders are an error, never silently skipped.

Example:
    python scripts/evaluate.py --images ../shared/data/ham10000-224/images \
        --labels ../shared/data/ham10000-224/metadata.csv \
        --subset models/provenance/val_split.json --out runs/eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.data import attach_paths, read_labels  # noqa: E402
from handler.evaluation import classification_report, format_report  # noqa: E402
from handler.inference import predict_probabilities  # noqa: E402
from handler.model import load_checkpoint  # noqa: E402
from handler.preprocessing import load_model_input  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", nargs="+", required=True, help="one or more image folders")
    parser.add_argument("--labels", required=True, help="HAM10000 metadata or ISIC 2018 Task 3 ground-truth CSV")
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "skin_lesion.pt"))
    parser.add_argument("--subset", help="JSON file with 'val_image_ids' (as written by train.py) to evaluate only those")
    parser.add_argument("--out", required=True, help="folder for metrics.json and predictions.csv")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--referral-threshold", type=float,
                        help="measure melanoma sensitivity/specificity of the flag p(mel) >= this")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation, write ``metrics.json`` and ``predictions.csv``, print a summary."""
    records = read_labels(args.labels)
    if args.subset:
        wanted = set(json.loads(Path(args.subset).read_text())["val_image_ids"])
        records = [r for r in records if r.image_id in wanted]
    records = attach_paths(records, args.images)
    loaded = load_checkpoint(args.checkpoint)
    probabilities = []
    for start in tqdm(range(0, len(records), args.batch_size), desc="evaluating", mininterval=5):
        batch = [load_model_input(Path(r.path).read_bytes(), loaded.preprocess)[0] for r in records[start:start + args.batch_size]]
        probabilities.append(predict_probabilities(loaded, torch.stack(batch)))
    probs = torch.cat(probabilities).numpy()
    labels = np.array([r.label for r in records])
    report = classification_report(probs, labels, args.referral_threshold)
    report["checkpoint"] = str(args.checkpoint)
    report["model_version"] = loaded.version
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    with open(out / "predictions.csv", "w") as handle:
        handle.write("image_id,label," + ",".join(report["per_class"]) + "\n")
        for record, row in zip(records, probs):
            handle.write(f"{record.image_id},{list(report['per_class'])[record.label]}," + ",".join(f"{p:.6f}" for p in row) + "\n")
    print(format_report(report))
    print(f"wrote {out / 'metrics.json'}")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
