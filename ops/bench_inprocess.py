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
    from handler.preprocessing import PreprocessConfig
    from handler.settings import HandlerSettings

# torch and the handler are imported inside the functions that need them.


def median_seconds(candidates: dict[str, Callable[[], Any]], rounds: int,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time of each callable by ``clock``, timed in interleaved rounds after one warm-up call each.

    ``clock`` is wall time by default; ``time.thread_time`` counts only this thread's CPU time: with
    one thread, the work itself, not the other processes sharing the machine.
    """
    for run in candidates.values():  # warm-up: allocators, lazy initialization, kernel selection
        run()
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            started = clock()
            run()
            timings[name].append(clock() - started)
    return {name: statistics.median(values) for name, values in timings.items()}


def decoders(config: PreprocessConfig) -> dict[str, Callable[[bytes], np.ndarray]]:
    """JPEG bytes to the model input of ``config`` (an RGB array in its geometry: a centre crop, or the
    whole image at a square or 4:3 input), four ways.

    ``pillow_draft`` is the served path itself (:func:`handler.preprocessing.load_model_input`):
    DCT-domain downscaling in libjpeg to :func:`handler.preprocessing.decode_size`, then the resize.
    The others decode in full (or OpenCV's halved decode) and take the same resize, so only the
    decoder differs.
    """
    import cv2
    from PIL import Image

    from handler.preprocessing import load_model_input, resize_to_model_input

    def pillow_draft(data: bytes) -> np.ndarray:
        return load_model_input(data, config)[0].permute(1, 2, 0).numpy()

    def pillow_full(data: bytes) -> np.ndarray:
        return np.asarray(resize_to_model_input(Image.open(io.BytesIO(data)).convert("RGB"), config))

    def opencv(flag: int) -> Callable[[bytes], np.ndarray]:
        def decode(data: bytes) -> np.ndarray:
            image = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flag), cv2.COLOR_BGR2RGB)
            return np.asarray(resize_to_model_input(Image.fromarray(image), config))
        return decode

    return {"pillow_draft": pillow_draft, "pillow_full": pillow_full,
            "opencv_reduced": opencv(cv2.IMREAD_REDUCED_COLOR_2), "opencv_full": opencv(cv2.IMREAD_COLOR)}


def bench_decode(payloads: Sequence[bytes], config: PreprocessConfig, rounds: int) -> list[dict[str, Any]]:
    """Per-image decode + resize time of each decoder (:func:`decoders`), as a ratio to the served ``pillow_draft``.

    Also reports how far each decoder's pixels are from the served path's (mean absolute
    difference in 8-bit levels on the model input), since a faster decoder that changes
    the model's input is not a free win.
    """
    candidates = decoders(config)
    timings = median_seconds({name: (lambda decode=decode: [decode(p) for p in payloads])
                               for name, decode in candidates.items()}, rounds)
    reference = [candidates["pillow_draft"](p).astype(np.int16) for p in payloads]
    rows = []
    for name, decode in candidates.items():
        pixels = [decode(p).astype(np.int16) for p in payloads]
        difference = float(np.mean([np.abs(a - b).mean() for a, b in zip(pixels, reference)]))
        rows.append({"decoder": name, "ms_per_image": timings[name] * 1000 / len(payloads),
                     "ratio_to_served": timings[name] / timings["pillow_draft"], "mean_abs_pixel_difference": difference})
        print(f"decode {name}: {rows[-1]['ms_per_image']:.2f} ms/image, ratio {rows[-1]['ratio_to_served']:.3f}, "
              f"pixel difference {difference:.2f}", flush=True)
    return rows


def runtime_variants(include_compile: bool) -> dict[str, dict[str, Any]]:
    """The CPU model-execution variants compared: name -> how to build them.

    ``threads`` is the thread count the variant runs with (absent: every core); a served
    worker gets one core of two, so the 1-thread rows are the per-worker cost.
    """
    variants = {
        "eager fp32 contiguous": {"runtime": "eager", "precision": "fp32", "channels_last": False},
        "eager fp32 channels-last": {"runtime": "eager", "precision": "fp32", "channels_last": True},
        "eager bf16 autocast": {"runtime": "eager", "precision": "bf16", "channels_last": True},
        "torchscript fp32": {"runtime": "torchscript", "precision": "fp32", "channels_last": True},
        "torchscript fp32, 1 thread": {"runtime": "torchscript", "precision": "fp32", "channels_last": True, "threads": 1},
        "openvino fp32": {"runtime": "openvino", "precision": "fp32", "channels_last": True},
        "openvino fp32, 1 thread": {"runtime": "openvino", "precision": "fp32", "channels_last": True, "threads": 1},
        "onnxruntime fp32": {"runtime": "onnxruntime", "precision": "fp32", "channels_last": False},
        "onnxruntime fp32, 1 thread": {"runtime": "onnxruntime", "precision": "fp32", "channels_last": False, "threads": 1},
    }
    if include_compile:
        variants["torch.compile fp32"] = {"runtime": "compile", "precision": "fp32", "channels_last": True}
    return variants


def onnxruntime_runner(module: Any, input_hw: tuple[int, int], threads: int) -> Callable[[Any], Any]:
    """``module`` exported to ONNX (TorchScript-based exporter, dynamic batch) and run by ONNX Runtime
    on the CPU with ``threads`` intra-op threads (0: every core). Measured here only; not a served runtime."""
    import tempfile
    import warnings

    import onnxruntime
    import torch

    example = torch.zeros(2, 3, *input_hw)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = str(Path(folder) / "model.onnx")
        torch.onnx.export(module, (example,), path, dynamo=False, input_names=["inputs"],
                          dynamic_axes={"inputs": {0: "batch"}}, opset_version=17)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(inputs: Any) -> Any:
        return session.run(None, {"inputs": inputs.contiguous().numpy()})
    return run


def bench_runtimes(checkpoint: str, payloads: Sequence[bytes], batch_sizes: Sequence[int], rounds: int,
                   include_compile: bool, device: str = "cpu", served_runtime: str = "torchscript") -> list[dict[str, Any]]:
    """Per-image forward time (features + logits, no decode) of each runtime variant, per batch size.

    Ratios are to the served runtime with every core (``served_runtime``, fp32) at the same
    batch size. Each variant's outputs are compared with eager fp32's (``max_abs_logit_difference``).
    A variant whose package is not installed (ONNX Runtime is a development requirement only)
    is reported as not measured, never left out silently.
    """
    import torch

    from handler.checkpoint import load_checkpoint
    from handler.preprocessing import load_model_input, normalize_batch
    from handler.runtime import FeaturesAndLogits, build_runner

    default_threads = torch.get_num_threads()
    variants = runtime_variants(include_compile and device == "cpu")
    reference_name = {"eager": "eager fp32 channels-last"}.get(served_runtime, f"{served_runtime} fp32")
    if device != "cpu":
        variants = {"eager fp32": {"runtime": "eager", "precision": "fp32", "channels_last": True},
                    "eager fp16 autocast": {"runtime": "eager", "precision": "fp16", "channels_last": True},
                    "torchscript fp16": {"runtime": "torchscript", "precision": "fp16", "channels_last": True}}
        reference_name = "torchscript fp16"
    runners, missing = {}, {}
    for name, variant in variants.items():
        loaded = load_checkpoint(checkpoint, device)
        model = loaded.model if variant["channels_last"] else loaded.model.to(memory_format=torch.contiguous_format)
        threads = variant.get("threads", 0)
        try:
            if variant["runtime"] == "compile":
                runners[name] = torch.compile(FeaturesAndLogits(model.requires_grad_(False)).eval())
            elif variant["runtime"] == "onnxruntime":
                runners[name] = onnxruntime_runner(FeaturesAndLogits(model.requires_grad_(False)).eval(),
                                                   (loaded.preprocess.input_height, loaded.preprocess.input_width), threads)
            else:
                input_hw = (loaded.preprocess.input_height, loaded.preprocess.input_width)
                runners[name] = build_runner(model, variant["runtime"], variant["precision"], input_hw, threads)
        except ImportError as error:
            missing[name] = f"not installed: {error.name}"
            print(f"runtime {name}: not measured ({missing[name]})", flush=True)
    preprocess = load_checkpoint(checkpoint).preprocess
    rows = []
    for batch_size in batch_sizes:
        uint8 = torch.stack([load_model_input(payloads[i % len(payloads)], preprocess)[0] for i in range(batch_size)])
        inputs = normalize_batch(uint8.to(device), preprocess)

        def timed(name: str) -> Callable[[], Any]:
            threads = variants[name].get("threads", default_threads)
            contiguous = not variants[name]["channels_last"]
            batch = inputs.contiguous() if contiguous else inputs

            def run() -> Any:
                torch.set_num_threads(threads)
                try:
                    with torch.inference_mode():
                        outputs = runners[name](batch)
                    if device != "cpu":
                        torch.cuda.synchronize()
                    return outputs
                finally:
                    torch.set_num_threads(default_threads)
            return run

        candidates = {name: timed(name) for name in runners}
        reference_logits = torch.as_tensor(candidates[next(iter(candidates))]()[1]).float().cpu()
        differences = {name: float((torch.as_tensor(run()[1]).float().cpu() - reference_logits).abs().max())
                       for name, run in candidates.items()}
        timings = median_seconds(candidates, rounds)
        for name in variants:
            if name in missing:
                rows.append({"variant": name, "batch_size": batch_size, "ms_per_image": None, "images_per_s": None,
                             "ratio_to_served": None, "max_abs_logit_difference": None, "note": missing[name]})
                continue
            rows.append({"variant": name, "batch_size": batch_size, "ms_per_image": timings[name] * 1000 / batch_size,
                         "images_per_s": batch_size / timings[name], "ratio_to_served": timings[name] / timings[reference_name],
                         "max_abs_logit_difference": differences[name], "served": name == reference_name})
            print(f"runtime {name}, batch {batch_size}: {rows[-1]['ms_per_image']:.2f} ms/image, "
                  f"ratio {rows[-1]['ratio_to_served']:.3f}, logits within {differences[name]:.1e}", flush=True)
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


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_layouts(cores: int) -> list[tuple[int, int]]:
    """``(processes, threads per process)`` layouts tried for the in-process limit.

    One process on every core and one single-thread process per core, plus halves between on
    larger machines: which is fastest depends on the CPU (depthwise convolutions scale poorly
    across threads), so the limit is measured, never assumed.
    """
    layouts = {(1, cores), (cores, 1)}
    if cores >= 4:
        layouts.add((cores // 2, 2))
    return sorted(layouts)


def parse_layout(text: str) -> tuple[int, int]:
    """``"2x1"`` -> ``(2, 1)``: processes x threads per process.

    Raises:
        ValueError: Not two positive integers joined by ``x``.
    """
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"{text!r} is not PROCESSESxTHREADS, e.g. 2x1")
    return int(parts[0]), int(parts[1])


def _throughput_worker(checkpoint: str, settings: HandlerSettings, payloads: list[bytes], batch_sizes: list[int],
                       seconds: float, barrier: Any, results: Any) -> None:
    """One process of a layout: load, then per batch size warm up, wait for the others, run ``seconds``."""
    import torch

    from handler.checkpoint import load_checkpoint
    from handler.inference import prepare_for_serving

    torch.set_num_threads(settings.torch_threads)
    loaded = load_checkpoint(checkpoint)
    prepare_for_serving(loaded, settings)
    for batch_size in batch_sizes:
        batches = [[payloads[(start + i) % len(payloads)] for i in range(batch_size)]
                   for start in range(0, len(payloads), batch_size)]
        per_image_ms(loaded, settings, batches[0], False)  # warm-up
        barrier.wait()
        images, index, started = 0, 0, time.perf_counter()
        while time.perf_counter() - started < seconds or index < 3:
            batch = batches[index % len(batches)]
            per_image_ms(loaded, settings, batch, False)
            images += len(batch)
            index += 1
        results.put((batch_size, images, time.perf_counter() - started))


def bench_in_process(checkpoint: str, settings: HandlerSettings, payloads: list[bytes], batch_sizes: list[int],
                     seconds: float, layouts: Sequence[tuple[int, int]] | None = None,
                     timeout: float = 900.0) -> list[dict[str, Any]]:
    """Images/s of ``handle_batch`` (decode, preprocess, one batched forward, responses) per batch size
    and process layout: the in-process limit the served throughput is compared with.

    Each layout starts its processes (``spawn``), each with ``threads`` intra-op threads, all
    running the same batch size at once for about ``seconds`` (at least 3 batches each) after a
    warm-up batch. A layout's throughput is its images over the longest process's time.

    Returns:
        One row per (layout, batch size): ``batch_size``, ``processes``, ``threads_per_process``,
        ``images``, ``seconds``, ``images_per_s``.
    """
    import multiprocessing
    import queue as queue_module

    context = multiprocessing.get_context("spawn")
    rows = []
    for processes, threads in layouts or process_layouts(usable_cores()):
        barrier, results = context.Barrier(processes), context.Queue()
        worker_settings = dataclasses.replace(settings, torch_threads=threads)
        workers = [context.Process(target=_throughput_worker, daemon=True,
                                   args=(checkpoint, worker_settings, payloads, batch_sizes, seconds, barrier, results))
                   for _ in range(processes)]
        for worker in workers:
            worker.start()
        try:
            measured: dict[int, list[tuple[int, float]]] = {size: [] for size in batch_sizes}
            for _ in range(processes * len(batch_sizes)):
                try:
                    batch_size, images, elapsed = results.get(timeout=timeout)
                except queue_module.Empty:
                    codes = [worker.exitcode for worker in workers]
                    raise RuntimeError(f"in-process benchmark: no result from {processes} x {threads} "
                                       f"within {timeout:.0f} s (worker exit codes {codes})") from None
                measured[batch_size].append((images, elapsed))
        finally:
            for worker in workers:
                worker.join(timeout=30)
                if worker.is_alive():
                    worker.kill()
        for batch_size in batch_sizes:
            images = sum(count for count, _ in measured[batch_size])
            elapsed = max(seconds for _, seconds in measured[batch_size])
            row = {"batch_size": batch_size, "processes": processes, "threads_per_process": threads,
                   "images": images, "seconds": elapsed, "images_per_s": images / elapsed}
            print(f"in-process batch {batch_size}, {processes} process(es) x {threads} thread(s): "
                  f"{row['images_per_s']:.1f} images/s", flush=True)
            rows.append(row)
    return rows


def machine_description() -> str:
    """CPU model, core count, torch version and threads."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
