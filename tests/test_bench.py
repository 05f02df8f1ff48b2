"""The end-to-end benchmark: its statistics on synthetic numbers, and one bounded run through real TorchServe."""

import json
from pathlib import Path

import pytest
import yaml

from ops import bench_inprocess, bench_report, loadgen
from ops.bench_served import model_config_overrides
from ops.paths import MODEL_CONFIG
from scripts import bench
from tests.conftest import RELEASED_CHECKPOINT

SUMMARY_KEYS = ("served_throughput_ratio", "speedup_vs_unbatched", "gradcam_cost_ratio", "gate_cost_ratio",
                "p99_over_p50_at_70pct", "kserve_v1_ratio", "open_inference_ratio")
# The protocols section (a server of its own) is left out of the shortened full run below;
# test_protocol_ratios_are_checked_and_reported covers its summary and report.
PROTOCOL_KEYS = ("kserve_v1_ratio", "open_inference_ratio")


def level(concurrency, images_per_s, p50, p99, errors=0, avg_batch=1.0):
    return {"mode": "closed", "concurrency": concurrency, "requests": 100, "errors": errors, "seconds": 10.0,
            "images_per_s": images_per_s, "p50_ms": p50, "p95_ms": p99, "p99_ms": p99, "mean_ms": p50,
            "avg_batch_size": avg_batch, "batches": 100 / avg_batch}


def test_percentile_is_nearest_rank_and_monotone():
    values = list(range(1, 101))  # 1..100
    assert loadgen.percentile(values, 0.50) == 50
    assert loadgen.percentile(values, 0.95) == 95
    assert loadgen.percentile(values, 0.99) == 99
    assert loadgen.percentile(values, 1.0) == 100
    assert loadgen.percentile([7.0], 0.99) == 7.0
    assert loadgen.percentile([3, 1, 2], 0.0) == 1
    with pytest.raises(ValueError):
        loadgen.percentile([], 0.5)


def test_level_stats_counts_errors_and_takes_percentiles_over_successes():
    latencies = [0.010] * 97 + [0.050, 0.100, 5.0]
    statuses = [200] * 99 + [503]  # the 5 s one failed: it must not enter the percentiles
    stats = loadgen.level_stats(latencies, statuses, seconds=2.0)
    assert stats["requests"] == 100 and stats["errors"] == 1
    assert stats["images_per_s"] == pytest.approx(99 / 2.0)
    assert stats["p50_ms"] == pytest.approx(10.0)
    assert stats["p99_ms"] == pytest.approx(100.0)
    assert stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
    empty = loadgen.level_stats([1.0], [-1], seconds=1.0)
    assert empty["errors"] == 1 and empty["images_per_s"] == 0 and empty["p99_ms"] is None


def test_parse_histogram_reads_torchserve_prometheus_text():
    # As scraped from TorchServe 0.12 (trailing comma inside the braces included).
    text = "\n".join([
        "# TYPE skin_lesion_batch_size histogram",
        'skin_lesion_batch_size_bucket{ModelName="skin_lesion",Hostname="vm",le="1.0",} 5.0',
        'skin_lesion_batch_size_count{ModelName="skin_lesion",Hostname="vm",} 5.0',
        'skin_lesion_batch_size_sum{ModelName="skin_lesion",Hostname="vm",} 12.0',
        'skin_lesion_batch_size_sum{ModelName="other",Hostname="vm",} 99.0',
        'skin_lesion_batch_size_sum_extra{ModelName="skin_lesion",} 1.0',
    ])
    assert loadgen.parse_histogram(text, "skin_lesion_batch_size", "skin_lesion") == (12.0, 5.0)
    assert loadgen.parse_histogram("", "skin_lesion_batch_size", "skin_lesion") == (0.0, 0.0)


def test_summary_ratios_and_checks():
    result = {
        "in_process": [{"batch_size": 8, "images_per_s": 20.0}, {"batch_size": 1, "images_per_s": 10.0}],
        "unbatched": {"levels": [level(1, 6.0, 160, 200)]},
        "served": {"levels": [level(1, 7.0, 140, 150), level(4, 14.0, 280, 400, avg_batch=3.5),
                              level(16, 18.0, 800, 900, avg_batch=7.9), level(32, 17.5, 1700, 1900, avg_batch=8.0)],
                   "paced": {**level(None, 12.0, 200, 700), "mode": "open", "offered_images_per_s": 12.6}},
        "gradcam": [{"batch_size": 8, "overlay_format": "jpeg", "gradcam_cost_ratio": 1.2},
                    {"batch_size": 8, "overlay_format": "png", "gradcam_cost_ratio": 1.9}],
    }
    summary = bench_report.summarize(result, batch_size=8)
    assert summary["best_concurrency"] == 16 and summary["p99_ms_at_best"] == 900
    assert summary["served_throughput_ratio"] == pytest.approx(18.0 / 20.0)
    assert summary["speedup_vs_unbatched"] == pytest.approx(3.0)
    assert summary["gradcam_cost_ratio"] == 1.2
    assert summary["p99_over_p50_at_70pct"] == pytest.approx(3.5)  # from the open-loop level
    assert summary["tail_level"].startswith("open loop")
    assert summary["closed_loop_nearest_70pct"]["concurrency"] == 4  # 14 is nearest 0.7 x 18 = 12.6
    assert {check["name"]: check["met"] for check in summary["checks"]} == {
        "served_throughput_ratio": True, "speedup_vs_unbatched": True, "gradcam_cost_ratio": True,
        "gate_cost_ratio": None, "p99_over_p50_at_70pct": False, "kserve_v1_ratio": None, "open_inference_ratio": None}

    # Without the open-loop level, the closed-loop level nearest 70 % of the peak is used;
    # sections that did not run give None ("not measured"), never a made-up figure.
    partial = bench_report.summarize({"served": {"levels": result["served"]["levels"], "paced": None}}, batch_size=8)
    assert partial["p99_over_p50_at_70pct"] == pytest.approx(400 / 280)
    assert partial["tail_level"].startswith("closed loop, 4 in flight")
    assert partial["served_throughput_ratio"] is None and partial["speedup_vs_unbatched"] is None
    assert {check["name"]: check["met"] for check in partial["checks"]}["gradcam_cost_ratio"] is None


def test_protocol_ratios_are_checked_and_reported(tmp_path):
    level = {"requests": 100, "errors": 0, "images_per_s": 10.0, "p50_ms": 1500, "p95_ms": 1900, "p99_ms": 2000,
             "avg_batch_size": 3.9, "concurrency": 16}
    protocols = {"concurrency": 16, "rounds": 1, "levels": {"plain": [level], "kserve_v1": [{**level, "images_per_s": 9.6}],
                                                             "open_inference": [{**level, "images_per_s": 9.4}]},
                 "images_per_s": {"plain": 10.0, "kserve_v1": 9.6, "open_inference": 9.4},
                 "ratio_to_plain": {"plain": 1.0, "kserve_v1": 0.96, "open_inference": 0.94}}
    summary = bench_report.summarize({"protocols": protocols}, batch_size=4)
    checks = {check["name"]: check["met"] for check in summary["checks"]}
    assert checks["kserve_v1_ratio"] is True and checks["open_inference_ratio"] is False
    bench_report.write_report(tmp_path / "PERF.md", {"protocols": protocols, "summary": summary, "date": "d",
                                                     "machine": "m", "command": "c", "quick": True})
    report = (tmp_path / "PERF.md").read_text()
    assert "| open_inference, 1 | 100 | 0 | 9.4 |" in report and "| kserve_v1 | 9.6 | 0.960 |" in report


def test_the_in_process_limit_is_the_fastest_layout_and_the_baseline_gives_same_run_ratios():
    rows = [{"batch_size": 4, "processes": 1, "threads_per_process": 2, "images_per_s": 10.0},
            {"batch_size": 4, "processes": 2, "threads_per_process": 1, "images_per_s": 14.0},
            {"batch_size": 1, "processes": 1, "threads_per_process": 2, "images_per_s": 6.0},
            {"batch_size": 1, "processes": 2, "threads_per_process": 1, "images_per_s": 5.0}]
    limit = bench_report.in_process_limit(rows)
    assert limit[4] is rows[1] and limit[1] is rows[2]
    result = {"in_process": rows, "served": {"levels": [level(4, 12.6, 300, 500)], "paced": None},
              "baseline": {"checkpoint": "git:360bf4d", "version": "1.5.0",
                           "in_process": [{**row, "images_per_s": row["images_per_s"] / 2} for row in rows],
                           "served": {"levels": [level(4, 4.2, 900, 1500, errors=1)]}}}
    summary = bench_report.summarize(result, batch_size=4)
    # Divided by the fastest layout (2 x 1), not the first: the ratio is at most 1 when the server is no faster.
    assert summary["served_throughput_ratio"] == pytest.approx(12.6 / 14.0)
    assert summary["in_process_layout"] == "2 process(es) x 1 thread(s)"
    assert summary["baseline_served_ratio"] == pytest.approx(3.0)
    assert summary["baseline_in_process_ratio"] == pytest.approx(2.0)
    assert summary["errors"] == 1  # the baseline's served errors count too


def test_layouts_parse_and_cover_one_process_and_one_per_core():
    assert bench_inprocess.parse_layout("2x1") == (2, 1) and bench_inprocess.parse_layout("1X16") == (1, 16)
    for bad in ("2", "0x1", "ax1", "2x1x1", "-1x2"):
        with pytest.raises(ValueError):
            bench_inprocess.parse_layout(bad)
    assert bench_inprocess.process_layouts(2) == [(1, 2), (2, 1)]
    assert bench_inprocess.process_layouts(8) == [(1, 8), (4, 2), (8, 1)]
    assert bench_inprocess.process_layouts(1) == [(1, 1)]


@pytest.mark.slow
def test_in_process_layouts_run_real_processes_on_the_handler_path(tmp_path):
    """Two layouts x two batch sizes with a tiny checkpoint: every process serves real JPEGs through handle_batch."""
    from handler.settings import HandlerSettings
    from tests.tiny_release import synthetic_jpeg, tiny_checkpoint

    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    payloads = [synthetic_jpeg(seed) for seed in range(6)]
    rows = bench_inprocess.bench_in_process(str(checkpoint), HandlerSettings(), payloads, [2, 1], 0.2,
                                            layouts=[(2, 1), (1, 2)], timeout=300)
    assert [(row["processes"], row["threads_per_process"], row["batch_size"]) for row in rows] == [
        (2, 1, 2), (2, 1, 1), (1, 2, 2), (1, 2, 1)]
    for row in rows:
        # At least 3 batches per process, all answered 200 (bench_in_process raises otherwise).
        assert row["images"] >= 3 * row["batch_size"] * row["processes"]
        assert row["images_per_s"] == pytest.approx(row["images"] / row["seconds"])


def test_baseline_from_git_is_the_release_checkpoint_at_that_commit(tmp_path):
    from handler.checkpoint import read_checkpoint
    from ops.bench_served import baseline_checkpoint

    assert baseline_checkpoint("some/where.pt", tmp_path) == Path("some/where.pt")
    head = baseline_checkpoint("git:HEAD", tmp_path)
    assert read_checkpoint(head).meta.version == read_checkpoint(RELEASED_CHECKPOINT).meta.version
    with pytest.raises(SystemExit, match="no-such-revision"):
        baseline_checkpoint("git:no-such-revision", tmp_path)


def test_a_git_baseline_is_served_as_it_was_released_unless_asked_otherwise(tmp_path):
    from ops.bench_run import BenchOptions, prepare
    from ops.bench_served import RELEASE_HANDLER_KEYS, RELEASE_SERVING_KEYS, released_serving

    committed = yaml.safe_load(MODEL_CONFIG.read_text())  # HEAD's config, unless this tree edits it
    released = released_serving("HEAD")
    assert released == {**{key: committed[key] for key in RELEASE_SERVING_KEYS if key in committed},
                        "handler": {key: committed["handler"][key] for key in RELEASE_HANDLER_KEYS
                                    if key in committed["handler"]}}
    assert released["handler"]["runtime"] and released["batchSize"]
    with pytest.raises(SystemExit, match="no-such-revision"):
        released_serving("no-such-revision")

    (tmp_path / "a.jpg").write_bytes(b"not read here")

    def options(**changes):
        return BenchOptions(checkpoint=str(RELEASED_CHECKPOINT), model_config=str(MODEL_CONFIG),
                            samples=str(tmp_path), **changes)

    # As released: REV's choices, with this run's explicit options on top (they apply to both sides).
    run = prepare(options(baseline="git:HEAD", handler=["tta=flip", "gradcam_alpha=0.3"], workers=1))
    overrides = run.baseline_overrides()
    assert overrides["handler"] == {**released["handler"], "tta": "flip", "gradcam_alpha": 0.3}
    assert overrides["batchSize"] == released["batchSize"] and overrides["minWorkers"] == overrides["maxWorkers"] == 1
    # Served with this run's config: the run's overrides alone, and so for a checkpoint file.
    assert prepare(options(baseline="git:HEAD", baseline_serving="current", workers=1)).baseline_overrides() == {
        "minWorkers": 1, "maxWorkers": 1}
    assert prepare(options(baseline=str(RELEASED_CHECKPOINT))).baseline_overrides() == {}
    # The report says how the baseline was served.
    assert "runtime" in bench_report.baseline_serving_text({"serving": "released", "overrides": overrides})
    assert bench_report.baseline_serving_text({"serving": "current", "overrides": {}}).startswith("this run's model config")


def test_command_line_masks_the_token():
    shown = bench_report.command_line(["scripts/bench.py", "--url", "http://127.0.0.1:8080", "--token", "s3cret", "--quick"])
    assert shown == "python scripts/bench.py --url http://127.0.0.1:8080 --token *** --quick"
    assert "s3cret" not in bench_report.command_line(["scripts/bench.py", "--token=s3cret"])


def test_report_from_synthetic_result(tmp_path):
    result = {"date": "today", "machine": "test machine", "command": "python scripts/bench.py --quick",
              "plan": {"level_requests": 100, "level_seconds": 5.0},
              "served": {"levels": [level(1, 7.0, 140, 150), level(8, 14.0, 500, 600, avg_batch=6.0)], "paced": None,
                         "model_config": {"batchSize": 8, "maxBatchDelay": 50}, "target": "test"},
              "in_process": [{"batch_size": 8, "images": 80, "seconds": 4.0, "images_per_s": 20.0}]}
    result["summary"] = bench_report.summarize(result, batch_size=8)
    bench_report.write_report(tmp_path / "PERF.md", result)
    report = (tmp_path / "PERF.md").read_text()
    assert all(key in report for key in SUMMARY_KEYS)
    assert "| 8 | 100 | 0 | 14.0 | 500 | 600 | 600 | 6.00 |" in report
    assert "not measured" in report  # speedup_vs_unbatched and gradcam_cost_ratio did not run


def test_default_plans_and_model_config_overrides():
    quick = loadgen.default_plan(quick=True)
    assert quick.levels == (1, 4, 16) and quick.level_requests == 300 and quick.level_seconds == 6.0
    full = loadgen.default_plan(quick=False, levels=[2, 8], level_seconds=3.0)
    assert full.levels == (2, 8) and full.level_requests == 2000 and full.level_seconds == 3.0
    assert model_config_overrides(4, 5, 2, ["torch_threads=1", "tta=hflip"]) == {
        "batchSize": 4, "maxBatchDelay": 5, "minWorkers": 2, "maxWorkers": 2,
        "handler": {"torch_threads": 1, "tta": "hflip"}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        model_config_overrides(handler=["torch_threads"])


def test_the_load_generating_client_imports_neither_torch_nor_the_handler():
    import subprocess
    import sys

    code = "import sys, ops.loadgen; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'handler')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


@pytest.mark.slow
@pytest.mark.data
def test_bench_through_real_torchserve(samples_dir, tmp_path):
    """All sections, shortened: two TorchServe start-ups plus a few seconds per level."""
    args = bench.get_args_parser().parse_args([
        "--samples", str(samples_dir), "--checkpoint", str(RELEASED_CHECKPOINT), "--quick",
        # The runtime section converts the model for four runtimes (minutes on 2 cores): `make bench` runs it.
        "--sections", "decode", "gate", "gradcam", "inprocess", "unbatched", "served",
        "--levels", "1", "8", "--level-seconds", "4", "--level-requests", "200", "--warmup-seconds", "2",
        "--rounds", "1", "--inprocess-seconds", "1", "--out", str(tmp_path), "--report", str(tmp_path / "PERF.md")])
    bench.main(args)
    result = json.loads((tmp_path / "bench.json").read_text())

    levels = result["served"]["levels"]
    assert [row["concurrency"] for row in levels] == [1, 8]
    for row in levels + result["unbatched"]["levels"] + [result["served"]["paced"]]:
        assert row["errors"] == 0 and row["requests"] > 0
        assert row["images_per_s"] > 0
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["avg_batch_size"] >= 1
    # 8 clients in flight against the release batchSize (4) and two workers: the server must batch.
    assert levels[-1]["avg_batch_size"] > 1
    assert result["unbatched"]["model_config"]["batchSize"] == 1
    assert result["unbatched"]["levels"][0]["avg_batch_size"] == 1
    released = yaml.safe_load(MODEL_CONFIG.read_text())
    assert result["served"]["model_config"]["batchSize"] == released["batchSize"]
    assert all(row["images_per_s"] > 0 for row in result["in_process"])
    assert {row["batch_size"] for row in result["in_process"]} == {1, released["batchSize"]}
    layouts = bench_inprocess.process_layouts(bench_inprocess.usable_cores())
    assert {(row["processes"], row["threads_per_process"]) for row in result["in_process"]} == set(layouts)

    summary = result["summary"]
    for key in [k for k in SUMMARY_KEYS if k not in PROTOCOL_KEYS] + ["p99_ms_at_best", "best_served_images_per_s"]:
        assert summary[key] is not None and summary[key] > 0, key
    assert [check["name"] for check in summary["checks"]] == list(SUMMARY_KEYS)
    report = (tmp_path / "PERF.md").read_text()
    assert all(key in report for key in SUMMARY_KEYS)
    assert "| 8 | " in report and "p99" in report


@pytest.mark.data
def test_gate_cost_is_measured_against_predict_in_the_same_run(samples_dir):
    """The gate section times the gate and the classifier on the same batch, and the handler path with and
    without the gate; the summary checks the gate against its share of the predict cost."""
    import dataclasses

    from handler.checkpoint import load_checkpoint
    from handler.inference import prepare_for_serving
    from handler.settings import load_handler_settings
    from ops.bench_inprocess import bench_gate

    loaded = load_checkpoint(RELEASED_CHECKPOINT)
    settings = dataclasses.replace(load_handler_settings(MODEL_CONFIG), torch_threads=0)
    prepare_for_serving(loaded, settings)
    payloads = [path.read_bytes() for path in sorted(samples_dir.glob("*.jpg"))[:4]]
    row = bench_gate(loaded, settings, payloads, batch_size=2, rounds=2)
    assert loaded.gate is not None  # put back after the rounds without it
    assert 0 < row["gate_ms_per_image"] and 0 < row["model_ms_per_image"]
    assert row["gate_cost_ratio"] == pytest.approx(row["gate_ms_per_image"] / row["model_ms_per_image"])
    summary = bench_report.summarize({"gate": row}, batch_size=2)
    (check,) = [c for c in summary["checks"] if c["name"] == "gate_cost_ratio"]
    assert check["value"] == row["gate_cost_ratio"] and check["target"] == "<= 0.25"


@pytest.mark.parametrize("geometry", [dict(image_size=48, resize_size=48, resize_mode="full_view", image_width=64),
                                      dict(image_size=40, resize_size=48, resize_mode="shorter_side_center_crop")])
def test_decode_section_compares_decoders_on_the_served_model_input(geometry):
    """Every decoder ends at the model input of the checkpoint's geometry (a 4:3 input keeps its width);
    the served row is the serving path itself."""
    import io

    import numpy as np
    from PIL import Image

    from handler.preprocessing import PreprocessConfig, load_model_input

    config = PreprocessConfig(mean=(0.5,) * 3, std=(0.5,) * 3, **geometry)
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 20, (450, 600, 3)) + np.linspace(0, 80, 600)[None, :, None], 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    outputs = {name: decode(data) for name, decode in bench_inprocess.decoders(config).items()}
    assert set(outputs) == {"pillow_draft", "pillow_full", "opencv_reduced", "opencv_full"}
    for name, array in outputs.items():
        assert array.shape == (config.input_height, config.input_width, 3), name
    assert np.array_equal(outputs["pillow_draft"], load_model_input(data, config)[0].permute(1, 2, 0).numpy())
    rows = bench_inprocess.bench_decode([data], config, rounds=1)
    assert [row["decoder"] for row in rows][0] == "pillow_draft" and rows[0]["mean_abs_pixel_difference"] == 0
    assert all(row["mean_abs_pixel_difference"] < 10 for row in rows)
