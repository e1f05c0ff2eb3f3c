"""The one training loop of fedfusion: used by the site client (plain, DP-SGD, FedProx) and centralized training.

Batches may be dicts (``image, mask, seg, label[, has_seg, has_label, case_id]``, the dataset's items collated) or
tuples/lists ``(image, mask, seg, label)``. The optional ``has_seg``/``has_label`` flags (mixed supervision: a case
may lack a segmentation or a label) are passed on to the loss as keyword arguments, which masks each part per case
(:class:`models.losses.MultiTaskLoss`); without them every case has both targets.

Opacus's Poisson-sampling loader can yield **empty** batches (size 0):

* with a plain optimizer they are skipped (no forward, no step);
* with an Opacus ``DPOptimizer`` they still take a *noise-only* step (zero clipped gradient + Gaussian noise), which
  is what Opacus does for an empty batch: DP-SGD's guarantee (and the accountant's step count) assumes every
  sampled step releases a noisy update, and skipping a step would reveal that the batch was empty.

FedProx (:class:`ProximalTerm`) adds ``mu/2 * ||w - w_global||^2``:

* plain optimizer: added to the loss before ``backward`` (gradient ``mu * (w - w_global)``);
* ``DPOptimizer``: a loss term on the weights is invisible to Opacus's per-sample gradients (Opacus rebuilds
  ``.grad`` from the clipped per-sample gradients plus noise, which would silently drop it). Its gradient does not
  depend on any case's data, so it is added **after** clipping and noising, before the parameter update: DP
  post-processing, no privacy cost, not clipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .modalities import owner_modality
from .precision import MixedPrecision
from .schedule import LRSchedule


def resolve_device(preference: str = "auto") -> torch.device:
    """The torch device to use: ``auto`` = CUDA when available else CPU; or an explicit ``cpu``, ``cuda``,
    ``cuda:N``.

    Raises:
        ValueError: unknown name, or CUDA requested on a machine without it.
    """
    pref = (preference or "auto").strip().lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {preference!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} requested but CUDA is not available here; use --device cpu/auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {preference!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {preference!r}; use auto, cpu, cuda or cuda:N")
    return dev


def optimizer_groups(model: nn.Module, lr: float, groups: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` as optimizer parameter groups at ``lr``: ``groups`` (each with an
    ``lr_scale``, :func:`models.trainable.parameter_groups`) with their rate set, or one group of them all."""
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    if groups is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0, "lr": lr}]
    return [{**g, "lr": lr * float(g.get("lr_scale", 1.0))} for g in groups]


def make_optimizer(
    model: nn.Module, lr: float, kind: str = "adam", *, weight_decay: float = 0.0, momentum: float = 0.9,
    groups: list[dict[str, Any]] | None = None,
) -> torch.optim.Optimizer:
    """Optimizer over the trainable parameters of ``model``: ``adam`` or ``sgd`` (with ``momentum``); ``groups``:
    parameter groups with their own ``lr_scale`` (:func:`optimizer_groups`)."""
    params = optimizer_groups(model, lr, groups)
    kind = kind.strip().lower()
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; choose adam or sgd")


def _plain_name(name: str) -> str:
    # Opacus's GradSampleModule prefixes parameter names with "_module."
    return name[len("_module.") :] if name.startswith("_module.") else name


#: What the FedProx term covers (run config ``proximal-scope``).
PROXIMAL_SCOPES: tuple[str, ...] = ("all", "encoders")


class ProximalTerm:
    """FedProx proximal term ``mu/2 * sum ||w - w_global||^2`` over the trainable parameters.

    Args:
        global_params: the round's global weights, either a mapping ``name -> tensor`` (a state dict; Opacus's
            ``_module.`` prefix is ignored on both sides, buffers and unknown names are ignored) or a sequence of
            tensors in ``model.parameters()`` order.
        mu: proximal strength (>= 0; 0 makes the term vanish).
        scope: ``"all"`` trainable parameters, or only the ``"encoders"`` (parameters a modality owns,
            :func:`models.modalities.owner_modality`): the drift that compounds under modality-aware aggregation is
            the owners' encoder updates, while holding the shared layers (classifier included) near the global
            model is what cost the classifier (docs/results.md, `missing`).
    """

    def __init__(self, global_params: Mapping[str, Tensor] | Sequence[Tensor], mu: float,
                 scope: str = "all") -> None:
        if mu < 0:
            raise ValueError(f"proximal mu must be >= 0, got {mu}")
        if scope not in PROXIMAL_SCOPES:
            raise ValueError(f"proximal scope must be one of {PROXIMAL_SCOPES}, got {scope!r}")
        self.mu = float(mu)
        self.scope = scope
        if isinstance(global_params, Mapping):
            self._named: dict[str, Tensor] | None = {
                _plain_name(k): torch.as_tensor(v).detach().clone() for k, v in global_params.items()
            }
            self._seq: list[Tensor] | None = None
        else:
            self._named = None
            self._seq = [torch.as_tensor(v).detach().clone() for v in global_params]
        self._cache: tuple[int, list[tuple[nn.Parameter, Tensor]]] | None = None

    def pairs(self, model: nn.Module) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, global value on the parameter's device) for every trainable parameter of ``model``."""
        if self._cache is not None and self._cache[0] == id(model):
            return self._cache[1]
        named = list(model.named_parameters())
        out: list[tuple[nn.Parameter, Tensor]] = []
        if self._named is not None:
            for name, p in named:
                if not p.requires_grad or not self._covers(name):
                    continue
                ref = self._named.get(_plain_name(name))
                if ref is None:
                    raise ValueError(f"ProximalTerm: no global value for parameter {_plain_name(name)!r}")
                out.append((p, self._fit(ref, p, name)))
        else:
            assert self._seq is not None
            if len(self._seq) != len(named):
                raise ValueError(
                    f"ProximalTerm: {len(self._seq)} global tensors for {len(named)} model parameters; pass them in "
                    "model.parameters() order or as a state dict"
                )
            out = [(p, self._fit(ref, p, n)) for (n, p), ref in zip(named, self._seq)
                   if p.requires_grad and self._covers(n)]
        self._cache = (id(model), out)
        return out

    def _covers(self, name: str) -> bool:
        return self.scope == "all" or owner_modality(_plain_name(name)) is not None

    @staticmethod
    def _fit(ref: Tensor, p: Tensor, name: str) -> Tensor:
        if tuple(ref.shape) != tuple(p.shape):
            raise ValueError(f"ProximalTerm: global {name} has shape {tuple(ref.shape)}, model has {tuple(p.shape)}")
        return ref.to(device=p.device, dtype=p.dtype)

    def penalty(self, model: nn.Module) -> Tensor:
        """``mu/2 * sum ||w - w_global||^2`` as a scalar tensor with grad."""
        pairs = self.pairs(model)
        if not pairs:
            return torch.zeros(())
        total = sum(((p - ref) ** 2).sum() for p, ref in pairs)
        return 0.5 * self.mu * total  # type: ignore[return-value]

    __call__ = penalty

    @torch.no_grad()
    def add_gradient(self, model: nn.Module) -> None:
        """Add ``mu * (w - w_global)`` to every parameter's ``.grad`` (DP path: after clipping and noise)."""
        if self.mu == 0:
            return
        for p, ref in self.pairs(model):
            if p.grad is None:
                p.grad = self.mu * (p.detach() - ref)
            else:
                p.grad.add_(p.detach() - ref, alpha=self.mu)


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(image (B, M, *S), mask (B, M), seg (B, *S), label (B,))`` from a dict or tuple/list batch."""
    if isinstance(batch, Mapping):
        missing = [k for k in ("image", "mask", "seg", "label") if k not in batch]
        if missing:
            raise ValueError(f"batch dict lacks {missing}; expected keys image, mask, seg, label")
        return batch["image"], batch["mask"], batch["seg"], batch["label"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 4:
        image, mask, seg, label = batch[:4]
        return image, mask, seg, label
    raise ValueError(
        f"unsupported batch of type {type(batch).__name__}; expected a dict with image, mask, seg, label or a "
        "tuple (image, mask, seg, label)"
    )


def target_flags(batch: Any) -> tuple[Tensor, Tensor] | None:
    """``(has_seg (B,), has_label (B,))`` float flags of a dict batch that carries them, else ``None`` (every case
    then has both targets). A batch with one flag but not the other gets ones for the missing one."""
    if not isinstance(batch, Mapping) or not ({"has_seg", "has_label"} & set(batch)):
        return None
    b = int(batch["image"].shape[0])
    ones = torch.ones(b)
    return (torch.as_tensor(batch.get("has_seg", ones)).float().reshape(-1),
            torch.as_tensor(batch.get("has_label", ones)).float().reshape(-1))


def is_dp_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` is an Opacus ``DPOptimizer`` (it wraps ``original_optimizer`` and adds noise)."""
    return hasattr(optimizer, "original_optimizer") and hasattr(optimizer, "add_noise")


def _noise_only_step(optimizer: Any) -> None:
    """Opacus step for an empty Poisson batch: zero per-sample gradients (batch of 0) + noise, then update."""
    # clear the previous step's summed gradients first (Opacus refuses to add noise to processed ones)
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def mask_channels(image: Tensor, mask: Tensor) -> Tensor:
    """Zero the channels of ``image (B, M, *S)`` whose ``mask (B, M)`` is 0 (exact zeros, NaN-proof)."""
    keep = mask.reshape(*mask.shape, *([1] * (image.dim() - 2))) > 0
    return torch.where(keep, image, torch.zeros((), dtype=image.dtype, device=image.device))


def single_modality_mask(mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One present modality per case, drawn uniformly among those ``mask`` (B, M) marks present: a 0/1 (B, M) mask
    of ``mask``'s dtype and device. Every row of ``mask`` needs a present modality."""
    draws = torch.rand(mask.shape, generator=generator).to(mask.device)
    pick = torch.where(mask > 0, draws + 1.0, torch.zeros_like(draws)).argmax(dim=1)  # absent ones never win
    return torch.nn.functional.one_hot(pick, mask.shape[1]).to(mask.dtype)


def single_modality_views(mask: Tensor, views: int, prefer: Tensor | None = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """The single-modality term as one view per case, for DP-SGD (which allows one pass per layer per step).

    ``mask`` (B*K, M) holds K rows per case (:class:`client.privacy.multiplicity.MultiViewLoader`: rows ``[case0
    view0..K-1, case1 …]``); the last view of every case keeps one of its present modalities
    (:func:`single_modality_mask`), drawn among those ``prefer`` (M,) marks when the case has one (e.g. the
    modalities a trainable set like ``head+ct+us`` adds: the others' encoders are frozen, so drawing them would
    only train the heads), else among all present. Averaging the case's K view gradients before clipping then
    puts a 1/K share of its gradient on the prediction from that modality alone: the DP form of the non-private
    run's second loss term.
    """
    if views < 2:
        raise ValueError(f"a single-modality view needs at least 2 views per case, got {views} (augment-multiplicity)")
    rows = (torch.arange(mask.shape[0], device=mask.device) % views) == views - 1
    chosen = mask[rows]
    if prefer is not None:
        preferred = chosen * prefer.to(chosen)[None, :]
        chosen = torch.where((preferred.sum(dim=1) > 0)[:, None], preferred, chosen)
    out = mask.clone()
    out[rows] = single_modality_mask(chosen, generator)
    return out


def _forward(model: nn.Module, image: Tensor, mask: Tensor, single: Tensor | None) -> tuple[Any, Any]:
    """``model(image, mask)``, and with ``single`` also the prediction from the single-modality mask ``single``,
    sharing the encoders (:meth:`models.network.FusionNet.encode` / ``decode``: equal to a second forward)."""
    if single is None:
        return model(image, mask), None
    features = model.encode(image, mask)
    return model.decode(features, mask), model.decode(features, single)


def _loss_total(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def train_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., Any],
    device: torch.device | str,
    *,
    modality_dropout: float = 0.0,
    modality_dropout_mode: str = "independent",
    generator: torch.Generator | None = None,
    proximal: ProximalTerm | None = None,
    max_batches: int | None = None,
    amp: str | MixedPrecision = "off",
    schedule: LRSchedule | None = None,
    start_step: int = 0,
    single_modality_loss: float = 0.0,
    single_view: tuple[int, Tensor | None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``, one optimizer step per batch.

    Args:
        model: network with ``forward(image (B, M, *S), mask (B, M)) -> (seg_logits, class_logits)`` (may be an
            Opacus ``GradSampleModule``).
        loader: batches as dicts or tuples (see module docstring); empty batches allowed.
        optimizer: a torch optimizer or an Opacus ``DPOptimizer``.
        loss_fn: ``loss_fn(seg_logits, class_logits, seg, label[, has_seg=, has_label=])`` returning ``(total,
            parts)`` (e.g. :class:`models.losses.MultiTaskLoss`) or just a loss tensor (e.g. Opacus's ghost-clipping
            wrapper, which passes the keyword flags on); the flags are passed only for batches that carry them.
        device: where to compute.
        modality_dropout: per-present-modality drop probability per batch (``apply_modality_dropout``); dropped
            channels are zeroed and their mask set to 0. 0 disables.
        modality_dropout_mode: how (``apply_modality_dropout``'s modes; the model config's
            ``modality_dropout_mode``).
        generator: CPU torch generator for the dropout draws (reproducible runs).
        proximal: FedProx term (see module docstring for its DP handling).
        max_batches: stop after this many batches (empty ones included); None = whole loader.
        amp: mixed precision for non-private training (:mod:`models.precision`): ``off``, ``auto`` (CUDA only),
            ``bf16``, ``fp16``, or a :class:`~models.precision.MixedPrecision` kept across epochs (fp16's loss
            scale); always float32 under DP-SGD.
        schedule: learning rate per global step (:class:`models.schedule.LRSchedule`); None keeps the optimizer's.
        start_step: the global step of this epoch's first optimizer step (steps of earlier epochs and rounds).
        single_modality_loss: weight of a second loss term on the prediction from one present modality per case
            (after modality dropout; :func:`single_modality_mask`, drawn with ``generator``), the encoders run once
            (the model config's ``single_modality_loss``). 0 = off. Not with a DP optimizer: Opacus's per-case
            gradients assume one pass through each layer (``single_view`` is the DP form).
        single_view: ``(K, prefer)``: the loader yields K rows per case (augmentation multiplicity) and the last of
            each case's rows sees one modality alone (:func:`single_modality_views`, after modality dropout): the
            single-modality term under DP-SGD. ``None`` = off.

    Returns:
        ``loss`` (task loss, mean over examples), ``loss-seg``, ``loss-cls`` (unweighted parts, means over the cases
        carrying that target when the loss counts them; NaN when the loss gives no parts or no case had the
        target), ``loss-proximal`` (mean penalty per step, 0 without FedProx), ``num-examples``, ``steps``
        (optimizer steps, noise-only DP steps included: the next epoch starts at ``start_step + steps``),
        ``empty-batches``, ``lr`` (the learning rate of the last step).
    """
    from .network import apply_modality_dropout

    device = torch.device(device)
    dp = is_dp_optimizer(optimizer)
    precision = amp if isinstance(amp, MixedPrecision) else MixedPrecision.resolve(amp, device, private=dp)
    if dp and precision.enabled:
        raise ValueError("mixed precision with DP-SGD: per-case gradients and clipping must stay float32 "
                         "(models/precision.py); pass amp='off' or 'auto'")
    if single_modality_loss > 0 and dp:
        raise ValueError("the single-modality loss needs two passes through the fusion and decoder, which DP-SGD's "
                         "per-case gradients do not support; pass single_modality_loss=0 under DP")
    model.train()
    n_examples = 0
    steps = 0
    empty = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seg_sum = torch.zeros((), dtype=torch.float64, device=device)
    cls_sum = torch.zeros((), dtype=torch.float64, device=device)
    seg_n = torch.zeros((), dtype=torch.float64, device=device)  # cases the seg part was averaged over
    cls_n = torch.zeros((), dtype=torch.float64, device=device)
    prox_sum = 0.0
    have_parts = True
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        image, mask, seg, label = unpack_batch(batch)
        flags = target_flags(batch)
        b = int(image.shape[0])
        if schedule is not None and (b > 0 or dp):
            schedule.apply(optimizer, start_step + steps)
        if b == 0:
            empty += 1
            if dp:
                _noise_only_step(optimizer)
                steps += 1
            continue
        mask = mask.float()
        if modality_dropout > 0:
            mask = apply_modality_dropout(mask.cpu(), modality_dropout, generator=generator,
                                          mode=modality_dropout_mode)
        if single_view is not None:
            mask = single_modality_views(mask.cpu(), single_view[0], single_view[1], generator)
        image = image.to(device, non_blocking=True).float()
        mask = mask.to(device, non_blocking=True)
        image = mask_channels(image, mask)
        seg = seg.to(device, non_blocking=True).long()
        label = label.to(device, non_blocking=True).long().reshape(-1)
        targets = {} if flags is None else {"has_seg": flags[0].to(device), "has_label": flags[1].to(device)}

        single = single_modality_mask(mask, generator) if single_modality_loss > 0 else None
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            (seg_logits, class_logits), alone = _forward(model, image, mask, single)
            out = loss_fn(seg_logits, class_logits, seg, label, **targets)
            extra = None if alone is None else _loss_total(loss_fn(*alone, seg, label, **targets))
        if isinstance(out, tuple):
            total, parts = out
        else:
            total, parts = out, None
        backward_loss = total if extra is None else total + single_modality_loss * extra
        if proximal is not None and proximal.mu > 0 and not dp:
            penalty = proximal.penalty(model)
            prox_sum += float(penalty.detach())
            backward_loss = backward_loss + penalty
        precision.backward(backward_loss)
        if dp and proximal is not None and proximal.mu > 0:
            # Clip + noise, then the data-independent proximal gradient, then the update (see module docstring).
            if optimizer.pre_step():  # type: ignore[attr-defined]
                proximal.add_gradient(model)
                prox_sum += float(proximal.penalty(model).detach())
                optimizer.original_optimizer.step()  # type: ignore[attr-defined]
        else:
            precision.step(optimizer)
        steps += 1
        # Opacus's ghost-clipping loss is not a tensor; .detach() gives its scalar mean.
        loss_sum += total.detach().reshape(()).to(torch.float64) * b
        if parts is not None and "seg" in parts and "cls" in parts:
            # parts averaged over the cases with that target (counted), or over the whole batch
            n_s = parts["seg-cases"].detach().to(torch.float64) if "seg-cases" in parts else float(b)
            n_c = parts["cls-cases"].detach().to(torch.float64) if "cls-cases" in parts else float(b)
            seg_sum += parts["seg"].detach().to(torch.float64) * n_s
            cls_sum += parts["cls"].detach().to(torch.float64) * n_c
            seg_n += n_s
            cls_n += n_c
        else:
            have_parts = False
        n_examples += b
    if dp:
        optimizer.zero_grad(set_to_none=True)
    nan = float("nan")
    denom = max(n_examples, 1)
    return {
        "loss": float(loss_sum) / denom if n_examples else nan,
        "loss-seg": float(seg_sum) / float(seg_n) if have_parts and float(seg_n) > 0 else nan,
        "loss-cls": float(cls_sum) / float(cls_n) if have_parts and float(cls_n) > 0 else nan,
        "loss-proximal": prox_sum / max(steps, 1),
        "num-examples": float(n_examples),
        "steps": float(steps),
        "empty-batches": float(empty),
        "lr": float(optimizer.param_groups[0]["lr"]),
    }
