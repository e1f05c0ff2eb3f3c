"""A process keeps a bounded number of site runtimes (client/runtime_cache.py): a simulation worker serves many
virtual sites, and memory must not grow with how many it has served."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import runtime
from client.runtime_cache import ENV, LRUCache, capacity
from tests.client_helpers import make_phantoms, run_config


def test_least_recently_used_entries_go_first(monkeypatch: pytest.MonkeyPatch) -> None:
    cache: LRUCache[str, int] = LRUCache(2)
    cache["a"], cache["b"] = 1, 2
    assert cache["a"] == 1  # "a" is now the most recent
    cache["c"] = 3
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    assert cache.get("b") is None and cache.get("b", 0) == 0

    monkeypatch.setenv(ENV, "1")
    lazy: LRUCache[str, int] = LRUCache()  # reads the variable at every insertion
    lazy["x"], lazy["y"] = 1, 2
    assert len(lazy) == 1 and "y" in lazy
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            capacity()
    monkeypatch.delenv(ENV)
    assert capacity() >= 1


def test_a_worker_keeps_at_most_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_phantoms(tmp_path / "data", sites=3, cases=2, scenario="iid", fmt="nifti")
    monkeypatch.setenv(ENV, "2")
    runtime.clear_cache()
    rc = run_config(**{"data-dir": str(data), "run-dir": str(tmp_path / "run")})
    built = [runtime.get_runtime({"partition-id": i, "num-partitions": 3}, rc)[0] for i in range(3)]
    assert len(runtime._RUNTIMES) == 2 and len(runtime._DATASETS) == 2
    # the dropped site builds again (from the on-disk cache) and answers as before
    again, _ = runtime.get_runtime({"partition-id": 0, "num-partitions": 3}, rc)
    assert again is not built[0] and again.num_cases == built[0].num_cases
    runtime.clear_cache()
