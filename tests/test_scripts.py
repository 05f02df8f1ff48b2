"""Training and evaluation CLIs on real HAM10000 images (small, bounded runs)."""

import json
import math

import pytest
import torch

from handler.checkpoint import load_checkpoint, read_checkpoint
from lab.ensembles import check_compatible_members
from ops.paths import MODEL_CONFIG
from scripts import evaluate, train
from tests.conftest import RELEASED_CHECKPOINT


@pytest.mark.slow
@pytest.mark.data
def test_train_pauses_resumes_and_writes_a_release_checkpoint(ham224_dir, tmp_path, capsys):
    common = ["--metadata", str(ham224_dir / "metadata.csv"), "--images", str(ham224_dir / "images"),
              "--output", str(tmp_path / "run"), "--limit", "70", "--epochs", "2", "--image-size", "64",
              "--batch-size", "8", "--workers", "0", "--val-fraction", "0.3", "--model-version", "0.0.9"]
    assert train.main(train.get_args_parser().parse_args(common + ["--epochs-this-run", "1"])) is None
    assert not (tmp_path / "run" / "best.pt").exists()
    report = train.main(train.get_args_parser().parse_args(common))
    out = capsys.readouterr().out
    assert "resumed from" in out and "at epoch 1" in out
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"train_loss", "val_loss", "val_balanced_accuracy"} <= set(history[0])
    loaded = load_checkpoint(tmp_path / "run" / "best.pt")
    assert loaded.version == "0.0.9" and loaded.preprocess.image_size == 64
    assert loaded.meta.provenance["initialization"].startswith("ImageNet")
    assert loaded.meta.provenance["command"].startswith("python ")
    assert loaded.meta.provenance["trained_epochs"] == 2 and loaded.meta.provenance["best_epoch"] in (1, 2)
    assert sum(loaded.meta.data["train_class_counts"].values()) == loaded.meta.data["train_images"]
    assert 0.0 <= loaded.meta.provenance["validation"]["balanced_rule_balanced_accuracy"] <= 1.0
    assert 0.0 <= report["balanced_accuracy"] <= 1.0
    assert json.loads((tmp_path / "run" / "val_report.json").read_text()) == report
    # Resuming is exact: the same weights as one uninterrupted run (same data order, augmentations, dropout).
    train.main(train.get_args_parser().parse_args(common[:5] + [str(tmp_path / "straight")] + common[6:]))
    resumed_state, straight_state = (torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
                                     for name in ("run", "straight"))
    assert all(torch.equal(value, straight_state[key]) for key, value in resumed_state.items())
    assert set(loaded.meta.calibration) == {"none", "hflip", "flip4"}
    # A 2-epoch model on 70 images may deserve any temperature; it must only be a usable one.
    assert all(math.isfinite(loaded.calibration(t).temperature) and loaded.calibration(t).temperature > 0
               for t in ("none", "hflip", "flip4"))
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["val_image_ids"]) == loaded.meta.data["val_images"]
    assert sum(loaded.calibration("none").class_prior) == pytest.approx(1.0, abs=1e-4)

    # Second stage: continue from that checkpoint with the stem and first two stages frozen.
    stage2 = ["--metadata", str(ham224_dir / "metadata.csv"), "--images", str(ham224_dir / "images"),
              "--output", str(tmp_path / "stage2"), "--limit", "70", "--epochs", "1", "--image-size", "64",
              "--batch-size", "8", "--workers", "0", "--val-fraction", "0.3", "--lr", "1e-2",
              "--init-checkpoint", str(tmp_path / "run" / "best.pt"), "--freeze-blocks", "2"]
    train.main(train.get_args_parser().parse_args(stage2))
    tuned = load_checkpoint(tmp_path / "stage2" / "best.pt")
    assert tuned.meta.provenance["initialization"].startswith("checkpoint best.pt (version 0.0.9, sha256 ")
    before, after = loaded.model.state_dict(), tuned.model.state_dict()
    frozen = [k for k in before if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    trained = [k for k in before if k.startswith(("blocks.2.", "conv_head.", "classifier.")) and before[k].is_floating_point()]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # batch-norm statistics included
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    # Another geometry may be warm-started (tests/test_student_recipe.py); another architecture may not.
    with pytest.raises(ValueError, match="not efficientnet_b0"):
        train.main(train.get_args_parser().parse_args(stage2[:-4] + ["--arch", "efficientnet_b0", "--init-checkpoint",
                                                                      str(tmp_path / "run" / "best.pt")]))

    # An independent ensemble member: another training seed on the same split.
    member = common[:5] + [str(tmp_path / "member")] + common[6:] + ["--epochs", "1", "--seed", "7", "--split-seed", "42"]
    train.main(train.get_args_parser().parse_args(member))
    assert json.loads((tmp_path / "member" / "split.json").read_text()) == split
    other = load_checkpoint(tmp_path / "member" / "best.pt")
    assert not torch.equal(other.model.state_dict()["classifier.weight"], before["classifier.weight"])
    check_compatible_members([read_checkpoint(tmp_path / name / "best.pt") for name in ("run", "member")])


@pytest.mark.data
def test_evaluate_released_model_on_real_samples(samples_dir, tmp_path):
    from PIL import Image

    args = evaluate.get_args_parser().parse_args(
        ["--images", str(samples_dir), "--labels", str(samples_dir / "metadata.csv"), "--out", str(tmp_path)])
    report = evaluate.main(args)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_images"] == 70
    assert {"accuracy", "balanced_accuracy", "per_class", "confusion_matrix", "macro_auc", "ece",
            "melanoma_sensitivity", "melanoma_specificity", "n_images"} <= set(metrics)
    assert sum(map(sum, metrics["confusion_matrix"])) == 70
    assert set(metrics["per_class"]["mel"]) >= {"recall", "precision", "auc"}
    # Defaults come from the serving config, so the figures describe what the service answers.
    from handler.settings import load_handler_settings

    settings = load_handler_settings(MODEL_CONFIG)
    assert metrics["tta"] == settings.tta and metrics["melanoma_threshold"] == settings.referral_threshold
    assert metrics["decision_rule"] == settings.decision_rule
    assert set(metrics["balanced_accuracy_by_rule"]) == {"most_probable", "balanced"}
    assert metrics["balanced_accuracy"] == metrics["balanced_accuracy_by_rule"][settings.decision_rule]
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("image_id,label,prediction,akiec")
    called = [line.split(",")[2] for line in rows[1:]]
    assert [called.count(code) for code in metrics["per_class"]] == [sum(column) for column in zip(*metrics["confusion_matrix"])]
    assert sum(row["count"] for row in metrics["reliability"]) == 70
    intervals = metrics["bootstrap"]["intervals"]
    assert metrics["bootstrap"]["resamples"] == 1000 and set(intervals) >= {"balanced_accuracy", "macro_auc"}
    for key, (low, high) in intervals.items():
        assert low <= metrics[key] <= high, key
    for name in ("confusion_matrix.png", "reliability.png"):
        with Image.open(tmp_path / name) as figure:
            assert figure.format == "PNG" and figure.width > 400 and figure.height > 400
    # These lesions overlap the training pool, so this is no accuracy claim: it only
    # proves the released weights are trained (chance is 1/7).
    assert report["balanced_accuracy"] > 0.4


@pytest.mark.data
def test_evaluate_reads_isic_ground_truth_like_ham_metadata(samples_dir, tiny_checkpoint, tmp_path):
    from lab.data import read_labels

    records = read_labels(samples_dir / "metadata.csv")[:14]
    columns = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    isic = tmp_path / "ISIC2018_Task3_GroundTruth.csv"
    rows = [",".join(["image"] + columns)]
    from handler.labels import CLASS_CODES
    for record in records:
        code = CLASS_CODES[record.label].upper()
        rows.append(",".join([record.image_id] + ["1.0" if c == code else "0.0" for c in columns]))
    isic.write_text("\n".join(rows) + "\n")
    common = ["--images", str(samples_dir), "--checkpoint", str(tiny_checkpoint), "--tta", "hflip",
              "--referral-threshold", "0.3"]
    from_isic = evaluate.main(evaluate.get_args_parser().parse_args(common + ["--labels", str(isic), "--out", str(tmp_path / "a")]))
    ham = tmp_path / "ham.csv"
    ham.write_text("\n".join((samples_dir / "metadata.csv").read_text().splitlines()[:15]) + "\n")
    from_ham = evaluate.main(evaluate.get_args_parser().parse_args(common + ["--labels", str(ham), "--out", str(tmp_path / "b")]))
    assert from_isic["n_images"] == from_ham["n_images"] == 14
    assert from_isic["confusion_matrix"] == from_ham["confusion_matrix"]
    assert from_isic["tta"] == "hflip" and from_isic["melanoma_threshold"] == 0.3
    assert from_isic["checkpoint"] == str(tiny_checkpoint)


@pytest.mark.data
def test_calibrate_fits_every_tta_mode_and_an_operating_point(samples_dir, tiny_checkpoint, tmp_path):
    from scripts import calibrate

    subset = tmp_path / "split.json"
    subset.write_text(json.dumps({"val_image_ids": [p.stem for p in samples_dir.glob("*.jpg")]}))
    output = tmp_path / "recalibrated.pt"
    figures = calibrate.main(calibrate.get_args_parser().parse_args(
        ["--checkpoint", str(tiny_checkpoint), "--images", str(samples_dir), "--labels", str(samples_dir / "metadata.csv"),
         "--subset", str(subset), "--output", str(output), "--report", str(tmp_path / "cal.json"),
         "--tta-modes", "none", "hflip", "--folds", "2", "--repeats", "3", "--target-sensitivity", "0.9"]))
    loaded = load_checkpoint(output)
    # The modes refitted are new; flip4, not refitted, keeps the calibration it had.
    assert set(loaded.meta.calibration) == {"none", "hflip", "flip4"}
    before = load_checkpoint(tiny_checkpoint).meta.calibration
    assert loaded.meta.calibration["flip4"] == before["flip4"] and loaded.meta.calibration["none"] != before["none"]
    point = loaded.meta.operating_point
    assert point.tta == "none" and point.target_melanoma_sensitivity == 0.9
    assert point.validation_out_of_fold == figures["none"]["out_of_fold"]
    assert point.referral_threshold == figures["none"]["referral_threshold"]
    assert point.validation_out_of_fold["melanoma_sensitivity"] >= 0.9
    assert loaded.meta.provenance["calibration_command"].startswith("python ")
    assert loaded.meta.version == "0.0.1-test"  # the rest of the meta is kept
    # Fitting on the same images can only lower the negative log-likelihood, so in-sample
    # calibration is never worse than the identity by much; the figures must be recorded.
    assert figures["none"]["in_sample"]["ece"] <= figures["none"]["uncalibrated"]["ece"] + 0.05
    assert json.loads((tmp_path / "cal.json").read_text())["hflip"]["referral_threshold"] > 0
    # Each calibration records the class frequencies it was fitted on: the 70 samples are 10 per class.
    assert loaded.calibration("none").class_prior == pytest.approx([1 / 7] * 7, abs=1e-6)
    assert set(figures["none"]["out_of_fold"]["balanced_rule"]) == {"balanced_accuracy", "accuracy"}
    repeated = figures["none"]["out_of_fold_repeated"]
    assert repeated["repeats"] == 3 and repeated["folds"] == 2 and set(repeated["mean"]) == set(repeated["sd"])
    original = load_checkpoint(tiny_checkpoint)
    for name, tensor in original.model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name])


def test_repeated_out_of_fold_averages_independent_partitions():
    from lab import crossfit
    from lab.evaluation import headline_figures

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(7).repeat(30)
    logits = torch.nn.functional.one_hot(labels, 7).float() * 2 + torch.randn(len(labels), 7, generator=generator) * 1.5
    labels = labels.numpy()
    single = crossfit.repeated_out_of_fold(logits, labels, 5, range(3, 4), 0.2)
    probabilities, calls = crossfit.out_of_fold_probabilities(logits, labels, 5, 3)
    expected = headline_figures(probabilities, labels, 0.2, calls)
    assert single["mean"]["balanced_accuracy"] == pytest.approx(expected["balanced_rule"]["balanced_accuracy"])
    assert single["mean"]["macro_auc"] == pytest.approx(expected["macro_auc"])
    assert single["sd"]["balanced_accuracy"] == 0.0
    several = crossfit.repeated_out_of_fold(logits, labels, 5, range(3, 8), 0.2)
    assert several["repeats"] == 5 and several["sd"]["balanced_accuracy"] > 0  # the partitions differ


def test_evaluate_names_missing_images(tmp_path):
    (tmp_path / "img").mkdir()
    labels = tmp_path / "gt.csv"
    labels.write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_9999999,1,0,0,0,0,0,0\n")
    args = evaluate.get_args_parser().parse_args(
        ["--images", str(tmp_path / "img"), "--labels", str(labels), "--out", str(tmp_path / "out"),
         "--checkpoint", str(RELEASED_CHECKPOINT)])
    with pytest.raises(FileNotFoundError, match="ISIC_9999999"):
        evaluate.main(args)


@pytest.mark.data
def test_explain_writes_side_by_side_panels(samples_dir, tmp_path):
    from PIL import Image

    from lab.explanations import TEXT_BAND
    from scripts import explain

    images = [str(samples_dir / "ISIC_0024354.jpg"), str(samples_dir / "ISIC_0025032.jpg")]
    results = explain.main(explain.get_args_parser().parse_args(images + ["--out", str(tmp_path), "--target-class", "mel"]))
    assert [panel.name for _, _, panel in results] == ["ISIC_0024354_gradcam.png", "ISIC_0025032_gradcam.png"]
    assert all(response.body.gradcam.class_code == "mel" for _, response, _ in results)
    panel = Image.open(results[0][2])
    assert panel.size == (1200, 450 + TEXT_BAND)


@pytest.mark.data
def test_bench_reports_gradcam_cost_ratios(samples_dir, tmp_path):
    from scripts import bench

    args = bench.get_args_parser().parse_args(["--sections", "gradcam", "--samples", str(samples_dir),
                                               "--batch-sizes", "1", "2", "--rounds", "1",
                                               "--out", str(tmp_path), "--report", str(tmp_path / "PERF.md")])
    result = bench.main(args)
    rows = {(r["batch_size"], r["overlay_format"]): r for r in result["gradcam"]}
    assert set(rows) == {(1, "jpeg"), (1, "png"), (2, "jpeg"), (2, "png")}
    assert all(r["gradcam_cost_ratio"] > 0 for r in rows.values())
    assert json.loads((tmp_path / "bench.json").read_text())["machine"]
    assert "gradcam_cost_ratio" in (tmp_path / "PERF.md").read_text()
