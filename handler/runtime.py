"""How the served network executes: eager PyTorch, a frozen TorchScript graph or OpenVINO, and at which precision.

Serving needs two outputs from one pass, the last feature map (for Grad-CAM) and the
logits, so both runtimes run :class:`FeaturesAndLogits`. The choice is a setting in
``model-config.yaml`` (``runtime``, ``precision``), measured in ``scripts/bench.py``:
on this project's 2-core AVX-512 CPU the frozen graph is about a third faster than eager
(its conv/BN folding and fused activations matter most for the depthwise layers), while
bf16 autocast is an order of magnitude slower (no fast bf16 depthwise kernels).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable

import torch
from torch import nn

from handler.architectures import features_and_logits

logger = logging.getLogger(__name__)

RUNTIMES: tuple[str, ...] = ("eager", "torchscript", "openvino")
# Runtimes that compile the network once per worker: the input gate's backbone is compiled the same way.
COMPILED_RUNTIMES: tuple[str, ...] = ("torchscript", "openvino")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

Runner = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class FeaturesAndLogits(nn.Module):
    """``x -> (last feature map, logits)`` in one pass, the unit that serving traces and runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return features_and_logits(self.model, inputs)


def check_runtime(runtime: str, precision: str) -> None:
    """Validate a runtime/precision pair.

    Raises:
        ValueError: Unknown names.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if runtime == "openvino" and precision != "fp32":
        raise ValueError(f"runtime openvino runs fp32 only (asked for {precision!r}): the calibration was fitted in fp32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device``; a no-op for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_runner(model: nn.Module, runtime: str, precision: str, input_hw: tuple[int, int], threads: int = 0) -> Runner:
    """Prepare the network for serving.

    Args:
        model: The network in eval mode, on its device, channels-last.
        runtime: ``eager``, ``torchscript`` (traced and frozen once, here, at worker start) or
            ``openvino`` (converted and compiled once, here; CPU and fp32 only).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast around the forward pass.
        input_hw: Model input (height, width), for the tracing example.
        threads: OpenVINO's inference threads (0: every core); PyTorch's come from
            ``torch.set_num_threads``.

    Returns:
        A callable from a normalized (N, 3, H, W) batch to ``(features, logits)``.
    """
    check_runtime(runtime, precision)
    device = next(model.parameters()).device
    model.requires_grad_(False)  # serving never differentiates; frozen graphs need grad-free constants
    module = FeaturesAndLogits(model).eval()
    if runtime == "openvino":
        from handler.openvino_runtime import compile_for_cpu

        compiled = compile_for_cpu(module, torch.zeros(2, 3, *input_hw, device=device), threads)
        logger.info("serving an OpenVINO network (fp32, %s threads) on %s", threads or "all", device)
        return compiled  # type: ignore[return-value]  # FeaturesAndLogits has exactly two outputs
    if runtime == "torchscript":
        example = torch.zeros(2, 3, *input_hw, device=device).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(device, precision), warnings.catch_warnings():
            # "same" padding is computed from the input size; tracing records it as a constant,
            # which is right because every served input has the same side.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            traced = torch.jit.freeze(torch.jit.trace(module, example))
            for _ in range(2):  # the profiling executor specializes on the first calls
                traced(example)
        module = traced
        logger.info("serving a frozen TorchScript graph (%s) on %s", precision, device)

    def run(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device, precision):
            return module(inputs)

    return run
