"""The site's optimizer (run-config key ``optimizer``) and its state across rounds (``optimizer-state``).

Why not plain Adam under DP: with per-coordinate noise of std ``sigma * C / B`` much larger than the gradient,
Adam's second moment estimates the *noise* variance, so every coordinate moves by about the learning rate whatever
its signal (Tang et al., AAAI 2024, "DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless You Apply Bias
Correction)"). The choices:

==========  ======================================================================================================
``adam``    ``torch.optim.Adam`` (the default; fine without DP or with little noise)
``sgd``     SGD with momentum 0.9 (:func:`models.training.make_optimizer`): DP-SGD with momentum, the recipe of De
            et al. 2022
``adam-bc`` :class:`AdamBC`: Adam whose bias-corrected second moment has the known noise variance
            ``(sigma * C / B)^2`` subtracted (floored at ``gamma``) before the square root, so it normalises by
            the gradient's own scale; without DP (noise variance 0) it is Adam
==========  ======================================================================================================

State across rounds: by default (``optimizer-state = keep``; in docs/results.md ``settings``, resetting Adam each
round cost 0.03 mean-region Dice at equal steps, beyond the seed noise) the site saves the optimizer's state
(moments, step counts: tensors and numbers only) after each round to ``<state-dir>/optimizer-state/<key>.pt`` and loads it before the next (:func:`load_state`, ``weights_only=True``), so
momentum survives a deployed site's fresh process per message. The key is a digest of the run id, the optimizer and
the names of the parameters it updates; a file that does not fit is ignored (logged), never half-loaded. With
``reset`` each round starts a fresh optimizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.runconfig import OPTIMIZERS

log = logging.getLogger("fedfusion.site")

__all__ = ["AdamBC", "OPTIMIZERS", "STATE_DIR", "build_optimizer", "load_state", "read_state", "save_state",
           "set_noise_std", "state_file"]

#: Folder of saved optimizer states inside a site's state directory.
STATE_DIR = "optimizer-state"
#: version 2: flat per (key, dtype) (:func:`_flatten`); a version-1 file is ignored (the optimizer starts afresh)
_FORMAT = "fedfusion-optimizer-state/2"


class AdamBC(torch.optim.Optimizer):
    """Bias-corrected DP-Adam (Tang et al. 2024): Adam with the DP noise variance removed from the second moment.

    For gradient ``g_t`` (the noised, averaged DP gradient)::

        m_t = b1 m + (1 - b1) g_t          v_t = b2 v + (1 - b2) g_t^2
        m^ = m_t / (1 - b1^t)              v^ = max(v_t / (1 - b2^t) - noise_var, gamma, se_t)
        w  = w - lr * m^ / (sqrt(v^) + eps)

    ``se_t = noise_var * sqrt(2 / n_t)`` is the standard error of the bias-corrected second moment of pure noise
    after ``t`` steps (``n_t = (1 + b2) / (1 - b2) * (1 - b2^t)^2 / (1 - b2^(2t))`` samples' worth of the moving
    average: ``t`` at first, ``(1 + b2) / (1 - b2)`` in the long run). The paper floors at ``gamma`` alone, which
    presumes the thousands of steps where ``v^`` has concentrated; a federated site takes tens, where ``v^ -
    noise_var`` of a noise-dominated coordinate is as often below 0 as above, the floor then held and the step
    ``lr * m^ / sqrt(gamma)`` was huge (measured: updates 17-97x the model's norm from a pretrained start,
    docs/site.md). A corrected moment within one standard error of 0 is taken to be that standard error, so a
    coordinate of pure noise moves by at most about ``lr`` per step, as under DP-Adam; as ``t`` grows the floor
    shrinks toward ``noise_var * sqrt(2 (1 - b2) / (1 + b2))`` (0.045 ``noise_var`` at ``b2 = 0.999``).

    Args:
        params: parameters to update.
        lr: learning rate.
        betas: ``(b1, b2)``.
        eps: added to the denominator.
        gamma: floor of the corrected second moment (``gamma'`` of the paper).
        noise_var: ``(sigma * C / B_expected)^2``, the variance per coordinate of the DP noise in ``g_t``
            (:func:`set_noise_std` sets it once the site's noise is planned); 0 = Adam.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, gamma: float = 5e-8, noise_var: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not (gamma > 0 and noise_var >= 0 and math.isfinite(noise_var)):
            raise ValueError(f"gamma must be > 0 and noise_var >= 0, got {gamma}, {noise_var}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, gamma=gamma, noise_var=float(noise_var)))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = m / (1 - b1**t)
                v_hat = (v / (1 - b2**t) - group["noise_var"]).clamp_(min=_floor(group, t))
                p.addcdiv_(m_hat, v_hat.sqrt_().add_(group["eps"]), value=-group["lr"])
        return loss


def _floor(group: dict[str, Any], t: float) -> float:
    """The corrected second moment's floor after ``t`` steps: ``gamma`` or one standard error of the moving average
    of squared pure noise, whichever is larger (:class:`AdamBC`)."""
    noise_var = group["noise_var"]
    if noise_var <= 0:
        return float(group["gamma"])
    b2 = group["betas"][1]
    samples = (1 + b2) / (1 - b2) * (1 - b2**t) ** 2 / (1 - b2 ** (2 * t))
    return max(float(group["gamma"]), noise_var * math.sqrt(2.0 / samples))


def build_optimizer(kind: str, model: nn.Module, lr: float,
                    groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (:data:`OPTIMIZERS`) over the trainable parameters of ``model``, in ``groups`` with
    their own ``lr_scale`` when given (:func:`models.trainable.parameter_groups`).

    Raises:
        ValueError: an unknown kind or a bad learning rate.
    """
    from models.training import make_optimizer, optimizer_groups

    if kind in ("adam", "sgd"):
        return make_optimizer(model, lr, kind, groups=groups)
    if kind == "adam-bc":
        return AdamBC(optimizer_groups(model, lr, groups), lr=lr)
    raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)} (run config optimizer)")


def set_noise_std(optimizer: torch.optim.Optimizer, std: float) -> None:
    """Tell an :class:`AdamBC` the DP noise std per coordinate of its gradients (``sigma * C / B_expected``); other
    optimizers ignore it."""
    inner = getattr(optimizer, "original_optimizer", optimizer)
    if isinstance(inner, AdamBC):
        for group in inner.param_groups:
            group["noise_var"] = float(std) ** 2


def state_file(state_dir: Path, run_id: str, kind: str, names: Sequence[str]) -> Path:
    """Where the optimizer state of this run, optimizer and parameter set is kept."""
    digest = hashlib.sha256("\0".join([str(run_id), kind, *names]).encode("utf-8")).hexdigest()[:24]
    return Path(state_dir) / STATE_DIR / f"{digest}.pt"


def _flatten(state: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """An optimizer's per-parameter state as one flat tensor per (state key, dtype) plus the shapes and numbers.

    Why: saved as it is, the state is one tensor per parameter and key (about 740 for the default model with Adam),
    and ``torch.load(weights_only=True)`` rebuilds each on its own: 0.05-0.1 s per round and site on 2 cores,
    about a tenth of a federated round's overhead. A handful of flat tensors load in milliseconds.
    """
    slots: dict[str, list[torch.Tensor]] = {}
    entries: list[list[Any]] = []
    for index in sorted(state):
        for key, value in state[index].items():
            if isinstance(value, torch.Tensor):
                slot = f"{key}/{str(value.dtype).removeprefix('torch.')}"
                slots.setdefault(slot, []).append(value.detach().cpu().reshape(-1))
                entries.append([int(index), str(key), slot, list(value.shape)])
            else:
                entries.append([int(index), str(key), None, value])
    # the entries as one JSON string: the weights-only unpickler is per object too (740 small lists: 20 ms)
    return {"entries": json.dumps(entries), "slots": {k: torch.cat(v) for k, v in slots.items()}}


def _unflatten(payload: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """The per-parameter state :func:`_flatten` laid out flat.

    Raises:
        ValueError: the entries and the flat tensors do not fit together (a damaged or foreign file).
    """
    slots, entries = payload.get("slots"), json.loads(str(payload.get("entries")))
    if not isinstance(slots, dict) or not isinstance(entries, list):
        raise ValueError("no entries or slots")
    offsets = {slot: 0 for slot in slots}
    state: dict[int, dict[str, Any]] = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise ValueError(f"malformed entry {entry!r:.60}")
        index, key, slot, shape = entry  # for a number (slot None) the last field is its value
        if slot is None:
            state.setdefault(int(index), {})[str(key)] = shape
            continue
        flat = slots.get(slot)
        if not isinstance(flat, torch.Tensor) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"entry {index}/{key} names no stored tensor of a valid shape")
        numel, start = math.prod(shape), offsets[slot]
        if start + numel > flat.numel():
            raise ValueError(f"slot {slot} is shorter than its entries")
        state.setdefault(int(index), {})[str(key)] = flat[start:start + numel].view(shape)
        offsets[slot] = start + numel
    if any(offsets[slot] != slots[slot].numel() for slot in slots):
        raise ValueError("a slot is longer than its entries")
    return state


def save_state(path: Path, optimizer: torch.optim.Optimizer, kind: str, names: Sequence[str]) -> None:
    """Save the optimizer's state (tensors and numbers only, laid out flat, atomically) for :func:`load_state`."""
    from models.checkpoint import atomic_torch_save

    inner = getattr(optimizer, "original_optimizer", optimizer)
    payload = {"format": _FORMAT, "optimizer": kind, "names": list(names), **_flatten(inner.state_dict()["state"])}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload, path)
    _prune(Path(path).parent, keep=Path(path))


#: Optimizer states a site keeps: its most recent runs (a long-lived site daemon takes part in run after run, and a
#: finished run's state is never read again; a few are kept for runs that overlap).
KEEP_STATES = 4


def _prune(folder: Path, keep: Path) -> None:
    """Delete all but the :data:`KEEP_STATES` most recently written states of ``folder`` (never ``keep``)."""
    files = sorted(folder.glob("*.pt"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in files[KEEP_STATES:]:
        if old != keep:
            try:
                old.unlink()
            except OSError as e:  # another process pruned it first: nothing lost
                log.debug("could not prune optimizer state %s: %s", old, e)


def read_state(path: Path, kind: str, names: Sequence[str]) -> dict[int, dict[str, Any]] | None:
    """The per-parameter optimizer state saved by :func:`save_state` (parameter index -> key -> tensor or number),
    or ``None`` (logged why) when there is no file or it is unreadable, of another version, optimizer or parameter
    set, or damaged."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError) as exc:
        log.warning("optimizer state %s unreadable (%s); starting the optimizer afresh", path, exc)
        return None
    if not (isinstance(payload, dict) and payload.get("format") == _FORMAT):
        log.warning("optimizer state %s is not in this version's format (%s); starting the optimizer afresh", path,
                    _FORMAT)
        return None
    if not (payload.get("optimizer") == kind and payload.get("names") == list(names)):
        log.warning("optimizer state %s is for another optimizer or parameter set; starting afresh", path)
        return None
    try:
        return _unflatten(payload)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        log.warning("optimizer state %s is damaged (%s); starting the optimizer afresh", path, exc)
        return None


def load_state(path: Path, optimizer: torch.optim.Optimizer, kind: str, names: Sequence[str]) -> bool:
    """Load a state saved by :func:`save_state` into ``optimizer`` (its hyperparameters stay as built).

    Returns ``False`` (and logs why) when there is no file or it does not fit this optimizer and parameter set; the
    optimizer then starts fresh.
    """
    saved = read_state(path, kind, names)
    if saved is None:
        return False
    inner = getattr(optimizer, "original_optimizer", optimizer)
    current = inner.state_dict()
    current["state"] = saved
    try:
        inner.load_state_dict(current)
    except (ValueError, KeyError, RuntimeError) as exc:
        log.warning("optimizer state %s does not fit (%s); starting afresh", path, exc)
        inner.state.clear()
        return False
    return True
