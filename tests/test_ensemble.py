"""The logit-averaging ensemble: its arithmetic, which members combine, the scripts that build and compare
ensembles, and serving one. The checkpoint format of an ensemble is tested in test_checkpoint.py."""

import base64

import numpy as np
import pytest
import torch

from handler.architectures import LogitAverage, build_from_config, build_model, default_preprocess_config, features_and_logits
from handler.calibration import Calibration
from handler.checkpoint import Meta, combine_members, load_checkpoint, make_checkpoint
from handler.inference import handle_batch, prepare_for_serving
from handler.preprocessing import load_model_input, normalize_batch
from handler.runtime import build_runner
from handler.settings import HandlerSettings
from lab.ensembles import check_compatible_members
from scripts import ensemble as ensemble_script
from tests.conftest import TINY_CALIBRATION

CALIBRATIONS = {tta: Calibration.from_dict(fitted) for tta, fitted in TINY_CALIBRATION.items()}


def member_checkpoint(seed, image_size=64, version="0.0.1-test"):
    torch.manual_seed(seed)
    model = build_model("efficientnet_lite0").eval()
    preprocess = default_preprocess_config("efficientnet_lite0", image_size=image_size)
    meta = Meta(preprocess, version=version, calibration=dict(CALIBRATIONS),
                data={"metadata": "metadata.csv", "train_images": 5129, "val_images": 855, "split": "seed 42"},
                provenance={"command": f"python scripts/train.py --seed {seed}"})
    return make_checkpoint(model, "efficientnet_lite0", preprocess, meta)


@pytest.fixture()
def member_files(tmp_path):
    return [member_checkpoint(seed, version=f"0.{seed}.0").save(tmp_path / f"member{seed}.pt") for seed in (1, 2)]


def test_logits_are_the_members_mean_and_probabilities_the_geometric_mean():
    members = [load_member(member_checkpoint(seed)) for seed in (1, 2)]
    ensemble = LogitAverage(members).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        member_logits = torch.stack([m(x) for m in members])
        features, logits = features_and_logits(ensemble, x)
    assert torch.allclose(logits, member_logits.mean(0), atol=1e-5)
    assert torch.allclose(ensemble(x), logits, atol=1e-6)
    assert features.shape[1] == sum(ensemble.member_channels) == 2 * 1280
    # Averaging log-probabilities instead of logits gives the same distribution.
    log_mean = torch.log_softmax(member_logits, 2).mean(0)
    assert torch.allclose(torch.softmax(logits, 1), torch.softmax(log_mean, 1), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        LogitAverage(members[:1])


def load_member(checkpoint):
    model = build_from_config(checkpoint.config)
    model.load_state_dict(checkpoint.state_dict)
    return model.eval()


def test_loaded_ensemble_is_a_logit_average_of_every_member_weight(tmp_path):
    members = [member_checkpoint(seed) for seed in (1, 2)]
    meta = Meta(members[0].meta.preprocessing, version="9.9.9")
    loaded = load_checkpoint(combine_members(members, meta).save(tmp_path / "ensemble.pt"))  # weights_only=True inside
    assert isinstance(loaded.model, LogitAverage) and loaded.version == "9.9.9"
    assert loaded.architecture == "logit_average(efficientnet_lite0, efficientnet_lite0)"
    assert loaded.preprocess == default_preprocess_config("efficientnet_lite0", image_size=64)
    for index, member in enumerate(members):
        restored = loaded.model.members[index].state_dict()
        assert all(torch.equal(restored[name], tensor) for name, tensor in member.state_dict.items())


def test_members_from_different_train_script_versions_on_one_split_combine():
    older, newer = member_checkpoint(1), member_checkpoint(2)
    newer.meta.data["train_class_counts"] = {"nv": 3706}  # recorded by train.py since 1.3.0
    check_compatible_members([older, newer])


@pytest.mark.parametrize("problem,match", [
    ("one member", "at least 2"),
    ("preprocessing", "other preprocessing"),
    ("classes", "classes"),
    ("nested", "itself an ensemble"),
    ("split", "share one training/validation split"),
    ("no split", "share one training/validation split"),
])
def test_incompatible_members_are_refused(problem, match):
    first, second = member_checkpoint(1), member_checkpoint(2)
    if problem == "one member":
        members = [first]
    elif problem == "preprocessing":
        members = [first, member_checkpoint(2, image_size=96)]
    elif problem == "classes":
        second.config["classes"] = list(reversed(second.config["classes"]))
        members = [first, second]
    elif problem == "split":
        second.meta.data["split"] = "seed 7"  # its validation images were another member's training images
        members = [first, second]
    elif problem == "no split":
        second.meta.data = None
        members = [first, second]
    else:
        members = [combine_members([first, second], first.meta), member_checkpoint(3)]
    with pytest.raises(ValueError, match=match):
        check_compatible_members(members)


def test_script_records_member_provenance_and_needs_calibration(member_files, tmp_path):
    output = tmp_path / "ensemble.pt"
    args = ensemble_script.get_args_parser().parse_args(
        ["--members", *map(str, member_files), "--output", str(output), "--model-version", "2.0.0-test"])
    ensemble_script.main(args)
    loaded = load_checkpoint(output)
    assert loaded.meta.provenance["command"].startswith("python scripts/ensemble.py --members ")
    sources = [member["source"] for member in loaded.meta.members]
    assert sources[0].startswith("checkpoint member1.pt (version 0.1.0, sha256 ")
    assert [member["command"] for member in loaded.meta.members] == [
        "python scripts/train.py --seed 1", "python scripts/train.py --seed 2"]
    assert all(member["data"]["split"] == "seed 42" for member in loaded.meta.members)
    # Stored in float16 by default (half the file), run in float32.
    stored = torch.load(output, weights_only=True)["state_dict"]
    assert stored["members.0.classifier.weight"].dtype == torch.float16
    assert loaded.model.members[0].classifier.weight.dtype == torch.float32
    assert torch.equal(loaded.model.members[0].classifier.weight, stored["members.0.classifier.weight"].float())
    # The members' calibrations do not describe the ensemble's logits: serving waits for calibrate.py.
    with pytest.raises(ValueError, match="no calibration"):
        prepare_for_serving(loaded, HandlerSettings())



def test_script_grows_an_ensemble_from_its_checkpoint_and_stores_int8(member_files, tmp_path):
    first = tmp_path / "two.pt"
    ensemble_script.main(ensemble_script.get_args_parser().parse_args(
        ["--members", *map(str, member_files), "--output", str(first), "--model-version", "2.0.0-test"]))
    third = member_checkpoint(3, version="0.3.0").save(tmp_path / "member3.pt")
    grown = tmp_path / "three.pt"
    ensemble_script.main(ensemble_script.get_args_parser().parse_args(
        ["--members", str(first), str(third), "--output", str(grown), "--model-version", "3.0.0-test",
         "--storage-dtype", "int8"]))
    loaded = load_checkpoint(grown)
    assert loaded.architecture == "logit_average(efficientnet_lite0, efficientnet_lite0, efficientnet_lite0)"
    sources = [member["source"] for member in loaded.meta.members]
    assert sources[0].startswith("checkpoint member1.pt (version 0.1.0, sha256 ")
    assert " taken as stored from member 1 of checkpoint two.pt (version 2.0.0-test, sha256 " in sources[1]
    assert sources[2].startswith("checkpoint member3.pt (version 0.3.0, sha256 ")
    assert [member["command"] for member in loaded.meta.members] == [
        f"python scripts/train.py --seed {seed}" for seed in (1, 2, 3)]
    stored = torch.load(grown, weights_only=True)["state_dict"]
    assert stored["members.2.conv_stem.weight"].dtype == torch.int8
    assert grown.stat().st_size < 0.6 * first.stat().st_size * 3 / 2
    # The int8 network stays close to the float16 one it was made from (a random network's
    # logits span about +-12; the release's measured effect on real images is in test_storage).
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = LogitAverage([load_checkpoint(first).model.members[1], load_member(member_checkpoint(3))]).eval()(x)
        quantized = LogitAverage(list(loaded.model.members)[1:]).eval()(x)
    assert (quantized - reference).abs().max() < 0.1 * reference.abs().max()

@pytest.mark.data
def test_handler_serves_the_ensembles_calibrated_mean_logits_and_explains_it(member_files, tmp_path, samples_dir):
    output = tmp_path / "ensemble.pt"
    ensemble_script.main(ensemble_script.get_args_parser().parse_args(
        ["--members", *map(str, member_files), "--output", str(output), "--model-version", "2.0.0-test"]))
    loaded = load_checkpoint(output)
    loaded.meta.calibration = dict(CALIBRATIONS)  # what calibrate.py would add
    images = [(samples_dir / name).read_bytes() for name in sorted(p.name for p in samples_dir.glob("*.jpg"))[:5]]
    rows = [{"body": {"image": base64.b64encode(i).decode(), "gradcam": True}} for i in images]
    eager = [r.body for r in handle_batch(loaded, HandlerSettings(runtime="eager"), rows, "2.0.0-test")]
    batch = normalize_batch(torch.stack([load_model_input(i, loaded.preprocess)[0] for i in images]), loaded.preprocess)
    with torch.no_grad():
        member_logits = torch.stack([features_and_logits(m, batch)[1] for m in loaded.model.members]).mean(0)
    expected = CALIBRATIONS["none"].apply(member_logits)
    served = torch.tensor([list(body.probabilities.values()) for body in eager])
    assert torch.allclose(served, expected, atol=1e-4)
    assert all(body.gradcam.class_code == body.prediction for body in eager)


def test_torchscript_runner_traces_the_ensemble():
    ensemble = LogitAverage([load_member(member_checkpoint(seed)) for seed in (1, 2)]).eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager_features, eager_logits = features_and_logits(ensemble, x)
        features, logits = build_runner(ensemble, "torchscript", "fp32", (64, 64))(x)
    assert torch.allclose(logits, eager_logits, atol=1e-4)
    assert torch.allclose(features, eager_features, atol=1e-4)


@pytest.mark.data
def test_compare_members_measures_each_combination_as_the_built_ensemble(member_files, tmp_path, samples_dir, monkeypatch):
    import csv
    import json

    import numpy as np

    from handler.labels import class_index
    from lab import evaluation
    from lab.crossfit import measure_combination
    from scripts import compare_members

    two = tmp_path / "two.pt"
    ensemble_script.main(ensemble_script.get_args_parser().parse_args(
        ["--members", *map(str, member_files), "--output", str(two), "--model-version", "2.0.0-test"]))
    third = member_checkpoint(3, version="0.3.0").save(tmp_path / "member3.pt")
    rows = list(csv.DictReader(open(samples_dir / "metadata.csv")))
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps({"val_image_ids": [row["image_id"] for row in rows]}))
    common = ["--members", str(two), str(third), "--images", str(samples_dir), "--labels", str(samples_dir / "metadata.csv"),
              "--subset", str(subset), "--cache-dir", str(tmp_path / "cache"), "--repeats", "2",
              "--nested-repeats", "0"]
    report = compare_members.main(compare_members.get_args_parser().parse_args(
        common + ["--report", str(tmp_path / "r.json"), "--nested-repeats", "1"]))
    measured = report["combinations"]
    # Each of the 5 outer folds picked one of the 7 combinations.
    assert sum(report["selection_aware"]["picks"].values()) == 5
    assert 0.0 <= report["selection_aware"]["mean"] <= 1.0
    # The ensemble file's two members plus the single network: 7 combinations of 1-3 networks.
    assert sorted(" + ".join(row["members"]) for row in measured) == sorted(
        ["two[0]", "two[1]", "member3", "two[0] + two[1]", "two[0] + member3", "two[1] + member3", "two[0] + two[1] + member3"])
    assert [row["mean"]["balanced_accuracy"] for row in measured] == sorted(
        (row["mean"]["balanced_accuracy"] for row in measured), reverse=True)
    assert json.loads((tmp_path / "r.json").read_text())["n_images"] == 70
    # A combination reads exactly as the ensemble built from it (stored float16 weights included).
    built = evaluation.logits_for_files(load_checkpoint(two), [samples_dir / f"{row['image_id']}.jpg" for row in rows])
    labels = np.array([class_index(row["dx"]) for row in rows])
    direct = measure_combination(built, labels, folds=5, seed=0, repeats=2, target_sensitivity=0.85)
    pair = next(row for row in measured if row["members"] == ["two[0]", "two[1]"])
    assert direct["referral_threshold"] == pair["referral_threshold"]
    for key, value in direct["mean"].items():
        assert value == pytest.approx(pair["mean"][key], abs=2e-3), key
    # A rerun reads the cached logits instead of running the networks again.
    monkeypatch.setattr(evaluation, "logits_for_files", lambda *a, **k: pytest.fail("logits recomputed"))
    again = compare_members.main(compare_members.get_args_parser().parse_args(common + ["--min-size", "3"]))["combinations"]
    assert again[0]["mean"] == next(row for row in measured if len(row["members"]) == 3)["mean"]
    with pytest.raises(ValueError, match="3 distinct names"):
        compare_members.main(compare_members.get_args_parser().parse_args(common + ["--names", "a", "b"]))
    other_split = member_checkpoint(4)
    other_split.meta.data["split"] = "seed 7"
    other_split.save(third)
    with pytest.raises(ValueError, match="share one training/validation split"):
        compare_members.main(compare_members.get_args_parser().parse_args(common))


def test_selection_aware_figure_removes_the_winners_luck():
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold

    from lab.crossfit import out_of_fold_probabilities, selection_aware_balanced_accuracy

    folds, labels = 3, np.repeat(np.arange(7), 15)
    generator = np.random.default_rng(0)
    onehot = np.eye(7)[labels]
    steady = torch.as_tensor(onehot + generator.normal(size=onehot.shape), dtype=torch.float32)
    # "lucky k" is perfect on every image except outer fold k's, where it guesses: the inner
    # contest for fold k always crowns it, and it always fails on the images it is then judged on.
    outer = list(StratifiedKFold(folds, shuffle=True, random_state=0).split(np.zeros(len(labels)), labels))
    contest = {("steady",): steady}
    for k, (_, unseen) in enumerate(outer):
        lucky = 6.0 * onehot
        lucky[unseen] = 6.0 * generator.normal(size=(len(unseen), 7))
        contest[(f"lucky{k}",)] = torch.as_tensor(lucky, dtype=torch.float32)
    own = {name: balanced_accuracy_score(labels, out_of_fold_probabilities(logits, labels, folds, 0)[1])
           for name, logits in contest.items()}
    assert min(own[(f"lucky{k}",)] for k in range(folds)) > own[("steady",)] + 0.1
    nested = selection_aware_balanced_accuracy(contest, labels, folds, range(1))
    assert nested["picks"] == {f"lucky{k}": 1 for k in range(folds)}
    assert nested["mean"] < 1 / 7 + 0.1
    # Without the lucky ones, the steady network is picked and keeps its own accuracy.
    alone = selection_aware_balanced_accuracy({("steady",): steady}, labels, folds, range(1))
    assert alone["picks"] == {"steady": folds}
    assert alone["mean"] == pytest.approx(own[("steady",)], abs=0.05)
