"""The round-0 global model: fresh weights from the run's seed, or a checkpoint (run-config key ``init-checkpoint``).

A federation may start from a model pretrained on data the consortium may share (``fedfusion pretrain``): the
server distributes its weights as round 0, so the sites' first training round starts there. The checkpoint must
describe the run's network (:data:`ARCHITECTURE_FIELDS` of its model config equal the run's, the same parameter
names and shapes); it is loaded without running code from it (``torch.load(weights_only=True)``). What the run
started from is recorded in ``RUN/init-checkpoint.json`` (:data:`PROVENANCE_FILE`): the path, the file's SHA-256,
its model config and the provenance the checkpoint carries (what it was pretrained on, how, by which command).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from common.runconfig import RunConfigError
from models.atomic import atomic_write_text
from models.config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURE_FIELDS", "PROVENANCE_FILE", "initial_state", "sha256_of"]

#: File of the run directory recording the initial checkpoint.
PROVENANCE_FILE = "init-checkpoint.json"
#: Model-config fields that change the network's parameters (dropout rates do not).
ARCHITECTURE_FIELDS = ("family", "modalities", "spatial_dims", "spatial_size", "channels", "attention_heads",
                       "num_seg_classes", "num_classes")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def initial_state(model_config: ModelConfig, seed: int, init_checkpoint: str,
                  run_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The round-0 global state dict: ``init_checkpoint``'s weights when given (its provenance written to
    ``run_dir/init-checkpoint.json``), else the network of ``model_config`` initialised from ``seed``.

    Raises:
        RunConfigError (key ``init-checkpoint``): a missing or unreadable file, or a checkpoint of another network
            (the differing model-config fields or parameter names are named).
    """
    from models.network import build_model

    torch.manual_seed(seed)
    fresh = build_model(model_config).state_dict()
    if not init_checkpoint:
        return fresh
    from models.checkpoint import load_checkpoint

    path = Path(init_checkpoint).expanduser().resolve()
    try:
        state, cfg, extra = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise RunConfigError("init-checkpoint", f"{exc}; give a checkpoint written by `fedfusion pretrain` or a "
                             "run's checkpoints/best.pt") from exc
    ours, theirs = model_config.to_dict(), cfg.to_dict()
    differ = [f for f in ARCHITECTURE_FIELDS if ours.get(f) != theirs.get(f)]
    if differ:
        shown = "; ".join(f"{f}: checkpoint {theirs.get(f)!r}, run {ours.get(f)!r}" for f in differ)
        raise RunConfigError("init-checkpoint", f"{path} is a checkpoint of another network ({shown}); set the "
                             "run's model-* keys to the checkpoint's, or pretrain one for this model")
    missing, unexpected = sorted(set(fresh) - set(state)), sorted(set(state) - set(fresh))
    bad = [k for k in fresh if k in state and tuple(state[k].shape) != tuple(fresh[k].shape)]
    if missing or unexpected or bad:
        raise RunConfigError("init-checkpoint", f"{path} does not fit this version's network: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {bad[:3]}")
    out = {k: state[k].to(dtype=fresh[k].dtype).clone() for k in fresh}
    record: dict[str, Any] = {"path": str(path), "sha256": sha256_of(path), "model-config": theirs,
                              "provenance": extra.get("provenance")}
    logger.info("round-0 global model from %s (sha256 %s)", path, record["sha256"])
    if run_dir is not None:
        atomic_write_text(Path(run_dir) / PROVENANCE_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out
