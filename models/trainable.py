"""Which parameters a federated run trains at the sites (run-config key ``dp-trainable``).

Under DP-SGD the noise added per step grows with the square root of the number of noised coordinates, so a run
that starts from a pretrained model (``init-checkpoint``) can train only a small part privately and keep the rest
fixed. The sets are defined by parameter (state-dict) names alone, with the same ownership rule as modality-aware
aggregation (:func:`models.modalities.owner_modality`), so the site, which freezes, and the server, which
validates and aggregates, agree without exchanging anything:

=========  =====================================================================================================
set        parameters trained (every other parameter keeps the global model's value)
=========  =====================================================================================================
``all``    every parameter
``shared`` parameters owned by no modality: fusion core, decoder, classifier (and the ``input`` family's shared
           encoder). Frozen: the per-modality encoders ``encoders.<m>.…``, stems ``fusion.stems.<m>.…``,
           modality embeddings ``fusion.levels.<l>.embeddings.<m>.…`` and late-fusion heads
           ``fusion.heads.<m>.…``
``head``   the prediction heads only: the decoder's final 1x1 convolution ``decoder.head.…``, the classifier
           ``classifier.…`` and the late-fusion heads ``fusion.heads.…`` (the ``output`` family has no
           ``decoder.head``)
``none``   nothing but the modalities it adds (``none+ct+us``; alone it trains nothing and is refused)
=========  =====================================================================================================

A set may add modalities: ``head+ct+us`` trains the heads and every parameter owned by ``ct`` or ``us`` (their
encoders, stems, embeddings and late-fusion heads); ``none+ct+us`` those parameters alone. That is the start a
consortium has when its public data lack modalities its sites hold (public brain-tumour sets are MRI only): the
pretrained parts stay frozen and only what the public data could not train is trained privately. The run config's
``lr-base-scale`` can let the base part (the heads of ``head+ct+us``) learn more slowly than the added modalities'
parameters (:func:`parameter_groups`).

Frozen parameters get ``requires_grad = False`` before Opacus wraps the model (they are neither clipped nor
noised), are left out of the site's reply, and the server takes them unchanged from the global model.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from torch import nn

from .modalities import MODALITIES, owner_modality

__all__ = ["TRAINABLE_SETS", "freeze_untrained", "is_trained", "parameter_groups", "parse_trainable",
           "trainable_problem", "trained_names", "trained_parameter_count"]

#: The values of run-config key ``dp-trainable``.
TRAINABLE_SETS: tuple[str, ...] = ("all", "shared", "head", "none")

#: Name prefixes of the prediction heads (set ``head``).
_HEAD_PREFIXES = ("decoder.head.", "classifier.", "fusion.heads.")


def _plain(name: str) -> str:
    # Opacus's GradSampleModule prefixes parameter names with "_module."
    return name[len("_module."):] if name.startswith("_module.") else name


def _split(which: str) -> tuple[str, list[str]]:
    base, *added = (part.strip() for part in str(which).split("+"))
    return base, added


def trainable_problem(which: str) -> str | None:
    """Why ``which`` is not a trainable set (``base`` or ``base+m1+m2…``, see the module docstring), or ``None``."""
    base, added = _split(which)
    if base not in TRAINABLE_SETS:
        return (f"choose one of {', '.join(TRAINABLE_SETS)}, optionally followed by +modality for each modality "
                "whose parameters are trained too (e.g. head+ct+us)")
    unknown = [m for m in added if m not in MODALITIES]
    if unknown:
        return f"adds unknown modalities {', '.join(map(repr, unknown))}; modalities are {', '.join(MODALITIES)}"
    if len(set(added)) != len(added):
        return "names a modality twice"
    if base == "all" and added:
        return "'all' already trains every modality; drop the +modality terms"
    if base == "none" and not added:
        return "'none' trains nothing by itself; add the modalities to train (e.g. none+ct+us)"
    return None


@functools.lru_cache(maxsize=64)
def parse_trainable(which: str) -> tuple[str, frozenset[str]]:
    """Split ``which`` (``base`` or ``base+m1+m2…``) into its base set and the modalities it adds.

    Raises:
        ValueError: not a trainable set (:func:`trainable_problem`), naming what is valid.
    """
    problem = trainable_problem(which)
    if problem is not None:
        raise ValueError(f"trainable set {which!r}: {problem} (run config dp-trainable)")
    base, added = _split(which)
    return base, frozenset(added)


def is_trained(name: str, which: str) -> bool:
    """Whether the parameter (or buffer) ``name`` belongs to trainable set ``which`` (see the module docstring).

    Raises:
        ValueError: an unknown set, naming the valid ones.
    """
    base, added = parse_trainable(which)
    plain = _plain(name)
    if base == "all":
        return True
    owner = owner_modality(plain)
    if owner is not None and owner in added:
        return True
    if base == "shared":
        return owner is None
    if base == "none":
        return False
    return plain.startswith(_HEAD_PREFIXES)


def trained_names(names: Iterable[str], which: str) -> list[str]:
    """The names of ``names`` in trainable set ``which``, in the given order."""
    return [n for n in names if is_trained(n, which)]


def freeze_untrained(model: nn.Module, which: str) -> None:
    """Set ``requires_grad = False`` on every parameter outside ``which`` (call after
    :meth:`models.network.FusionNet.set_site_modalities`, which resets the flags, and before building the
    optimizer / Opacus). Parameters inside ``which`` keep their flag (an absent modality's encoder stays frozen).

    Raises:
        ValueError: an unknown set, or a set that leaves the model nothing to train.
    """
    params = list(model.named_parameters())
    if not any(is_trained(n, which) for n, _ in params):
        raise ValueError(f"trainable set {which!r} selects no parameter of this model; choose another dp-trainable")
    for name, p in params:
        if not is_trained(name, which):
            p.requires_grad_(False)


def trained_parameter_count(model: nn.Module, which: str) -> int:
    """Number of scalar parameters ``which`` trains in ``model`` (the dimension DP-SGD noises)."""
    return sum(p.numel() for n, p in model.named_parameters() if is_trained(n, which))


def parameter_groups(model: nn.Module, which: str, base_scale: float = 1.0) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for set ``which``: the trainable parameters an added modality owns
    (``+ct+us``) at the full learning rate, the rest (the base set, e.g. the pretrained heads) at ``base_scale`` of
    it (run config ``lr-base-scale``: discriminative fine-tuning, a smaller step for what a pretrained start
    already learnt). Each group's ``lr_scale`` is what :meth:`models.schedule.LRSchedule.apply` multiplies the
    schedule's rate by. One group at the full rate when ``base_scale`` is 1 or the set adds no modality (there is
    nothing to set the base against); empty groups are left out.

    Raises:
        ValueError: an unknown set (:func:`parse_trainable`) or a scale outside (0, 1].
    """
    if not 0 < base_scale <= 1:
        raise ValueError(f"lr-base-scale must be in (0, 1], got {base_scale}")
    _, added = parse_trainable(which)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if base_scale == 1 or not added:
        return [{"params": [p for _, p in params], "lr_scale": 1.0}]
    own = [p for n, p in params if owner_modality(_plain(n)) in added]
    base = [p for n, p in params if owner_modality(_plain(n)) not in added]
    return [g for g in ({"params": own, "lr_scale": 1.0}, {"params": base, "lr_scale": float(base_scale)})
            if g["params"]]
