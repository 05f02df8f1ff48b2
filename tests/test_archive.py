"""Release checks of ops/archive.py: a release carries its own gate and the threshold measured for it."""

from __future__ import annotations

import zipfile

import pytest
import yaml

from ops.archive import ArchiveSpec, ReleaseCheckError, build_archive, check_release
from ops.paths import MODEL_CONFIG
from tests.tiny_release import tiny_checkpoint


def config_with_threshold(folder, threshold):
    values = yaml.safe_load(MODEL_CONFIG.read_text())
    values["handler"]["referral_threshold"] = threshold
    path = folder / "model-config.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_a_checkpoint_without_a_gate_is_not_released(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(ReleaseCheckError, match="no out-of-distribution gate"):
        check_release(ArchiveSpec(checkpoint, MODEL_CONFIG, tmp_path / "store"))


def test_a_threshold_other_than_the_measured_one_is_refused_unless_forced_and_then_recorded(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")  # operating point = the served config's threshold
    assert check_release(ArchiveSpec(checkpoint, MODEL_CONFIG, tmp_path / "store", require_gate=False)) == []
    other = config_with_threshold(tmp_path, 0.37)
    with pytest.raises(ReleaseCheckError, match="0.37.*measured at"):
        check_release(ArchiveSpec(checkpoint, other, tmp_path / "store", require_gate=False))
    archive = build_archive(ArchiveSpec(checkpoint, other, tmp_path / "store", "9.9", require_gate=False,
                                        force_threshold=True))
    with zipfile.ZipFile(archive) as mar:
        packed = yaml.safe_load(mar.read("model-config.yaml"))
    assert packed["handler"]["referral_threshold"] == 0.37
    assert any(note.startswith("FORCED") and "0.37" in note for note in packed["release_notes"])
    # A development archive without a gate must still load: its config stops requiring one, and says so.
    assert packed["handler"]["require_input_gate"] is False
    assert any(note.startswith("NOT A RELEASE") for note in packed["release_notes"])
