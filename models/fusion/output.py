"""Output-level (late) fusion: one prediction per modality, combined by a masked, learned-weight average.

Each modality's pyramid goes through the *shared* decoder (``decoder``, owner None: it learns a modality-agnostic
upsampling path from every site's data) and then through its own heads ``fusion.heads.<m>`` (owned by ``m``):
``seg`` (1x1 conv to segmentation logits at full resolution), ``cls`` (a one-modality
:class:`models.classifier.LesionClassifier`: the modality's image statistics inside its own predicted lesion
regions) and ``gate`` (``nn.Embedding(1, 1)``: the modality's learned
fusion logit). The fused logits are ``sum_i w_i y_i`` with ``w = softmax(gate)`` taken over the modalities present
in each sample only (renormalised: missing modalities get weight exactly 0, present weights sum to 1).
Averaging logits (rather than probabilities) is a weighted product of experts, which keeps cross-entropy and
Dice losses on the fused output well-conditioned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..classifier import LesionClassifier
from ..decoder import decoder_widths
from ..encoders import conv_block
from .base import Fusion


class ModalityHead(nn.Module):
    """Per-modality prediction heads of ``modality``: ``seg`` (1x1 conv), ``cls`` (region-pooled classifier),
    ``gate`` (fusion logit)."""

    def __init__(self, cfg: ModelConfig, modality: str) -> None:
        super().__init__()
        width = decoder_widths(cfg.channels, cfg.num_seg_classes)[0]  # the shared decoder's full-resolution width
        self.seg = conv_block(cfg.spatial_dims, width, cfg.num_seg_classes, kernel_size=1, conv_only=True)
        self.cls = LesionClassifier((modality,), cfg.num_classes, cfg.dropout)
        self.gate = nn.Embedding(1, 1)
        nn.init.zeros_(self.gate.weight)  # start from the plain mean over present modalities


class OutputFusion(Fusion):
    """Late fusion; parameters ``fusion.heads.<m>`` (owned by ``m``); the network's decoder returns features."""

    family = "output"
    late = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.heads = nn.ModuleDict({m: ModalityHead(cfg, m) for m in cfg.modalities})
        self.last_weights: Tensor | None = None

    def forward(
        self,
        image: Tensor,
        pyramids: Sequence[Sequence[Tensor]],
        mask: Tensor,
        decode: Callable[[Tensor, Sequence[Tensor]], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """``image`` (B, M, *S) masked input; ``pyramids[i][l]`` (B, C_l, *S_l); ``decode(bottleneck, skips)`` ->
        (B, W, *S) full-resolution features.

        Returns fused (seg logits (B, K, *S), class logits (B, num_classes)); stores the per-sample fusion weights
        (B, M) in :attr:`last_weights`.
        """
        return self.combine(self.modality_predictions(image, pyramids, decode), mask)

    def modality_predictions(
        self,
        image: Tensor,
        pyramids: Sequence[Sequence[Tensor]],
        decode: Callable[[Tensor, Sequence[Tensor]], Tensor],
    ) -> list[tuple[Tensor, Tensor] | None]:
        """Each modality's own prediction ``(seg logits (B, K, *S), class logits (B, num_classes))``; ``None`` for
        modalities declared absent at this site. Independent of the mask, so subset evaluation
        (``FusionNet.forward_subsets``) computes them once and only re-runs :meth:`combine` per subset."""
        out: list[tuple[Tensor, Tensor] | None] = []
        for i, m in enumerate(self.modalities):
            if m in self.skip:
                out.append(None)
                continue
            feats = pyramids[i]
            head = self.heads[m]
            seg = head.seg(decode(feats[-1], feats[:-1]))
            own = image[:, i : i + 1]
            out.append((seg, head.cls(seg, own, own.new_ones(own.shape[0], 1))))
        return out

    def combine(self, predictions: Sequence[tuple[Tensor, Tensor] | None], mask: Tensor) -> tuple[Tensor, Tensor]:
        """Masked learned-weight average of :meth:`modality_predictions` for ``mask`` (B, M) -> fused
        (seg logits (B, K, *S), class logits (B, num_classes)); stores the weights in :attr:`last_weights`."""
        b = mask.shape[0]
        # (B, 1) indices, not (B,): Opacus's expanded-weights mode needs a batch *and* a feature dimension
        index = torch.zeros(b, 1, dtype=torch.long, device=mask.device)
        gates = torch.cat([self.heads[m].gate(index) for m in self.modalities], dim=1)[..., 0]  # (B, M)
        present = mask > 0
        weights = gates.masked_fill(~present, float("-inf")).softmax(dim=1)
        weights = torch.where(present, weights, torch.zeros_like(weights))  # exact zeros, no NaN for safety
        seg: Tensor | None = None
        cls: Tensor | None = None
        for i, pred in enumerate(predictions):
            if pred is None:  # declared absent at this site: its weight is exactly 0 anyway
                continue
            s, c = pred
            w = weights[:, i]
            s = s * w.reshape(-1, *([1] * (s.dim() - 1)))
            c = c * w[:, None]
            seg = s if seg is None else seg + s
            cls = c if cls is None else cls + c
        assert seg is not None and cls is not None
        self.last_weights = weights.detach()
        return seg, cls
