"""`make evaluate` reports the input gate's refusals; `--ood` (make evaluate-ood) its refusal rate and AUROC."""

from __future__ import annotations

import csv

import pytest

from lab.synthetic_images import generate
from ops.paths import CHECKPOINT
from scripts import evaluate

pytestmark = pytest.mark.data


def test_evaluate_reports_refusals_accepted_figures_and_ood_folders(samples_dir, tmp_path):
    images = sorted(samples_dir.glob("*.jpg"))[::7]  # 10 images, all 7 classes
    with open(samples_dir / "metadata.csv") as handle:
        rows = {row["image_id"]: row for row in csv.DictReader(handle)}
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["lesion_id", "image_id", "dx"])
        writer.writeheader()
        for path in images:
            writer.writerow({key: rows[path.stem][key] for key in ("lesion_id", "image_id", "dx")})
    ood = tmp_path / "ood"
    ood.mkdir()
    for image in generate(count=9, seed=3):
        (ood / image.name).write_bytes(image.data)
    (ood / "not_an_image.txt").write_text("a file the service refuses before its gate")
    args = evaluate.get_args_parser().parse_args(
        ["--images", str(samples_dir), "--labels", str(labels), "--out", str(tmp_path / "eval"), "--bootstrap", "0",
         "--checkpoint", str(CHECKPOINT), "--ood", str(ood)])
    report = evaluate.main(args)
    gate = report["input_gate"]
    assert gate["images"] == len(images) and gate["refused"] == 0 and gate["refusal_rate"] == 0.0
    assert report["accepted"]["balanced_accuracy"] == pytest.approx(report["balanced_accuracy"])
    (folder,) = gate["ood"]
    assert folder["images"] == 10 and folder["refused"] == 10 and folder["refusal_rate"] == 1.0
    assert folder["refused_before_gate"] == ["not_an_image.txt"]
    assert folder["auroc"] == 1.0
