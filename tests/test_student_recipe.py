"""Release 1.7.0's recipe on tiny settings: a 4:3 model input, a warm start from an ensemble member,
validation by the recorded split's lesions, distillation from a release checkpoint."""

import json
from pathlib import Path

import pytest
import torch

from handler.architectures import build_model, default_preprocess_config
from handler.calibration import Calibration
from handler.checkpoint import Meta, combine_members, load_checkpoint, make_checkpoint, read_checkpoint
from handler.preprocessing import FULL_VIEW, PreprocessConfig, load_model_input, resize_to_model_input
from lab.data import build_train_transform
from lab.distillation import SoftLabelledDataset, cache_teacher_logits
from lab.provenance import file_sha256
from lab.training import load_release_weights, split_records_by_file
from ops.paths import DATA, PROVENANCE
from scripts import train
from tests.conftest import TINY_CALIBRATION
from tests.test_distillation import write_out_of_fold_logits
from tests.tiny_release import synthetic_jpeg

RECTANGULAR = PreprocessConfig(image_size=48, resize_size=48, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode=FULL_VIEW,
                               image_width=64)


def test_a_rectangular_input_round_trips_and_needs_the_full_view():
    assert PreprocessConfig.from_dict(RECTANGULAR.to_dict()) == RECTANGULAR
    assert (RECTANGULAR.input_height, RECTANGULAR.input_width) == (48, 64)
    # A square model's metadata is written as before (every cache keyed on it stays valid).
    assert "image_width" not in PreprocessConfig().to_dict()
    with pytest.raises(ValueError, match="full_view"):
        PreprocessConfig(image_size=48, resize_size=48, image_width=64)


def test_served_and_trained_inputs_have_the_rectangular_shape():
    tensor, _ = load_model_input(synthetic_jpeg(size=(300, 300)), RECTANGULAR)
    assert tuple(tensor.shape) == (3, 48, 64)
    from PIL import Image

    image = Image.new("RGB", (200, 150), (120, 80, 60))
    assert resize_to_model_input(image, RECTANGULAR).size == (64, 48)
    augment = build_train_transform(RECTANGULAR)
    # No right-angle rotation: every augmented view keeps the input's shape, so batches stack.
    assert {tuple(augment(image).shape) for _ in range(20)} == {(3, 48, 64)}


def _tiny(seed: int, preprocess: PreprocessConfig) -> "object":
    torch.manual_seed(seed)
    meta = Meta(preprocess, version=f"0.0.{seed}",
                calibration={tta: Calibration.from_dict(fitted) for tta, fitted in TINY_CALIBRATION.items()})
    return make_checkpoint(build_model("efficientnet_lite0").eval(), "efficientnet_lite0", preprocess, meta)


def test_a_member_of_an_ensemble_warm_starts_a_network_at_another_geometry(tmp_path):
    square = default_preprocess_config("efficientnet_lite0", 48)
    members = [_tiny(1, square), _tiny(2, square)]
    ensemble = combine_members(members, Meta(square, version="0.1.0"), storage="float16").save(tmp_path / "ensemble.pt")
    rectangular = PreprocessConfig(**{**square.to_dict(), "resize_mode": FULL_VIEW, "image_width": 64,
                                      "mean": square.mean, "std": square.std})
    model = build_model("efficientnet_lite0")
    described = load_release_weights(model, "efficientnet_lite0", rectangular, ensemble, member=1)
    assert "member 1" in described and "trained with" in described
    expected = members[1].state_dict["classifier.weight"].to(torch.float16).float()
    assert torch.equal(model.state_dict()["classifier.weight"], expected)
    with pytest.raises(ValueError, match="name the member"):
        load_release_weights(build_model("efficientnet_lite0"), "efficientnet_lite0", rectangular, ensemble)
    # A single network (a second cycle starts from one) has no members: a member given anyway is
    # ignored, and the provenance must not name one.
    single = members[0].save(tmp_path / "single.pt")
    described = load_release_weights(build_model("efficientnet_lite0"), "efficientnet_lite0", rectangular, single, member=3)
    assert "member" not in described and "0.0.1" in described
    other_normalization = PreprocessConfig(image_size=48, resize_size=48)
    with pytest.raises(ValueError, match="normalization"):
        load_release_weights(build_model("efficientnet_lite0"), "efficientnet_lite0", other_normalization, ensemble, 0)


@pytest.mark.data
def test_the_recorded_split_carries_every_image_of_its_lesions():
    folder = _data_43()
    train_records, val_records = split_records_by_file(folder / "metadata.csv", [folder / "images"],
                                                       PROVENANCE / "val_split.json")
    named = set(json.loads((PROVENANCE / "val_split.json").read_text())["val_image_ids"])
    assert not {r.lesion_id for r in train_records} & {r.lesion_id for r in val_records}
    assert named <= {r.image_id for r in val_records}
    assert len({r.lesion_id for r in val_records}) == len(named)
    assert len(val_records) > len(named)  # several images of some lesions


def _data_43() -> Path:
    """The 4:3 HAM10000 copies (200x150), or a skip naming where they were looked for."""
    folder = DATA / "ham10000-200x150"
    if not folder.exists():
        pytest.skip(f"real HAM10000 data not found at {folder}")
    return folder


def _tiny_teacher(tmp_path: Path, side: int) -> Path:
    """A two-member release of tiny square networks, saved; its path."""
    square = default_preprocess_config("efficientnet_lite0", side)
    teacher = combine_members([_tiny(1, square), _tiny(2, square)], Meta(square, version="0.1.0"))
    teacher.meta.calibration = {tta: Calibration.from_dict(fitted) for tta, fitted in TINY_CALIBRATION.items()}
    return teacher.save(tmp_path / "teacher.pt")


def _train_rectangular(folder: Path, output: Path, limit: int, *extra: str) -> None:
    """``scripts/train.py`` at 48x64, full view, on the recorded split, one epoch of batches of 16."""
    train.main(train.get_args_parser().parse_args([
        "--metadata", str(folder / "metadata.csv"), "--images", str(folder / "images"), "--output", str(output),
        "--limit", str(limit), "--epochs", "1", "--image-size", "48", "--image-width", "64", "--resize-mode", "full_view",
        "--val-split", str(PROVENANCE / "val_split.json"), "--freeze-blocks", "3", "--batch-size", "16", "--workers", "0",
        *extra]))


@pytest.mark.slow
@pytest.mark.data
def test_the_student_recipe_trains_a_distilled_rectangular_network(tmp_path):
    folder, teacher_path = _data_43(), _tiny_teacher(tmp_path, 48)
    _train_rectangular(folder, tmp_path / "run", 200, "--init-checkpoint", str(teacher_path), "--init-member", "0",
                       "--teacher", str(teacher_path), "--model-version", "0.0.7")
    student = load_checkpoint(tmp_path / "run" / "best.pt")
    assert (student.preprocess.input_height, student.preprocess.input_width) == (48, 64)
    assert student.meta.data["distillation"]["alpha"] == 0.7
    assert "val_split.json" in student.meta.data["split"]
    assert "member 0" in student.meta.provenance["initialization"]
    logits = torch.load(tmp_path / "run" / "teacher_logits.pt", weights_only=True)
    assert logits["views"] == [0] and logits["logits"].shape[1:] == (1, 7)
    # The cache is reused, not recomputed, by a rerun.
    records = split_records_by_file(folder / "metadata.csv", [folder / "images"], PROVENANCE / "val_split.json", 200, 42)[0]
    again = cache_teacher_logits(teacher_path, records, tmp_path / "run" / "teacher_logits.pt", torch.device("cpu"), views=(0,))
    assert torch.equal(again, logits["logits"])
    assert len(SoftLabelledDataset.__mro__) > 1 and read_checkpoint(tmp_path / "run" / "best.pt").meta.version == "0.0.7"


@pytest.mark.slow
@pytest.mark.data
def test_function_matching_trains_against_the_teacher_online_and_says_so(tmp_path):
    folder, teacher_path = _data_43(), _tiny_teacher(tmp_path, 40)
    _train_rectangular(folder, tmp_path / "run", 64, "--pretrained", "none", "--teacher", str(teacher_path),
                       "--function-matching", "1.0", "--model-version", "0.0.8")
    student = load_checkpoint(tmp_path / "run" / "best.pt")
    assert (student.preprocess.input_height, student.preprocess.input_width) == (48, 64)
    assert "function matching" in student.meta.data["distillation"]["views"]
    assert "Beta(1, 1)" in student.meta.data["distillation"]["views"]
    # Nothing is cached: the teacher (at its own 40 px square input) answered every batch.
    assert not (tmp_path / "run" / "teacher_logits.pt").exists()


@pytest.mark.slow
@pytest.mark.data
def test_the_student_recipe_distils_out_of_fold_logits_and_names_them(tmp_path):
    folder = _data_43()
    records = split_records_by_file(folder / "metadata.csv", [folder / "images"], PROVENANCE / "val_split.json", 64, 42)[0]
    logits = torch.randn(len(records), 7, generator=torch.Generator().manual_seed(0)).numpy()
    path = write_out_of_fold_logits(records, logits, tmp_path / "out_of_fold_logits.csv")
    _train_rectangular(folder, tmp_path / "run", 64, "--pretrained", "none", "--teacher-out-of-fold", str(path),
                       "--distill-alpha", "0.5", "--model-version", "0.0.9")
    distillation = load_checkpoint(tmp_path / "run" / "best.pt").meta.data["distillation"]
    assert "did not train on it" in distillation["teacher"] and distillation["alpha"] == 0.5
    assert distillation["logits_sha256"] == file_sha256(path)
    assert not (tmp_path / "run" / "teacher_logits.pt").exists()  # read, not computed
    # A file that leaves out a training image is refused, naming it.
    gap = write_out_of_fold_logits(records[1:], logits[1:], tmp_path / "gap.csv")
    with pytest.raises(ValueError, match=f"no out-of-fold logits for 1 .*{records[0].image_id}"):
        _train_rectangular(folder, tmp_path / "gap", 64, "--pretrained", "none", "--teacher-out-of-fold", str(gap))


def test_one_teacher_at_a_time_and_function_matching_needs_a_network(tmp_path, capsys):
    base = ["--output", str(tmp_path), "--metadata", "m.csv", "--images", "images"]
    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args([*base, "--teacher", "a.pt", "--teacher-out-of-fold", "b.csv"])
    assert "not allowed with argument" in capsys.readouterr().err
    args = train.get_args_parser().parse_args([*base, "--teacher-out-of-fold", "b.csv", "--function-matching", "1"])
    with pytest.raises(SystemExit, match="needs --teacher"):
        train.main(args)
