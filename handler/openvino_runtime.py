"""OpenVINO execution of a served network (``runtime: openvino``): converted once per worker, run in fp32 on the CPU.

The network is converted from the PyTorch module itself (no ONNX file, nothing written to
disk) with a dynamic batch dimension, then compiled for the CPU with

- ``INFERENCE_PRECISION_HINT: f32``: OpenVINO otherwise runs bf16 on CPUs that have it
  (AVX-512 BF16, AMX), which would change the calibrated probabilities;
- ``INFERENCE_NUM_THREADS``: the worker's thread share (``torch_threads``), as TorchScript gets;
- ``PERFORMANCE_HINT: LATENCY``: one stream, one batch at a time, as a TorchServe worker calls it;
- ``ENABLE_CPU_PINNING: False``: OpenVINO otherwise pins its inference threads to cores chosen
  inside each process, so the workers of one server (separate processes, each with its thread
  share) pin to the same core and take turns on it. Measured on a 2-core AMD EPYC VM, the
  handler path of the 192x256 student at 1 thread: one process alone 27.6 ms per image; two side
  by side 64.6 and 61.1 ms each with pinning, 32.1 and 30.1 without (as with ``taskset`` giving
  each its own core: 28.4 and 30.0); one process at 2 threads 23.1 ms with pinning, 18.8 without.

Outputs equal frozen TorchScript's to about 1e-6 (logits) and 5e-6 relative (feature maps),
checked in ``tests/test_runtime.py``; the speed is measured by ``scripts/bench.py``'s runtime
section on the machine at hand.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

CompiledNetwork = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def cpu_config(threads: int = 0) -> dict[str, object]:
    """The CPU plugin's compile settings (module docstring): ``threads`` inference threads, 0 for every core."""
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                 "ENABLE_CPU_PINNING": False}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def compile_for_cpu(module: nn.Module, example: torch.Tensor, threads: int = 0) -> CompiledNetwork:
    """Convert ``module`` (eval mode, on the CPU) and compile it for the CPU.

    Args:
        module: The network; its outputs are one tensor or a tuple of tensors.
        example: An input of the served shape; every dimension but the batch is fixed.
        threads: Inference threads; 0 lets OpenVINO use every core.

    Returns:
        A callable from a float32 batch to the tuple of the module's outputs, as CPU tensors
        that the caller owns.

    Raises:
        ImportError: OpenVINO is not installed.
        ValueError: The module is not on the CPU.
    """
    import openvino

    if example.device.type != "cpu":
        raise ValueError(f"runtime openvino runs on the CPU, not on {example.device}")
    shape = openvino.PartialShape([-1, *example.shape[1:]])
    with torch.no_grad(), warnings.catch_warnings():
        # The converter traces the module; "same" padding is traced as constants, right
        # because every input has the example's spatial size.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        converted = openvino.convert_model(module, example_input=example.contiguous(), input=[shape])
    compiled = openvino.Core().compile_model(converted, "CPU", cpu_config(threads))
    request = compiled.create_infer_request()

    def run(inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # share_outputs=False (the default) copies the results out of the request's buffers,
        # which the next call overwrites.
        results = request.infer({0: inputs.detach().float().contiguous().numpy()})
        return tuple(torch.from_numpy(results[index]) for index in range(len(compiled.outputs)))

    return run
