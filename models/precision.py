"""Automatic mixed precision (AMP) for non-private training: which dtype, autocast, loss scaling, optimizer step.

:func:`models.training.train_epoch` takes ``amp`` (a mode name or a :class:`MixedPrecision`):

* ``off``: float32 everywhere (the default);
* ``auto``: on CUDA, bfloat16 autocast where the GPU supports it, else float16 with a ``GradScaler``; float32 on
  the CPU (``bench/step_time.py`` times CPU bfloat16 too: it changes the numerics of every convolution and is not
  switched on behind a site's back) and always float32 under DP-SGD;
* ``bf16`` / ``fp16``: that dtype on the training device (``fp16`` with loss scaling); refused under DP-SGD.

Why never under DP-SGD: Opacus computes per-case gradients from the activations and output gradients its hooks
capture; in reduced precision those per-case gradients, their norms and hence the clipping would differ from what
the privacy analysis assumes is computed (float32 per-case norms), and fp16 loss scaling would scale the gradients
Opacus clips. Non-private training loses nothing by it: autocast keeps reductions, losses and normalisations in
float32 and the optimizer updates float32 weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: The values of ``train_epoch``'s ``amp`` argument.
AMP_MODES: tuple[str, ...] = ("off", "auto", "bf16", "fp16")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MixedPrecision:
    """A resolved AMP choice for one device; keep one across epochs so fp16's loss scale carries over.

    Attributes:
        device_type: ``cpu`` or ``cuda`` (what ``torch.autocast`` takes).
        dtype: the autocast dtype, or ``None`` for float32 (AMP off).
        scaler: the fp16 loss scaler (``None`` for bfloat16 and float32, which need none).
    """

    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def resolve(cls, mode: str, device: torch.device | str, *, private: bool) -> "MixedPrecision":
        """The AMP of ``mode`` (:data:`AMP_MODES`) on ``device``; ``private``: the optimizer is DP-SGD.

        Raises:
            ValueError: an unknown mode, or ``bf16``/``fp16`` asked for DP-SGD training (see the module docstring).
        """
        dev = torch.device(device)
        if mode not in AMP_MODES:
            raise ValueError(f"amp {mode!r} is not one of {', '.join(AMP_MODES)}")
        if mode in _DTYPES and private:
            raise ValueError(f"amp {mode!r} with DP-SGD: Opacus's per-case gradients and clipping must stay float32; "
                             "use amp='off' or 'auto' (float32 under DP) for private training")
        if mode == "off" or private or (mode == "auto" and dev.type != "cuda"):
            return cls(dev.type, None)
        if mode == "auto":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        dtype = _DTYPES[mode]
        scaler = torch.amp.GradScaler(dev.type) if dtype is torch.float16 else None
        return cls(dev.type, dtype, scaler)

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> Any:
        """Context for the forward pass and the loss: ``torch.autocast`` in :attr:`dtype`, or nothing when off."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, through the loss scaler for fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; with fp16, unscaled first and skipped when the scaled gradients overflowed."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
