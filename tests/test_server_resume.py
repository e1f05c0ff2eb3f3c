"""Kill the real server process after round 2 of 4, resume it, and check no round is lost or doubled.

The server is the real :func:`server.server_app.run_server` (FedAdam, so optimiser state must survive the
restart) in a plain subprocess, with an in-process Grid whose sites are the lightweight stub below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from models.checkpoint import load_checkpoint
from models.runlog import iter_metrics
from tests.server_stubs import LocalGrid, eval_metrics, site_metrics, write_heldout
from common.runconfig import default_model_config, model_entries

PROJECT = Path(__file__).resolve().parents[1]
TINY = default_model_config(family="attention", modalities=("t1", "ct"), spatial_dims=3, spatial_size=(8, 16, 16),
                   channels=(4, 8))
SITES = {11: {"t1": 6, "ct": 6}, 12: {"t1": 4}, 13: {"ct": 5}}
TRAIN_SECONDS = 0.15  # a stub site's "training" time: long enough to kill the server mid-round


def stub_site(node_id: int, msg: Message) -> Message:
    """Returns the received arrays moved by a small deterministic step (per node and round), with metrics."""
    if msg.metadata.message_type.startswith("query"):  # prepare-sites before round 1 (server/prepare.py)
        return Message(content=RecordDict({"metrics": MetricRecord({"ready": 1.0, "can-evaluate": 1.0})}),
                       reply_to=msg)
    cfg = msg.content["config"]
    rnd = int(cfg["server-round"])
    if msg.metadata.message_type.startswith("evaluate"):
        return Message(content=RecordDict({"metrics": MetricRecord(eval_metrics(3, 0.1 * rnd))}), reply_to=msg)
    time.sleep(TRAIN_SECONDS)
    rng = np.random.default_rng(1000 * node_id + rnd)
    arrays = {}
    for k, v in msg.content["arrays"].items():
        a = v.numpy()
        if a.dtype.kind == "f":
            a = (a + 1e-3 * rng.standard_normal(a.shape)).astype(a.dtype)
        arrays[k] = torch.from_numpy(np.ascontiguousarray(a))
    metrics = site_metrics(sum(SITES[node_id].values()), SITES[node_id])
    # train-seconds carries the round the site saw (the server logs only known metric names)
    metrics.update({"train-seconds": float(rnd), "epsilon-total": 0.5 * rnd, "epsilon-round": 0.5, "delta": 1e-5})
    return Message(content=RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def run_config(run_dir: Path, heldout: Path, resume: str = "") -> dict:
    return {
        **model_entries(TINY),
        "num-server-rounds": 4, "strategy": "fedadam", "aggregation": "modality-aware",
        "min-train-nodes": 2, "min-evaluate-nodes": 2, "min-available-nodes": 3,
        "eval-every": 2, "best-metric": "dice-whole", "run-dir": str(run_dir), "test-dir": str(heldout),
        "resume": resume, "round-timeout": 60, "device": "cpu",
    }


def serve(config: dict) -> None:
    """Entry point of the server subprocess (also usable in-process)."""
    from server.server_app import run_server

    torch.set_num_threads(1)
    torch.manual_seed(0)
    grid = LocalGrid(sorted(SITES), stub_site)
    run_server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))


def _spawn(config: dict) -> subprocess.Popen:
    code = "import json, sys; from tests.test_server_resume import serve; serve(json.loads(sys.argv[1]))"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(config)], cwd=PROJECT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _last_round(run_dir: Path) -> int:
    try:
        return int(load_checkpoint(run_dir / "checkpoints" / "last.pt")[2]["round"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_killed_server_resumes_without_lost_or_doubled_rounds(tmp_path: Path) -> None:
    heldout = write_heldout(tmp_path / "heldout", TINY.modalities)
    run_dir = tmp_path / "run"
    proc = _spawn(run_config(run_dir, heldout))
    deadline = time.time() + 90
    try:
        while _last_round(run_dir) < 2:
            if proc.poll() is not None:
                pytest.fail(f"server exited early:\n{proc.stdout.read()}")
            if time.time() > deadline:
                pytest.fail("server did not complete round 2 in time")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-round 3: its sites are training
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    stopped_at = _last_round(run_dir)
    assert stopped_at in (2, 3)  # (3 only if round 3 finished before the kill landed)
    assert max(r["round"] for r in iter_metrics(run_dir / "metrics.jsonl")) <= 3

    resumed = _spawn(run_config(run_dir, heldout, resume=str(run_dir)))
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    assert f"resuming {run_dir} after round {stopped_at} of 4" in (run_dir / "server.log").read_text()

    state, _, extra = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert extra["round"] == 4
    assert extra["strategy_state"]["optimizer"]["class"] == "FedAdam"
    # every site's claims stay pinned from its first round across the restart
    pins = extra["strategy_state"]["claims"]["train"]
    assert {int(n): (p["round"], p["num-examples"]) for n, p in pins.items()} == {
        n: (1.0, float(sum(c.values()))) for n, c in SITES.items()}
    records = list(iter_metrics(run_dir / "metrics.jsonl"))
    # each (round, phase, scope, metric) exactly once, and every round 1..4 present
    dup = [k for k, n in Counter((r["round"], r["phase"], r["scope"], r["metric"]) for r in records).items() if n > 1]
    assert not dup, dup[:5]
    for phase, metric, expected in (("train", "sites-accepted", [1, 2, 3, 4]), ("site-eval", "dice-whole", [1, 2, 3, 4]),
                                    ("server-eval", "all/dice-whole", [2, 4])):  # eval-every = 2
        rounds = sorted(r["round"] for r in records
                        if r["phase"] == phase and r["scope"] == "global" and r["metric"] == metric)
        assert rounds == expected, (phase, rounds)
    # the sites saw the true round numbers after the restart (offset handled), each site each round once
    seen = sorted((r["scope"], r["round"], r["value"]) for r in records
                  if r["phase"] == "train" and r["metric"] == "train-seconds" and r["scope"] != "global")
    assert seen == sorted((f"node-{n}", rnd, float(rnd)) for n in SITES for rnd in range(1, 5))

    # as if never stopped: an uninterrupted run ends at the same global model
    straight = tmp_path / "straight"
    serve(run_config(straight, heldout))
    ref, _, _ = load_checkpoint(straight / "checkpoints" / "last.pt")
    for k, v in ref.items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)
