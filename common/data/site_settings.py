"""What a site states about its own data: the optional ``fedfusion-site.toml`` in the site folder.

```toml
# SITE/fedfusion-site.toml
convention = "brats2023"   # label convention of every case (common.data.conventions.CONVENTIONS);
                           # absent: each case's convention is recognised from its file names
```

The file belongs to the site's data, next to ``labels.csv``: the readers (training, held-out evaluation and
``fedfusion inspect``) all read it, in simulation and in deployment alike. It is deliberately not a run-config key:
the run config comes from the server, and what a site's label values mean is the site's knowledge, not the
server's. An unreadable or invalid file is reported for every case of the site (nothing is read on a guess).
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from common.layout import SITE_SETTINGS_FILE

from .case_files import is_inside
from .conventions import CONVENTIONS, Convention, get_convention

#: Largest settings file read (a few lines are expected; a huge file is a mistake or hostile).
MAX_SETTINGS_BYTES = 64 * 1024
#: Keys the file may hold (anything else is a typo worth reporting).
SETTINGS_KEYS: dict[str, str] = {"convention": f"label convention, one of {', '.join(CONVENTIONS)}"}


@dataclass(frozen=True)
class SiteSettings:
    """A site's stated settings: ``convention`` is ``None`` when the site states none (recognise from names)."""

    convention: Convention | None = None


def _settings_bytes(site_dir: Path) -> bytes | None:
    """The settings file's bytes, ``None`` when there is none; ValueError when it is not safe to read."""
    path = Path(site_dir) / SITE_SETTINGS_FILE
    if not os.path.lexists(path):
        return None
    real = os.path.realpath(path)
    if not is_inside(real, os.path.realpath(site_dir)) or not os.path.isfile(real):
        raise ValueError(f"{path} leads to {real}, not a file inside the site folder; make it a plain file")
    if os.path.getsize(real) > MAX_SETTINGS_BYTES:
        raise ValueError(f"{path} is over {MAX_SETTINGS_BYTES} bytes; it should hold a few 'key = value' lines")
    with open(real, "rb") as fh:
        return fh.read(MAX_SETTINGS_BYTES + 1)


def read_site_settings(site_dir: Path) -> SiteSettings:
    """Read ``SITE/fedfusion-site.toml`` (defaults when there is none).

    Raises:
        ValueError: naming the file and what is wrong (not TOML, an unknown key, an unknown convention).
    """
    raw = _settings_bytes(Path(site_dir))
    if raw is None:
        return SiteSettings()
    path = Path(site_dir) / SITE_SETTINGS_FILE
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path} is not valid TOML ({exc}); write lines such as convention = \"brats2021\"") from exc
    unknown = sorted(set(data) - set(SETTINGS_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: "
                         + "; ".join(f"{k} ({v})" for k, v in SETTINGS_KEYS.items()))
    convention = None
    if "convention" in data:
        if not isinstance(data["convention"], str):
            raise ValueError(f"{path}: convention must be a string, one of {', '.join(CONVENTIONS)}")
        try:
            convention = get_convention(data["convention"])
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return SiteSettings(convention)


def site_settings_fingerprint(site_dir: Path) -> str:
    """Short hash of the site's settings file (``""`` when there is none or it cannot be read): part of cache keys,
    so a changed convention is never served from a cache built under the old one."""
    try:
        raw = _settings_bytes(Path(site_dir))
    except (ValueError, OSError):
        return "unreadable"
    return "" if raw is None else hashlib.sha256(raw).hexdigest()[:16]
