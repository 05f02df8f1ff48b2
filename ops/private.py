"""Files and folders only this user can read, created that way (never tightened after the fact).

A key, token or config holding one must never exist, even for a moment, with wider permissions
than 0600 (folders 0700): a ``chmod`` after ``write_text`` leaves a window in which another user
can open the file and keep the descriptor. So files are opened with ``O_CREAT | O_EXCL`` and
their mode, and folders are made under a ``0o077`` umask.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Within the block, new files and folders get no group or other permission bits."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents) mode 0700; a folder that exists with wider bits is narrowed.

    Narrowing an existing folder (a ``run/`` made by an older version, 0755) is safe: nothing is
    written into it before it is private.
    """
    with private_umask():
        path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, PRIVATE_DIR)
    return path


def create_private(path: Path, data: bytes | str) -> Path:
    """Create ``path`` mode 0600 with ``data``; fails with FileExistsError if it exists (O_EXCL)."""
    payload = data.encode() if isinstance(data, str) else data
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def write_private(path: Path, data: bytes | str) -> Path:
    """Replace ``path`` atomically with a 0600 file holding ``data`` (staged beside it, then renamed)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    try:
        create_private(staging, data)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return path
