"""`make evaluate` reports the input gate's refusals; make evaluate-ood (--ood, --synthetic, --clinical, --samples)
its refusal rates with intervals, and the forced answers on clinical photos."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lab.synthetic_images import generate
from ops.paths import CHECKPOINT
from scripts import evaluate

pytestmark = pytest.mark.data


def _labels_of(images: list[Path], samples_dir: Path, labels: Path) -> Path:
    """A HAM10000 metadata file naming only ``images`` (samples), with their labels from the samples' metadata."""
    with open(samples_dir / "metadata.csv") as handle:
        rows = {row["image_id"]: row for row in csv.DictReader(handle)}
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["lesion_id", "image_id", "dx"])
        writer.writeheader()
        for path in images:
            writer.writerow({key: rows[path.stem][key] for key in ("lesion_id", "image_id", "dx")})
    return labels


def test_evaluate_reports_refusals_accepted_figures_and_ood_folders(samples_dir, tmp_path):
    images = sorted(samples_dir.glob("*.jpg"))[::7]  # 10 images, all 7 classes
    labels = _labels_of(images, samples_dir, tmp_path / "labels.csv")
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


def test_evaluate_ood_reports_every_set_with_intervals_and_the_forced_answers_on_clinical_photos(samples_dir, tmp_path):
    from ops.paths import DATA

    pad = DATA / "pad-ufes-20-clinical"
    if not (pad / "metadata.csv").is_file():
        pytest.skip(f"PAD-UFES-20 clinical photos not found at {pad}")
    with open(pad / "metadata.csv") as handle:
        rows = list(csv.DictReader(handle))
    picked = [next(r for r in rows if r["diagnostic"] == dx) for dx in ("NEV", "BCC", "ACK", "SEK", "SCC")]
    clinical = tmp_path / "clinical"
    (clinical / "images").mkdir(parents=True)
    with open(clinical / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(picked)
    for row in picked:
        (clinical / "images" / row["image"]).write_bytes((pad / "images" / row["image"]).read_bytes())
    images = sorted(samples_dir.glob("*.jpg"))[:2]
    labels = _labels_of(images, samples_dir, tmp_path / "labels.csv")
    args = evaluate.get_args_parser().parse_args(
        ["--images", str(samples_dir), "--labels", str(labels), "--out", str(tmp_path / "eval"), "--bootstrap", "0",
         "--checkpoint", str(CHECKPOINT), "--synthetic", "9", "--clinical", str(clinical), "--samples", str(samples_dir)])
    gate = evaluate.main(args)["input_gate"]
    low, high = gate["interval95"]
    assert gate["refusal_rate"] == 0.0 and low == 0.0 and 0.5 < high < 0.9  # 0 of 2: a wide interval
    synthetic, samples = gate["ood"]
    assert synthetic["images"] == 9 and synthetic["refused"] == 9 and synthetic["reasons"] == {"other": 9}
    assert samples["images"] == 70 and samples["refused"] == 0 and samples["refused_images"] == []
    assert samples["interval95"][0] == 0.0 and samples["interval95"][1] == pytest.approx(0.052, abs=1e-3)
    report = gate["clinical"]
    assert report["images"] == 5 and report["interval95"][0] <= report["refusal_rate"] <= report["interval95"][1]
    assert sum(report["reasons"].values()) == report["refused"]
    forced = report["forced_answers"]
    assert forced["classes"] == ["akiec", "bcc", "bkl", "mel", "nv"]  # the five PAD-UFES-20 shares with HAM10000
    assert forced["images"] == 4  # SCC has no HAM10000 class: not scored
    assert 0.0 <= forced["balanced_accuracy"] <= 1.0 and sum(forced["called"].values()) == 4
