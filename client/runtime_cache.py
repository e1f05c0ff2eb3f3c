"""A bounded, least-recently-used cache for what a site process keeps between messages (:mod:`client.runtime`).

A simulation's Ray worker serves many virtual sites, and a site lands on whichever worker is free, so every worker
would end up keeping the dataset, network and Opacus engine of every site it ever served (memory growing with the
number of sites). The caches weigh what they hold (:func:`dataset_bytes`, :func:`runtime_bytes`: the preprocessed
arrays, the parameters with their gradients, optimizer moments and, under DP, per-case gradients) and keep at
most :func:`budget` bytes each, dropping the least recently used entries beyond it (always keeping the newest). A
dropped site simply builds again on its next message, from the on-disk preprocessed cache and the in-process noise
memo: a fraction of a second. A deployed site serves one site, so the bound only matters when one process serves
several run configurations.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["DEFAULT_BUDGET_MB", "ENV", "LRUCache", "budget", "dataset_bytes", "runtime_bytes"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Environment variable with the MiB each cache may hold (a positive number).
ENV = "FEDFUSION_SITE_CACHE_MB"
#: MiB each cache holds without :data:`ENV` (e.g. ~25 sites of the demo's 24 cases, every site of bench/scale.py).
DEFAULT_BUDGET_MB = 512.0


def budget() -> int:
    """Bytes each site cache may hold: :data:`ENV` MiB if set, else :data:`DEFAULT_BUDGET_MB`.

    Raises:
        ValueError: :data:`ENV` is not a positive number (naming it and what to set).
    """
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return int(DEFAULT_BUDGET_MB * 2**20)
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{ENV}={raw!r}: set it to the MiB of site runtimes a process may keep (e.g. 512)")
    return int(value * 2**20)


def dataset_bytes(dataset: Any) -> int:
    """Bytes of a :class:`common.data.CaseDataset`'s cached items: per case the float32 image (M, *S), the float32
    mask (M,) and the int64 segmentation (*S)."""
    voxels = math.prod(int(s) for s in dataset.spatial_size)
    m = len(dataset.modalities)
    return len(dataset) * (4 * m * voxels + 4 * m + 8 * voxels)


def runtime_bytes(rt: Any) -> int:
    """Bytes a :class:`client.runtime.SiteRuntime` keeps: its dataset, and its parameters four times (weights,
    gradients, two Adam moments) plus, under DP, once per case of a batch (Opacus's per-case gradients)."""
    params = sum(p.numel() * p.element_size() for p in rt.model.parameters())
    per_case = int(rt.train.batch_size) if rt.dp_request.enabled else 0
    return dataset_bytes(rt.dataset) + params * (4 + per_case)


class LRUCache(Generic[K, V]):
    """A mapping that keeps its most recently used entries while their summed ``weigh`` stays within ``capacity``
    (``None``: :func:`budget`, read at every insertion so that a worker can set :data:`ENV` after import); the
    newest entry is always kept. Not thread-safe: callers lock."""

    def __init__(self, capacity: int | None = None, weigh: Callable[[V], int] = lambda _v: 1) -> None:
        self._capacity = capacity
        self._weigh = weigh
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    @property
    def weight(self) -> int:
        """Summed weight of the entries held."""
        return sum(w for _, w in self._data.values())

    def __getitem__(self, key: K) -> V:
        value, _ = self._data[key]
        self._data.move_to_end(key)
        return value

    def values(self) -> list[V]:
        """The cached values, least recently used first (does not touch their recency)."""
        return [value for value, _ in self._data.values()]

    def get(self, key: K, default: V | None = None) -> V | None:
        return self[key] if key in self._data else default

    def __setitem__(self, key: K, value: V) -> None:
        self._data[key] = (value, int(self._weigh(value)))
        self._data.move_to_end(key)
        limit = self._capacity if self._capacity is not None else budget()
        while len(self._data) > 1 and self.weight > limit:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()
