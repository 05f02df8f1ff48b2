"""Build a versioned TorchServe archive (.mar) from files in this repository only.

Example:
    python scripts/package.py                      # model_store/skin_lesion.mar
    python scripts/package.py --version 1.1 --archive-name skin_lesion_v1.1   # make release VERSION=1.1
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HANDLER_PACKAGE = ROOT / "handler"


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "skin_lesion.pt"))
    parser.add_argument("--model-config", default=str(ROOT / "config" / "model-config.yaml"))
    parser.add_argument("--model-name", default="skin_lesion")
    parser.add_argument("--version", help="archive version; defaults to the checkpoint's meta.version")
    parser.add_argument("--archive-name", help="file name without .mar; defaults to the model name")
    parser.add_argument("--export-path", default=str(ROOT / "model_store"))
    return parser


def stage_handler_package(destination: Path) -> None:
    """Copy the handler package's Python sources (no caches, no stray files) into ``destination/handler``."""
    target = destination / "handler"
    target.mkdir(parents=True)
    for source in sorted(HANDLER_PACKAGE.glob("*.py")):
        shutil.copy2(source, target / source.name)


def main(args: argparse.Namespace) -> Path:
    """Build the archive and return its path."""
    checkpoint = Path(args.checkpoint)
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)["meta"]
    version = args.version or str(meta.get("version", "0.0.0"))
    export_path = Path(args.export_path)
    export_path.mkdir(parents=True, exist_ok=True)
    archive_name = args.archive_name or args.model_name
    with tempfile.TemporaryDirectory() as staging:
        staging_dir = Path(staging)
        extra = staging_dir / "extra"
        stage_handler_package(extra)
        serialized = staging_dir / f"{args.model_name}.pt"
        shutil.copy2(checkpoint, serialized)
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", args.model_name, "--version", version,
            "--serialized-file", str(serialized),
            "--handler", str(HANDLER_PACKAGE / "skin_lesion_handler.py"),
            "--extra-files", str(extra),
            "--config-file", str(Path(args.model_config)),
            "--export-path", str(staging_dir), "--force",
        ]
        subprocess.run(command, check=True)
        # The archiver names the file after the model; the manifest keeps the model name.
        archive = export_path / f"{archive_name}.mar"
        shutil.move(staging_dir / f"{args.model_name}.mar", archive)
    print(f"built {archive} (version {version}, {archive.stat().st_size / 1e6:.1f} MB)")
    return archive


if __name__ == "__main__":
    main(get_args_parser().parse_args())
