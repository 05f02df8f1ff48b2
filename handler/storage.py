"""How a checkpoint's weights are stored on disk: float32, float16, or int8 convolutions.

Storage only shrinks the file; the network always runs with float32 parameters rebuilt
from it. Because a release is calibrated and measured after it is stored
(``scripts/calibrate.py`` loads the stored file), its figures describe the weights that
serve, whichever storage was chosen.

``int8`` keeps each convolution kernel as symmetric 8-bit integers with one float32 scale
per output channel, stored beside it under ``<name>`` + :data:`SCALE_SUFFIX`; every other
floating-point tensor (batch-norm, biases, the linear classifier) is stored in float16.
EfficientNet-Lite was designed for 8-bit deployment (ReLU6, no squeeze-and-excitation),
and per-channel scales give even a 3x3 depthwise kernel its own range, so the rounding
error is a fraction of a percent of each channel's largest weight. Compounded through a
network's layers it still moves the logits (about a tenth of their spread for release
1.5.0's members; models/MODEL_CARD.md, "Storage"), which is why calibration comes after storage.
"""

from __future__ import annotations

from typing import Mapping

import torch

STORAGE_DTYPES: tuple[str, ...] = ("float32", "float16", "int8")
SCALE_SUFFIX = ".int8_scale"


def check_storage_dtype(storage: str) -> str:
    """Return ``storage`` if it is one of :data:`STORAGE_DTYPES`.

    Raises:
        ValueError: Naming the known storage dtypes.
    """
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {storage!r}; choose one of {list(STORAGE_DTYPES)}")
    return storage


def _quantize_per_output_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 values and per-output-channel float32 scales with ``values * scale ~ weight``."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    largest = flat.abs().amax(dim=1)
    # An all-zero channel gets scale 1 so that dequantization stays finite (and exact: zeros).
    scale = torch.where(largest > 0, largest / 127.0, torch.ones_like(largest))
    values = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return values.reshape(weight.shape), scale


def pack_state_dict(state_dict: Mapping[str, torch.Tensor], storage: str) -> dict[str, torch.Tensor]:
    """The tensors to write to disk for ``storage``.

    Args:
        state_dict: A module's float32 state dict.
        storage: One of :data:`STORAGE_DTYPES`.

    Returns:
        A new dict; :func:`unpack_state_dict` turns it back into a loadable state dict.

    Raises:
        ValueError: On an unknown ``storage``.
    """
    check_storage_dtype(storage)
    packed: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point() or storage == "float32":
            packed[name] = tensor
        elif storage == "int8" and tensor.dim() == 4:
            packed[name], packed[name + SCALE_SUFFIX] = _quantize_per_output_channel(tensor)
        else:
            packed[name] = tensor.to(torch.float16)
    return packed


def unpack_state_dict(stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 state dict that :func:`pack_state_dict` stored (the identity for float32 storage).

    Raises:
        ValueError: If an int8 tensor has no scale, or a scale has no tensor.
    """
    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in stored:
                raise ValueError(f"stored weights have a scale {name!r} but no tensor it scales")
            continue
        if tensor.dtype == torch.int8:
            scale = stored.get(name + SCALE_SUFFIX)
            if scale is None:
                raise ValueError(f"stored int8 tensor {name!r} has no {SCALE_SUFFIX!r} scale")
            state_dict[name] = tensor.float() * scale.float().reshape(-1, *([1] * (tensor.dim() - 1)))
        else:
            state_dict[name] = tensor.float() if tensor.is_floating_point() else tensor
    return state_dict
