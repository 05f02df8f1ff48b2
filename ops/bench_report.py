"""The benchmark's summary (ratios against the issue's targets) and its markdown report (docs/PERFORMANCE.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ops.loadgen import fmt

# (key in the summary, target as text, test on the value): the acceptance targets.
TARGETS = (
    ("served_throughput_ratio", ">= 0.85", lambda value: value >= 0.85),
    ("speedup_vs_unbatched", ">= 3", lambda value: value >= 3.0),
    ("gradcam_cost_ratio", "<= 1.3", lambda value: value <= 1.3),
    ("gate_cost_ratio", "<= 0.25", lambda value: value <= 0.25),
    ("p99_over_p50_at_70pct", "<= 3", lambda value: value <= 3.0),
    # Each KServe protocol's throughput at 16 in flight against the plain endpoint's (protocols section).
    ("kserve_v1_ratio", ">= 0.95", lambda value: value >= 0.95),
    ("open_inference_ratio", ">= 0.95", lambda value: value >= 0.95),
)


def in_process_limit(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The fastest layout's row per batch size."""
    best: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["batch_size"] not in best or row["images_per_s"] > best[row["batch_size"]]["images_per_s"]:
            best[row["batch_size"]] = row
    return best


def nearest_level(levels: Sequence[dict[str, Any]], images_per_s: float) -> dict[str, Any]:
    """The level whose throughput is nearest ``images_per_s``."""
    return min(levels, key=lambda level: abs(level["images_per_s"] - images_per_s))


def summarize(result: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """The headline ratios and the issue's checks, from whichever sections ran.

    Args:
        result: ``in_process``, ``served``, ``unbatched`` and ``gradcam`` sections (any may be
            missing or None).
        batch_size: The served batch size, at which in-process throughput and the Grad-CAM
            ratio are taken.

    Returns:
        Ratios (None where a section is missing), the best served level, the tail check and
        ``checks``: ``{name, value, target, met}`` per target.
    """
    summary: dict[str, Any] = {"batch_size": batch_size}
    served = (result.get("served") or {}).get("levels") or []
    best = max(served, key=lambda level: level["images_per_s"]) if served else None
    limit = in_process_limit(result.get("in_process") or [])
    in_process = {size: row["images_per_s"] for size, row in limit.items()}
    unbatched = (result.get("unbatched") or {}).get("levels") or []
    gradcam = [row for row in result.get("gradcam") or []
               if row["batch_size"] == batch_size and row["overlay_format"] == "jpeg"]
    summary["best_served_images_per_s"] = best["images_per_s"] if best else None
    summary["best_concurrency"] = best["concurrency"] if best else None
    summary["p99_ms_at_best"] = best["p99_ms"] if best else None
    summary["p50_ms_at_best"] = best["p50_ms"] if best else None
    summary["in_process_images_per_s"] = in_process.get(batch_size)
    summary["in_process_layout"] = (f"{limit[batch_size].get('processes', 1)} process(es) x "
                                    f"{limit[batch_size].get('threads_per_process', 'all')} thread(s)"
                                    if batch_size in limit else None)
    summary["unbatched_images_per_s"] = unbatched[0]["images_per_s"] if unbatched else None
    summary["served_throughput_ratio"] = (best["images_per_s"] / in_process[batch_size]
                                          if best and in_process.get(batch_size) else None)
    summary["speedup_vs_unbatched"] = (best["images_per_s"] / summary["unbatched_images_per_s"]
                                       if best and summary["unbatched_images_per_s"] else None)
    summary["gradcam_cost_ratio"] = gradcam[0]["gradcam_cost_ratio"] if gradcam else None
    gate = result.get("gate")
    summary["gate_cost_ratio"] = gate["gate_cost_ratio"] if gate else None
    summary["gate_handler_ratio"] = gate["handler_ratio"] if gate else None
    # Tail check: the open-loop level at ~70 % of peak when it ran, else the closed-loop level
    # whose throughput is nearest 70 % of the peak.
    paced = (result.get("served") or {}).get("paced")
    if paced and paced.get("p50_ms"):
        kind = "Poisson" if paced.get("arrivals", "poisson") == "poisson" else "evenly paced"
        tail, source = paced, f"open loop, {kind} arrivals at {paced['offered_images_per_s']:.1f}/s"
    elif best:
        tail = nearest_level(served, 0.7 * best["images_per_s"])
        source = f"closed loop, {tail['concurrency']} in flight (nearest 70 % of peak)"
    else:
        tail, source = None, None
    summary["tail_level"] = source
    summary["tail_images_per_s"] = tail["images_per_s"] if tail else None
    summary["tail_share_of_peak"] = (tail["images_per_s"] / best["images_per_s"]
                                     if tail and best and best["images_per_s"] else None)
    summary["tail_p50_ms"] = tail["p50_ms"] if tail else None
    summary["tail_p99_ms"] = tail["p99_ms"] if tail else None
    summary["p99_over_p50_at_70pct"] = (tail["p99_ms"] / tail["p50_ms"]) if tail and tail["p50_ms"] else None
    if served:
        nearest = nearest_level(served, 0.7 * best["images_per_s"])
        summary["closed_loop_nearest_70pct"] = {
            "concurrency": nearest["concurrency"], "images_per_s": nearest["images_per_s"],
            "p99_over_p50": nearest["p99_ms"] / nearest["p50_ms"] if nearest["p50_ms"] else None}
    baseline = result.get("baseline") or {}
    baseline_served = (baseline.get("served") or {}).get("levels") or []
    baseline_limit = in_process_limit(baseline.get("in_process") or [])
    summary["baseline"] = baseline.get("checkpoint")
    summary["baseline_best_served_images_per_s"] = (max(level["images_per_s"] for level in baseline_served)
                                                    if baseline_served else None)
    summary["baseline_served_ratio"] = (best["images_per_s"] / summary["baseline_best_served_images_per_s"]
                                        if best and summary["baseline_best_served_images_per_s"] else None)
    summary["baseline_in_process_images_per_s"] = (baseline_limit[batch_size]["images_per_s"]
                                                   if batch_size in baseline_limit else None)
    summary["baseline_in_process_ratio"] = (in_process[batch_size] / summary["baseline_in_process_images_per_s"]
                                            if in_process.get(batch_size) and summary["baseline_in_process_images_per_s"]
                                            else None)
    protocol_ratios = (result.get("protocols") or {}).get("ratio_to_plain") or {}
    summary["kserve_v1_ratio"] = protocol_ratios.get("kserve_v1")
    summary["open_inference_ratio"] = protocol_ratios.get("open_inference")
    summary["errors"] = sum(level["errors"] for level in served + unbatched + baseline_served + ([paced] if paced else []))
    summary["checks"] = [{"name": name, "value": summary[name], "target": target,
                          "met": None if summary[name] is None else bool(test(summary[name]))}
                         for name, target, test in TARGETS]
    return summary


def met_text(met: bool | None) -> str:
    """``yes``, ``NO`` or ``not measured``."""
    return "not measured" if met is None else ("yes" if met else "NO")


def level_row(label: str, level: dict[str, Any]) -> str:
    """One markdown table row for a level."""
    return (f"| {label} | {level['requests']} | {level['errors']} | {level['images_per_s']:.1f} | {fmt(level['p50_ms'], 0)} | "
            f"{fmt(level['p95_ms'], 0)} | {fmt(level['p99_ms'], 0)} | {fmt(level.get('avg_batch_size'), 2)} |")


def write_report(path: Path, result: dict[str, Any]) -> None:
    """The markdown performance report."""
    summary = result["summary"]
    load = result.get("load_average_1min") or {}
    lines = ["# Performance", "", f"Measured {result['date']} on: {result['machine']}.", "",
             f"Command: `{result['command']}`", ""]
    lines += [f"Note: {note}" for note in result.get("notes") or []] + ([""] if result.get("notes") else [])
    if load:
        lines += [f"1-minute load average at start {fmt(load.get('start'), 2)}, at end {fmt(load.get('end'), 2)} "
                  f"(with the benchmark itself idle at the start, a figure near or above the core count means other "
                  f"work was competing for the CPU). Run took {result.get('wall_s', 0):.0f} s.", ""]
    lines += ["How the serving settings were chosen, with before/after figures and what was rejected: "
              "[TUNING.md](TUNING.md).", ""]
    lines += ["## Summary", "", "| figure | value | target | met |", "|---|---|---|---|"]
    for check in summary["checks"]:
        lines.append(f"| `{check['name']}` | {fmt(check['value'], 3)} | {check['target']} | {met_text(check['met'])} |")
    lines += [f"| best served throughput (images/s) | {fmt(summary['best_served_images_per_s'], 1)} "
              f"({summary['best_concurrency']} in flight) | | |",
              f"| p99 latency at best throughput (ms) | {fmt(summary['p99_ms_at_best'], 0)} | | |",
              f"| in-process limit at batch {summary['batch_size']} (images/s) | "
              f"{fmt(summary['in_process_images_per_s'], 1)} ({summary.get('in_process_layout')}) | | |",
              f"| unbatched served throughput, 1 in flight (images/s) | {fmt(summary['unbatched_images_per_s'], 1)} | | |",
              f"| errors (all served levels) | {summary['errors']} | 0 | {met_text(summary['errors'] == 0)} |", ""]
    lines += ["`served_throughput_ratio` = best served images/s ÷ the in-process limit (the fastest process layout "
              "of `handle_batch`) at the served batch size; `speedup_vs_unbatched` = best served images/s ÷ served images/s of an archive at "
              "`batchSize: 1`, `maxBatchDelay: 0` with one request in flight; `gradcam_cost_ratio` = explain ÷ "
              "predict per image, JPEG overlays, at the served batch size; `p99_over_p50_at_70pct` from "
              f"{summary['tail_level'] or 'no level'}"
              + (f", which achieved {summary['tail_share_of_peak']:.0%} of peak "
                 f"(p50 {fmt(summary['tail_p50_ms'], 0)} ms, p99 {fmt(summary['tail_p99_ms'], 0)} ms)."
                 if summary["tail_share_of_peak"] is not None else "."), ""]
    if result.get("baseline"):
        baseline = result["baseline"]
        lines += [f"## Against the baseline `{baseline['checkpoint']}` (release {baseline.get('version')}), same run", "",
                  f"The baseline was served with {baseline_serving_text(baseline)}.", "",
                  "| figure | this release | baseline | ratio |", "|---|---|---|---|",
                  f"| best served images/s | {fmt(summary['best_served_images_per_s'], 1)} | "
                  f"{fmt(summary['baseline_best_served_images_per_s'], 1)} | {fmt(summary['baseline_served_ratio'], 3)} |",
                  f"| in-process limit images/s, batch {summary['batch_size']} | {fmt(summary['in_process_images_per_s'], 1)} | "
                  f"{fmt(summary['baseline_in_process_images_per_s'], 1)} | {fmt(summary['baseline_in_process_ratio'], 3)} |", ""]
        if baseline.get("served"):
            lines += ["| baseline, in flight | requests | errors | images/s | p50 ms | p95 ms | p99 ms | avg batch |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [level_row(str(level["concurrency"]), level) for level in baseline["served"]["levels"]]
            lines.append("")
    nearest = summary.get("closed_loop_nearest_70pct")
    if nearest:
        lines += [f"For comparison, the closed-loop level nearest 70 % of peak ({nearest['concurrency']} in flight, "
                  f"{nearest['images_per_s']:.1f} images/s) has p99/p50 = {fmt(nearest['p99_over_p50'], 2)}.", ""]
    served = result.get("served")
    if served:
        settings = served.get("model_config") or {}
        lines += ["## Served: concurrency sweep through TorchServe", "",
                  f"Target: {served.get('target', 'TorchServe started by this run')}"
                  + "".join(f", `{key}: {value}`" for key, value in settings.items()) + ". "
                  "Closed loop: each client sends its next real 600x450 JPEG (raw body, `POST /predictions/skin_lesion`) "
                  "when the last is answered, from a separate client process, after a warm-up. Each level stops at "
                  f"{result['plan']['level_requests']} requests or {result['plan']['level_seconds']:g} s. Latencies over "
                  "200 responses; average batch = Δ`skin_lesion_batch_size_sum` ÷ Δ`_count` scraped around the level.", "",
                  "| in flight | requests | errors | images/s | p50 ms | p95 ms | p99 ms | avg batch |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [level_row(str(level["concurrency"]), level) for level in served["levels"]]
        if served.get("paced"):
            paced = served["paced"]
            label = f"open loop ({paced.get('arrivals', 'poisson')}) {paced['offered_images_per_s']:.1f}/s ({paced['load_fraction']:.0%} of peak)"
            lines.append(level_row(label, paced))
        lines.append("")
    protocols = result.get("protocols")
    if protocols:
        lines += [f"## Protocols ({protocols['concurrency']} in flight, one image per request, {protocols['rounds']} "
                  "interleaved rounds)", "",
                  "The same JPEGs as the raw body to `/predictions` (plain), as KServe v1 `instances` to "
                  "`/v1/models/skin_lesion:predict` and as an Open Inference Protocol `inputs` tensor to "
                  "`/v2/models/skin_lesion/infer`, on one server with the release settings.", "",
                  "| protocol, round | requests | errors | images/s | p50 ms | p95 ms | p99 ms | avg batch |",
                  "|---|---|---|---|---|---|---|---|"]
        for protocol, levels in protocols["levels"].items():
            lines += [level_row(f"{protocol}, {index + 1}", level) for index, level in enumerate(levels)]
        lines += ["", "| protocol | mean images/s | ratio to plain |", "|---|---|---|"]
        lines += [f"| {protocol} | {value:.1f} | {fmt(protocols['ratio_to_plain'][protocol], 3)} |"
                  for protocol, value in protocols["images_per_s"].items()]
        lines.append("")
    unbatched = result.get("unbatched")
    if unbatched:
        lines += ["## Served without batching", "",
                  "| setting | requests | errors | images/s | p50 ms | p95 ms | p99 ms | avg batch |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [level_row(f"batchSize 1, {level['concurrency']} in flight", level) for level in unbatched["levels"]]
        lines.append("")
    if result.get("runtime"):
        lines += ["## Model runtime (forward pass only, in-process, per image)", "",
                  "Ratio = time ÷ the served runtime's time (every core) at the same batch size (below 1 is "
                  "faster). Interleaved rounds, medians. Logit difference = largest absolute difference from the "
                  "first variant's (eager fp32) logits on the same batch.", "",
                  "| variant | batch size | ms/image | images/s | ratio to served | logit difference |",
                  "|---|---|---|---|---|---|"]
        for row in result["runtime"]:
            name = f"{row['variant']} (served)" if row.get("served") else row["variant"]
            if row["ms_per_image"] is None:
                lines.append(f"| {name} | {row['batch_size']} | {row.get('note', 'not measured')} | | | |")
                continue
            difference = row.get("max_abs_logit_difference")
            lines.append(f"| {name} | {row['batch_size']} | {row['ms_per_image']:.2f} | {row['images_per_s']:.1f} | "
                         f"{row['ratio_to_served']:.3f} | {'' if difference is None else f'{difference:.1e}'} |")
        lines.append("")
    if result.get("decode"):
        lines += ["## JPEG decode + resize (per 600x450 image, to the model's input in its geometry)", "",
                  "Pixel difference = mean absolute difference, in 8-bit levels, from the served path's model input.", "",
                  "| decoder | ms/image | ratio to served | pixel difference |", "|---|---|---|---|"]
        lines += [f"| {row['decoder']}{' (served)' if row['decoder'] == 'pillow_draft' else ''} | {row['ms_per_image']:.2f} | "
                  f"{row['ratio_to_served']:.3f} | {row['mean_abs_pixel_difference']:.2f} |" for row in result["decode"]]
        lines.append("")
    if result.get("in_process"):
        limit = in_process_limit(result["in_process"])
        lines += ["## In-process limit (`handle_batch`, no HTTP, no server running)", "",
                  "Every process layout runs the handler path on all cores at once (processes started together, "
                  "each with its own model); the fastest layout per batch size is the limit (**bold**) that "
                  "`served_throughput_ratio` divides by.", "",
                  "| batch size | processes x threads | images | seconds | images/s |", "|---|---|---|---|---|"]
        for row in result["in_process"]:
            rate = f"{row['images_per_s']:.1f}"
            lines.append(f"| {row['batch_size']} | {row.get('processes', 1)} x {row.get('threads_per_process', 'all')} | "
                         f"{row['images']} | {row['seconds']:.1f} | "
                         f"{f'**{rate}**' if limit[row['batch_size']] is row else rate} |")
        lines.append("")
    if result.get("gate"):
        gate = result["gate"]
        lines += ["", "## Input gate", "",
                  f"The out-of-distribution gate (`{gate['method']}`) against the release's predict cost, same run, "
                  f"batch {gate['batch_size']}, medians of interleaved rounds:", "",
                  "| gate ms/image | model ms/image | gate_cost_ratio | handler path with / without gate |",
                  "|---|---|---|---|",
                  f"| {gate['gate_ms_per_image']:.1f} | {gate['model_ms_per_image']:.1f} | {gate['gate_cost_ratio']:.3f} | "
                  f"{gate['handler_ratio']:.3f} |"]
    if result.get("gradcam"):
        lines += ["## Grad-CAM cost (in-process handler path, per image)", "",
                  "Explain = the same batch through the same handler with Grad-CAM on for every request:",
                  "closed-form maps from the one forward pass, full-resolution decode of the original,",
                  "overlay render, encode and base64. Ratio = explain / predict, interleaved rounds, medians.", "",
                  "| batch size | overlay | predict ms/image | explain ms/image | gradcam_cost_ratio |",
                  "|---|---|---|---|---|"]
        for row in result["gradcam"]:
            lines.append(f"| {row['batch_size']} | {row['overlay_format']} | {row['predict_ms_per_image']:.1f} | "
                         f"{row['explain_ms_per_image']:.1f} | {row['gradcam_cost_ratio']:.3f} |")
        lines += ["", "The served default is JPEG overlays (`gradcam_format` in `config/model-config.yaml`); PNG is "
                  "available per request with `\"overlay_format\": \"png\"` at the cost shown.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def command_line(argv: Sequence[str]) -> str:
    """The command as typed, with the ``--token`` value masked: the report is committed."""
    shown, mask_next = [], False
    for arg in argv[1:]:
        shown.append("***" if mask_next else ("--token=***" if arg.startswith("--token=") else arg))
        mask_next = arg == "--token"
    return " ".join(["python scripts/bench.py", *shown])


def summary_text(result: dict[str, Any]) -> str:
    """The run's checks against their targets, the baseline ratios and the tail, as printed at the end of a run."""
    summary = result["summary"]
    lines = ["summary:"] + [f"  {check['name']}: {fmt(check['value'], 3)} (target {check['target']}: "
                            f"{met_text(check['met'])})" for check in summary["checks"]]
    if summary["baseline"]:
        lines.append(f"  against {summary['baseline']}: served {fmt(summary['baseline_served_ratio'], 3)}x, "
                     f"in-process {fmt(summary['baseline_in_process_ratio'], 3)}x")
    lines.append(f"  p99 at best throughput: {fmt(summary['p99_ms_at_best'], 0)} ms; tail check from {summary['tail_level']}")
    return "\n".join(lines)


def baseline_serving_text(baseline: dict[str, Any]) -> str:
    """How the baseline was served, in words: as released (its own batching and runtime) or as this release is."""
    overrides = baseline.get("overrides") or {}
    handler = overrides.get("handler") or {}
    settings = [f"{key} {value}" for key, value in overrides.items() if key != "handler"]
    settings += [f"{key} {value}" for key, value in handler.items()]
    if not settings:
        return "this run's model config, as this release"
    how = "its own release's serving choices" if baseline.get("serving") == "released" else "this run's overrides"
    return f"{how} ({', '.join(settings)})"
