"""models.atomic: whole-file replacement with the permissions a plain open() would give, or the ones asked for."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from models.atomic import atomic_write, atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_text_replaces_the_file_with_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = tmp_path / "sub" / "metrics.jsonl"
        atomic_write_text(target, "one\n")
        atomic_write_text(target, "two\n")
    finally:
        os.umask(old)
    assert target.read_text() == "two\n"
    assert _mode(target) == 0o644  # run outputs stay readable like any file open() writes
    assert [p.name for p in target.parent.iterdir()] == ["metrics.jsonl"]  # no temp file left


def test_atomic_write_keeps_a_private_mode_and_cleans_up_on_failure(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    atomic_write(key, lambda fh: fh.write(b"secret"), mode=0o600)
    assert _mode(key) == 0o600

    def boom(fh: object) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(key, boom, mode=0o600)
    assert key.read_bytes() == b"secret" and [p.name for p in tmp_path.iterdir()] == ["node.key"]


def test_the_rename_is_made_durable_by_an_fsync_of_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename lives in the folder's entries: without fsyncing the folder a power cut can bring the old file back."""
    synced: list[tuple[str, bool]] = []
    real_fsync, real_replace = os.fsync, os.replace
    replaced: list[str] = []

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), bool(replaced)))
        real_fsync(fd)

    def replace(src: str, dst: object) -> None:
        real_replace(src, dst)
        replaced.append(str(dst))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "ledger.json", "{}")
    assert (str(tmp_path), True) in synced, f"the folder was not fsynced after the rename: {synced}"
