"""In-process benchmarks (no server): JPEG decoders, model runtimes and the handler's batch path.

Decoders and runtimes are each reported as a ratio to the served choice; the handler path
(:func:`bench_gradcam`, :func:`bench_in_process`) runs ``handler.inference.handle_batch`` itself,
the served ceiling that ``scripts/bench.py`` compares TorchServe against.

Every candidate is timed in interleaved rounds (A, B, C, A, B, C...) so that machine noise
hits all of them alike, and the median round is reported.
"""

from __future__ import annotations

import io
import os
import platform
import dataclasses
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from handler.checkpoint import LoadedModel
    from handler.settings import HandlerSettings

# torch and the handler are imported inside the functions that need them.


def median_seconds(candidates: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median wall time of each callable, timed in interleaved rounds after one warm-up call each."""
    for run in candidates.values():  # warm-up: allocators, lazy initialization, kernel selection
        run()
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def decoders(resize_size: int) -> dict[str, Callable[[bytes], np.ndarray]]:
    """JPEG bytes to an RGB array whose shorter side is ``resize_size``, four ways.

    ``pillow_draft`` is the served path (:func:`handler.preprocessing.load_model_input`):
    DCT-domain downscaling in libjpeg, then a bilinear resize of the small image.
    """
    import cv2
    from PIL import Image

    def shorter_side_to(width: int, height: int) -> tuple[int, int]:
        scale = resize_size / min(width, height)
        return max(resize_size, round(width * scale)), max(resize_size, round(height * scale))

    def pillow_draft(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (resize_size, resize_size))
        image = image.convert("RGB")
        return np.asarray(image.resize(shorter_side_to(*image.size), Image.BILINEAR))

    def pillow_full(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return np.asarray(image.resize(shorter_side_to(*image.size), Image.BILINEAR))

    def opencv(flag: int) -> Callable[[bytes], np.ndarray]:
        def decode(data: bytes) -> np.ndarray:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
            height, width = image.shape[:2]
            resized = cv2.resize(image, shorter_side_to(width, height), interpolation=cv2.INTER_LINEAR)
            return cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
        return decode

    return {"pillow_draft": pillow_draft, "pillow_full": pillow_full,
            "opencv_reduced": opencv(cv2.IMREAD_REDUCED_COLOR_2), "opencv_full": opencv(cv2.IMREAD_COLOR)}


def bench_decode(payloads: Sequence[bytes], resize_size: int, rounds: int) -> list[dict[str, Any]]:
    """Per-image decode + resize time of each decoder, as a ratio to the served ``pillow_draft``.

    Also reports how far each decoder's pixels are from the served path's (mean absolute
    difference in 8-bit levels on the resized image), since a faster decoder that changes
    the model's input is not a free win.
    """
    candidates = decoders(resize_size)
    timings = median_seconds({name: (lambda decode=decode: [decode(p) for p in payloads])
                               for name, decode in candidates.items()}, rounds)
    reference = [candidates["pillow_draft"](p).astype(np.int16) for p in payloads]
    rows = []
    for name, decode in candidates.items():
        pixels = [decode(p).astype(np.int16) for p in payloads]
        difference = float(np.mean([np.abs(a - b).mean() for a, b in zip(pixels, reference) if a.shape == b.shape]))
        rows.append({"decoder": name, "ms_per_image": timings[name] * 1000 / len(payloads),
                     "ratio_to_served": timings[name] / timings["pillow_draft"], "mean_abs_pixel_difference": difference})
        print(f"decode {name}: {rows[-1]['ms_per_image']:.2f} ms/image, ratio {rows[-1]['ratio_to_served']:.3f}, "
              f"pixel difference {difference:.2f}", flush=True)
    return rows


def runtime_variants(include_compile: bool) -> dict[str, dict[str, Any]]:
    """The model-execution variants compared: name -> how to build them."""
    variants = {
        "eager fp32 contiguous": {"runtime": "eager", "precision": "fp32", "channels_last": False},
        "eager fp32 channels-last": {"runtime": "eager", "precision": "fp32", "channels_last": True},
        "eager bf16 autocast": {"runtime": "eager", "precision": "bf16", "channels_last": True},
        "torchscript fp32 (served)": {"runtime": "torchscript", "precision": "fp32", "channels_last": True},
        "torchscript fp32, 1 thread": {"runtime": "torchscript", "precision": "fp32", "channels_last": True, "threads": 1},
    }
    if include_compile:
        variants["torch.compile fp32"] = {"runtime": "compile", "precision": "fp32", "channels_last": True}
    return variants


def bench_runtimes(checkpoint: str, payloads: Sequence[bytes], batch_sizes: Sequence[int], rounds: int,
                   include_compile: bool, device: str = "cpu") -> list[dict[str, Any]]:
    """Per-image forward time (features + logits, no decode) of each runtime variant, per batch size.

    Ratios are to ``torchscript fp32 (served)`` at the same batch size. The 1-thread variant
    is the per-worker cost when each of two workers gets one core.
    """
    import torch

    from handler.checkpoint import load_checkpoint
    from handler.preprocessing import load_model_input, normalize_batch
    from handler.runtime import FeaturesAndLogits, build_runner

    default_threads = torch.get_num_threads()
    variants = runtime_variants(include_compile and device == "cpu")
    if device != "cpu":
        variants = {"eager fp32": {"runtime": "eager", "precision": "fp32", "channels_last": True},
                    "eager fp16 autocast": {"runtime": "eager", "precision": "fp16", "channels_last": True},
                    "torchscript fp16 (served)": {"runtime": "torchscript", "precision": "fp16", "channels_last": True}}
    runners = {}
    for name, variant in variants.items():
        loaded = load_checkpoint(checkpoint, device)
        model = loaded.model if variant["channels_last"] else loaded.model.to(memory_format=torch.contiguous_format)
        if variant["runtime"] == "compile":
            runners[name] = torch.compile(FeaturesAndLogits(model.requires_grad_(False)).eval())
        else:
            runners[name] = build_runner(model, variant["runtime"], variant["precision"], loaded.preprocess.image_size)
    preprocess = load_checkpoint(checkpoint).preprocess
    rows = []
    reference_name = next(name for name in variants if "(served)" in name)
    for batch_size in batch_sizes:
        uint8 = torch.stack([load_model_input(payloads[i % len(payloads)], preprocess)[0] for i in range(batch_size)])
        inputs = normalize_batch(uint8.to(device), preprocess)

        def timed(name: str) -> Callable[[], Any]:
            threads = variants[name].get("threads", default_threads)
            contiguous = not variants[name]["channels_last"]
            batch = inputs.contiguous() if contiguous else inputs

            def run() -> None:
                torch.set_num_threads(threads)
                try:
                    with torch.inference_mode():
                        runners[name](batch)
                    if device != "cpu":
                        torch.cuda.synchronize()
                finally:
                    torch.set_num_threads(default_threads)
            return run

        timings = median_seconds({name: timed(name) for name in variants}, rounds)
        for name in variants:
            rows.append({"variant": name, "batch_size": batch_size, "ms_per_image": timings[name] * 1000 / batch_size,
                         "images_per_s": batch_size / timings[name], "ratio_to_served": timings[name] / timings[reference_name]})
            print(f"runtime {name}, batch {batch_size}: {rows[-1]['ms_per_image']:.2f} ms/image, "
                  f"ratio {rows[-1]['ratio_to_served']:.3f}", flush=True)
    return rows


def per_image_ms(loaded: LoadedModel, settings: HandlerSettings, payloads: list[bytes], explain: bool) -> float:
    """Milliseconds per image for one batch through the handler path."""
    from handler.inference import handle_batch

    rows = [{"body": data} for data in payloads]
    started = time.perf_counter()
    responses = handle_batch(loaded, settings, rows, "bench", [explain] * len(rows))
    elapsed = time.perf_counter() - started
    if any(r.status != 200 for r in responses):
        raise RuntimeError(f"benchmark request failed: {[r.body for r in responses if r.status != 200][:1]}")
    return elapsed * 1000 / len(rows)


def bench_gradcam(loaded: LoadedModel, settings: HandlerSettings, payloads: list[bytes], batch_sizes: list[int],
                  rounds: int) -> list[dict[str, Any]]:
    """Explain cost / predict cost per image, interleaved, for each batch size and overlay format."""
    results = []
    for batch_size in batch_sizes:
        batch = [payloads[i % len(payloads)] for i in range(batch_size)]
        for image_format in ("jpeg", "png"):
            format_settings = dataclasses.replace(settings, gradcam_format=image_format)
            per_image_ms(loaded, format_settings, batch, True)  # warm-up
            predict, explain = [], []
            for _ in range(rounds):
                predict.append(per_image_ms(loaded, format_settings, batch, False))
                explain.append(per_image_ms(loaded, format_settings, batch, True))
            row = {"batch_size": batch_size, "overlay_format": image_format,
                   "predict_ms_per_image": statistics.median(predict), "explain_ms_per_image": statistics.median(explain)}
            row["gradcam_cost_ratio"] = row["explain_ms_per_image"] / row["predict_ms_per_image"]
            print(f"batch {batch_size} {image_format}: predict {row['predict_ms_per_image']:.1f} ms/image, "
                  f"explain {row['explain_ms_per_image']:.1f} ms/image, ratio {row['gradcam_cost_ratio']:.3f}", flush=True)
            results.append(row)
    return results


def bench_gate(loaded: LoadedModel, settings: HandlerSettings, payloads: list[bytes], batch_size: int,
               rounds: int) -> dict[str, Any]:
    """The input gate's cost against the release's predict cost per image, measured in the same run.

    Two views, each timed in interleaved rounds: the gate's forward pass against the classifier's
    on the same uint8 batch (``gate_ms`` / ``model_ms``), and the whole handler path with the gate
    against the same path with the gate taken out (``handler_ratio``: what a request pays).
    """
    import torch

    from handler.inference import predict_probabilities
    from handler.preprocessing import load_model_input

    if loaded.gate is None:
        raise ValueError("the checkpoint has no input gate to measure")
    batch = torch.stack([load_model_input(payloads[i % len(payloads)], loaded.preprocess, settings.decode_limits)[0]
                         for i in range(batch_size)])
    gate = loaded.gate
    with torch.inference_mode():
        forward = median_seconds({"model": lambda: predict_probabilities(loaded, batch, settings.tta),
                                   "gate": lambda: gate.score(batch)}, rounds)
    rows = [payloads[i % len(payloads)] for i in range(batch_size)]
    with_gate, without_gate = [], []
    per_image_ms(loaded, settings, rows, False)  # warm-up
    for _ in range(rounds):
        with_gate.append(per_image_ms(loaded, settings, rows, False))
        loaded.gate = None
        try:
            without_gate.append(per_image_ms(loaded, settings, rows, False))
        finally:
            loaded.gate = gate
    row = {"batch_size": batch_size, "method": gate.method,
           "gate_ms_per_image": forward["gate"] * 1000 / batch_size,
           "model_ms_per_image": forward["model"] * 1000 / batch_size,
           "handler_ms_per_image_with_gate": statistics.median(with_gate),
           "handler_ms_per_image_without_gate": statistics.median(without_gate)}
    row["gate_cost_ratio"] = row["gate_ms_per_image"] / row["model_ms_per_image"]
    row["handler_ratio"] = row["handler_ms_per_image_with_gate"] / row["handler_ms_per_image_without_gate"]
    print(f"gate batch {batch_size}: gate {row['gate_ms_per_image']:.1f} ms/image, model {row['model_ms_per_image']:.1f} "
          f"ms/image, ratio {row['gate_cost_ratio']:.3f}; handler path with/without gate {row['handler_ratio']:.3f}",
          flush=True)
    return row


def bench_in_process(loaded: LoadedModel, settings: HandlerSettings, payloads: list[bytes], batch_sizes: list[int],
                     seconds: float) -> list[dict[str, Any]]:
    """Images/s of ``handle_batch`` (decode, preprocess, one batched forward, responses), per batch size.

    Cycles through all payloads in batches for about ``seconds`` (at least 3 batches) after
    one warm-up batch.
    """
    results = []
    for batch_size in batch_sizes:
        batches = [[payloads[(start + i) % len(payloads)] for i in range(batch_size)]
                   for start in range(0, len(payloads), batch_size)]
        per_image_ms(loaded, settings, batches[0], False)  # warm-up
        images, elapsed, index = 0, 0.0, 0
        while elapsed < seconds or index < 3:
            batch = batches[index % len(batches)]
            elapsed += per_image_ms(loaded, settings, batch, False) * len(batch) / 1000
            images += len(batch)
            index += 1
        row = {"batch_size": batch_size, "images": images, "seconds": elapsed, "images_per_s": images / elapsed}
        print(f"in-process batch {batch_size}: {row['images_per_s']:.1f} images/s", flush=True)
        results.append(row)
    return results


def machine_description() -> str:
    """CPU model, core count, torch version and threads."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
