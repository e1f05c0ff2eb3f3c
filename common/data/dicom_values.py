"""Typed, validated access to DICOM header values: a bad value raises :class:`BadHeaderValue` naming the element.

pydicom (in its default "warn" validation mode) hands an invalid IS/DS value such as ``'1A'`` back as a plain
string, and decoding some malformed elements raises on access. The readers use these helpers for every value they
need, so a hostile or broken value is always one ``bad-header-value`` problem for that one file, never an exception
escaping into the case or a value silently replaced by a default (an absent element still gets its default).
"""

from __future__ import annotations

import math
from typing import Any

#: Longest rendering of an offending value in a message (values can be megabytes long).
_SHOWN_CHARS = 40


class BadHeaderValue(ValueError):
    """An element whose value cannot be used.

    Attributes:
        keyword: the DICOM keyword (e.g. ``NumberOfFrames``).
    """

    def __init__(self, keyword: str, value: object, expected: str) -> None:
        shown = repr(value)
        if len(shown) > _SHOWN_CHARS:
            shown = f"{shown[:_SHOWN_CHARS]}... ({len(shown)} characters)"
        super().__init__(f"header element {keyword} = {shown} is not {expected}")
        self.keyword = keyword


def header_value(ds: Any, keyword: str) -> Any | None:
    """The raw value of ``keyword`` in ``ds`` (a Dataset or sequence item), or ``None`` when absent or empty."""
    if ds is None:
        return None
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom raises while decoding some malformed elements
        raise BadHeaderValue(keyword, "(undecodable)", f"decodable ({exc})") from exc
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        return value if value.strip() else None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value if len(value) else None
    return value


def header_int(ds: Any, keyword: str, default: int, minimum: int | None = None) -> int:
    """``keyword`` as an integer (``default`` when absent); raises :class:`BadHeaderValue` when invalid or below
    ``minimum``."""
    value = header_value(ds, keyword)
    if value is None:
        return default
    try:
        if isinstance(value, bool):
            raise TypeError("a boolean")
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError("not an integer")
        out = int(number)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadHeaderValue(keyword, value, "an integer") from exc
    if minimum is not None and out < minimum:
        raise BadHeaderValue(keyword, value, f"an integer >= {minimum}")
    return out


def header_float(ds: Any, keyword: str, positive: bool = False) -> float | None:
    """``keyword`` as a finite float (``None`` when absent); raises :class:`BadHeaderValue` when invalid (or, with
    ``positive``, not above zero)."""
    value = header_value(ds, keyword)
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadHeaderValue(keyword, value, "a number") from exc
    if not math.isfinite(out):
        raise BadHeaderValue(keyword, value, "a finite number")
    if positive and out <= 0:
        raise BadHeaderValue(keyword, value, "a number above zero")
    return out


def header_floats(ds: Any, keyword: str, count: int, positive: bool = False) -> list[float] | None:
    """``keyword`` as exactly ``count`` finite floats (``None`` when absent); raises :class:`BadHeaderValue`
    otherwise (or, with ``positive``, when one is not above zero)."""
    value = header_value(ds, keyword)
    if value is None:
        return None
    items = [value] if isinstance(value, (str, bytes, int, float)) else value
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadHeaderValue(keyword, value, f"{count} numbers") from exc
    if len(out) != count or not all(math.isfinite(v) for v in out):
        raise BadHeaderValue(keyword, value, f"{count} finite numbers")
    if positive and not all(v > 0 for v in out):
        raise BadHeaderValue(keyword, value, f"{count} numbers above zero")
    return out


def header_orientation(ds: Any, keyword: str = "ImageOrientationPatient") -> list[float] | None:
    """ImageOrientationPatient as 6 floats (``None`` when absent): two direction cosines that must be (nearly) unit
    length and perpendicular, else :class:`BadHeaderValue` (a degenerate orientation makes a singular affine)."""
    values = header_floats(ds, keyword, 6)
    if values is None:
        return None
    row, col = values[:3], values[3:]
    norms = (math.sqrt(sum(v * v for v in row)), math.sqrt(sum(v * v for v in col)))
    dot = sum(a * b for a, b in zip(row, col))
    if not all(0.9 < n < 1.1 for n in norms) or abs(dot) > 0.1:
        raise BadHeaderValue(keyword, values, "two perpendicular unit vectors")
    return values
