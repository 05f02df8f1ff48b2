"""Release checkpoints side by side on the validation lesions at 4:3, lesion-level, as each serves.

Presentations and method: :mod:`lab.release_comparison`. Writes ``comparison.json`` (each release's
figures and intervals), ``paired_differences.json`` (each release minus the first, with paired
bootstrap intervals) and ``comparison.md`` into ``--out`` and prints the tables.

Example (what ``make compare-releases`` runs):
    python scripts/compare_releases.py --release 1.6.1=runs/release/skin_lesion-1.6.1.pt \
        --release 1.7.0=models/skin_lesion.pt --out runs/compare-releases
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from handler.settings import load_handler_settings
from lab.data import read_labelled_images
from lab.release_comparison import (PRESENTATIONS, format_comparison, format_differences, lesion_report,
                                    paired_differences, serve_lesions, stretched_copies)
from lab.training import split_records_by_file
from ops.paths import DATA, MODEL_CONFIG, PROVENANCE


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", action="append", required=True, metavar="NAME=CHECKPOINT",
                        help="a release to compare (repeat the option)")
    parser.add_argument("--split", default=str(PROVENANCE / "val_split.json"), help="the validation split (val_image_ids)")
    parser.add_argument("--data-224", default=str(DATA / "ham10000-224"), help="one squashed 224x224 copy per lesion")
    parser.add_argument("--data-43", default=str(DATA / "ham10000-200x150"), help="every image at 200x150")
    parser.add_argument("--presentations", nargs="+", choices=PRESENTATIONS, default=list(PRESENTATIONS))
    parser.add_argument("--stretched-dir", help="where the 299x224 copies are made (default: a temporary folder)")
    parser.add_argument("--model-config", default=str(MODEL_CONFIG), help="serving settings (TTA, decision rule)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the 95%% intervals")
    parser.add_argument("--out", required=True, help="folder for comparison.json, paired_differences.json and comparison.md")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Serve every release on every presentation and write the table."""
    settings = load_handler_settings(args.model_config)
    releases = dict(item.split("=", 1) for item in args.release)
    with tempfile.TemporaryDirectory() as scratch:
        presentations = {}
        if "stretched" in args.presentations:
            squares = read_labelled_images(f"{args.data_224}/metadata.csv", [f"{args.data_224}/images"], args.split)
            presentations["stretched"] = stretched_copies(squares, args.stretched_dir or scratch)
        if "200x150" in args.presentations:
            presentations["200x150"] = split_records_by_file(f"{args.data_43}/metadata.csv", [f"{args.data_43}/images"],
                                                             args.split)[1]
        reports, differences = {}, {}
        first = next(iter(releases))
        for presentation, records in presentations.items():
            reports[presentation], answers = {}, {}
            for name, checkpoint in releases.items():
                answers[name] = serve_lesions(checkpoint, records, settings)
                reports[presentation][name] = lesion_report(answers[name], args.bootstrap)
                figures = reports[presentation][name]["figures"]
                print(f"{presentation} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()), flush=True)
            if args.bootstrap:
                differences[presentation] = {name: paired_differences(answers[first], answers[name], args.bootstrap)
                                             for name in releases if name != first}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(reports, indent=2))
    table = format_comparison(reports)
    if any(differences.values()):
        (out / "paired_differences.json").write_text(json.dumps({"minus": first, "presentations": differences}, indent=2))
        table += ("\n\nEach release minus the first, paired (the same resampled lesions score both; 95 % intervals):\n\n"
                  + format_differences(differences, first))
    (out / "comparison.md").write_text(table + "\n")
    print(table)
    return {"reports": reports, "paired_differences": differences}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
