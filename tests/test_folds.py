"""Cross-fitted training (lab.folds, scripts/train_folds.py) on synthetic metadata and tiny images."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from handler.checkpoint import read_checkpoint
from handler.labels import CLASS_CODES
from handler.preprocessing import FULL_VIEW
from lab.calibration import fit_calibration
from lab.data import LabelledImage, read_labels
from lab.folds import (
    FoldAssignment, FoldMismatchError, check_folds, check_trained_on, cross_fitted_probabilities, ensure_folds, fold_split,
    lesion_average, lesion_figures, load_folds, make_folds, read_folds, records_digest, select_epoch)
from lab.training import lesions_of_split
from ops.paths import DATA, PROVENANCE
from scripts import train_folds
from tests.conftest import synthetic_ham

# Images per lesion for the lesions of each class: every class has several lesions, some lesions several images.
def test_folds_are_lesion_grouped_stratified_and_cover_every_image_once(tmp_path):
    metadata = synthetic_ham(tmp_path)
    records = read_labels(metadata)
    folds = make_folds(records, 3, seed=0, metadata=metadata)
    fold_of = folds.fold_of()
    assert sorted(fold_of) == sorted(r.image_id for r in records) and sum(map(len, folds.folds)) == len(records)
    lesion_folds = {}
    for record in records:
        assert lesion_folds.setdefault(record.lesion_id, fold_of[record.image_id]) == fold_of[record.image_id]
    for label in range(len(CLASS_CODES)):  # 4 lesions (7 images) per class: every fold gets some of each class
        lesions = {r.lesion_id for r in records if r.label == label}
        assert min(sum(lesion_folds[lesion] == fold for lesion in lesions) for fold in range(3)) >= 1
    assert make_folds(records, 3, seed=0, metadata=metadata).digest == folds.digest
    assert make_folds(records, 3, seed=1, metadata=metadata).digest != folds.digest
    train, holdout = fold_split(records, folds, 1)
    assert {r.image_id for r in holdout} == set(folds.folds[1]) and len(train) + len(holdout) == len(records)
    assert not {r.lesion_id for r in train} & {r.lesion_id for r in holdout}


def test_fold_file_round_trips_and_refuses_other_metadata_or_edits(tmp_path):
    metadata = synthetic_ham(tmp_path / "data")
    path = tmp_path / "folds_k3.json"
    assignment, records = ensure_folds(path, metadata, 3, 0)
    stored = json.loads(path.read_text())
    assert stored["records_sha256"] == records_digest(records) and stored["digest"] == assignment.digest
    assert read_folds(path) == assignment
    assert ensure_folds(path, metadata, 3, 0)[0] == assignment  # found and checked, not rebuilt
    with pytest.raises(FoldMismatchError, match="k=3"):
        ensure_folds(path, metadata, 5, 0)
    # The same rows in another column order (the Kaggle layout's file) match.
    lines = metadata.read_text().splitlines()
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("\n".join(",".join([row.split(",")[1], row.split(",")[0], *row.split(",")[2:]]) for row in lines) + "\n")
    assert load_folds(path, swapped)[0] == assignment
    # A changed label, a dropped image: refused, naming the difference.
    relabelled = tmp_path / "relabelled.csv"
    relabelled.write_text(metadata.read_text().replace(",mel,", ",nv,", 1))
    with pytest.raises(FoldMismatchError, match="other lesions or labels"):
        load_folds(path, relabelled)
    dropped = tmp_path / "dropped.csv"
    dropped.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(FoldMismatchError, match="1 fold images not in the metadata"):
        load_folds(path, dropped)
    # A hand-edited fold file fails its own digest.
    stored["folds"][0], stored["folds"][1] = stored["folds"][0][1:], stored["folds"][1] + stored["folds"][0][:1]
    path.write_text(json.dumps(stored))
    with pytest.raises(FoldMismatchError, match="digest"):
        read_folds(path)


def validation_split(folder: Path, lesion: int = 0) -> Path:
    """A val_split.json naming the first image of lesion ``lesion`` of every class of :func:`synthetic_ham`."""
    path = folder / "val_split.json"
    path.write_text(json.dumps({"seed": 0, "val_image_ids": [f"ISIC_{label}{lesion:02d}0" for label in range(len(CLASS_CODES))]}))
    return path


def test_folds_can_leave_out_the_validation_lesions_and_every_user_of_the_file_then_does(tmp_path):
    metadata = synthetic_ham(tmp_path / "data")
    split = validation_split(tmp_path)
    records = read_labels(metadata)
    left_out = {f"HAM_{label}00" for label in range(len(CLASS_CODES))}
    path = tmp_path / "folds_k3.json"
    assignment, kept = ensure_folds(path, metadata, 3, 0, exclude_split=split)
    # Every image of those lesions is out (lesion 0 of each class has 1 image here, the split names it), the rest are in.
    assert assignment.excluded_lesions == tuple(sorted(left_out)) and "val_split.json" in assignment.excluded_because
    assert {r.image_id for r in kept} == set(assignment.fold_of()) == {r.image_id for r in records if r.lesion_id not in left_out}
    assert load_folds(path, metadata) == (assignment, kept)  # the file alone says what to leave out
    for fold in range(3):
        train, holdout = fold_split(kept, assignment, fold)
        assert not {r.lesion_id for r in train + holdout} & left_out
    # Leaving out other lesions than the file does is refused both ways; --rebuild-folds replaces it.
    with pytest.raises(FoldMismatchError, match="leaves out 7 lesions"):
        ensure_folds(path, metadata, 3, 0)
    with pytest.raises(FoldMismatchError, match="asked to leave out the 7 lesions"):
        ensure_folds(path, metadata, 3, 0, exclude_split=validation_split(tmp_path / "data", lesion=1))
    # The left-out lesions are part of the digest: an edited list fails it.
    stored = json.loads(path.read_text())
    assert stored["digest"] != make_folds(records, 3, 0, metadata).digest
    stored["excluded_lesions"] = stored["excluded_lesions"][1:]
    path.write_text(json.dumps(stored))
    with pytest.raises(FoldMismatchError, match="digest"):
        read_folds(path)
    # The script leaves out the release's validation split by default and says so.
    assert train_folds.get_args_parser().parse_args([]).exclude_split == str(PROVENANCE / "val_split.json")
    with pytest.raises(ValueError, match="none of the validation images"):  # the release's split names no synthetic image
        train_folds.main(train_folds.get_args_parser().parse_args(
            ["--metadata", str(metadata), "--k", "3", "--folds-only", "--folds-file", str(tmp_path / "other.json")]))


def test_a_lesion_split_across_folds_is_refused(tmp_path):
    records = [LabelledImage("a", 0, "L1"), LabelledImage("b", 0, "L1"), LabelledImage("c", 1, "L2"), LabelledImage("d", 1, "L3")]
    split = FoldAssignment(2, 0, "m.csv", "x", records_digest(records), (("a", "c"), ("b", "d")))
    with pytest.raises(FoldMismatchError, match="L1 has images in two folds"):
        check_folds(split, records)
    with pytest.raises(ValueError, match="different diagnoses"):
        make_folds([LabelledImage("a", 0, "L1"), LabelledImage("b", 1, "L1")], 2, 0, __file__)


def test_lesion_average_and_cross_fitted_calibration():
    probabilities = np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]], np.float32)
    averaged, labels, lesions = lesion_average(probabilities, np.array([0, 0, 1]), ["L1", "L1", "L2"])
    assert lesions == ["L1", "L2"] and labels.tolist() == [0, 1]
    assert np.allclose(averaged, [[0.6, 0.4], [0.1, 0.9]])
    with pytest.raises(ValueError, match="different labels"):
        lesion_average(probabilities, np.array([0, 1, 1]), ["L1", "L1", "L2"])
    # Each fold is calibrated on the other fold alone.
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 7
    logits = rng.normal(0, 1, (60, 7)).astype(np.float32) + 3 * np.eye(7, dtype=np.float32)[labels]
    folds = np.arange(60) % 2
    probabilities, priors = cross_fitted_probabilities(logits, labels, folds)
    other = fit_calibration(torch.from_numpy(logits[folds == 1]), torch.from_numpy(labels[folds == 1]))
    assert np.allclose(probabilities[folds == 0], other.apply(torch.from_numpy(logits[folds == 0])).numpy(), atol=1e-6)
    assert priors[0] == other.class_prior and set(priors) == {0, 1}
    report = lesion_figures(logits, labels, [f"L{i}" for i in range(60)], folds, target_sensitivity=0.85, bootstrap=20)
    assert report["n_lesions"] == 60 and set(report["per_fold"]) == {"0", "1"}
    assert report["melanoma_sensitivity"] >= 0.85 and "balanced_accuracy" in report["bootstrap"]["intervals"]


def test_one_epoch_count_is_chosen_from_the_curve():
    curve = [{"epoch": 1, "lesion_balanced_accuracy": 0.5, "image_log_loss": 1.0},
             {"epoch": 2, "lesion_balanced_accuracy": 0.7, "image_log_loss": 0.8},
             {"epoch": 3, "lesion_balanced_accuracy": 0.7, "image_log_loss": 0.9}]
    assert select_epoch(curve) == 2 and select_epoch(curve, "image_log_loss") == 2
    with pytest.raises(ValueError, match="selection key"):
        select_epoch(curve, "accuracy")


def fold_args(metadata: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--metadata", str(metadata), "--images", str(metadata.parent / "images"), "--k", "3",
            "--folds-file", str(tmp_path / "folds_k3.json"), "--output", str(tmp_path / "run"), "--arch", "efficientnet_lite0",
            "--image-size", "32", "--epochs", "2", "--batch-size", "12", "--workers", "0", "--pretrained", "none",
            "--ema-decay", "0", "--bootstrap", "20", "--device", "cpu", "--exclude-split", "none", *extra]


@pytest.mark.slow
def test_train_folds_runs_resumes_summarizes_and_exports_teachers(tmp_path, capsys, one_thread):
    metadata = synthetic_ham(tmp_path / "data")
    parser = train_folds.get_args_parser()
    # One epoch of fold 0 only, then stop: nothing summarized yet.
    assert train_folds.main(parser.parse_args(fold_args(metadata, tmp_path, "--epochs-this-run", "1"))) is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "fold_0" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1] and "holdout_lesion_balanced_accuracy" in rows[0]
    assert not (tmp_path / "run" / "fold_1").exists()
    # Another recipe cannot resume this run.
    with pytest.raises(ValueError, match="other settings"):
        train_folds.main(parser.parse_args(fold_args(metadata, tmp_path, "--lr", "0.01")))
    summary = train_folds.main(parser.parse_args(fold_args(metadata, tmp_path)))
    out = capsys.readouterr().out
    assert "fold_0: resumed from" in out and "at epoch 1" in out
    assert summary["selected_epoch"] in (1, 2) and [row["epoch"] for row in summary["curve"]] == [1, 2]
    assignment, records = load_folds(tmp_path / "folds_k3.json", metadata)
    lesion = summary["lesion"]
    assert summary["n_images"] == len(records) and lesion["n_lesions"] == len({r.lesion_id for r in records})
    assert set(lesion["per_fold"]) == {"0", "1", "2"} and "balanced_accuracy" in lesion["bootstrap"]["intervals"]
    assert summary["folds_sha256"] == assignment.digest
    # Out-of-fold logits: every image, every epoch, scored by the fold that held it out.
    oof = torch.load(tmp_path / "run" / "out_of_fold_logits.pt", weights_only=True)
    assert sorted(oof["image_ids"]) == sorted(r.image_id for r in records) and tuple(oof["logits"].shape) == (len(records), 2, 7)
    fold_of = assignment.fold_of()
    assert oof["folds"].tolist() == [fold_of[i] for i in oof["image_ids"]]
    for fold in range(3):
        metrics = (tmp_path / "run" / f"fold_{fold}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]
        teacher = read_checkpoint(tmp_path / "run" / f"fold_{fold}" / "teacher.pt")
        check_trained_on(teacher.meta.data, assignment, fold, "teacher")
        assert teacher.meta.preprocessing.resize_mode == FULL_VIEW and teacher.meta.preprocessing.image_size == 32
        assert teacher.meta.provenance["epoch"] == summary["selected_epoch"]
        assert teacher.meta.data["train_images"] + teacher.meta.data["val_images"] == len(records)
        with pytest.raises(FoldMismatchError, match="holds out fold"):
            check_trained_on(teacher.meta.data, assignment, (fold + 1) % 3, "teacher")
    csv_rows = list(csv.DictReader(open(tmp_path / "run" / f"out_of_fold_logits_epoch_{summary['selected_epoch']:03d}.csv")))
    assert len(csv_rows) == len(records) and {"image_id", "lesion_id", "fold", "logit_mel"} <= set(csv_rows[0])
    # Rerunning a finished run trains nothing and gives the same summary.
    again = train_folds.main(parser.parse_args(fold_args(metadata, tmp_path)))
    assert again["lesion"]["balanced_accuracy"] == lesion["balanced_accuracy"]
    assert "finished earlier" in capsys.readouterr().out


def test_train_folds_refuses_provenance_for_smoke_runs_and_a_foreign_fold_file(tmp_path):
    metadata = synthetic_ham(tmp_path / "data")
    parser = train_folds.get_args_parser()
    with pytest.raises(SystemExit, match="smoke run"):
        train_folds.main(parser.parse_args(fold_args(metadata, tmp_path, "--limit", "10", "--provenance-dir", str(tmp_path))))
    other = synthetic_ham(tmp_path / "other", lesions=(1, 1, 1))
    ensure_folds(tmp_path / "folds_k3.json", other, 3, 0)
    with pytest.raises(FoldMismatchError, match="built from other metadata"):
        train_folds.main(parser.parse_args(fold_args(metadata, tmp_path)))


@pytest.mark.data
@pytest.mark.parametrize("k", [4, 5])
def test_committed_folds_match_the_4_3_metadata(k):
    metadata = DATA / "ham10000-200x150" / "metadata.csv"
    if not metadata.exists():
        pytest.skip(f"HAM10000 200x150 metadata not found at {metadata} (set SKIN_LESION_DATA or place ../shared/data)")
    assignment, records = load_folds(PROVENANCE / f"folds_k{k}.json", metadata)
    # The training lesions only: the 855 validation lesions (1,156 images) of the release's split are left out.
    assert assignment.k == k and len(records) == 10015 - 1156 and len({r.lesion_id for r in records}) == 7470 - 855
    every = read_labels(metadata)
    val_lesions = lesions_of_split(every, PROVENANCE / "val_split.json")
    assert set(assignment.excluded_lesions) == val_lesions and not val_lesions & {r.lesion_id for r in records}
    # What `train_folds.py --k K --folds-only` writes.
    assert make_folds(every, k, 0, metadata, val_lesions).digest == assignment.digest
    sizes = [len(fold) for fold in assignment.folds]
    assert max(sizes) - min(sizes) < 0.05 * len(records) / k
    for count in assignment.counts:  # every fold holds every class
        assert min(count["class_images"].values()) > 0
