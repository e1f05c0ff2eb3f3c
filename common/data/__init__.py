"""Site data readers: DICOM/NIfTI studies of a hospital site -> training tensors (no header data leaves).

Public API (imported lazily so ``import common.data`` stays light):

- :class:`common.data.dataset.CaseDataset` — torch Dataset over one or more sites (items: image, mask, seg,
  label, case_id).
- :func:`common.data.site.load_case` — one case folder -> all modalities on one reference grid.
- :func:`common.data.site.discover_sites` — a site folder or a data root -> its sites (heldout/ flagged).
- :func:`common.data.inspect.inspect_data` — problem report of a site or data root (``fedfusion inspect``).
- :func:`common.data.series_mapping.load_series_mapping` — SeriesDescription -> modality rules.
- :class:`common.data.limits.ReaderLimits` — what one file, series and case folder may cost the readers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CaseDataset": "dataset",
    "preprocess_case": "dataset",
    "load_case": "site",
    "scan_case": "site",
    "discover_sites": "site",
    "read_labels": "site",
    "list_cases": "site",
    "SiteDir": "site",
    "CaseData": "site",
    "CaseError": "site",
    "inspect_data": "inspect",
    "InspectReport": "inspect",
    "load_series_mapping": "series_mapping",
    "SeriesMapping": "series_mapping",
    "Problem": "problems",
    "ReaderLimits": "limits",
    "DEFAULT_LIMITS": "limits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
