"""Site-side differential privacy: persistent accountant, site policy, Opacus wiring.

The names below load their module on first use: the SuperNode's app guard (:mod:`client.supernode_guard`) reads the
site policy without importing torch and Opacus (Opacus configures the root logger at import).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ACCOUNTANT_FILE": "accountant",
    "PersistentAccountant": "accountant",
    "epsilon_of": "accountant",
    "PolicyRefusal": "policy",
    "SitePolicy": "policy",
    "read_policy_file": "policy",
    "write_policy_file": "policy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
