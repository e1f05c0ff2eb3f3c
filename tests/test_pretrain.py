"""Public pretraining: a public phantom cohort distinct from the sites, supervised and self-supervised
checkpoints with provenance that a federation can start from (init-checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.runconfig import model_entries
from models.checkpoint import load_checkpoint
from models.network import build_model
from server.initial import initial_state
from simulations.pretrain import PretrainSettings, pretrain, public_phantoms
from tests.client_helpers import TINY

SMALL = {**model_entries(TINY), "batch-size": 2, "lr": 0.01, "seed": 0}


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("public")
    public_phantoms(data, sites=1, cases=3, seed=11, federation_seed=0, shape=(16, 32, 32), heldout_cases=2)
    return data


def test_public_cohort_refuses_the_federations_seed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="federation's seed"):
        public_phantoms(tmp_path, sites=1, cases=2, seed=0, federation_seed=0)


@pytest.mark.parametrize("mode", ["supervised", "masked"])
def test_pretraining_writes_a_checkpoint_a_run_starts_from(public: Path, tmp_path: Path, mode: str) -> None:
    out = tmp_path / f"{mode}.pt"
    result = pretrain(PretrainSettings(data=public, out=out, mode=mode, run_config=SMALL, epochs=1, progress=False,
                                       phantoms={"seed": 11}))
    state, cfg, extra = load_checkpoint(out)
    assert cfg == TINY and extra["provenance"]["mode"] == mode and extra["provenance"]["cases"] == 3
    assert json.loads(extra["provenance"]["phantoms"]) == {"seed": 11}
    torch.manual_seed(0)
    fresh = build_model(TINY).state_dict()
    encoders = [k for k in fresh if k.startswith("encoders.")]
    assert any(not torch.equal(state[k], fresh[k]) for k in encoders)  # the encoders learnt something
    if mode == "masked":  # only the encoders are pretrained; the rest is the seed's initialisation
        assert all(torch.equal(state[k], fresh[k]) for k in fresh if not k.startswith("encoders."))
    start = initial_state(TINY, 0, str(out), tmp_path)
    assert all(torch.equal(start[k], state[k]) for k in state)
    assert json.loads((tmp_path / "init-checkpoint.json").read_text())["sha256"] == result.sha256
