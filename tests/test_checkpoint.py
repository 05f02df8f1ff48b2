"""The checkpoint format (handler.checkpoint): every meta field survives a weights-only save and read, the
released checkpoint re-saves unchanged, and an ensemble's members come back out as they went in."""

import dataclasses

import pytest
import torch

from handler.architectures import build_model, default_preprocess_config
from handler.calibration import Calibration
from handler.checkpoint import (
    Checkpoint, Meta, OperatingPoint, combine_members, load_checkpoint, make_checkpoint, read_checkpoint, split_members)
from handler.labels import CLASS_CODES
from handler.preprocessing import PreprocessConfig
from ops.paths import CHECKPOINT as RELEASED_CHECKPOINT
from tests.conftest import TINY_CALIBRATION

META_FIELDS = [f.name for f in dataclasses.fields(Meta)]


def assert_same(expected, actual, where="value"):
    """Deep equality of stored values: tensors by dtype, shape and content; containers element by element."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert expected.dtype == actual.dtype and torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(expected) == list(actual), (where, list(expected), list(actual))
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(expected) is type(actual) and len(expected) == len(actual), where
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert type(expected) is type(actual) and expected == actual, (where, expected, actual)


def tiny_network(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("efficientnet_lite0").eval()


def full_meta() -> Meta:
    """A meta with every field set to something other than its default."""
    preprocess = PreprocessConfig(image_size=64, resize_size=72, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.75),
                                  interpolation="bicubic")
    return Meta(
        preprocessing=preprocess,
        version="9.8.7-test",
        calibration={tta: Calibration.from_dict(fitted) for tta, fitted in TINY_CALIBRATION.items()},
        operating_point=OperatingPoint("hflip", 0.12, 0.85, {"melanoma_sensitivity": 0.875, "balanced_rule": {
            "balanced_accuracy": 0.74}}),
        # Laid out like handler.input_gate's stored gate: packed weights, fp16 reference features, plain values.
        input_gate={"format": 1, "method": "test-cosine-knn3", "arch": "efficientnet_lite0", "storage": "float16",
                    "state_dict": {"conv_stem.weight": torch.randn(8, 3, 3, 3).half(),
                                   "bn1.num_batches_tracked": torch.tensor(7)},
                    "input_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "scorer": "cosine_knn", "k": 3,
                    "threshold": 0.25, "reference": torch.randn(10, 8).half(), "provenance": {"images": 10}},
        data={"metadata": "metadata.csv", "train_images": 5129, "val_images": 855, "split": "seed 42",
              "train_class_counts": dict(zip(CLASS_CODES, range(7)))},
        members=[{"source": "checkpoint a.pt (version 0.1.0, sha256 0123456789ab)", "command": "python scripts/train.py",
                  "validation": {"balanced_accuracy": 0.7}}],
        provenance={"command": "python scripts/ensemble.py --members a.pt", "calibration_command": "python scripts/calibrate.py",
                    "validation": {"balanced_accuracy": 0.71, "ece": None}, "torch": "2.x", "trained_epochs": 12},
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A single network's checkpoint with a full meta, saved, and the file's path."""
    meta = full_meta()
    checkpoint = make_checkpoint(tiny_network(0), "efficientnet_lite0", meta.preprocessing, meta, dropout=0.3)
    path = checkpoint.save(tmp_path_factory.mktemp("checkpoint") / "nested" / "full.pt")
    return checkpoint, path


def test_file_is_a_plain_weights_only_dict(saved):
    checkpoint, path = saved
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "config", "meta"}
    assert raw["config"] == {"format": 1, "arch": "efficientnet_lite0", "num_classes": 7, "classes": list(CLASS_CODES),
                             "dropout": 0.3}
    assert_same(checkpoint.to_dict(), raw)


@pytest.mark.parametrize("name", META_FIELDS)
def test_each_meta_field_round_trips(saved, name):
    checkpoint, path = saved
    expected, actual = getattr(checkpoint.meta, name), getattr(read_checkpoint(path).meta, name)
    assert expected is not None and expected != {} and expected != []  # full_meta sets every field
    if name in ("input_gate", "data", "members", "provenance"):
        assert_same(expected, actual, name)
    else:
        assert actual == expected  # typed: PreprocessConfig, str, dict of Calibration, OperatingPoint
    # Fields are stored under their own names, so older readers of meta keep working.
    stored = torch.load(path, weights_only=True)["meta"]
    if name == "provenance":
        assert all(stored[key] == value for key, value in expected.items())
    else:
        assert name in stored


def test_absent_fields_stay_absent():
    preprocess = default_preprocess_config("efficientnet_lite0", 64)
    meta = Meta(preprocess)
    assert meta.to_dict() == {"preprocessing": preprocess.to_dict()}
    assert Meta.from_dict(meta.to_dict()) == meta
    point = OperatingPoint("none", 0.1)
    assert OperatingPoint.from_dict(point.to_dict()) == point


def test_weights_and_calibrations_load_back_exactly(saved):
    checkpoint, path = saved
    loaded = load_checkpoint(path)
    assert loaded.version == "9.8.7-test" and loaded.preprocess == checkpoint.meta.preprocessing
    assert loaded.calibration("hflip") == checkpoint.meta.calibration["hflip"]
    restored = loaded.model.state_dict()
    assert all(torch.equal(restored[name], tensor) for name, tensor in checkpoint.state_dict.items())
    uncalibrated = make_checkpoint(tiny_network(0), "efficientnet_lite0", checkpoint.meta.preprocessing)
    with pytest.raises(ValueError, match="no calibration for TTA mode 'flip4'"):
        load_checkpoint(uncalibrated.save(path.with_name("uncalibrated.pt"))).calibration("flip4")


def test_checkpoint_with_other_classes_is_refused(tmp_path):
    checkpoint = make_checkpoint(tiny_network(0), "efficientnet_lite0", default_preprocess_config("efficientnet_lite0"))
    checkpoint.config["classes"] = list(reversed(CLASS_CODES))
    with pytest.raises(ValueError, match="classes"):
        load_checkpoint(checkpoint.save(tmp_path / "bad.pt"))


def test_released_checkpoint_reads_and_resaves_identically(tmp_path):
    original = torch.load(RELEASED_CHECKPOINT, map_location="cpu", weights_only=True)
    checkpoint = read_checkpoint(RELEASED_CHECKPOINT)
    assert checkpoint.meta.version and checkpoint.meta.calibration and checkpoint.meta.operating_point is not None
    resaved_path = checkpoint.save(tmp_path / "resaved.pt")
    resaved = torch.load(resaved_path, map_location="cpu", weights_only=True)
    # The same tensors (dtypes included) and values; only the order of meta's keys may differ.
    assert_same(original["state_dict"], resaved["state_dict"], "state_dict")
    assert_same(original["config"], resaved["config"], "config")
    assert set(original["meta"]) == set(resaved["meta"])
    for key in original["meta"]:
        assert_same(original["meta"][key], resaved["meta"][key], f"meta[{key!r}]")
    # And reading then saving again changes nothing at all, byte for byte (torch.save names the
    # archive's records after the file, so the copy keeps the name).
    again = read_checkpoint(resaved_path).save(tmp_path / "again" / "resaved.pt")
    assert again.read_bytes() == resaved_path.read_bytes()


def member(seed: int, image_size: int = 64) -> Checkpoint:
    preprocess = default_preprocess_config("efficientnet_lite0", image_size)
    meta = Meta(preprocess, version=f"0.{seed}.0", data={"metadata": "metadata.csv", "train_images": 5129,
                                                          "val_images": 855, "split": "seed 42"},
                provenance={"command": f"python scripts/train.py --seed {seed}"})
    return make_checkpoint(tiny_network(seed), "efficientnet_lite0", preprocess, meta)


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_split_members_returns_the_combined_members_weights(storage, tmp_path):
    members = [member(1), member(2)]
    records = [{"source": f"checkpoint m{index}.pt", "data": m.meta.data, **m.meta.provenance}
               for index, m in enumerate(members)]
    ensemble = combine_members(members, Meta(members[0].meta.preprocessing, version="9.9.9", members=records), storage)
    assert ensemble.is_ensemble and ensemble.meta.preprocessing == members[0].meta.preprocessing
    split = split_members(read_checkpoint(ensemble.save(tmp_path / "ensemble.pt")))
    assert [m.config for m in split] == [m.config for m in members]
    for index, (original, restored) in enumerate(zip(members, split)):
        assert list(restored.state_dict) == list(original.state_dict)
        for name, tensor in original.state_dict.items():
            expected = tensor.half().float() if storage == "float16" and tensor.is_floating_point() else tensor
            assert restored.state_dict[name].dtype == tensor.dtype and torch.equal(restored.state_dict[name], expected), name
        assert restored.meta.data == original.meta.data and restored.meta.preprocessing == original.meta.preprocessing
        assert restored.meta.provenance["source"] == f"checkpoint m{index}.pt"
        assert restored.meta.provenance["command"] == original.meta.provenance["command"]
    # Recombined, they make the same ensemble.
    again = combine_members(split, ensemble.meta, storage)
    assert again.config == ensemble.config
    assert all(torch.equal(again.state_dict[name], tensor) for name, tensor in ensemble.state_dict.items())


def test_combine_and_split_refuse_what_is_not_their_input():
    single, other = member(1), member(2)
    with pytest.raises(ValueError, match="at least 2"):
        combine_members([single], single.meta)
    with pytest.raises(ValueError, match="itself an ensemble"):
        combine_members([combine_members([single, other], single.meta), single], single.meta)
    with pytest.raises(ValueError, match="not an ensemble"):
        split_members(single)
