"""Training throughput of each CPU lever, measured on the machine at hand (``make train-bench``).

Which levers pay differs between CPUs (AVX-512/AMX Intel against AVX2-only AMD machines, about
half as fast), so a training plan takes its figures from here, not from another machine. Every
lever is one full SGD step as :mod:`lab.training` takes it (forward, class-weighted loss,
backward, AdamW update) on random ``uint8`` images of the lever's input shape, batch
``batch_size``, after ``warmup`` untimed steps; the figure is training images per second.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handler.architectures import build_model
from lab.training import freeze_early_layers


@dataclass(frozen=True)
class Lever:
    """One training configuration to time.

    Attributes:
        name: What the table calls it.
        height: Input height.
        width: Input width.
        channels_last: Channels-last memory format.
        bf16: bf16 autocast.
        frozen_blocks: Stem plus this many stages frozen (weights and batch-norm statistics).
        compile: ``torch.compile`` (inductor); falls back to eager, reported, when it fails.
        processes: Side-by-side processes, each with ``threads`` threads; the figure is their sum.
        threads: Torch threads per process (0: one process with torch's default).
    """

    name: str
    height: int = 150
    width: int = 200
    channels_last: bool = True
    bf16: bool = False
    frozen_blocks: int = 0
    compile: bool = False
    processes: int = 1
    threads: int = 0


LEVERS: tuple[Lever, ...] = (
    Lever("150x200 fp32 channels_last"),
    Lever("224x224", height=224, width=224),
    Lever("224x299", height=224, width=299),
    Lever("150x200 bf16 autocast", bf16=True),
    Lever("150x200 without channels_last", channels_last=False),
    Lever("150x200 stem + 2 stages frozen", frozen_blocks=2),
    Lever("150x200 stem + 3 stages frozen", frozen_blocks=3),
    Lever("150x200 stem + 4 stages frozen", frozen_blocks=4),
    Lever("150x200 stem + 3 frozen, torch.compile", frozen_blocks=3, compile=True),
    Lever("150x200 stem + 3 frozen, 2 processes x 1 thread", frozen_blocks=3, processes=2, threads=1),
)


def time_lever(lever: Lever, arch: str = "efficientnet_lite0", batch_size: int = 32, steps: int = 5, warmup: int = 2,
               seed: int = 0) -> dict[str, Any]:
    """Images per second of ``steps`` timed SGD steps of one process under ``lever``."""
    if lever.threads:
        torch.set_num_threads(lever.threads)
    torch.manual_seed(seed)
    model = build_model(arch, dropout=0.2)
    frozen = freeze_early_layers(model, lever.frozen_blocks)
    memory_format = torch.channels_last if lever.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    for module in frozen:
        module.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    criterion = nn.CrossEntropyLoss(weight=torch.ones(7))
    step_model, note = model, ""
    if lever.compile:
        try:
            step_model = torch.compile(model)
        except Exception as error:  # noqa: BLE001 - reported: the lever falls back to eager
            note = f"torch.compile unavailable ({type(error).__name__}: {error}); eager"
    images = torch.randint(0, 256, (batch_size, 3, lever.height, lever.width), dtype=torch.uint8)
    labels = torch.randint(0, 7, (batch_size,))

    def step() -> None:
        inputs = ((images.float() - 127.5) / 127.5).contiguous(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lever.bf16):
            loss = criterion(step_model(inputs).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    try:
        for _ in range(warmup):
            step()
    except Exception as error:  # noqa: BLE001 - a compile that fails at its first call falls back too
        if not lever.compile:
            raise
        note, step_model = f"torch.compile failed ({type(error).__name__}); eager", model
        for _ in range(warmup):
            step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    return {"images_per_s": steps * batch_size / seconds, "seconds": seconds, "note": note}


def _time_in_child(arguments: tuple[Lever, str, int, int, int]) -> dict[str, Any]:
    lever, arch, batch_size, steps, warmup = arguments
    return time_lever(lever, arch, batch_size, steps, warmup)


def measure(lever: Lever, arch: str = "efficientnet_lite0", batch_size: int = 32, steps: int = 5,
            warmup: int = 2) -> dict[str, Any]:
    """``lever``'s training images per second, each process in a fresh spawned process (so no lever
    inherits another's threads, compiled code or allocator state); side-by-side processes are summed."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(lever.processes) as pool:
        results = pool.map(_time_in_child, [(lever, arch, batch_size, steps, warmup)] * lever.processes)
    notes = sorted({r["note"] for r in results if r["note"]})
    return {"lever": dataclasses.asdict(lever), "images_per_s": sum(r["images_per_s"] for r in results),
            "per_process": [r["images_per_s"] for r in results], "note": "; ".join(notes)}


def cpu_name() -> str:
    """The CPU model as the kernel names it (the levers' figures belong to it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_levers(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the levers, each as images/s and as a ratio to the first row."""
    base = rows[0]["images_per_s"] if rows else 1.0
    lines = ["| lever | images/s | ratio to the first row | note |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['lever']['name']} | {row['images_per_s']:.1f} | {row['images_per_s'] / base:.2f} | "
                     f"{row['note']} |")
    return "\n".join(lines)
