"""Shared helpers for the site-client tests: tiny phantom sites, hand-built Flower messages, a tiny model config."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from common.runconfig import default_model_config, model_entries


#: Tiny network: fast enough for 2 shared cores.
TINY = default_model_config(family="attention", spatial_size=(8, 16, 16), channels=(4, 8), attention_heads=2)


def make_phantoms(out: Path, *, sites: int = 2, cases: int = 3, scenario: str = "modality-skew", fmt: str = "dicom",
                  seed: int = 3) -> Path:
    from simulations.phantom_writers import generate

    generate(out, sites=sites, cases_per_site=cases, seed=seed, scenario=scenario, shape=(16, 32, 32), fmt=fmt,
             heldout_cases=0)
    return out


def run_config(**overrides: Any) -> dict[str, Any]:
    """A run config like pyproject's, sized for tests (DP with a given noise multiplier: no derivation cost)."""
    rc: dict[str, Any] = {
        "num-server-rounds": 3, "seed": 0, "local-epochs": 1, "lr": 0.01, "batch-size": 2, "proximal-mu": 0.0,
        "dp-enabled": True, "dp-target-epsilon": 8.0, "dp-delta": 1e-5, "dp-noise-multiplier": 1.0,
        "dp-max-grad-norm": 1.0, **model_entries(TINY),
    }
    rc.update(overrides)
    return rc


def message(kind: str, state: dict[str, torch.Tensor], server_round: int = 1) -> Message:
    """A server instruction as the SuperNode would deliver it (``kind``: train | evaluate)."""
    md = Metadata(run_id=1, message_id=f"m{server_round}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                  group_id=str(server_round), created_at=time.time(), ttl=3600.0, message_type=kind)
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, metadata=md)


def context(node_config: dict[str, Any], rc: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=rc)


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    from models.network import build_model

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_model(TINY).state_dict().items()}
