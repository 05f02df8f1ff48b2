"""SHA-256 digests of model archives: recorded when an archive is built, checked before it is served.

A ``.mar`` is code (SECURITY.md): TorchServe imports the handler inside it. ``make release``
records the archive's digest beside it (``<name>.mar.sha256``, the ``sha256sum`` format, so
``sha256sum -c`` checks it by hand) and appends the release to ``releases.jsonl`` in the model
store. Every start (:func:`ops.rollout.start_serving`, so ``make serve``, the cluster's
replicas and their restarts) and every registration (``make rollout``) checks the archive
against its recorded digest first and refuses one that was changed, truncated or swapped
since it was built, or that has no digest at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

DIGEST_SUFFIX = ".sha256"
LEDGER = "releases.jsonl"


class DigestError(RuntimeError):
    """An archive does not match its recorded digest, or has none."""


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def digest_path(archive: Path) -> Path:
    return archive.with_name(archive.name + DIGEST_SUFFIX)


def recorded_digest(archive: Path) -> str | None:
    """The digest recorded for ``archive``, or None without a record."""
    path = digest_path(archive)
    if not path.exists():
        return None
    return path.read_text().split()[0]


def record(archive: Path, note: dict[str, Any] | None = None) -> str:
    """Record ``archive``'s digest beside it and append the build to the store's ledger; returns the digest."""
    digest = sha256_of(archive)
    staging = digest_path(archive).with_name(digest_path(archive).name + ".tmp")
    staging.write_text(f"{digest}  {archive.name}\n")
    os.replace(staging, digest_path(archive))
    entry = {"archive": archive.name, "sha256": digest, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **(note or {})}
    with open(archive.parent / LEDGER, "a") as ledger:
        ledger.write(json.dumps(entry) + "\n")
    return digest


def verify(archive: Path) -> str:
    """Check ``archive`` against its recorded digest; returns the digest.

    Raises:
        DigestError: No digest recorded, or the archive's bytes differ from the recorded ones.
    """
    expected = recorded_digest(archive)
    if expected is None:
        raise DigestError(f"{archive} has no recorded SHA-256 ({digest_path(archive).name}); only archives built by "
                          "`make archive` / `make release` are served: rebuild it")
    actual = sha256_of(archive)
    if actual != expected:
        raise DigestError(f"{archive} does not match its recorded SHA-256 (recorded {expected[:16]}..., now "
                          f"{actual[:16]}...): it changed since it was built; rebuild it or find out who changed it")
    return actual
