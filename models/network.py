"""FusionNet: per-modality encoders -> fusion family -> U-shaped decoder (segmentation) + classifier (case label).

Parameter names carry ownership (``models.modalities.owner_modality``):

======================================  ===========================================  =========
name                                    what                                         owner
======================================  ===========================================  =========
``encoders.<m>.…``                      per-modality encoder (all but ``input``)     ``m``
``fusion.stems.<m>.…``                  early-fusion stem conv (``input``)           ``m``
``fusion.levels.<l>.embeddings.<m>.…``  modality embedding (``attention``)           ``m``
``fusion.heads.<m>.…``                  late-fusion heads and gate (``output``)      ``m``
``classifier.modalities.<m>.…``         the classifier's embedding of ``m``'s         ``m``
                                        region statistics
``fusion.…`` (other)                    fusion core                                  None
``decoder.…``, ``classifier.…`` (other) shared decoder and classifier MLP            None
======================================  ===========================================  =========

Missing modalities: the forward replaces every channel whose mask is 0 by exact zeros (``torch.where``, so even
NaN pixels there cannot leak) and every family excludes it from fusion, so the pixels of a missing modality never
change the output. Every parameter takes part in every forward (the encoder of a missing modality runs on zeros and
its output is multiplied by 0), so Opacus's per-sample gradients exist for all parameters, zero where unused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .classifier import LesionClassifier
from .config import MODALITY_DROPOUT_MODES, ModelConfig
from .decoder import Decoder
from .encoders import Encoder
from .fusion import build_fusion
from .fusion.base import Fusion
from .fusion.attention import AttentionFusion
from .fusion.output import OutputFusion


class FusionNet(nn.Module):
    """The fedfusion network for one :class:`ModelConfig` (family, modalities, widths, 2D/3D).

    A unimodal baseline is the same network built with ``cfg.modalities = (m,)``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.fusion: Fusion = build_fusion(cfg)
        if self.fusion.modality_encoders:
            self.encoders = nn.ModuleDict(
                {m: Encoder(cfg.spatial_dims, 1, cfg.channels) for m in cfg.modalities}
            )
        self.decoder = Decoder(cfg.spatial_dims, cfg.channels, None if self.fusion.late else cfg.num_seg_classes,
                               num_seg_classes=cfg.num_seg_classes)
        if not self.fusion.late:
            self.classifier = LesionClassifier(cfg.modalities, cfg.num_classes, cfg.dropout)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Segment and classify one batch.

        Args:
            image: (B, M, *S) float32, M = ``len(config.modalities)`` in config order, S 2D (H, W) or 3D (D, H, W)
                with every axis divisible by ``2 ** (depth - 1)`` (normally ``config.spatial_size``), intensities
                as the data pipeline normalised them.
            mask: (B, M) float 0/1 availability; every sample needs at least one present modality.

        Returns:
            (seg_logits (B, num_seg_classes, *S), class_logits (B, num_classes)), unnormalised logits.
        """
        self._check_inputs(image, mask)
        mask = mask.to(image.dtype)
        return self.decode(self._encode(image, mask), mask)

    # -- the mask-independent / mask-dependent split (fast evaluation of many modality subsets) --------------------
    def encode(self, image: Tensor, mask: Tensor) -> tuple[Tensor, list[Any]]:
        """The part of :meth:`forward` that does not depend on which of the present modalities are used.

        Args:
            image, mask: as in :meth:`forward`; channels whose ``mask`` is 0 are zeroed first.

        Returns:
            Opaque features for :meth:`decode`: ``(image, per_modality)``, the masked image (B, M, *S) (the
            classifier pools it inside the predicted regions) and one entry per modality: ``input``: stem outputs (B, C_0, *S), ``None`` for
            modalities declared absent by :meth:`set_site_modalities`; ``single``/``hierarchical``: encoder pyramids
            ``[H^0..H^{L-1}]`` (zeros when declared absent); ``attention``: those pyramids after the fusion's
            mask-independent work (``Fusion.prepare``: per level the stacked features, attention scores and
            values); ``output``: the modality's own
            ``(seg logits, class logits)`` (``None`` when declared absent).
        """
        self._check_inputs(image, mask)
        return self._encode(image, mask.to(image.dtype))

    def _encode(self, image: Tensor, mask: Tensor) -> tuple[Tensor, list[Any]]:
        present = mask.reshape(*mask.shape, *([1] * (image.dim() - 2))) > 0
        x = torch.where(present, image, torch.zeros((), dtype=image.dtype, device=image.device))
        if not self.fusion.modality_encoders:
            return x, self.fusion.stem_features(x)
        pyramids = [
            self._zero_pyramid(x) if m in self.fusion.skip else self.encoders[m](x[:, i : i + 1])
            for i, m in enumerate(self.config.modalities)
        ]
        if self.fusion.late:
            return x, self.fusion.modality_predictions(x, pyramids, self.decoder)
        return x, self.fusion.prepare(pyramids)

    def decode(self, features: tuple[Tensor, list[Any]], mask: Tensor) -> tuple[Tensor, Tensor]:
        """Fuse :meth:`encode`'s features under ``mask`` (B, M) and predict: ``(seg logits (B, K, *S), class
        logits (B, num_classes))``, equal to ``forward(image, mask)`` for any ``mask`` that is a subset of the mask
        given to :meth:`encode` (a modality outside ``mask`` is multiplied by exactly 0 or masked out of attention,
        whatever its features). Every sample needs at least one modality in ``mask``, which has the image's float
        dtype (as :meth:`forward` and :meth:`encode` cast it)."""
        image, per_modality = features
        if not self.fusion.modality_encoders:
            return self._heads(self.fusion.fuse_stems(per_modality, mask), image, mask)
        if self.fusion.late:
            return self.fusion.combine(per_modality, mask)
        return self._heads(self.fusion.fuse(per_modality, mask), image, mask)

    def forward_subsets(
        self, image: Tensor, mask: Tensor, subset_masks: Tensor, *, subset_batch: int | None = None,
        features: tuple[Tensor, list[Any]] | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``forward`` for many modality subsets of one batch, sharing the mask-independent work.

        The per-modality encoders (stems for ``input``, whole per-modality predictions for ``output``) run once
        (:meth:`encode`); only the fusion and decoder run per subset (:meth:`decode`), ``subset_batch`` subsets at
        a time stacked along the batch axis (GroupNorm and attention are per sample, so stacking is exact).

        Args:
            image: (B, M, *S), as in :meth:`forward`.
            mask: (B, M) availability of each case.
            subset_masks: (S, M) 0/1 keep-vectors; subset ``s`` uses ``mask * subset_masks[s]``.
            subset_batch: subsets per decoder pass (memory grows linearly with it). ``None``: 1 on CPU, where
                stacking was measured slower (``bench/subset_eval_speed.py``: cache-bound convolutions plus the
                copies), 8 on CUDA (fewer, larger kernel launches; not measured here).
            features: :meth:`encode`'s output for this ``image`` and ``mask`` when the caller has it already
                (threads sharing one batch's encoding: :meth:`decode` only reads it); ``None``: encoded here.

        Yields:
            Per subset in order, ``(seg logits (B, K, *S), class logits (B, num_classes))``, equal (up to float
            rounding) to ``forward(image, mask * subset_masks[s])``. Lazy: consume each before the next to keep
            memory low. :meth:`attention_weights` / :meth:`fusion_weights` afterwards describe the last chunk.

        Raises:
            ValueError: bad shapes, or a subset that leaves some sample with no modality (drop those samples or
            evaluate that subset separately).
        """
        self._check_inputs(image, mask)
        mask = mask.to(image.dtype)
        m = len(self.config.modalities)
        if subset_masks.dim() != 2 or subset_masks.shape[1] != m:
            raise ValueError(f"subset_masks must be (S, M) with M = {m}, got shape {tuple(subset_masks.shape)}")
        if subset_batch is None:
            subset_batch = 8 if image.device.type == "cuda" else 1
        if subset_batch < 1:
            raise ValueError(f"subset_batch must be >= 1, got {subset_batch}")
        effective = mask[None] * subset_masks.to(device=mask.device, dtype=mask.dtype)[:, None]  # (S, B, M)
        empty = effective.sum(dim=2) <= 0
        if bool(empty.any()):
            s, b = (int(v) for v in torch.nonzero(empty)[0])
            raise ValueError(
                f"subset {s} leaves sample {b} of the batch with no modality present; evaluate that subset on the "
                "samples that have one of its modalities"
            )
        if features is None:
            features = self._encode(image, mask)
        bsz = image.shape[0]
        for start in range(0, effective.shape[0], subset_batch):
            chunk = effective[start : start + subset_batch]
            k = chunk.shape[0]
            seg, cls = self.decode(_tile(features, k), chunk.reshape(k * bsz, m))
            for j in range(k):
                yield seg[j * bsz : (j + 1) * bsz], cls[j * bsz : (j + 1) * bsz]

    def _zero_pyramid(self, x: Tensor) -> list[Tensor]:
        """Stand-in features of a modality declared absent: zeros (B, C_l, *S / 2**l) per level. Every family
        multiplies them by mask 0 or masks them out, so the output equals running the encoder."""
        b, spatial = x.shape[0], x.shape[2:]
        return [
            x.new_zeros(b, c, *(s // 2**l for s in spatial)) for l, c in enumerate(self.config.channels)
        ]

    def _heads(self, fused: Sequence[Tensor], image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder on the fused pyramid; classifier on the segmentation and the (masked) image."""
        seg = self.decoder(fused[-1], fused[:-1])
        return seg, self.classifier(seg, image, mask)

    def _check_inputs(self, image: Tensor, mask: Tensor) -> None:
        cfg = self.config
        m = len(cfg.modalities)
        if image.dim() != 2 + cfg.spatial_dims:
            raise ValueError(
                f"image must be (B, M, {'D, H, W' if cfg.spatial_dims == 3 else 'H, W'}) for a "
                f"{cfg.spatial_dims}D model, got shape {tuple(image.shape)}"
            )
        if image.shape[1] != m:
            raise ValueError(
                f"image has {image.shape[1]} modality channels but the model expects {m} "
                f"({', '.join(cfg.modalities)}); stack missing modalities as zero channels with mask 0"
            )
        if tuple(mask.shape) != (image.shape[0], m):
            raise ValueError(f"mask must be (B, M) = {(image.shape[0], m)}, got {tuple(mask.shape)}")
        down = 2 ** (len(cfg.channels) - 1)
        if any(s % down for s in image.shape[2:]):
            raise ValueError(
                f"image spatial size {tuple(image.shape[2:])} must be divisible by {down}; resize the data to "
                f"the model's spatial_size {cfg.spatial_size}"
            )
        for i, name in enumerate(cfg.modalities):
            if name in self.fusion.skip and bool((mask[:, i] > 0).any()):
                raise ValueError(
                    f"modality {name!r} is present in the batch but was declared absent at this site by "
                    "set_site_modalities; declare it (or pass mask 0 for it)"
                )
        if bool((mask.sum(dim=1) <= 0).any()):
            bad = torch.nonzero(mask.sum(dim=1) <= 0).flatten().tolist()
            raise ValueError(f"samples {bad} of the batch have no modality present (mask all 0); drop them")

    # -- sites without some modalities ---------------------------------------------------------------------------
    def set_site_modalities(self, modalities: Sequence[str] | None) -> None:
        """Declare the modalities a site can ever have (``None``: all of the model's), to save compute.

        Parameters owned by the other modalities (``models.modalities.owner_modality``) are frozen
        (``requires_grad=False``) and their branches (encoder, stem, late-fusion head) are skipped in ``forward``;
        the outputs are unchanged because those modalities' mask is always 0. Call it *before* building the optimizer
        / Opacus ``make_private`` (which then see only the trainable parameters), and call it with ``None`` (or all
        modalities) to undo. A batch where a declared-absent modality has mask 1 is a ValueError.
        """
        from .modalities import canonical, owner_modality

        cfg = self.config
        keep = set(cfg.modalities) if modalities is None else set(canonical(modalities))
        unknown = keep - set(cfg.modalities)
        if unknown:
            raise ValueError(
                f"site modalities {sorted(unknown)} are not inputs of this model ({', '.join(cfg.modalities)})"
            )
        self.fusion.skip = frozenset(set(cfg.modalities) - keep)
        for name, p in self.named_parameters():
            owner = owner_modality(name)
            p.requires_grad_(owner is None or owner in keep)

    # -- introspection -------------------------------------------------------------------------------------------
    def attention_weights(self) -> Tensor | None:
        """Last forward's cross-modal attention (B, M_query, M_key), averaged over levels, heads and positions;
        rows of missing query modalities are 0 and columns of missing keys are 0. None for non-attention families
        or before any forward."""
        if isinstance(self.fusion, AttentionFusion):
            return self.fusion.last_attention
        return None

    def fusion_weights(self) -> Tensor | None:
        """Last forward's late-fusion weights (B, M) (``output`` family; 0 for missing modalities), else None."""
        if isinstance(self.fusion, OutputFusion):
            return self.fusion.last_weights
        return None


def _tile(obj: Any, k: int) -> Any:
    """Repeat every tensor of a nested list/tuple ``k`` times along the batch axis (``[x, x, ..., x]``)."""
    if k == 1 or obj is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.repeat(k, *([1] * (obj.dim() - 1)))
    return type(obj)(_tile(o, k) for o in obj)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> FusionNet:
    """Build the network of ``cfg`` (on ``device`` if given, else CPU)."""
    model = FusionNet(cfg)
    return model.to(device) if device is not None else model


def apply_modality_dropout(
    mask: Tensor, p: float, generator: torch.Generator | None = None, mode: str = "independent"
) -> Tensor:
    """Training-time modality dropout: a random subset of each sample's present modalities, never none.

    Modes:

    - ``independent``: drop each present modality with probability ``p``; a sample whose every present modality was
      drawn for dropping keeps one of them, chosen uniformly.
    - ``subsets``: with probability ``min(1, 2 p)`` a sample keeps a uniformly drawn non-empty subset of its present
      modalities (each of the ``2^k - 1`` equally likely), else all of them. This trains on the distribution the
      every-subset evaluation averages over (the 63 subsets of 6 modalities hold 3 on average), where independent
      drops at 0.25 mostly remove one or two; the share ``2 p`` keeps the expected number of kept modalities of
      the independent mode (4.5 of 6 at ``p`` = 0.25, 3 at 0.5).

    Args:
        mask: (B, M) float 0/1 availability.
        p: the dropout probability, in [0, 1).
        generator: optional torch generator (on the mask's device) for reproducible draws.
        mode: one of :data:`models.config.MODALITY_DROPOUT_MODES`.

    Returns:
        A new (B, M) mask, a subset of ``mask``: missing modalities stay missing and a sample with a present modality
        keeps at least one. The network zeroes the image channels of dropped modalities itself, so the caller only
        passes the new mask to ``forward``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"modality dropout probability must be in [0, 1), got {p}")
    if mode not in MODALITY_DROPOUT_MODES:
        raise ValueError(f"modality dropout mode {mode!r} is not one of {', '.join(MODALITY_DROPOUT_MODES)}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, M), got shape {tuple(mask.shape)}")
    present = mask > 0
    if p == 0.0:
        return mask.clone()
    if mode == "subsets":
        chosen = torch.rand(mask.shape[0], generator=generator, device=mask.device) < min(1.0, 2.0 * p)
        keep = present.clone()
        todo = chosen & present.any(dim=1)
        # rejection sampling: fair coins on the present modalities, redrawn for the rows that kept none (a row with
        # k present redraws with probability 2^-k), which makes every non-empty subset equally likely
        while bool(todo.any()):
            coins = (torch.rand(mask.shape, generator=generator, device=mask.device) < 0.5) & present
            keep = torch.where(todo[:, None], coins, keep)
            todo = todo & ~coins.any(dim=1)
        return keep.to(mask.dtype)
    draw = torch.rand(mask.shape, generator=generator, device=mask.device)
    keep = present & (draw >= p)
    emptied = present.any(dim=1) & ~keep.any(dim=1)
    if bool(emptied.any()):
        # Choose one present modality per emptied sample: argmax of random scores restricted to present ones.
        scores = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~present, -1.0)
        rescue = torch.zeros_like(present)
        rescue.scatter_(1, scores.argmax(dim=1, keepdim=True), True)
        keep = keep | (rescue & emptied[:, None])
    return keep.to(mask.dtype)
