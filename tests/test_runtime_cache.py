"""A process keeps site runtimes within a memory budget (client/runtime_cache.py): a simulation worker serves many
virtual sites, and memory must not grow with how many it has served."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import runtime
from client.runtime_cache import ENV, LRUCache, budget, dataset_bytes, runtime_bytes
from tests.client_helpers import make_phantoms, run_config


def test_least_recently_used_entries_go_first(monkeypatch: pytest.MonkeyPatch) -> None:
    cache: LRUCache[str, int] = LRUCache(2)
    cache["a"], cache["b"] = 1, 2
    assert cache["a"] == 1  # "a" is now the most recent
    cache["c"] = 3
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    assert cache.get("b") is None and cache.get("b", 0) == 0

    heavy: LRUCache[str, int] = LRUCache(10, weigh=lambda v: v)  # by weight; the newest always stays
    heavy["x"], heavy["y"] = 4, 5
    heavy["z"] = 20
    assert list(heavy._data) == ["z"] and heavy.weight == 20

    monkeypatch.setenv(ENV, "1")  # MiB, read at every insertion
    lazy: LRUCache[str, int] = LRUCache(weigh=lambda v: v)
    lazy["x"], lazy["y"] = 2**19, 2**19
    assert len(lazy) == 2
    lazy["w"] = 1
    assert "x" not in lazy and len(lazy) == 2
    for bad in ("0", "-3", "many", "nan"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            budget()
    monkeypatch.delenv(ENV)
    assert budget() >= 2**20


def test_a_worker_keeps_sites_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_phantoms(tmp_path / "data", sites=3, cases=2, scenario="iid", fmt="nifti")
    runtime.clear_cache()
    rc = run_config(**{"data-dir": str(data), "run-dir": str(tmp_path / "run")})
    first, _ = runtime.get_runtime({"partition-id": 0, "num-partitions": 3}, rc)
    one = runtime_bytes(first)
    params = sum(p.numel() * 4 for p in first.model.parameters())
    assert dataset_bytes(first.dataset) == 2 * (4 * 6 * 8 * 16 * 16 + 4 * 6 + 8 * 8 * 16 * 16)
    assert one == dataset_bytes(first.dataset) + params * (4 + 2)  # DP: per-case gradients of a batch of 2
    runtime.clear_cache()
    monkeypatch.setenv(ENV, str(2.5 * one / 2**20))  # room for two sites
    built = [runtime.get_runtime({"partition-id": i, "num-partitions": 3}, rc)[0] for i in range(3)]
    assert len(runtime._RUNTIMES) == 2 and runtime._RUNTIMES.weight <= 2.5 * one
    # the dropped site builds again (from the on-disk cache) and answers as before
    again, _ = runtime.get_runtime({"partition-id": 0, "num-partitions": 3}, rc)
    assert again is not built[0] and again.num_cases == built[0].num_cases
    runtime.clear_cache()
