"""``fedfusion export``: a checkpoint as a plain PyTorch state dict plus the model config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

REBUILD_INSTRUCTIONS = """\
Exported {out}: a plain torch.save'd dict with
  "state_dict"   - the network's parameters and buffers (CPU tensors, plain module names)
  "model_config" - the fedfusion ModelConfig as a plain dict (family, modalities, channels, spatial size, ...)
  "round"        - the federated round the weights come from ({round})
Rebuild it:
  with fedfusion installed:
      import torch
      from models.config import ModelConfig
      from models.network import build_model
      payload = torch.load("{out}", map_location="cpu", weights_only=True)
      model = build_model(ModelConfig.from_dict(payload["model_config"]))
      model.load_state_dict(payload["state_dict"])
  outside fedfusion: payload = torch.load("{out}", weights_only=True) needs only PyTorch; re-create the
  architecture from "model_config" (inputs: image (B, M, *spatial_size) with M = len(modalities) in that order,
  plus an availability mask (B, M), 1 = acquired) and load "state_dict" into it.
"""


def export_checkpoint(checkpoint: Path, out: Path) -> dict:
    """Write ``{"state_dict", "model_config", "round"}`` for ``checkpoint`` to ``out`` (atomically).

    Raises:
        FileNotFoundError / ValueError: naming the checkpoint and what is wrong with it.
    """
    from models.checkpoint import atomic_torch_save, load_checkpoint

    state_dict, config, extra = load_checkpoint(checkpoint)
    payload = {
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "model_config": config.to_dict(),
        "round": int(extra.get("round", -1)),
    }
    atomic_torch_save(payload, out)
    return payload


def command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A fedfusion checkpoint (e.g. RUN/checkpoints/best.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the plain PyTorch file (e.g. model.pt).")],
) -> None:
    """Export a checkpoint as a plain PyTorch state dict plus the model config."""
    try:
        payload = export_checkpoint(checkpoint, out)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(REBUILD_INSTRUCTIONS.format(out=out, round=payload["round"]))
