"""Distillation (lab.distillation, scripts/distill.py) on synthetic metadata, tiny images and tiny networks."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from handler.checkpoint import load_checkpoint, read_checkpoint
from handler.inference import predict_probabilities
from handler.preprocessing import FULL_VIEW, PreprocessConfig, normalize_batch
from lab.data import LabelledImage, attach_paths, build_eval_transform, read_labels
from lab.distillation import (
    SHAPE_KEEPING_VIEWS, VIEWS, DistillationDataset, DistillationLoss, cache_teacher_logits, dihedral, out_of_fold_teacher_logits,
    pack_targets, soft_labels, view_logits, views_of)
from lab.evaluation import input_batches
from lab.folds import FoldMismatchError, OutOfFold, check_trained_on, load_folds, write_out_of_fold_csv
from scripts import distill, train_folds
from tests.conftest import synthetic_ham


PREPROCESS = PreprocessConfig(image_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode=FULL_VIEW)


def test_the_eight_dihedral_views_are_distinct_and_closed():
    image = torch.arange(2 * 3 * 3).reshape(2, 3, 3)
    views = [dihedral(image, view) for view in range(VIEWS)]
    assert torch.equal(views[0], image) and torch.equal(views[4], image.flip(-1))
    assert len({tuple(view.flatten().tolist()) for view in views}) == 8
    assert torch.equal(dihedral(dihedral(image, 1), 3), image)  # 90 + 270 degrees
    assert torch.equal(dihedral(dihedral(image, 5), 5), image)  # a flip-rotation is its own inverse
    with pytest.raises(ValueError):
        dihedral(image, 8)


def test_a_rectangular_input_keeps_to_the_views_that_keep_its_shape():
    assert views_of(PREPROCESS) == tuple(range(8))
    rectangular = dataclasses.replace(PREPROCESS, image_width=40)
    assert views_of(dataclasses.replace(PREPROCESS, image_width=32)) == tuple(range(8))  # 32 wide and 32 high is square
    assert views_of(rectangular) == SHAPE_KEEPING_VIEWS == (0, 2, 4, 6)
    image = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    for view in range(VIEWS):
        assert (dihedral(image, view).shape == image.shape) == (view in SHAPE_KEEPING_VIEWS)
    # The four are distinct and what they say: the image, the half turn, the left-right and the up-down flip.
    assert [dihedral(image, v).tolist() for v in SHAPE_KEEPING_VIEWS] == [
        image.tolist(), image.flip(-1, -2).tolist(), image.flip(-1).tolist(), image.flip(-2).tolist()]


def test_view_logits_score_each_view_in_one_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 7)).eval()
    batch = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    logits = view_logits(model, batch, PREPROCESS, torch.device("cpu"))
    assert logits.shape == (3, 8, 7)
    for view in range(VIEWS):
        single = view_logits(model, dihedral(batch, view), PREPROCESS, torch.device("cpu"), views=(0,))[:, 0]
        assert torch.allclose(logits[:, view], single, atol=1e-5)
    some = view_logits(model, batch, PREPROCESS, torch.device("cpu"), views=SHAPE_KEEPING_VIEWS)
    assert torch.allclose(some, logits[:, list(SHAPE_KEEPING_VIEWS)], atol=1e-5)


def test_loss_is_temperature_scaled_kl_plus_weighted_cross_entropy():
    torch.manual_seed(0)
    logits, teacher = torch.randn(5, 7), torch.randn(5, 7)
    labels = torch.tensor([0, 1, 2, 3, 4])
    weight = torch.linspace(0.5, 2.0, 7)
    targets = pack_targets(labels, teacher)
    assert targets.shape == (5, 8) and torch.equal(targets[:, 0].long(), labels)
    ce = nn.functional.cross_entropy(logits, labels, weight=weight)
    assert torch.allclose(DistillationLoss(weight, 2.0, 0.0)(logits, targets), ce)
    kl = (torch.softmax(teacher / 2, 1) * (torch.log_softmax(teacher / 2, 1) - torch.log_softmax(logits / 2, 1))).sum(1).mean()
    assert torch.allclose(DistillationLoss(weight, 2.0, 1.0)(logits, targets), 4 * kl, atol=1e-6)
    assert torch.allclose(DistillationLoss(weight, 2.0, 0.7)(logits, targets), 0.7 * 4 * kl + 0.3 * ce, atol=1e-6)
    assert DistillationLoss(weight, 3.0, 1.0)(teacher, pack_targets(labels, teacher)) < 1e-6  # student == teacher
    with pytest.raises(ValueError):
        DistillationLoss(weight, 0.0, 0.5)


def test_soft_labels_come_from_the_held_out_teacher_or_the_ensemble():
    teachers = [torch.full((4, 8, 7), float(k)) for k in range(3)]
    folds = np.array([2, 0, 1, 0])
    assert soft_labels(teachers, folds, "out_of_fold")[:, 0, 0].tolist() == [2.0, 0.0, 1.0, 0.0]
    assert torch.equal(soft_labels(teachers, folds, "ensemble"), torch.full((4, 8, 7), 1.0))
    with pytest.raises(ValueError, match="soft-label source"):
        soft_labels(teachers, folds, "teacher")


def drawn_views(records, preprocess, views) -> set[int]:
    """Six passes over a DistillationDataset whose teacher logits carry their view's number: every item must be
    its image in the view its target names, at the input's shape, with its label. Returns the views drawn."""
    teacher = torch.zeros(len(records), len(views), 7)
    teacher[:, :, 0] = torch.tensor(views, dtype=torch.float32)  # the view's number, readable from the target
    dataset = DistillationDataset(records, preprocess, teacher, jitter=False)
    base = build_eval_transform(preprocess)
    seen = set()
    for _ in range(6):
        for index in range(len(records)):
            image, target = dataset[index]
            view = int(target[1])
            seen.add(view)
            assert image.shape[-2:] == (preprocess.input_height, preprocess.input_width)
            expected = dihedral(base(Image.open(records[index].path).convert("RGB")), view)
            assert torch.equal(image, expected) and int(target[0]) == records[index].label
    return seen


def write_out_of_fold_logits(records, logits, path):
    """A fold run's out-of-fold CSV (one epoch) of ``records`` with (N, C) ``logits``; its path."""
    oof = OutOfFold([r.image_id for r in records], [r.lesion_id for r in records], np.array([r.label for r in records]),
                    np.arange(len(records)) % 3, [1], np.asarray(logits, np.float32)[:, None])
    write_out_of_fold_csv(oof, 1, path)
    return path


def test_out_of_fold_soft_labels_follow_the_records_and_refuse_what_the_file_does_not_say(tmp_path):
    records = [LabelledImage(f"ISIC_{i:07d}", i % 7, f"HAM_{i // 2:07d}") for i in range(10)]
    logits = np.random.default_rng(0).normal(size=(10, 7)) * 3
    path = write_out_of_fold_logits(records, logits, tmp_path / "oof.csv")
    # Rows follow the training records' order, whatever the file's order.
    wanted = [9, 4, 0, 7]
    got = out_of_fold_teacher_logits(path, [records[i] for i in wanted])
    assert got.shape == (4, 7) and got.dtype == torch.float32
    assert torch.allclose(got, torch.from_numpy(logits[wanted]).float(), atol=1e-5)
    with pytest.raises(ValueError, match="no out-of-fold logits for 1 of the 3 training images .*ISIC_9999999"):
        out_of_fold_teacher_logits(path, records[:2] + [LabelledImage("ISIC_9999999", 0, "HAM_9999999")])
    with pytest.raises(ValueError, match="gives 1 images another class"):
        out_of_fold_teacher_logits(path, [dataclasses.replace(records[3], label=(records[3].label + 1) % 7)])
    (tmp_path / "other.csv").write_text("image_id,dx\nISIC_0000000,nv\n")
    with pytest.raises(ValueError, match="not an out-of-fold logits file: no column fold, logit_akiec"):
        out_of_fold_teacher_logits(tmp_path / "other.csv", records[:1])


def test_dataset_pairs_each_view_with_its_teacher_logits(tmp_path):
    metadata = synthetic_ham(tmp_path, lesions=(1,))
    records = attach_paths(read_labels(metadata), [tmp_path / "images"])
    torch.manual_seed(0)
    assert len(drawn_views(records, PREPROCESS, tuple(range(VIEWS)))) > 4
    with pytest.raises(ValueError, match="do not cover"):
        DistillationDataset(records, PREPROCESS, torch.zeros(2, VIEWS, 7))
    # A 4:3 input: one column per shape-keeping view, each paired with its view, never a quarter turn.
    rectangular = dataclasses.replace(PREPROCESS, image_size=12, resize_size=12, image_width=16)
    assert drawn_views(records, rectangular, SHAPE_KEEPING_VIEWS) == set(SHAPE_KEEPING_VIEWS)
    with pytest.raises(ValueError, match="4 views"):
        DistillationDataset(records, rectangular, torch.zeros(len(records), VIEWS, 7))


def tiny_teachers(tmp_path, k=2):
    metadata = synthetic_ham(tmp_path / "data", lesions=(1, 2, 1))
    common = ["--metadata", str(metadata), "--images", str(metadata.parent / "images"), "--k", str(k),
              "--folds-file", str(tmp_path / f"folds_k{k}.json"), "--arch", "efficientnet_lite0", "--image-size", "32",
              "--epochs", "1", "--batch-size", "4", "--workers", "0", "--pretrained", "none", "--ema-decay", "0",
              "--bootstrap", "10", "--device", "cpu"]
    train_folds.main(train_folds.get_args_parser().parse_args(
        common + ["--output", str(tmp_path / "folds"), "--exclude-split", "none"]))
    return metadata, common


def test_teacher_cache_matches_the_served_views_and_resumes(tmp_path, one_thread):
    metadata, _ = tiny_teachers(tmp_path)
    records = attach_paths(read_labels(metadata), [metadata.parent / "images"])
    teacher = tmp_path / "folds" / "fold_0" / "teacher.pt"
    cache = tmp_path / "cache.pt"
    logits = cache_teacher_logits(teacher, records, cache, torch.device("cpu"), batch_size=4, save_every=4)
    assert logits.shape == (len(records), 8, 7)
    loaded = load_checkpoint(teacher)
    with torch.no_grad():
        served = torch.cat([loaded.model(normalize_batch(batch, loaded.preprocess))
                            for batch in input_batches([r.path for r in records], loaded, 8)])
    assert torch.allclose(logits[:, 0], served, atol=1e-4)  # view 0 is the served input
    # A partial cache continues; a cache of another teacher is recomputed.
    state = torch.load(cache, weights_only=True)
    torch.save({**state, "done": 4, "logits": state["logits"][:4]}, cache)
    assert torch.allclose(cache_teacher_logits(teacher, records, cache, torch.device("cpu"), batch_size=4), logits, atol=1e-6)
    other = cache_teacher_logits(tmp_path / "folds" / "fold_1" / "teacher.pt", records, cache, torch.device("cpu"), batch_size=8)
    assert not torch.allclose(other, logits)


@pytest.mark.slow
def test_distill_checks_out_of_fold_and_writes_a_student_checkpoint(tmp_path, capsys, one_thread):
    metadata, common = tiny_teachers(tmp_path)
    args = [*common[:10], "--teachers", str(tmp_path / "folds"), "--output", str(tmp_path / "distill"), "--check-folds", "0", "1",
            "--arch", "efficientnet_lite0", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--pretrained", "none",
            "--ema-decay", "0", "--bootstrap", "10", "--device", "cpu", "--model-version", "0.0.1-student"]
    summary = distill.main(distill.get_args_parser().parse_args(args))
    out = capsys.readouterr().out
    assert "check fold 0: student" in out and "check fold 1: student" in out
    assert set(summary["check"]["per_fold"]) == {"0", "1"}
    for row in summary["check"]["per_fold"].values():
        assert 0 <= row["student"]["balanced_accuracy"] <= 1 and 0 <= row["teacher"]["macro_auc"] <= 1
    assert {"student", "teacher"} == set(summary["check_all_folds"])  # every fold checked: the all-folds figures too
    assert "balanced_accuracy" in summary["check_all_folds"]["student"]["bootstrap"]["intervals"]
    assignment, records = load_folds(tmp_path / "folds_k2.json", metadata)
    student = read_checkpoint(tmp_path / "distill" / "student.pt")
    check_trained_on(student.meta.data, assignment, None, "student")
    assert student.meta.data["train_images"] == len(records) and student.meta.data["val_images"] == 0
    assert student.meta.version == "0.0.1-student" and student.meta.preprocessing.resize_mode == FULL_VIEW
    assert "out-of-fold logits of the check students" in student.meta.provenance["calibration_source"]
    assert student.meta.provenance["distillation"]["temperature"] == 2.0
    assert student.state_dict["conv_stem.weight"].dtype == torch.float16
    loaded = load_checkpoint(tmp_path / "distill" / "student.pt")
    probabilities = predict_probabilities(loaded, next(iter(input_batches([r.path for r in attach_paths(
        records, [metadata.parent / "images"])][:3], loaded))))
    assert probabilities.shape == (3, 7) and torch.allclose(probabilities.sum(1), torch.ones(3), atol=1e-5)
    assert json.loads((tmp_path / "distill" / "summary.json").read_text())["student"]["sha256"]
    # Rerun: nothing retrained (every student finished), same figures.
    again = distill.main(distill.get_args_parser().parse_args(args))
    assert again["check"] == summary["check"]
    # A teacher of another fold file is refused.
    shutil.copy(tmp_path / "folds" / "fold_1" / "teacher.pt", tmp_path / "folds" / "fold_0" / "teacher.pt")
    with pytest.raises(FoldMismatchError, match="holds out fold 1, expected fold 0"):
        distill.main(distill.get_args_parser().parse_args(args))


def test_distill_refuses_metadata_that_is_not_the_fold_files(tmp_path):
    metadata = synthetic_ham(tmp_path / "data", lesions=(1, 2, 1))
    other = synthetic_ham(tmp_path / "other", lesions=(1, 1))
    train_folds.main(train_folds.get_args_parser().parse_args(
        ["--metadata", str(metadata), "--images", str(metadata.parent / "images"), "--k", "2", "--folds-only",
         "--folds-file", str(tmp_path / "folds_k2.json"), "--exclude-split", "none"]))
    with pytest.raises(FoldMismatchError, match="built from other metadata"):
        distill.main(distill.get_args_parser().parse_args(
            ["--metadata", str(other), "--images", str(other.parent / "images"), "--k", "2",
             "--folds-file", str(tmp_path / "folds_k2.json"), "--teachers", str(tmp_path), "--output", str(tmp_path / "d")]))
    with pytest.raises(FileNotFoundError, match="no teacher checkpoints"):
        distill.main(distill.get_args_parser().parse_args(
            ["--metadata", str(metadata), "--images", str(metadata.parent / "images"), "--k", "2",
             "--folds-file", str(tmp_path / "folds_k2.json"), "--teachers", str(tmp_path), "--output", str(tmp_path / "d")]))


@pytest.mark.slow
def test_gpu_script_runs_every_step_and_bundles_on_cpu_with_tiny_settings(tmp_path):
    """scripts/gpu_train_all.sh with DEVICE=cpu: parallel folds, summary, teacher logits, parallel students, bundle, unpack;
    the validation lesions of EXCLUDE_SPLIT never reach a fold network or the student."""
    import os
    import subprocess

    from ops.paths import ROOT

    metadata = synthetic_ham(tmp_path / "data", lesions=(1, 2, 1, 1))
    # Lesion 3 of each class (one image) is the validation split.
    split = tmp_path / "val_split.json"
    split.write_text(json.dumps({"val_image_ids": [f"ISIC_{label}030" for label in range(7)]}))
    tiny = "--image-size 24 --pretrained none --ema-decay 0 --bootstrap 10 --threads 1"
    env = {**os.environ, "K": "2", "CHECK_FOLDS": "0 1", "EPOCHS": "1", "STUDENT_EPOCHS": "1", "BATCH_SIZE": "4", "WORKERS": "0", "DEVICE": "cpu",
           "DATA_DIR": str(tmp_path / "data"), "RUNS": str(tmp_path / "runs"), "PROVENANCE_DIR": str(tmp_path / "provenance"),
           "FOLDS_FILE": str(tmp_path / "provenance" / "folds_k2.json"), "VERSION": "0.0.2-gpu-smoke", "EXCLUDE_SPLIT": str(split),
           "FOLDS_ARGS": tiny + " --image-width 32", "DISTILL_ARGS": tiny, "PYTHON": os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python"))}
    if not os.path.exists(env["PYTHON"]):
        env["PYTHON"] = "python3"
    script = str(ROOT / "scripts" / "gpu_train_all.sh")
    done = subprocess.run(["bash", script, "run", str(tmp_path / "results")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert {"student.pt", "provenance.tgz", "runs.tgz"} <= set(results) and any(n.startswith("teachers.tar.part-") for n in results)
    assert len(results) <= 8
    timings = (tmp_path / "runs" / "gpu_logs" / "timings.txt").read_text()
    assert "training 2 fold networks in parallel" in timings and "done" in timings
    student = read_checkpoint(tmp_path / "results" / "student.pt")
    assert student.meta.version == "0.0.2-gpu-smoke" and "none" in student.meta.calibration
    # 4:3 from the folds to the student: the teachers' geometry, and only the views that keep it.
    assert (student.meta.preprocessing.input_height, student.meta.preprocessing.input_width) == (24, 32)
    assert "[0, 2, 4, 6]" in student.meta.provenance["distillation"]["views"]
    assert student.meta.data["train_images"] == len(read_labels(metadata)) - 7  # every image but the validation lesions'
    assignment, kept = load_folds(tmp_path / "provenance" / "folds_k2.json", metadata)
    assert len(assignment.excluded_lesions) == 7 and not any(r.image_id.endswith("30") for r in kept)
    summary = json.loads((tmp_path / "provenance" / "distill_k2" / "summary.json").read_text())
    assert set(summary["check"]["per_fold"]) == {"0", "1"} and "check_all_folds" in summary
    # Unpacking the bundle elsewhere restores the teachers, the student and the provenance.
    env |= {"RUNS": str(tmp_path / "unpacked" / "runs"), "PROVENANCE_DIR": str(tmp_path / "unpacked" / "provenance")}
    done = subprocess.run(["bash", script, "unpack", str(tmp_path / "results")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for fold in (0, 1):
        teacher = read_checkpoint(tmp_path / "unpacked" / "runs" / "folds_k2" / f"fold_{fold}" / "teacher.pt")
        assert teacher.meta.data["fold"] == fold
    assert (tmp_path / "unpacked" / "runs" / "distill_k2" / "student.pt").exists()
    assert (tmp_path / "unpacked" / "provenance" / "folds_k2" / "summary.json").exists()
    assert (tmp_path / "unpacked" / "provenance" / "folds_k2.json").exists()
