"""Making a site's model, optimizer and data loader private with Opacus (patient-level DP-SGD).

The privacy unit is the patient. Given the patients' study groups (``groups``), every step draws each patient
independently with probability ``q = 1 / steps_per_epoch`` (``steps_per_epoch = ceil(patients / batch)``), clips
each patient's summed study gradients to ``max_grad_norm`` and adds Gaussian noise of std
``noise_multiplier * max_grad_norm`` (:mod:`client.privacy.patient_sampling`). Without ``groups`` every item is its
own unit, which is Opacus's own sample-level DP-SGD (tests, benches, and sites with one study per patient draw
exactly the same batches either way).

Parameter names: Opacus wraps the network in a ``GradSampleModule`` whose ``state_dict`` keys gain a ``_module.``
prefix. fedfusion keeps a reference to the *plain* network (the wrapper shares its parameters), and every array
that leaves or enters the site uses the plain network's names, which the server checks.

Randomness: Opacus draws noise from a ``torch.Generator`` and samples with torch's global RNG; fedfusion replaces
both (after Opacus has built its parts) with draws from a :class:`client.privacy.randomness.RandomStream`, the OS
CSPRNG unless the site's policy asks for reproducible noise (see that module for why not Opacus's ``secure_mode``).
:attr:`PrivateParts.randomness` is the stream of the current round; the site sets it before each round.

FedProx with DP: a proximal term added to the loss would be silently dropped by Opacus (the DP optimizer rebuilds
``.grad`` from per-sample gradients, which do not see a loss term on the weights). The proximal gradient
``mu * (w - w_global)`` does not depend on data, so :func:`models.training.train_epoch` adds it *after* clipping
and noising (``ProximalTerm.add_gradient`` between ``pre_step`` and the update): post-processing, no privacy cost.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .randomness import RandomStream

log = logging.getLogger(__name__)

#: Grad-sample mode used by default; chosen by bench/dp_overhead.py (fastest correct mode on the default model,
#: see docs/benchmarks.md). ``hooks`` runs with fedfusion's grouped-convolution sampler for Conv layers
#: (:mod:`client.privacy.grad_samplers`) instead of Opacus's unfold-based one.
DEFAULT_GRAD_SAMPLE_MODE = "hooks"
#: Modes fedfusion knows how to drive: Opacus's own (ghost needs a per-sample loss; see make_private) plus
#: ``microbatch`` (exact per-case gradients from one batch-1 pass per case, see :class:`PerCaseGradModule`).
GRAD_SAMPLE_MODES: tuple[str, ...] = ("microbatch", "hooks", "functorch", "ew", "ghost")


def steps_per_epoch(num_cases: int, batch_size: int) -> int:
    """DP-SGD steps in one epoch: Opacus's Poisson loader has ``ceil(N / B)`` steps (its ``len``)."""
    if num_cases <= 0:
        raise ValueError("no training cases")
    return max(1, math.ceil(num_cases / max(1, batch_size)))


def sample_rate_of(num_cases: int, batch_size: int) -> float:
    """Poisson sampling rate Opacus uses for a loader of ``num_cases`` items and ``batch_size``: ``1 / len``."""
    return 1.0 / steps_per_epoch(num_cases, batch_size)


def expected_batch_size(num_cases: int, batch_size: int) -> int:
    """Expected privacy units per Poisson step, as Opacus computes it (``int(N * q)``, at least 1): the divisor of
    the summed clipped gradients and their noise."""
    return max(1, int(num_cases * sample_rate_of(num_cases, batch_size)))


#: The search's tolerance: the derived multiplier's epsilon lies in ``[target - EPSILON_TOLERANCE, target]`` (what
#: :func:`opacus.accountants.utils.get_noise_multiplier` guarantees with its default tolerance).
EPSILON_TOLERANCE = 0.01
#: Version of :func:`derive_noise_multiplier`'s search (2: regula falsi, was Opacus's bisection); the site's noise
#: cache keys on it, so a multiplier another search derived is never served.
NOISE_SEARCH = "search-2"
#: Noise multipliers beyond this are refused as unreachable (Opacus's ``MAX_SIGMA``).
_MAX_SIGMA = 1e6
#: Four times the noise lowering epsilon by less than 1 %: the accountant's floor, the target is unreachable.
_FLOOR_RATIO = 0.99


def derive_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                            accountant: str = "rdp") -> float:
    """Smallest noise multiplier (to :data:`EPSILON_TOLERANCE` in epsilon) whose epsilon (read with ``accountant``:
    ``rdp`` or ``prv``, :func:`client.privacy.accountant.epsilon_of`) after ``steps`` steps at ``sample_rate`` is
    <= ``target_epsilon``.

    ``steps`` is the run's plan: ``num-server-rounds * local-epochs * steps_per_epoch``. The contract is Opacus's
    ``get_noise_multiplier``'s (epsilon in ``[target - 0.01, target]``), but the search is not its bisection over
    ``[0, 20]`` (about 16 accountant calls): epsilon falls smoothly with the noise, so a bracket around
    ``sigma = 1`` (powers of 4) and regula falsi on ``(log sigma, log epsilon)`` (Illinois variant) reach the
    tolerance in 4-6 calls. Every candidate is read with the same accountant as the ledger.

    Raises:
        ValueError: a non-positive target, or one no noise below ``1e6`` reaches (the message says what to change).
    """
    from .accountant import epsilon_of

    if target_epsilon <= 0:
        raise ValueError(f"dp-target-epsilon must be > 0 to derive a noise multiplier, got {target_epsilon}")
    n = max(1, int(steps))

    def eps(sigma: float) -> float:
        with warnings.catch_warnings():
            # a small candidate noise puts RDP's best order at the edge of Opacus's grid: still an upper bound
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return epsilon_of([(sigma, sample_rate, n)], delta, accountant)

    def unreachable(why: str) -> ValueError:
        return ValueError(f"cannot reach epsilon={target_epsilon} at delta={delta} over {n} steps (sample rate "
                          f"{sample_rate:.4g}): {why}. Raise dp-target-epsilon or plan fewer rounds/epochs.")

    # bracket: lo misses the target (epsilon above it), hi meets it
    sigma = 1.0
    e = eps(sigma)
    if e > target_epsilon:
        lo, e_lo = sigma, e
        while True:
            sigma *= 4.0
            if sigma > _MAX_SIGMA:
                raise unreachable(f"even noise multiplier {_MAX_SIGMA:g} gives epsilon {e_lo:.3g}")
            e = eps(sigma)
            if e <= target_epsilon:
                hi, e_hi = sigma, e
                break
            if e > _FLOOR_RATIO * e_lo:
                # more noise no longer lowers epsilon: the accountant's floor at this delta (its largest order)
                raise unreachable(f"epsilon stops falling at about {e:.3g} however much noise is added (the "
                                  f"accountant's floor at delta {delta:g})")
            lo, e_lo = sigma, e
    else:
        hi, e_hi = sigma, e
        while True:
            sigma /= 4.0
            e = eps(sigma)
            if e > target_epsilon:
                lo, e_lo = sigma, e
                break
            hi, e_hi = sigma, e
            if sigma < 1e-6:  # a target no noise is needed for (e.g. a huge epsilon): the smallest noise tried
                return hi
    # regula falsi (Illinois) on f(u) = log(eps) - log(target - tol/2), u = log sigma: f(lo) > 0 >= f(hi)
    aim = math.log(target_epsilon - EPSILON_TOLERANCE / 2)

    def f(e_: float) -> float:
        return (math.log(e_) if 0 < e_ < math.inf else (math.inf if e_ > 0 else -math.inf)) - aim

    u_lo, u_hi, f_lo, f_hi = math.log(lo), math.log(hi), f(e_lo), f(e_hi)
    side = 0
    for _ in range(100):
        if target_epsilon - e_hi <= EPSILON_TOLERANCE:
            return float(hi)
        if math.isfinite(f_lo) and math.isfinite(f_hi) and f_lo != f_hi:
            u = u_hi - f_hi * (u_hi - u_lo) / (f_hi - f_lo)
            if not (min(u_lo, u_hi) < u < max(u_lo, u_hi)):
                u = 0.5 * (u_lo + u_hi)
        else:
            u = 0.5 * (u_lo + u_hi)
        e = eps(math.exp(u))
        if e <= target_epsilon:
            hi, e_hi, u_hi, f_hi = math.exp(u), e, u, f(e)
            if side == +1:
                f_lo /= 2.0  # Illinois: halve the stale end's value so the next secant moves it
            side = +1
        else:
            lo, e_lo, u_lo, f_lo = math.exp(u), e, u, f(e)
            if side == -1:
                f_hi /= 2.0
            side = -1
    return float(hi)  # meets the target; the tolerance was not reached in 100 steps (never seen)


def incompatible_layers(model: nn.Module) -> list[str]:
    """Opacus's complaints about ``model`` (e.g. BatchNorm); empty when DP-SGD can train it as is."""
    from opacus.validators import ModuleValidator

    return [str(e) for e in ModuleValidator.validate(model, strict=False)]


class CasesOnly(Dataset):
    """Training view of a case dataset without the ``case_id`` string.

    Opacus's Poisson loader must be able to build an *empty* batch of the same structure (only tensors allowed),
    and strings from data have no business in a training batch anyway. Items: ``image (M, *S)`` float32,
    ``mask (M,)`` float32, ``seg (*S)`` int64, ``label ()`` int64, ``has_seg ()`` / ``has_label ()`` float32 target
    flags (1 when the wrapped item has none: every batch keeps one structure, which Opacus's empty batches copy).
    """

    KEYS = ("image", "mask", "seg", "label")
    FLAGS = ("has_seg", "has_label")

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.dataset[i]
        out = {k: torch.as_tensor(item[k]) for k in self.KEYS}
        for k in self.FLAGS:
            out[k] = torch.as_tensor(item.get(k, 1.0), dtype=torch.float32).reshape(())
        return out


class PerCaseGradModule(nn.Module):
    """Exact per-case gradients by running each case of a batch through the network on its own.

    Why: an exact alternative to Opacus's modes that works for any layer without a registered grad sampler. On the
    default model on CPU it measured about 2.9x non-private time against 1.4x for ``hooks`` (docs/benchmarks.md):
    one batch-1 pass per case forgoes the batch's vectorisation, so it is not the default.

    How: in training mode with gradients on, case ``i`` is run through :func:`torch.func.functional_call` with
    per-case *views* of the parameters; a tensor hook on each view receives exactly case ``i``'s gradient and writes
    it into ``p.grad_sample[i]`` (scaled by the batch size for a mean-reduced loss, as Opacus's own modes do).
    Opacus's ``DPOptimizer`` then clips, noises and accounts as usual. The network must treat cases independently
    (no BatchNorm; Opacus's validator checks) and the loss must be a mean of per-case losses.

    Forward: ``image (B, M, *S)``, ``mask (B, M)`` → the wrapped network's outputs, concatenated over cases.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean") -> None:
        super().__init__()
        self._module = model
        self.loss_reduction = loss_reduction

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> Any:
        if not (self.training and torch.is_grad_enabled()) or image.shape[0] == 0:
            return self._module(image, mask)
        from torch.func import functional_call

        batch = int(image.shape[0])
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        named = [(n, p) for n, p in self._module.named_parameters() if p.requires_grad]
        for _, p in named:
            # zeros: a parameter a case does not reach (e.g. an absent modality's encoder) has zero gradient
            p.grad_sample = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device)
        outputs = []
        for i in range(batch):
            views = {}
            for n, p in named:
                v = p.view_as(p)
                v.register_hook(_store_grad(p, i, scale))
                views[n] = v
            outputs.append(functional_call(self._module, views, (image[i : i + 1], mask[i : i + 1])))
        if isinstance(outputs[0], torch.Tensor):
            return torch.cat(outputs)
        return type(outputs[0])(torch.cat(parts) for parts in zip(*outputs))


def _store_grad(p: torch.Tensor, i: int, scale: float) -> Callable[[torch.Tensor], None]:
    def hook(grad: torch.Tensor) -> None:
        p.grad_sample[i].copy_(grad * scale)  # type: ignore[attr-defined]

    return hook


@dataclass
class PrivateParts:
    """What :func:`make_private` returns.

    Attributes:
        model: the plain network (state_dict names without ``_module.``); send/receive arrays through it.
        module: the module to call in training (Opacus wrapper, or ``model`` itself for hook-based modes).
        optimizer: Opacus ``DPOptimizer`` (clipping + noise).
        loader: Poisson-sampling loader over :class:`CasesOnly` items.
        loss_fn: the loss to train with (ghost mode: Opacus's two-pass wrapper).
        noise_multiplier, max_grad_norm: as used.
        sample_rate: Poisson rate per step; ``steps_per_epoch``: steps of one epoch (accounting unit).
        grad_sample_mode: Opacus mode in use.
        steps_taken: DP steps applied so far (noise-only steps of empty Poisson batches included).
    """

    model: nn.Module
    module: nn.Module
    optimizer: Any
    loader: DataLoader
    loss_fn: Callable[..., Any]
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_epoch: int
    grad_sample_mode: str
    randomness: RandomStream = field(default_factory=RandomStream.fresh)
    steps_taken: int = 0


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    loss_fn: Callable[..., Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    randomness: RandomStream | None = None,
    groups: Sequence[Sequence[int]] | None = None,
) -> PrivateParts:
    """Wrap ``model``/``optimizer``/``loader`` for DP-SGD with Opacus (privacy unit: a patient of ``groups``, else
    one item of ``loader.dataset``).

    Args:
        model: plain network, trained in place (its parameters are shared with the returned wrapper).
        optimizer: optimizer over ``model.parameters()``.
        loader: non-private loader (its batch size sets the expected Poisson batch); items must be tensors only
            (wrap datasets with :class:`CasesOnly`).
        loss_fn: training loss. For ``ghost`` it must accept a ``reduction`` attribute of ``"none"`` and then
            return per-sample losses ``(B,)``.
        noise_multiplier: noise std / clipping norm, > 0.
        max_grad_norm: per-case L2 clipping norm.
        grad_sample_mode: Opacus per-sample-gradient mode (``hooks``, ``functorch``, ``ew``, ``ghost``).
        randomness: where noise and Poisson sampling draw from (default: the OS CSPRNG); replace it per round
            through :attr:`PrivateParts.randomness`.
        groups: indices of ``loader.dataset`` per patient (disjoint, covering it): Poisson sampling over patients
            (``ceil(len(groups) / loader.batch_size)`` steps per epoch) and one clip per patient. Needs per-study
            gradients (``hooks``, ``functorch``, ``microbatch``). ``None``: every item is its own patient.

    Raises:
        ValueError: incompatible layers, a bad mode, or groups with a mode that has no per-study gradients.
    """
    from opacus import PrivacyEngine

    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"unknown grad_sample_mode {grad_sample_mode!r}; choose one of {GRAD_SAMPLE_MODES}")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0 for DP-SGD, got {noise_multiplier}")
    if groups is not None and grad_sample_mode in ("ghost", "ew"):
        raise ValueError(
            f"grad_sample_mode {grad_sample_mode!r} keeps no per-study gradients to sum by patient; use hooks, "
            "functorch or microbatch for patient-level DP-SGD"
        )
    problems = incompatible_layers(model)
    if problems:
        raise ValueError("the network has layers Opacus cannot train privately: " + "; ".join(problems))
    from client.privacy import grad_samplers

    grad_samplers.install()  # per-case conv gradients without im2col (hooks/ghost modes read Opacus's registry)
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off; fedfusion replaces its noise and sampling (see the module docstring)
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    kwargs: dict[str, Any] = dict(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(full_backward_hook|Secure RNG|non-full backward).*")
        if grad_sample_mode == "ghost":
            module, dp_opt, criterion, dp_loader = engine.make_private(criterion=loss_fn, **kwargs)
        elif grad_sample_mode == "microbatch":
            # Opacus's optimizer, Poisson loader and validation; per-case gradients from PerCaseGradModule
            # (Opacus's "no_op" mode leaves p.grad_sample to us).
            per_case = PerCaseGradModule(model)
            kwargs.update(module=per_case, grad_sample_mode="no_op")
            _noop, dp_opt, dp_loader = engine.make_private(**kwargs)
            module, criterion = per_case, loss_fn  # the no-op wrapper adds nothing but a second name prefix
        else:
            module, dp_opt, dp_loader = engine.make_private(**kwargs)
            criterion = loss_fn
    from .patient_sampling import clip_per_patient, patient_loader

    dataset = loader.dataset
    if groups is not None:
        covered = sorted(int(i) for g in groups for i in g)
        if covered != list(range(len(dataset))):  # type: ignore[arg-type]
            raise ValueError("patient groups must cover every item of the loader's dataset exactly once")
        units = [list(g) for g in groups]
    else:
        units = [[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    spe = steps_per_epoch(len(units), int(loader.batch_size or 1))
    parts = PrivateParts(
        model=model,
        module=module,
        optimizer=dp_opt,
        loader=dp_loader,
        loss_fn=criterion,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=1.0 / spe,
        steps_per_epoch=spe,
        grad_sample_mode=grad_sample_mode,
        randomness=randomness or RandomStream.fresh(),
    )

    def draw(n: int, rate: float) -> torch.Tensor:  # reads parts.randomness at each draw: replaced per round
        return parts.randomness.poisson_mask(n, rate)

    # Opacus's Poisson loader replaced by the same draw over patients (one study each when no groups are given),
    # from the site's randomness instead of torch's generator
    parts.loader = patient_loader(dataset, units, parts.sample_rate, spe, draw=draw,
                                  pin_memory=bool(getattr(loader, "pin_memory", False)))
    if groups is not None:
        clip_per_patient(dp_opt, parts.loader.batch_sampler,
                         expected_patients=expected_batch_size(len(units), int(loader.batch_size or 1)))
    seed_empty_batch_template(parts.loader)
    _draw_noise_from_stream(dp_opt, parts)

    # Opacus keeps a single step hook (its own accountant's); fedfusion accounts in PersistentAccountant instead
    # and uses the hook to count applied steps.
    def _hook(_opt: Any) -> None:
        parts.steps_taken += 1

    dp_opt.step_hook = _hook
    return parts


def _draw_noise_from_stream(dp_opt: Any, parts: PrivateParts) -> None:
    """Make ``dp_opt`` add noise drawn from ``parts.randomness`` (Opacus draws from a torch generator).

    The replacement does what Opacus 1.6's ``add_noise`` of the flat-clipping optimizers does (noise std
    ``noise_multiplier x max_grad_norm`` added to each ``summed_grad``, the processed-flag checks), with the noise
    from :meth:`RandomStream.gaussian`.

    Raises:
        ValueError: an Opacus optimizer whose noise this function does not know how to replace.
    """
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    if type(dp_opt) not in (DPOptimizer, DPOptimizerFastGradientClipping):
        raise ValueError(f"cannot replace the noise of {type(dp_opt).__name__}; fedfusion supports flat clipping only")

    def add_noise() -> None:
        # ghost clipping may adjust the multiplier used for noise (never the accounted one), as in Opacus
        sigma = getattr(dp_opt, "_adjusted_noise_multiplier", dp_opt.noise_multiplier)
        for p in dp_opt.params:
            _check_processed_flag(p.summed_grad)
            ref = p.summed_grad
            noise = parts.randomness.gaussian(ref.shape, sigma * dp_opt.max_grad_norm)
            p.grad = (ref + noise.to(device=ref.device, dtype=ref.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)

    dp_opt.add_noise = add_noise
    dp_opt.generator = None  # nothing may draw from a torch generator by mistake


def seed_empty_batch_template(dp_loader: Any) -> None:
    """Let Opacus's Poisson loader build an empty *first* batch of dict items.

    Opacus makes the empty-first-batch template by iterating ``dataset[0]``; for a dict item that iterates the keys
    (strings) and the batch fails with ``TypeError: zeros(): argument 'dtype' must be torch.dtype``. A site with few
    cases hits this (P(empty) = (1 - q)^N per epoch: 6 % for 4 cases at batch 2). Seeding the collate's
    ``first_batch`` with one collated item makes Opacus derive the empty batch from it (same keys, batch of 0).
    """
    from torch.utils.data import default_collate

    collate = getattr(dp_loader, "collate_fn", None)
    dataset = getattr(dp_loader, "dataset", None)
    if collate is None or dataset is None or getattr(collate, "first_batch", False) is not None or not len(dataset):
        return
    item = dataset[0]
    if isinstance(item, Mapping):
        collate.first_batch = default_collate([item])


def load_plain_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load received arrays into the plain network, refusing missing/unexpected names with a clear error."""
    inner = getattr(model, "_module", model)
    own = inner.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"received arrays do not match this site's network: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; the run config's model-* keys and "
            "the server's model must agree"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ValueError(
            f"received arrays have wrong shapes for {bad[:5]} (e.g. {bad[0]}: got {tuple(state[bad[0]].shape)}, "
            f"expected {tuple(own[bad[0]].shape)}); the run config's model-* keys and the server's model must agree"
        )
    inner.load_state_dict(state, strict=True)
