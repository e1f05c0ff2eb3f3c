"""Marked sections of generated Markdown files (docs/results.md, docs/benchmarks.md).

Several writers share one file, each owning the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
(e.g. ``paper-tables`` from bench/paper_tables.py, ``experiment-fusion`` from ``fedfusion experiment fusion``,
``dp-overhead``/``scale``/``round-overhead`` in docs/benchmarks.md). Writing a section replaces only its own
text and keeps everything else byte for byte; a section not yet in the file is appended (after an optional
heading), so writers never clobber each other.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
from pathlib import Path

from models.atomic import atomic_write_text

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of section ``name`` (lower-case letters, digits, ``.``, ``_``, ``-``).

    Raises:
        ValueError: for a name that would make an ambiguous marker.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"section name {name!r} must be lower-case letters, digits, '.', '_' or '-'")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def read_section(path: str | os.PathLike[str], name: str) -> str | None:
    """The text between the markers of ``name`` in ``path`` (without the markers), or None if absent."""
    p = Path(path)
    if not p.exists():
        return None
    start, end = markers(name)
    text = p.read_text(encoding="utf-8")
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def write_section(
    path: str | os.PathLike[str],
    name: str,
    body: str,
    *,
    heading: str | None = None,
    new_file_title: str = "# fedfusion results",
) -> Path:
    """Create or replace section ``name`` of ``path`` with ``body`` (Markdown without the markers).

    Args:
        path: the Markdown file (created with ``new_file_title`` when missing).
        name: section name (see :func:`markers`).
        body: the section's text; markers inside it are stripped so a caller may pass a pre-marked block.
        heading: a line put before the start marker when the section is appended (ignored on replace, so a
            hand-edited heading stays).
        new_file_title: first line of a file that does not exist yet.

    Returns:
        the path written. The write is atomic (temporary file + rename) so a concurrent reader never sees half.
    """
    start, end = markers(name)
    body = body.replace(start, "").replace(end, "").strip("\n")
    block = f"{start}\n{body}\n{end}"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # Experiments run concurrently: serialise read-modify-write so no writer loses another's section.
    digest = hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"fedfusion-md-{digest}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = p.read_text(encoding="utf-8") if p.exists() else new_file_title.rstrip("\n") + "\n"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            tail = rest.split(end, 1)[1]
            text = head + block + tail
        else:
            text = text.rstrip("\n") + "\n\n" + (heading.rstrip("\n") + "\n\n" if heading else "") + block + "\n"
        atomic_write_text(p, text)
    return p
