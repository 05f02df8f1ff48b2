"""One benchmark run of ``scripts/bench.py``: its sections in order, then the summary.

The sections run one after another, never side by side, so that no two of them compete for the
CPU cores; the in-process ones first, while no server started by the run is up. What each section
measures is ``scripts/bench.py``'s docstring; the measurements are :mod:`ops.bench_inprocess`
and :mod:`ops.bench_served`, the summary and report :mod:`ops.bench_report`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ops.bench_inprocess import (bench_decode, bench_gate, bench_gradcam, bench_in_process, bench_runtimes,
                                 machine_description, parse_layout)
from ops.bench_report import summarize
from ops.bench_served import (UNBATCHED_OVERRIDES, baseline_checkpoint, merged_overrides, model_config_overrides,
                              model_config_with, protocol_sweep, released_serving, served_sweep)
from ops.loadgen import ServedTarget, SweepPlan, default_plan, sweep_target
from ops.paths import MODEL_NAME

SECTIONS = ("decode", "runtime", "gate", "gradcam", "inprocess", "unbatched", "served", "protocols")


@dataclasses.dataclass
class BenchOptions:
    """What to bench and how: ``scripts/bench.py``'s options, by the same names (``--help`` says each)."""

    checkpoint: str
    model_config: str
    samples: str
    sections: list[str] = dataclasses.field(default_factory=lambda: list(SECTIONS))
    quick: bool = False
    levels: list[int] | None = None
    level_requests: int | None = None
    level_seconds: float | None = None
    warmup_seconds: float | None = None
    load_fraction: float = 0.7
    arrivals: str = "poisson"
    batch_size_config: int | None = None
    max_batch_delay: int | None = None
    workers: int | None = None
    handler: list[str] = dataclasses.field(default_factory=list)
    device: str = "cpu"
    url: str | None = None
    token: str | None = None
    metrics_url: str | None = None
    batch_sizes: list[int] | None = None
    rounds: int = 7
    layouts: list[str] | None = None
    baseline: str | None = None
    baseline_serving: str = "released"
    inprocess_seconds: float | None = None

    @classmethod
    def from_namespace(cls, args: Any) -> "BenchOptions":
        """The options of parsed command-line arguments."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


@dataclasses.dataclass
class _Run:
    """What every section of one run shares."""

    options: BenchOptions
    payload_paths: list[str]
    payloads: list[bytes]
    plan: SweepPlan
    overrides: dict[str, Any]
    served_config: dict[str, Any]
    layouts: list[tuple[int, int]] | None

    @property
    def batch_size(self) -> int:
        return int(self.served_config["batchSize"])

    @property
    def rounds(self) -> int:
        return 3 if self.options.quick else self.options.rounds

    @property
    def inprocess_seconds(self) -> float:
        seconds = self.options.inprocess_seconds
        return seconds if seconds is not None else (3.0 if self.options.quick else 10.0)

    def inprocess_settings(self, served_config: dict[str, Any] | None = None) -> Any:
        """The served handler settings (this run's, or ``served_config``'s) with every core: in-process
        figures use them all, whatever a served worker's thread share is."""
        from handler.settings import HandlerSettings

        handler = (served_config or self.served_config).get("handler")
        return dataclasses.replace(HandlerSettings.from_mapping(handler), torch_threads=0)

    def in_process(self, checkpoint: str, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        served_config = None if overrides is None else model_config_with(Path(self.options.model_config), overrides)
        batch_size = self.batch_size if served_config is None else int(served_config["batchSize"])
        return bench_in_process(checkpoint, self.inprocess_settings(served_config), self.payloads,
                                sorted({batch_size, 1}, reverse=True), self.inprocess_seconds, self.layouts)

    def served(self, checkpoint: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return served_sweep(self.overrides if overrides is None else overrides, self.payload_paths, self.plan,
                            checkpoint, Path(self.options.model_config))

    def baseline_overrides(self) -> dict[str, Any]:
        """The model-config changes the baseline is served with: a ``git:REV`` baseline's own serving
        choices under ``baseline_serving == "released"`` (this run's explicit options still win), else
        this run's."""
        reference = self.options.baseline or ""
        if self.options.baseline_serving != "released" or not reference.startswith("git:"):
            return self.overrides
        return merged_overrides(released_serving(reference[len("git:"):]), self.overrides)


def prepare(options: BenchOptions) -> _Run:
    """Read the payloads and resolve the plan, the model config and the layouts.

    Raises:
        SystemExit: No payloads, or a malformed ``--handler`` or ``--layouts``.
    """
    samples = Path(options.samples)
    payload_paths = sorted(str(path) for path in samples.glob("*.jpg")) if samples.is_dir() else []
    if not payload_paths:
        raise SystemExit(f"no sample payloads at {samples}; pass --samples with real dermoscopic JPEGs")
    plan = default_plan(options.quick, options.levels, options.level_requests, options.level_seconds,
                        options.warmup_seconds, options.load_fraction, options.arrivals)
    try:
        overrides = model_config_overrides(options.batch_size_config, options.max_batch_delay, options.workers,
                                           options.handler)
    except ValueError as error:
        raise SystemExit(f"--handler: {error}") from error
    try:
        layouts = [parse_layout(text) for text in options.layouts] if options.layouts else None
    except ValueError as error:
        raise SystemExit(f"--layouts: {error}") from error
    return _Run(options, payload_paths, [Path(path).read_bytes() for path in payload_paths], plan, overrides,
                model_config_with(Path(options.model_config), overrides), layouts)


def run_bench(options: BenchOptions, command: str) -> dict[str, Any]:
    """Run the selected sections, the baseline's too with ``options.baseline``, and summarize.

    Returns:
        The result (what ``bench.json`` holds), its ``summary`` included.
    """
    started = time.monotonic()
    run = prepare(options)
    sections, notes = set(options.sections), []
    if options.url and "unbatched" in sections:
        notes.append("--url: the unbatched section needs a server of its own and was skipped.")
        sections.discard("unbatched")
    if options.url and sections & {"gradcam", "inprocess"}:
        notes.append(f"--url: the in-process sections ran while the server at {options.url} was up (idle).")
    for note in notes:
        print(note, flush=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_description(),
        "command": command, "quick": options.quick, "plan": dataclasses.asdict(run.plan), "notes": notes,
        # Other work on the machine skews every figure; the load average makes that visible.
        "load_average_1min": {"start": os.getloadavg()[0]},
    }
    result |= in_process_sections(run, sections)
    result |= served_sections(run, sections, notes)
    if options.baseline:
        result["baseline"] = baseline_sections(run, sections)
    result["wall_s"] = time.monotonic() - started
    result["load_average_1min"]["end"] = os.getloadavg()[0]
    result["summary"] = summarize(result, run.batch_size)
    return result


def in_process_sections(run: _Run, sections: set[str]) -> dict[str, Any]:
    """``decode``, ``runtime``, ``gate``, ``gradcam`` and ``inprocess``, as they were asked for."""
    from handler.checkpoint import load_checkpoint
    from handler.inference import prepare_for_serving

    options, result = run.options, {}
    if "decode" in sections:
        result["decode"] = bench_decode(run.payloads[:16], load_checkpoint(options.checkpoint).preprocess, run.rounds)
    if "runtime" in sections:
        result["runtime"] = bench_runtimes(options.checkpoint, run.payloads[:16], sorted({1, run.batch_size}), run.rounds,
                                           include_compile=not options.quick, device=options.device,
                                           served_runtime=run.inprocess_settings().runtime)
    if sections & {"gate", "gradcam"}:
        loaded, settings = load_checkpoint(options.checkpoint), run.inprocess_settings()
        prepare_for_serving(loaded, settings)
        if "gate" in sections and loaded.gate is not None:
            result["gate"] = bench_gate(loaded, settings, run.payloads[:16], run.batch_size, run.rounds)
        if "gradcam" in sections:
            batch_sizes = options.batch_sizes or ([run.batch_size] if options.quick else sorted({1, run.batch_size}))
            result["gradcam"] = bench_gradcam(loaded, settings, run.payloads[:16], batch_sizes, run.rounds)
        del loaded
    if "inprocess" in sections:
        result["in_process"] = run.in_process(options.checkpoint)
    return result


def served_sections(run: _Run, sections: set[str], notes: list[str]) -> dict[str, Any]:
    """``unbatched``, ``served`` (or the running server at ``options.url``) and ``protocols``."""
    options, result = run.options, {}
    checkpoint, model_config = Path(options.checkpoint), Path(options.model_config)
    if "unbatched" in sections:
        unbatched_plan = dataclasses.replace(run.plan, levels=(1,), load_fraction=0.0)
        result["unbatched"] = served_sweep(UNBATCHED_OVERRIDES, run.payload_paths, unbatched_plan, checkpoint, model_config)
    if "served" in sections and options.url:
        headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
        target = ServedTarget(f"{options.url.rstrip('/')}/predictions/{MODEL_NAME}", headers,
                              options.metrics_url.rstrip("/") if options.metrics_url else None)
        print(f"sweeping the running server at {options.url}", flush=True)
        result["served"] = {"target": options.url, "model_config": None,
                            **sweep_target(target, run.payload_paths, run.plan)}
    elif "served" in sections:
        result["served"] = run.served(checkpoint)
        result["served"]["target"] = "TorchServe started by this run, release archive" + (
            f" with {run.overrides}" if run.overrides else "")
    if "protocols" in sections and options.url:
        notes.append("--url: the protocols section needs a server of its own and was skipped.")
    elif "protocols" in sections:
        result["protocols"] = protocol_sweep(run.payload_paths, run.plan, checkpoint, model_config,
                                             rounds=1 if options.quick else 2)
    return result


def baseline_sections(run: _Run, sections: set[str]) -> dict[str, Any]:
    """The ``inprocess`` and ``served`` sections again for ``options.baseline`` (a file, or ``git:REV``)."""
    from handler.checkpoint import read_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as folder:
        baseline = baseline_checkpoint(run.options.baseline, Path(folder))
        overrides = run.baseline_overrides()
        result: dict[str, Any] = {"checkpoint": run.options.baseline, "version": read_checkpoint(baseline).meta.version,
                                  "serving": run.options.baseline_serving, "overrides": overrides}
        served_with = overrides or "this run's model config"
        print(f"baseline {run.options.baseline} (release {result['version']}), served with {served_with}", flush=True)
        if "inprocess" in sections:
            result["in_process"] = run.in_process(str(baseline), overrides)
        if "served" in sections and not run.options.url:
            result["served"] = run.served(baseline, overrides)
    return result
