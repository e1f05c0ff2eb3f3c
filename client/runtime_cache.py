"""A bounded, least-recently-used cache for what a site process keeps between messages (:mod:`client.runtime`).

A simulation's Ray worker serves many virtual sites, and a site lands on whichever worker is free, so every worker
would end up keeping the dataset, network and Opacus engine of every site it ever served (memory growing with the
number of sites). The caches hold at most :func:`capacity` entries each and drop the least recently used one
beyond it; a dropped site simply builds again on its next message (from the on-disk preprocessed cache and the
in-process noise memo: a fraction of a second). A deployed site serves one site, so the bound only matters when
one process serves several run configurations.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["DEFAULT_CAPACITY", "ENV", "LRUCache", "capacity"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Environment variable with the number of entries each cache keeps (a positive integer).
ENV = "FEDFUSION_SITE_RUNTIMES"
#: Entries kept without :data:`ENV`.
DEFAULT_CAPACITY = 8


def capacity() -> int:
    """The entries each site cache keeps: :data:`ENV` if set, else :data:`DEFAULT_CAPACITY`.

    Raises:
        ValueError: :data:`ENV` is not a positive integer (naming it and what to set).
    """
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_CAPACITY
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV}={raw!r}: set it to a positive number of site runtimes a process keeps (e.g. 8)")
    return value


class LRUCache(Generic[K, V]):
    """A mapping that keeps its ``capacity`` most recently used entries (``None``: read :func:`capacity` at every
    insertion, so a test or a worker can set :data:`ENV` after import). Not thread-safe: callers lock."""

    def __init__(self, capacity_: int | None = None) -> None:
        self._capacity = capacity_
        self._data: OrderedDict[K, V] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, key: K) -> V:
        value = self._data[key]
        self._data.move_to_end(key)
        return value

    def get(self, key: K, default: V | None = None) -> V | None:
        return self[key] if key in self._data else default

    def __setitem__(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        limit = self._capacity if self._capacity is not None else capacity()
        while len(self._data) > limit:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()
