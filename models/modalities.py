"""The one modality list of fedfusion.

Every tensor axis ``M``, availability mask, parameter owner and per-modality metric uses this order.
A run may use a subset; a subset is always kept in this canonical order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import combinations

#: Canonical modality order: MRI T1, contrast-enhanced T1, T2, FLAIR, CT, ultrasound.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair", "ct", "us")

#: DICOM ``Modality`` tag value each modality is acquired with.
DICOM_MODALITY: dict[str, str] = {
    "t1": "MR",
    "t1ce": "MR",
    "t2": "MR",
    "flair": "MR",
    "ct": "CT",
    "us": "US",
}


def canonical(modalities: Iterable[str]) -> tuple[str, ...]:
    """Return ``modalities`` validated, de-duplicated and sorted into canonical order.

    Raises:
        ValueError: naming any unknown modality and listing the known ones.
    """
    wanted = [m.strip().lower() for m in modalities]
    unknown = [m for m in wanted if m not in MODALITIES]
    if unknown:
        raise ValueError(
            f"unknown modality {', '.join(repr(u) for u in unknown)}; "
            f"known modalities are {', '.join(MODALITIES)}"
        )
    if not wanted:
        raise ValueError(f"at least one modality is needed; choose from {', '.join(MODALITIES)}")
    return tuple(m for m in MODALITIES if m in set(wanted))


def subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """All ``2**M - 1`` non-empty subsets of ``modalities``, smallest first, each in canonical order."""
    mods = canonical(modalities)
    return [c for k in range(1, len(mods) + 1) for c in combinations(mods, k)]


def subset_name(subset: Sequence[str]) -> str:
    """Stable display/metric name of a modality subset, e.g. ``t1+t2+ct``."""
    return "+".join(canonical(subset))


def owner_modality(param_name: str) -> str | None:
    """The modality that owns a parameter, read from its name alone, or ``None`` if it is shared.

    Contract (docs/architecture.md, "Parameter ownership"): a parameter belongs to modality ``m`` iff one component of its dotted
    name equals ``m`` (e.g. ``encoders.t1ce.blocks.0.conv.weight``). Shared parts (fusion core, decoder,
    classifier) never use a modality name as a module name. Opacus's ``_module.`` prefix is ignored.
    """
    for part in param_name.split("."):
        if part in MODALITIES:
            return part
    return None
