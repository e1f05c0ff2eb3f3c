"""The preprocessed-case cache is rebuilt when, and only when, its inputs change.

Inputs of a case's entry (``common.data.dataset.CaseDataset._cache_key``): the case's files (names, sizes, mtimes),
the run config's model modalities and spatial size, the series mapping, the segmentation requirement, the salt
keying patient identifiers and the site's label convention. Everything else of a run config (learning rate, DP,
rounds...) must not rebuild anything, and a change of one case rebuilds that case only. Also: simulated sites keep
the cache once per data set (``DATA/.fedfusion-cache``), shared by every run over it; a deployed site in its state
directory, built by ``fedfusion site`` at start-up (:func:`client.prepare.warm_site_cache`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import common.data.dataset as dataset_module
from client.runtime import clear_cache, get_runtime
from common.data import CaseDataset
from common.layout import DERIVED_CACHE
from tests.client_helpers import TINY, make_phantoms, run_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("phantoms") / "data", sites=2, cases=3, scenario="iid", fmt="nifti")


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Case folders preprocessed (not read from the cache) since the test started."""
    seen: list[str] = []
    original = dataset_module.CaseDataset._load_arrays
    real_preprocess = dataset_module.preprocess_case

    def load_arrays(self: CaseDataset, case_dir: Path, report: bool = True, has_label: bool = True) -> dict:
        def counting(*args: object, **kwargs: object) -> dict:
            seen.append(case_dir.name)
            return real_preprocess(*args, **kwargs)

        monkeypatch.setattr(dataset_module, "preprocess_case", counting)
        try:
            return original(self, case_dir, report, has_label)
        finally:
            monkeypatch.setattr(dataset_module, "preprocess_case", real_preprocess)

    monkeypatch.setattr(dataset_module.CaseDataset, "_load_arrays", load_arrays)
    return seen


def _dataset(site: Path, cache: Path, **changes: object) -> CaseDataset:
    kwargs: dict[str, object] = dict(modalities=TINY.modalities, spatial_size=TINY.spatial_size, cache_dir=cache,
                                     patient_salt=b"salt")
    kwargs.update(changes)
    return CaseDataset([site], **kwargs)  # type: ignore[arg-type]


def test_rebuilt_when_and_only_when_inputs_change(phantoms: Path, tmp_path: Path, builds: list[str]) -> None:
    site, cache = phantoms / "site-01", tmp_path / "cache"
    cases = sorted(c.name for c in site.iterdir() if c.is_dir())
    first = _dataset(site, cache)
    assert sorted(builds) == cases and len(list(cache.glob("*.npz"))) == len(cases)

    builds.clear()
    again = _dataset(site, cache)  # same inputs: nothing rebuilt, same arrays
    assert builds == []
    assert all((first[i]["image"] == again[i]["image"]).all() for i in range(len(first)))

    other_size = (8, 8, 8)
    _dataset(site, cache, spatial_size=other_size)  # a model input size: every case, once
    assert sorted(builds) == cases
    builds.clear()
    _dataset(site, cache)  # ... and the first size is still cached beside it
    _dataset(site, cache, spatial_size=other_size)
    assert builds == []

    _dataset(site, cache, modalities=TINY.modalities[:2])  # other modalities: every case
    assert sorted(builds) == cases
    builds.clear()
    _dataset(site, cache, patient_salt=b"another salt")  # other patient keys: every case
    assert sorted(builds) == cases
    builds.clear()

    # one case's file changes (new mtime): that case only
    changed = next(p for p in (site / cases[1]).iterdir() if p.is_file())
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _dataset(site, cache)
    assert builds == [cases[1]]


def test_a_run_config_change_rebuilds_only_what_it_changes(phantoms: Path, tmp_path: Path, builds: list[str]) -> None:
    """Through the site's runtime: learning rate, DP and rounds reuse the cache; a new spatial size builds it."""
    node = {"data-dir": str(phantoms / "site-02"), "state-dir": str(tmp_path / "state")}
    clear_cache()
    get_runtime(node, run_config())
    assert len(builds) == 3
    builds.clear()
    clear_cache()  # a fresh process: only the on-disk cache is left
    get_runtime(node, run_config(lr=0.5, **{"dp-noise-multiplier": 2.0, "num-server-rounds": 7, "local-epochs": 2}))
    assert builds == []
    clear_cache()
    get_runtime(node, run_config(**{"model-spatial-size": "8,8,8"}))
    assert len(builds) == 3
    assert (tmp_path / "state" / "preprocessed").is_dir()  # a deployed site: in its own state directory
    clear_cache()


def test_simulated_sites_build_once_per_data_set(phantoms: Path, tmp_path: Path, builds: list[str]) -> None:
    """Two simulation runs over the same phantoms: the second preprocesses nothing (the cache is the data set's,
    not the run's), while each run keeps its own site state."""
    clear_cache()
    for run in ("run-a", "run-b"):
        rc = run_config(**{"data-dir": str(phantoms), "run-dir": str(tmp_path / run)})
        for partition in (0, 1):
            get_runtime({"partition-id": partition, "num-partitions": 2}, rc)
        clear_cache()
        if run == "run-a":
            assert len(builds) == 6
            builds.clear()
    assert builds == []
    shared = phantoms / DERIVED_CACHE
    assert sorted(p.name for p in shared.iterdir()) == ["site-01", "site-02"]
    assert (shared / "site-01" / "preprocessed").is_dir() and (shared / "site-01" / "site-salt").is_file()
    for run in ("run-a", "run-b"):  # the privacy state stays per run
        assert (tmp_path / run / "site-state" / "site-01" / "site-salt").is_file()


def test_regenerated_phantoms_drop_the_old_cache(tmp_path: Path) -> None:
    from simulations.phantom_writers import generate

    data = make_phantoms(tmp_path / "data", sites=1, cases=2, scenario="iid", fmt="nifti")
    (data / DERIVED_CACHE / "site-01").mkdir(parents=True)
    generate(data, sites=1, cases_per_site=2, seed=4, scenario="iid", shape=(16, 32, 32), fmt="nifti",
             heldout_cases=0, overwrite=True)
    assert not (data / DERIVED_CACHE).exists()
