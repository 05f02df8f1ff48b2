"""Build a versioned TorchServe archive (.mar) that holds exactly what serves.

The archive holds the ``handler/`` package (every module of it, nothing else of the project),
the checkpoint and ``model-config.yaml``. Before packing, the checkpoint and the config are
checked against each other: the referral threshold the config serves must be the one measured
for these weights (``meta.operating_point``), unless forced, and a release must carry its own
out-of-distribution gate (``meta.input_gate``).

Every archive built here gets its SHA-256 recorded beside it (:mod:`ops.digests`), which every
start and registration checks. A release (``make release``) never replaces an existing archive
of the same name unless forced (``--force``), and a forced replacement is recorded in the model
store's ``releases.jsonl`` with the digest it replaced.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from handler.checkpoint import Meta, read_checkpoint
from handler.settings import load_handler_settings
from ops import digests
from ops.paths import MODEL_NAME, ROOT

HANDLER_PACKAGE = ROOT / "handler"


class ReleaseCheckError(ValueError):
    """The checkpoint and the serving config do not belong together, or a release would replace another."""


@dataclass(frozen=True)
class ArchiveSpec:
    """What to pack and how to name it.

    Attributes:
        checkpoint: The checkpoint file.
        model_config: The ``model-config.yaml`` to pack.
        export_path: Folder the ``.mar`` is written to.
        version: Archive version; None takes the checkpoint's ``meta.version``.
        archive_name: File name without ``.mar``; None uses the model name.
        model_name: The model's name in TorchServe.
        force_threshold: Pack a config whose referral threshold differs from the checkpoint's
            operating point; the archive then records that it was forced.
        require_gate: Refuse a checkpoint without an input gate (every release).
        overwrite: Replace an existing archive of the same name (``make archive`` rebuilds its
            development archive; a release passes False unless forced).
        forced: The replacement was asked for (``--force``): recorded in the ledger.
    """

    checkpoint: Path
    model_config: Path
    export_path: Path
    version: str | None = None
    archive_name: str | None = None
    model_name: str = MODEL_NAME
    force_threshold: bool = False
    require_gate: bool = True
    overwrite: bool = True
    forced: bool = False


def check_release(spec: ArchiveSpec, meta: Meta | None = None) -> list[str]:
    """Check the checkpoint and the config belong together; returns notes to record in the archive.

    Args:
        spec: What to archive.
        meta: The checkpoint's meta when the caller has read it already (else it is read here).

    Raises:
        ReleaseCheckError: No input gate (when required), no operating point, or a served
            referral threshold that differs from the measured one without ``force_threshold``.
    """
    meta = meta if meta is not None else read_checkpoint(spec.checkpoint).meta
    settings = load_handler_settings(spec.model_config)
    notes = []
    if spec.require_gate and meta.input_gate is None:
        raise ReleaseCheckError(f"{spec.checkpoint} has no out-of-distribution gate (meta.input_gate): a release "
                                "must refuse what it cannot judge; fit one with `make fit-gate CHECKPOINT=...`")
    point = meta.operating_point
    if point is None:
        message = f"{spec.checkpoint} has no measured operating point (meta.operating_point)"
        if not spec.force_threshold:
            raise ReleaseCheckError(message + "; run `make calibrate CHECKPOINT=...` first")
        return [*notes, f"FORCED: {message}"]
    if abs(point.referral_threshold - settings.referral_threshold) > 1e-9:
        message = (f"{spec.model_config} serves referral_threshold {settings.referral_threshold}, but "
                   f"{spec.checkpoint} was measured at {point.referral_threshold} (meta.operating_point)")
        if not spec.force_threshold:
            raise ReleaseCheckError(message + "; set the config to the measured value, or pass --force-threshold")
        notes.append(f"FORCED: {message}")
    if point.tta != settings.tta:
        message = f"the operating point was measured with TTA {point.tta!r}, the config serves {settings.tta!r}"
        if not spec.force_threshold:
            raise ReleaseCheckError(message + "; recalibrate with --serving-tta, or pass --force-threshold")
        notes.append(f"FORCED: {message}")
    return notes


def stage_handler_package(destination: Path) -> None:
    """Copy the handler package's Python sources (no caches, no stray files) into ``destination/handler``."""
    target = destination / "handler"
    target.mkdir(parents=True)
    for source in sorted(HANDLER_PACKAGE.glob("*.py")):
        shutil.copy2(source, target / source.name)


def build_archive(spec: ArchiveSpec) -> Path:
    """Check, then build the archive; returns its path.

    Raises:
        ReleaseCheckError: See :func:`check_release`.
    """
    target = spec.export_path / f"{spec.archive_name or spec.model_name}.mar"
    replaced = digests.recorded_digest(target) if target.exists() else None
    if target.exists() and not spec.overwrite:
        raise ReleaseCheckError(f"{target} exists (sha256 {replaced or 'not recorded'}): a release is never "
                                "replaced silently; choose a new version, or pass --force to replace it (recorded "
                                f"in {spec.export_path / digests.LEDGER})")
    checkpoint = read_checkpoint(spec.checkpoint)
    notes = check_release(spec, checkpoint.meta)
    version = spec.version or checkpoint.meta.version or "0.0.0"
    config_text = spec.model_config.read_text()
    if not spec.require_gate and checkpoint.meta.input_gate is None:
        # A test or development archive without a gate: it must still load, so its config stops
        # requiring one, and says why. Releases (require_gate) never get here.
        values = yaml.safe_load(config_text) or {}
        values.setdefault("handler", {})["require_input_gate"] = False
        config_text = yaml.safe_dump(values, sort_keys=False)
        notes.append("NOT A RELEASE: the checkpoint has no input gate; require_input_gate is off")
    if notes:
        # What was forced or waived is recorded in the config the archive serves.
        config_text += "\n# Written by ops/archive.py\n" + yaml.safe_dump({"release_notes": notes})
    spec.export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        staging_dir = Path(staging)
        extra = staging_dir / "extra"
        stage_handler_package(extra)
        serialized = staging_dir / f"{spec.model_name}.pt"
        shutil.copy2(spec.checkpoint, serialized)
        config = staging_dir / "model-config.yaml"
        config.write_text(config_text)
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", spec.model_name, "--version", version,
            "--serialized-file", str(serialized),
            "--handler", str(HANDLER_PACKAGE / "skin_lesion_handler.py"),
            "--extra-files", str(extra),
            "--config-file", str(config),
            "--export-path", str(staging_dir), "--force",
        ]
        subprocess.run(command, check=True)
        # The archiver names the file after the model; the manifest keeps the model name.
        archive = target
        # Copied beside the target, then renamed over it (never half an archive under its name);
        # its digest is recorded after: a crash in between leaves an archive whose digest is
        # missing or stale, which nothing serves.
        packed = spec.export_path / f".{archive.name}.{os.getpid()}.partial"
        shutil.move(staging_dir / f"{spec.model_name}.mar", packed)
        os.replace(packed, archive)
    ledger_entry = {"version": version}
    if replaced is not None or spec.forced:
        ledger_entry |= {"replaced_sha256": replaced, "forced": spec.forced}
    digest = digests.record(archive, ledger_entry)
    print(f"built {archive} (version {version}, {archive.stat().st_size / 1e6:.1f} MB, sha256 {digest[:16]}...)"
          + "".join(f"\n  {note}" for note in notes))
    return archive
