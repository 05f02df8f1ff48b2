"""Fitting the input gate (lab.gate_fitting, scripts/fit_input_gate.py): options, crops, cost clock, atomic store."""

from __future__ import annotations

import io
import time

import pytest
import torch
from PIL import Image

from handler.checkpoint import read_checkpoint
from handler.input_gate import InputGate, build_gate_backbone, make_gate_dict
from lab import gate_fitting, ood
from ops.bench_inprocess import median_seconds
from scripts import fit_input_gate


def test_every_command_line_option_reaches_the_fit() -> None:
    """The script is parser + main: each option that describes the fit is a field of GateFitOptions, under its name."""
    args = fit_input_gate.get_args_parser().parse_args(["--sizes", "96", "--clinical-crops", "2", "--head-c", "3"])
    options = gate_fitting.GateFitOptions.from_namespace(args, "the command")
    outputs = {"output", "report", "histogram", "write_into", "model_version"}
    fields = set(vars(options))
    assert set(vars(args)) - outputs <= fields, set(vars(args)) - outputs - fields
    assert (list(options.sizes), options.clinical_crops, list(options.head_c), options.command) == ([96], 2, [3.0], "the command")
    assert list(gate_fitting.GateFitOptions().sizes) == list(fit_input_gate.get_args_parser().parse_args([]).sizes)


def test_clinical_crops_are_deterministic_4_to_3_jpegs_of_the_same_patient() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), (180, 120, 100)).save(buffer, "PNG")
    item = ood.bytes_item("photo.png", buffer.getvalue())
    item = ood.Item(item.name, "PAT_1", item.read, "BCC")
    shapes = set()
    for seed in range(12):
        crop = ood.cropped_item(item, seed)
        data = crop.read()
        assert data == ood.cropped_item(item, seed).read() and data[:2] == b"\xff\xd8"  # same bytes, a JPEG
        width, height = Image.open(io.BytesIO(data)).size
        assert abs(max(width, height) / min(width, height) - 4 / 3) < 0.02 and 0.6 * 300 * 0.74 <= min(width, height)
        assert (crop.group, crop.label) == ("PAT_1", "BCC")
        shapes.add(width > height)
    assert shapes == {True, False}  # landscape and portrait


def test_thread_clock_counts_this_threads_work_not_waiting() -> None:
    def busy() -> None:
        end = time.thread_time() + 0.02
        while time.thread_time() < end:
            pass

    timings = median_seconds({"busy": busy, "asleep": lambda: time.sleep(0.05)}, rounds=3, clock=time.thread_time)
    assert timings["busy"] >= 0.019 and timings["asleep"] < 0.01


def test_store_gate_writes_the_gate_and_version_into_the_checkpoint(tiny_checkpoint, tmp_path) -> None:
    torch.manual_seed(0)
    gate_dict = make_gate_dict(build_gate_backbone().state_dict(), method="test-32", input_size=32, scorer="cosine_knn",
                               threshold=0.5, k=1, reference=torch.randn(8, 1280), provenance={"note": "random"})
    target = tmp_path / "release.pt"
    gate_fitting.store_gate(tiny_checkpoint, target, gate_dict, "the command", "9.9.9")
    stored = read_checkpoint(target)
    assert stored.meta.version == "9.9.9" and stored.meta.provenance["input_gate_command"] == "the command"
    batch = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8)
    assert torch.equal(InputGate.from_dict(stored.meta.input_gate).assess(batch).score,
                       InputGate.from_dict(gate_dict).assess(batch).score)
    assert read_checkpoint(tiny_checkpoint).meta.input_gate is None  # the source is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.pt"]  # no partial file left behind


@pytest.mark.parametrize("missing", ["samples", "clinical"])
def test_missing_data_is_named(tmp_path, missing) -> None:
    options = gate_fitting.GateFitOptions(**{missing: str(tmp_path / "nowhere")})
    with pytest.raises(SystemExit, match="nowhere"):
        gate_fitting.gate_sets(options)
