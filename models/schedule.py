"""The learning-rate schedule: the learning rate as a function of the global optimizer step.

One schedule spans a whole run. In centralized training the global step counts every optimizer step; in a federated
run a site computes it from the round, ``(server_round - 1) * steps_per_round + local_step``, with
``total_steps = num_rounds * steps_per_round`` (its own steps per round), so the sites' learning rates follow the
same curve whatever their sizes, and a resumed run continues where it stopped (:func:`models.training.train_epoch`
takes the schedule and the first global step).

Shapes (``f`` = the factor on the base learning rate, ``t`` = step, ``T`` = ``total_steps``, ``W`` = warm-up):

* warm-up (every kind): ``f = (t + 1) / W`` for ``t < W`` (a fresh Adam's first steps are the largest ones);
* ``constant``: ``f = 1``;
* ``cosine``: ``f = m + (1 - m) * (1 + cos(pi * u)) / 2`` with ``u = (t - W) / (T - W)`` clipped to [0, 1],
  ``m`` = ``min_factor``;
* ``poly`` (nnU-Net): ``f = m + (1 - m) * (1 - u) ** 0.9``.

Steps beyond ``T`` keep the final factor ``m`` (an extra round never raises the learning rate again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Schedule kinds, in the order the run config lists them.
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "poly")


@dataclass(frozen=True)
class LRSchedule:
    """``lr(step) = base_lr * factor(step)`` (see the module docstring for the shapes).

    Attributes:
        base_lr: the peak learning rate (> 0).
        total_steps: optimizer steps of the whole run (>= 1).
        kind: one of :data:`SCHEDULES`.
        warmup_steps: linear warm-up steps (0 = none; at most ``total_steps``).
        min_factor: final factor of ``cosine``/``poly``, in [0, 1].
    """

    base_lr: float
    total_steps: int
    kind: str = "cosine"
    warmup_steps: int = 0
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if not (self.base_lr > 0 and math.isfinite(self.base_lr)):
            raise ValueError(f"learning rate must be > 0, got {self.base_lr}")
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.total_steps < 1:
            raise ValueError(f"a schedule needs total_steps >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if not 0.0 <= self.min_factor <= 1.0:
            raise ValueError(f"min_factor must be in [0, 1], got {self.min_factor}")

    @classmethod
    def for_run(cls, base_lr: float, total_steps: int, kind: str, warmup: float) -> "LRSchedule":
        """The schedule of a run of ``total_steps`` optimizer steps with a warm-up over the share ``warmup`` of them
        (the run config's ``lr``, ``lr-schedule``, ``lr-warmup``; a site passes ``num_rounds * steps_per_round``)."""
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warm-up share must be in [0, 1), got {warmup}")
        return cls(base_lr, total_steps, kind, warmup_steps=int(round(warmup * total_steps)))

    def factor(self, step: int) -> float:
        """The factor on ``base_lr`` at global step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        u = min((step - self.warmup_steps) / span, 1.0)
        m = self.min_factor
        if self.kind == "cosine":
            return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * u))
        return m + (1.0 - m) * (1.0 - u) ** 0.9

    def lr(self, step: int) -> float:
        """The learning rate at global step ``step``."""
        return self.base_lr * self.factor(step)

    def apply(self, optimizer: Any, step: int) -> float:
        """Set every parameter group of ``optimizer`` (a torch optimizer or an Opacus ``DPOptimizer``, which shares
        its original optimizer's groups) to the learning rate of ``step`` times the group's ``lr_scale`` (1 when it
        has none; :func:`models.trainable.parameter_groups`); returns the rate."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * float(group.get("lr_scale", 1.0))
        return lr
