"""Which fedfusion modality a DICOM series is: the ``Modality`` tag plus SeriesDescription patterns.

A site's protocol names differ from vendor to vendor and hospital to hospital ("AX T1 POST GD", "t1_mprage_tra",
"FLAIR_DARK-FLUID"), so MR series are recognised by case-insensitive regular expressions over the
SeriesDescription (falling back to ProtocolName when the description is empty). CT and US series are recognised by
their ``Modality`` tag. A site adds or overrides patterns in a small JSON or TOML file; its rules are checked
before the defaults, in file order::

    # series-map.toml
    t1ce = ["AX T1 BRAVO POST", "T1_KM"]     # modality = regex or list of regexes
    flair = "T2_DARKFL"
    ignore = ["DWI", "ADC", "perfusion"]      # series to skip silently (not reported as unknown)

``ignore`` is the one target besides :data:`models.modalities.MODALITIES`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from models.modalities import MODALITIES

#: Target meaning "a known series that fedfusion does not use" (localisers, diffusion, ...).
IGNORE = "ignore"

#: Default MR SeriesDescription rules, checked in this order (first match wins). FLAIR and T2 come before the
#: contrast rule so "FLAIR post gd" stays FLAIR; the contrast rule comes before plain T1.
DEFAULT_MR_PATTERNS: tuple[tuple[str, str], ...] = (
    (IGNORE, r"locali[sz]er|scout|survey|3.?plane|calibration|\bcal\b"),
    ("flair", r"FLAIR|DARK.?FLUID|\bT2F\b|t2_?fl"),
    ("t2", r"T2(?!.*FLAIR)"),
    ("t1ce", r"post(?!erior)|\bgd\b|gad|\+c\b|\+gd|contrast|t1ce|\bt1c\b|t1_?km|\bce\b"),
    ("t1", r"MPRAGE|T1.*(SE|GRE|FLASH)|(?<![a-z0-9])T1(?![0-9])|SPGR|BRAVO|MP.?RAGE"),
)

#: ``Modality`` tag values that identify a fedfusion modality without looking at the description.
MODALITY_TAGS: dict[str, str] = {"CT": "ct", "US": "us"}

MappingSource = Union["SeriesMapping", Mapping[str, Any], str, os.PathLike[str], None]


@dataclass(frozen=True)
class SeriesMapping:
    """Ordered SeriesDescription rules: user rules first (they take precedence), then the defaults.

    Attributes:
        user_rules: ``(compiled regex, target)`` pairs from the site's config, in file order.
        default_rules: the built-in MR rules (:data:`DEFAULT_MR_PATTERNS`).
    """

    user_rules: tuple[tuple[re.Pattern[str], str], ...] = ()
    default_rules: tuple[tuple[re.Pattern[str], str], ...] = ()

    @classmethod
    def default(cls) -> "SeriesMapping":
        return cls((), _compile(DEFAULT_MR_PATTERNS, "default series mapping"))

    def identify(self, modality_tag: str | None, description: str | None) -> str | None:
        """The fedfusion modality of one series, :data:`IGNORE`, or ``None`` when it cannot be mapped.

        Args:
            modality_tag: the DICOM ``Modality`` value (e.g. ``MR``, ``CT``, ``US``).
            description: SeriesDescription (or ProtocolName when that is empty).
        """
        text = (description or "").strip()
        tag = (modality_tag or "").strip().upper()
        if text:
            for pattern, target in self.user_rules:
                if pattern.search(text):
                    return target
        if tag in MODALITY_TAGS:
            return MODALITY_TAGS[tag]
        if text and tag in ("MR", ""):
            for pattern, target in self.default_rules:
                if pattern.search(text):
                    return target
        return None

    def fingerprint(self) -> str:
        """Short stable hash of all rules (part of the on-disk cache key)."""
        text = json.dumps([(p.pattern, t) for p, t in (*self.user_rules, *self.default_rules)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compile(pairs: Iterable[tuple[str, str]], where: str) -> tuple[tuple[re.Pattern[str], str], ...]:
    out = []
    for target, pattern in pairs:
        target = str(target).strip().lower()
        if target not in MODALITIES and target != IGNORE:
            raise ValueError(
                f"{where}: unknown modality {target!r}; use one of {', '.join(MODALITIES)} or {IGNORE!r}"
            )
        try:
            out.append((re.compile(str(pattern), re.IGNORECASE), target))
        except re.error as exc:
            raise ValueError(f"{where}: invalid regular expression {pattern!r} for {target}: {exc}") from exc
    return tuple(out)


def _pairs_from_mapping(data: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    # A nested table (e.g. [series-map] in a larger TOML) is accepted too.
    for key in ("series-map", "series_map", "series-mapping"):
        if key in data and isinstance(data[key], Mapping):
            data = data[key]
            break
    pairs: list[tuple[str, str]] = []
    for target, value in data.items():
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(
                f"{where}: value for {target!r} must be a regex string or a list of regex strings, got {value!r}"
            )
        pairs.extend((target, p) for p in patterns)
    return pairs


def load_series_mapping(source: MappingSource = None) -> SeriesMapping:
    """Build the mapping from defaults plus an optional user config.

    Args:
        source: ``None`` (defaults only), a :class:`SeriesMapping` (returned as is), a dict
            ``{modality: regex | [regex, ...]}``, or the path of a ``.json`` / ``.toml`` file holding that dict.

    Raises:
        ValueError: naming the file and the bad entry (unknown modality, invalid regex, unreadable file).
    """
    if isinstance(source, SeriesMapping):
        return source
    defaults = SeriesMapping.default()
    if source is None:
        return defaults
    if isinstance(source, Mapping):
        where = "series mapping"
        data: Mapping[str, Any] = source
    else:
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"series mapping file {path} cannot be read: {exc}") from exc
        try:
            if path.suffix.lower() == ".toml":
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(
                f"series mapping file {path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: "
                f"{exc}; expected {{modality: regex or [regex, ...]}}"
            ) from exc
        if not isinstance(data, Mapping):
            raise ValueError(f"series mapping file {path} must hold an object {{modality: regex or [regex, ...]}}")
    return SeriesMapping(_compile(_pairs_from_mapping(data, where), where), defaults.default_rules)
