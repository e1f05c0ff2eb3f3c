"""Atomic file writes: write a temp file in the target's folder, fsync, ``os.replace``, then fsync the folder.

Readers (and a process killed mid-write) see the old file or the new one, never a torn one; the folder's fsync makes
the rename itself durable (without it a power cut right after the write may bring the old file back). Torch-free so
site policies, privacy ledgers and docs can use it without importing torch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], mode: int | None = None) -> None:
    """Call ``write`` on a binary temp file beside ``path``, fsync it, rename it onto ``path``, fsync the folder.

    Args:
        mode: permission bits of the file; ``None`` = what ``open()`` would give (0666 minus the umask). The temp
            file is 0600 from creation either way, so a private file is never readable by others, even briefly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if mode is None:
        mode = 0o666 & ~_umask()
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush ``directory``'s entries (a rename into it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would set it process-wide for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
