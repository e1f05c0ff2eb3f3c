"""Checkpoints that carry their model config, written atomically (write to a temp file, then rename).

A checkpoint handed to any command (resume, export, evaluate, report) may be hostile: a pickle can run code while it
is unpickled. Checkpoints are therefore loaded with ``torch.load(weights_only=True)``, which unpickles tensors,
numbers, strings and lists/tuples/dicts of them and refuses everything else; and :func:`save_checkpoint` writes
nothing else, so every checkpoint fedfusion writes loads that way.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write
from .config import ModelConfig

CHECKPOINT_FORMAT = "fedfusion-checkpoint-v1"

_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)


def plain_state(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with numpy scalars turned into Python numbers, checked to hold only what a weights-only load accepts
    (tensors, ``None``/bool/int/float/str/bytes, and lists, tuples and dicts of them).

    Raises:
        TypeError: naming the key path (``where``) of the first other value, e.g. a numpy array: convert it to a
            tensor first (``torch.from_numpy``).
    """
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.generic) and not isinstance(obj, np.object_):
        return obj.item()
    if isinstance(obj, _PLAIN_SCALARS):
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            plain_key = plain_state(key, f"{where} key")
            out[plain_key] = plain_state(value, f"{where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold only tensors, numbers, "
        "strings and lists/tuples/dicts of them (they are loaded with weights_only=True); convert it first "
        "(a numpy array with torch.from_numpy)"
    )


def _refusal_reason(exc: Exception) -> str:
    """The line of torch's weights-only refusal that names what was refused (its advice to load the file
    unsafely is left out on purpose)."""
    for line in str(exc).splitlines():
        if "Unsupported" in line:
            return line.strip().removeprefix("WeightsUnpickler error:").strip().split(". Please")[0]
    return "not a weights-only file"


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`); ``obj`` must pass :func:`plain_state`."""
    obj = plain_state(obj, str(path))
    atomic_write(path, lambda fh: torch.save(obj, fh))


def save_checkpoint(
    path: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    **extra: Any,
) -> None:
    """Save weights (on CPU), the model config and any extra state (round, strategy state, metrics).

    Raises:
        TypeError: when ``extra`` holds something a weights-only load would refuse (see :func:`plain_state`).
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "extra": extra,
    }
    atomic_torch_save(payload, path)


def stored_threshold(extra: Mapping[str, Any], default: float | None = None) -> float | None:
    """The calibrated decision threshold on P(malignant) a checkpoint's ``extra`` holds (``threshold``, written by
    the server from its selection set), or ``default`` when it holds none or an unusable value."""
    value = extra.get("threshold") if isinstance(extra, Mapping) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0:
        return float(value)
    return default


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`, never running code from it (``weights_only=True``).

    Raises:
        FileNotFoundError / ValueError: naming the file and what is wrong with it (a file holding other objects
            than tensors and plain containers is refused before any of them is built).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises for anything but tensors and plain containers
        raise ValueError(
            f"checkpoint {path} refused: it holds objects other than tensors, numbers, strings and lists/dicts of "
            f"them, and loading those could run code ({_refusal_reason(exc)}). fedfusion never writes such files; "
            "use only checkpoints written by this version of fedfusion"
        ) from exc
    except Exception as exc:  # torn or foreign file
        raise ValueError(f"checkpoint {path} cannot be read ({exc}); is it a fedfusion checkpoint?") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fedfusion checkpoint (missing format {CHECKPOINT_FORMAT!r})")
    return payload["state_dict"], ModelConfig.from_dict(payload["model_config"]), payload.get("extra", {})
