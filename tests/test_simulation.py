"""A real federated simulation: the ServerApp and ClientApp on Flower's simulation engine (Ray), with DP and
sites that miss modalities. Small enough for CI (2 rounds, 3 sites, tiny model)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest

from models.runlog import is_site_scope, iter_metrics

pytestmark = pytest.mark.slow

TINY = {
    "num-server-rounds": 2,
    "model-channels": "4,8",
    "model-spatial-size": "8,16,16",
    "model-modalities": "t1,t1ce,t2,flair,ct,us",
    "batch-size": 2,
    "local-epochs": 1,
    "lr": 0.003,
    "dp-enabled": True,
    "dp-target-epsilon": 8.0,
    "eval-batch-size": 4,
}


def test_three_site_dp_simulation_with_missing_modalities(tmp_path: Path) -> None:
    from simulations.phantom_writers import generate
    from simulations.simulate import simulate

    data = tmp_path / "data"
    generate(data, sites=3, cases_per_site=5, seed=3, scenario="modality-skew", shape=(8, 16, 16), fmt="nifti",
             heldout_cases=4)
    result = simulate(tmp_path / "run", data=data, overrides=TINY, progress=False, report=True)

    records = list(iter_metrics(tmp_path / "run" / "metrics.jsonl"))
    server_rounds = sorted({r["round"] for r in records if r["phase"] == "server-eval"})
    assert server_rounds[-2:] == [1, 2]

    # Every site trained in both rounds, spent privacy that grows, and told the server what it has.
    eps: dict[str, dict[int, float]] = defaultdict(dict)
    has: dict[str, dict[str, float]] = defaultdict(dict)
    for r in records:
        if r["phase"] == "train" and is_site_scope(r["scope"]):
            if r["metric"] == "epsilon-total":
                eps[r["scope"]][r["round"]] = r["value"]
            if r["metric"].startswith("has-"):
                has[r["scope"]][r["metric"][4:]] = r["value"]
    assert len(eps) == 3
    for site, per_round in eps.items():
        assert 0 < per_round[1] < per_round[2], site
    availability = {tuple(sorted(m for m, v in h.items() if v)) for h in has.values()}
    assert len(availability) == 3, "modality-skew sites should have differing modality sets"
    assert all(len(a) < 6 for a in availability)

    # The per-subset table was logged for every evaluated round (63 subsets + all/mean/worst).
    final = {r["metric"] for r in records if r["phase"] == "server-eval" and r["round"] == 2}
    assert "t1+ct/dice-whole" in final and "worst/dice-whole" in final and "mean/accuracy" in final

    assert result.report is not None and result.report.is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    # Ray is shut down: no worker process of ours survives the run.
    import ray

    assert not ray.is_initialized()
    from common.processes import descendants

    leftovers = [p for p in descendants(os.getpid()) if Path(f"/proc/{p}/cmdline").exists()
                 and b"ray" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert leftovers == []
