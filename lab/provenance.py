"""Where derived weights came from: file digests, checkpoint provenance lines and command lines."""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from handler.checkpoint import Meta


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes: what names a checkpoint in provenance and caches."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_provenance(path: str | os.PathLike, meta: Meta, digest: str | None = None) -> str:
    """A line naming a checkpoint file, its version and its SHA-256 prefix, for a derived model's metadata.

    Args:
        path: The checkpoint file.
        meta: Its metadata.
        digest: Its SHA-256 hex digest when already computed (:func:`file_sha256`).
    """
    digest = digest or file_sha256(path)
    return f"checkpoint {os.path.basename(path)} (version {meta.version}, sha256 {digest[:12]})"


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """``python <script> <arguments>``, as recorded in a checkpoint's provenance.

    Args:
        script: The script's path from the repository root, e.g. ``scripts/train.py``.
        argv: Its arguments; None takes this process's (``sys.argv[1:]``).
    """
    return f"python {script} " + shlex.join(sys.argv[1:] if argv is None else argv)
