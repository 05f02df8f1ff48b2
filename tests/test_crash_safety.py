"""Crash safety of files the project rewrites in place: a checkpoint (``make calibrate``, ``make
fit-gate`` and ``make ensemble`` write the release checkpoint over itself) killed half-way
through its write leaves the old file whole, and private files are created private.

The crash is real: a child process is killed (``os._exit``) in the middle of writing.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from handler.checkpoint import read_checkpoint
from ops.private import create_private, private_dir, write_private
from tests.tiny_release import tiny_checkpoint

CRASH_HALF_WAY = textwrap.dedent("""
    import os, sys, torch
    from handler.checkpoint import read_checkpoint
    real_save = torch.save

    def save_then_die(value, target, *args, **kwargs):
        if isinstance(target, (str, os.PathLike)):
            target = open(target, "wb")  # a save straight into the file
        real_save(value, target, *args, **kwargs)
        target.flush()
        target.truncate(target.tell() // 2)  # half of it on disk
        os._exit(9)

    torch.save = save_then_die
    checkpoint = read_checkpoint(sys.argv[1])
    checkpoint.meta.version = "9.9"
    checkpoint.save(sys.argv[1])
""")


def test_a_checkpoint_killed_half_way_through_its_rewrite_leaves_the_old_one_whole(tmp_path):
    path = tiny_checkpoint(tmp_path / "model.pt")
    before = path.read_bytes()
    crashed = subprocess.run([sys.executable, "-c", CRASH_HALF_WAY, str(path)], capture_output=True, text=True)
    assert crashed.returncode == 9, crashed.stderr
    assert path.read_bytes() == before
    assert read_checkpoint(path).meta.version != "9.9"
    # A save that completes replaces it.
    checkpoint = read_checkpoint(path)
    checkpoint.meta.version = "9.9"
    checkpoint.save(path)
    assert read_checkpoint(path).meta.version == "9.9"


def test_a_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import torch

    path = tiny_checkpoint(tmp_path / "model.pt")
    checkpoint = read_checkpoint(path)
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.fixture()
def usual_umask():
    previous = os.umask(0o022)  # the usual umask: what the helpers must not depend on
    yield
    os.umask(previous)


def test_private_files_and_folders_are_created_private(tmp_path, usual_umask):
    folder = private_dir(tmp_path / "run" / "cluster")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
    token = create_private(folder / "token", "secret\n")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        create_private(token, "another")  # O_EXCL: never opened through a planted file or link
    assert token.read_text() == "secret\n"
    replaced = write_private(folder / "token", "renewed\n")
    assert stat.S_IMODE(replaced.stat().st_mode) == 0o600 and replaced.read_text() == "renewed\n"
    # A folder made 0755 by an older version is narrowed before anything is written into it.
    old = tmp_path / "old-run"
    old.mkdir(mode=0o755)
    assert stat.S_IMODE(private_dir(old).stat().st_mode) == 0o700
