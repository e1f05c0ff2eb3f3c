"""Server-side exponential moving average of the global weights (run-config key ``server-ema``).

After every round ``ema = decay * ema + (1 - decay) * global`` (started at the round-0 global model). Under DP the
global model of one round carries that round's noise; averaging over rounds keeps the signal, which accumulates,
and averages the independent noise away (De et al. 2022 use the same on parameters). It is post-processing of what
the sites released, so it costs no privacy. The sites keep training from the raw aggregate; the server evaluates
the average and saves it as ``best.pt``; ``last.pt`` holds the raw global model (what training resumes from) and
the average (``extra["ema"]``) so a resumed run continues it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["WeightAverage"]


class WeightAverage:
    """The moving average of a state dict (floating-point entries; others follow the latest value).

    Args:
        decay: weight of the old average, in ``[0, 1)`` (0: the average is the latest global model).
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"server-ema decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.average: dict[str, torch.Tensor] | None = None

    def update(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold ``state`` into the average and return the average in ``state``'s dtypes (a copy).

        The average is kept in float64: a small ``(1 - decay)`` step would otherwise be lost to float32 rounding.
        """
        if self.average is None or set(self.average) != set(state):
            self.average = {k: _wide(v) for k, v in state.items()}
        else:
            for k, v in state.items():
                if v.is_floating_point():
                    self.average[k] = self.decay * self.average[k] + (1 - self.decay) * _wide(v)
                else:
                    self.average[k] = v.detach().clone()
        return {k: self.average[k].to(v.dtype) for k, v in state.items()}

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The average (for a weights-only checkpoint), or None before the first update."""
        return None if self.average is None else {k: v.clone() for k, v in self.average.items()}

    def load_state_dict(self, average: Mapping[str, torch.Tensor] | None) -> None:
        self.average = None if average is None else {k: v.detach().clone() for k, v in average.items()}


def _wide(v: torch.Tensor) -> torch.Tensor:
    return v.detach().to(torch.float64) if v.is_floating_point() else v.detach().clone()
