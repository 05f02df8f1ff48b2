"""Small, fast, releasable archives for tests of the serving tools (rollouts, restarts, tokens).

A random-weight EfficientNet-Lite0 at 64 px with an operating point equal to the served
config's referral threshold, so :mod:`ops.archive` packs it (without an input gate: these are
not real releases), served by one worker. Nothing here needs the HAM10000 data.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from handler.architectures import build_model, default_preprocess_config
from handler.calibration import Calibration
from handler.checkpoint import Meta, OperatingPoint, make_checkpoint
from handler.settings import load_handler_settings
from ops.archive import ArchiveSpec, build_archive
from ops.paths import MODEL_CONFIG
from ops.rollout import archive_name
from tests.conftest import TINY_CALIBRATION


def tiny_model_config(folder: Path) -> Path:
    """The project's model config with one worker, so that several versions load quickly on 2 cores."""
    config = yaml.safe_load(MODEL_CONFIG.read_text())
    config.update(minWorkers=1, maxWorkers=1)
    path = folder / "model-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random tiny checkpoint whose operating point is the served referral threshold."""
    torch.manual_seed(seed)
    preprocess = default_preprocess_config("efficientnet_lite0", image_size=64)
    threshold = load_handler_settings(MODEL_CONFIG).referral_threshold
    meta = Meta(preprocess, version="0.0.1-test",
                calibration={tta: Calibration.from_dict(fitted) for tta, fitted in TINY_CALIBRATION.items()},
                operating_point=OperatingPoint("none", threshold))
    return make_checkpoint(build_model("efficientnet_lite0").eval(), "efficientnet_lite0", preprocess, meta).save(path)


def tiny_archive(store: Path, checkpoint: Path, model_config: Path, version: str, name: str | None = None) -> Path:
    """``store/<name>.mar`` holding ``version`` (name: ``skin_lesion_v<version>``)."""
    return build_archive(ArchiveSpec(checkpoint, model_config, store, version, name or archive_name(version),
                                     require_gate=False))


def synthetic_jpeg(seed: int = 0, size: tuple[int, int] = (96, 72)) -> bytes:
    """A small random-colour JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def lenient_golden(folder: Path) -> Path:
    """A golden smoke-test file over two synthetic images that any working model passes (min_matches 0)."""
    images = folder / "golden"
    images.mkdir(parents=True, exist_ok=True)
    cases = []
    for index in range(2):
        (images / f"g{index}.jpg").write_bytes(synthetic_jpeg(index))
        cases.append({"image": f"g{index}.jpg", "expected": "nv"})
    path = folder / "golden.json"
    path.write_text(json.dumps({"images": "golden", "cases": cases, "min_matches": 0}))
    return path
