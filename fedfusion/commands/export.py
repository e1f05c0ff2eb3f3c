"""``fedfusion export``: a checkpoint as a plain PyTorch state dict plus the model config (``--format state-dict``,
the default) or as a MONAI bundle (``--format monai-bundle``, see :mod:`fedfusion.bundle`)."""

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


BUNDLE_INSTRUCTIONS = """\
Exported the MONAI bundle {out}/ (configs/metadata.json, configs/inference.json, models/model.pt,
docs/README.md: the model card). With fedfusion installed, run it on a study folder or a folder of studies:
  python -m monai.bundle run --config_file {out}/configs/inference.json --meta_file {out}/configs/metadata.json \\
      --bundle_root {out} --dataset_dir STUDIES --output_dir OUT
"""

#: ``--format`` choices.
FORMATS: tuple[str, ...] = ("state-dict", "monai-bundle")


def command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A fedfusion checkpoint (e.g. RUN/checkpoints/best.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="state-dict: the file to write (model.pt); monai-bundle: "
                                                          "the bundle folder.")],
    fmt: Annotated[str, typer.Option("--format", help="state-dict (plain PyTorch file) or monai-bundle.")] = "state-dict",
    overwrite: Annotated[bool, typer.Option(help="monai-bundle: replace an earlier bundle in --out.")] = False,
) -> None:
    """Export a checkpoint as a plain PyTorch state dict plus the model config, or as a MONAI bundle (metadata,
    inference config, weights and a model card with the training data, privacy spent and per-subset metrics)."""
    if fmt not in FORMATS:
        typer.echo(f"error: --format {fmt!r} unknown; choose one of {', '.join(FORMATS)}", err=True)
        raise typer.Exit(code=2)
    try:
        if fmt == "monai-bundle":
            from fedfusion.bundle import export_bundle

            export_bundle(checkpoint, out, overwrite=overwrite)
        else:
            payload = export_checkpoint(checkpoint, out)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    if fmt == "monai-bundle":
        typer.echo(BUNDLE_INSTRUCTIONS.format(out=out))
    else:
        typer.echo(REBUILD_INSTRUCTIONS.format(out=out, round=payload["round"]))
