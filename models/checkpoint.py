"""Checkpoints that carry their model config, written atomically (write to a temp file, then rename)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .config import ModelConfig

CHECKPOINT_FORMAT = "fedfusion-checkpoint-v1"


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def save_checkpoint(
    path: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    **extra: Any,
) -> None:
    """Save weights (on CPU), the model config and any extra state (round, strategy state, metrics)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "extra": extra,
    }
    atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError / ValueError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torn or foreign file
        raise ValueError(f"checkpoint {path} cannot be read ({exc}); is it a fedfusion checkpoint?") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fedfusion checkpoint (missing format {CHECKPOINT_FORMAT!r})")
    return payload["state_dict"], ModelConfig.from_dict(payload["model_config"]), payload.get("extra", {})
