"""Shared fixtures and helpers: real data locations, a tiny random checkpoint, synthetic HAM10000-style data, a real
TorchServe and one way to POST to it."""

from __future__ import annotations

import contextlib
import csv
import socket
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from handler.architectures import build_model, default_preprocess_config
from handler.calibration import Calibration
from handler.checkpoint import Meta, make_checkpoint, read_checkpoint
from handler.labels import CLASS_CODES
from ops import torchserve as serve
from ops.archive import ArchiveSpec, build_archive
from ops.client import ServiceClient
from ops.paths import CHECKPOINT as RELEASED_CHECKPOINT
from ops.paths import DATA, MODEL_CONFIG, MODEL_NAME, ROOT, SERVER_CONFIG  # noqa: F401 (ROOT: test modules import it from here)


@pytest.fixture(scope="session")
def released_version() -> str:
    """The version recorded in the released checkpoint, which the served archive reports."""
    return str(read_checkpoint(RELEASED_CHECKPOINT).meta.version)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real HAM10000 data not found at {path} (set SKIN_LESION_DATA or place ../shared/data)")
    return path


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The 70 full-size 600x450 HAM10000 JPEGs (10 per class)."""
    return _require(DATA / "samples-600x450")


@pytest.fixture(scope="session")
def ham224_dir() -> Path:
    """The 224x224 one-image-per-lesion HAM10000 training pool."""
    return _require(DATA / "ham10000-224")


@pytest.fixture(scope="session")
def sample_jpeg(samples_dir: Path) -> bytes:
    """One real 600x450 dermoscopic JPEG."""
    return (samples_dir / "ISIC_0024354.jpg").read_bytes()


# Biases (and, per mode, temperatures) that differ, so tests see which calibration was applied.
# The class priors are HAM10000's prevalence; flip4 has none, like a checkpoint calibrated before
# priors were recorded.
HAM10000_PRIOR = [0.031, 0.044, 0.097, 0.010, 0.082, 0.722, 0.014]
TINY_CALIBRATION = {
    "none": {"temperature": 1.5, "class_bias": [0.3, -0.2, 0.1, 0.0, 0.4, -0.5, -0.1], "class_prior": HAM10000_PRIOR},
    "hflip": {"temperature": 1.4, "class_bias": [0.2, -0.2, 0.1, 0.0, 0.3, -0.4, 0.0], "class_prior": HAM10000_PRIOR},
    "flip4": {"temperature": 1.3, "class_bias": None},
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight EfficientNet-Lite0 checkpoint at 64 px: fast, and nothing like the released model."""
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0").eval()
    preprocess = default_preprocess_config("efficientnet_lite0", image_size=64)
    path = tmp_path_factory.mktemp("tiny") / "skin_lesion.pt"
    meta = Meta(preprocess, version="0.0.1-test",
                calibration={tta: Calibration.from_dict(fitted) for tta, fitted in TINY_CALIBRATION.items()})
    make_checkpoint(model, "efficientnet_lite0", preprocess, meta).save(path)
    return path


@pytest.fixture
def one_thread():
    """Tiny networks train several times faster on one thread than on two busy cores (and start faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LESIONS_PER_CLASS = (1, 2, 1, 3)


def synthetic_ham(folder: Path, size: tuple[int, int] = (40, 30), lesions: tuple[int, ...] = LESIONS_PER_CLASS) -> Path:
    """A HAM10000-style metadata.csv and 4:3 JPEGs in ``folder``: one colour per class, noise per image.

    Returns:
        The metadata file (images are in ``folder/images``).
    """
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for label, code in enumerate(CLASS_CODES):
        base = np.array([(label * 37) % 256, (label * 91 + 60) % 256, (label * 53 + 120) % 256])
        for lesion, images in enumerate(lesions):
            lesion_id = f"HAM_{label}{lesion:02d}"
            for image in range(images):
                image_id = f"ISIC_{label}{lesion:02d}{image}"
                pixels = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / "images" / f"{image_id}.jpg", quality=90)
                rows.append((lesion_id, image_id, code, "histo", "50.0", "male", "back"))
    metadata = folder / "metadata.csv"
    with open(metadata, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        writer.writerows(rows)
    return metadata


def start_server(run_dir: Path, model_store: Path, overrides: dict[str, str] | None = None, models: str | None = None) -> serve.Server:
    """Start a real TorchServe on free loopback ports, with the project's config otherwise."""
    return serve.start(run_dir, model_store, SERVER_CONFIG, {**serve.loopback_addresses(), **(overrides or {})}, models)


def ready_server(run_dir: Path, model_store: Path, overrides: dict[str, str] | None = None, models: str | None = None,
                 timeout: float = 240) -> serve.Server:
    """A TorchServe with the project's config whose model has a READY worker (new ports if a picked one was taken)."""
    return serve.start_on_free_ports(run_dir, model_store, SERVER_CONFIG, overrides, models,
                                     ready=lambda server: serve.wait_ready(server, timeout=timeout))[0]


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A loopback port held (listening) for the block, as another program can take a port picked free
    a moment before TorchServe binds it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def post(server: serve.Server, body: bytes | dict | None = None, *, explain: bool = False, path: str | None = None,
         content_type: str | None = "application/octet-stream", upload: str | None = None, fields: dict | None = None,
         timeout: float = 60.0) -> requests.Response:
    """POST one request to ``server``'s model through :class:`ops.client.ServiceClient` (its inference token).

    Args:
        server: A running TorchServe.
        body: A dict is sent as JSON; bytes (or None) as the raw body with ``content_type``.
        explain: The explanations API instead of predictions.
        path: Another inference path (``/v1/models/skin_lesion:predict``, ``/v2/...``).
        content_type: The raw body's Content-Type (None: none sent).
        upload: Send ``body`` as a multipart file under this field name, with ``fields`` beside it.
        fields: Form fields of a multipart request (``upload`` defaults to ``data`` with them).
        timeout: Seconds.
    """
    path = path or f"/{'explanations' if explain else 'predictions'}/{MODEL_NAME}"
    client = ServiceClient(server, timeout=timeout)
    if upload is not None or fields is not None:
        return client.request("inference", "POST", path, files={upload or "data": ("x.jpg", body, "image/jpeg")},
                              data=fields)
    if isinstance(body, dict):
        return client.request("inference", "POST", path, json=body)
    return client.request("inference", "POST", path, data=body,
                          headers={"Content-Type": content_type} if content_type else None)


@pytest.fixture(scope="session")
def release_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding the release archive, built from the repository by ops.archive."""
    store = tmp_path_factory.mktemp("model_store")
    build_archive(ArchiveSpec(RELEASED_CHECKPOINT, MODEL_CONFIG, store))
    return store


@contextlib.contextmanager
def served(run_dir: Path, model_store: Path) -> Iterator[serve.Server]:
    """A ready TorchServe for the duration of the block, stopped by its own pid afterwards."""
    server = ready_server(run_dir, model_store)
    try:
        yield server
    finally:
        serve.stop(server)


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory: pytest.TempPathFactory, release_store: Path):
    """The released model served by real TorchServe, shared by the session's tests."""
    with served(tmp_path_factory.mktemp("torchserve"), release_store) as server:
        yield server


def same_answer(actual, expected, tolerance: float = 1e-4) -> bool:
    """Equal answers, numbers to ``tolerance``: one image's probabilities move in the last digits with
    the size of the batch it shares with other requests (oneDNN picks kernels by shape)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and actual.keys() == expected.keys() and all(
            same_answer(actual[key], value, tolerance) for key, value in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(
            same_answer(a, e, tolerance) for a, e in zip(actual, expected))
    if isinstance(expected, float) and not isinstance(expected, bool):
        return isinstance(actual, (int, float)) and abs(actual - expected) <= tolerance
    return actual == expected
