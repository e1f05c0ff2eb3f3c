"""Cross-modal attention fusion at every encoder level.

At each spatial position of level ``l`` the M modality features ``H_i^l`` are M tokens. Pre-norm multi-head
self-attention over these tokens (queries/keys see a learned modality embedding ``e_i`` added) lets every modality
attend to the others; missing modalities are masked out of the keys (their attention weight is exactly 0) and their
own query outputs are ignored by the final masked mean over modalities, which gives the fused feature ``F^l``:

    delta = W_o MHA(LN(H + e));   u_i = H_i + delta_i;   F = sum_i m_i u_i / sum_i m_i

How it is computed (the same function, fewer operations): the masked mean is taken before the output projection and
the upsampling, which are linear, and before the value mixing: with ``s_i = m_i / sum_j m_j`` and ``A`` the
attention of one head,

    sum_i s_i delta_i = W_o (sum_j a_j v_j) + b_o,   a_j = sum_i s_i A_ij,

so the output projection and the level-0 upsampling run on one token per position instead of M, and the M x M
mixing becomes a weighted sum. The mask-independent part (layer norm, query/key/value projections and the scores
``q k^T``) is :meth:`AttentionFusion.prepare`; only the masking, softmax and the mean depend on the mask
(:meth:`AttentionFusion.fuse`), so evaluating many modality subsets (``FusionNet.forward_subsets``) pays it once.
Measured at the default training shape (batch 12, 16x32x32, 6 modalities, 2 threads): the fusion's forward +
backward took 0.84x the CPU time of the per-modality form (one-off, both modules interleaved in one process), whose
outputs and gradients it equals (``tests/test_networks.py``).

Cost: attention is over M tokens per position, O(P M^2 C), linear in the number of positions P. At the
full-resolution level 0 (when the network has more than one level) it runs on 2x average-pooled tokens and its
update ``delta`` is upsampled back (nearest), which cuts that level's attention cost 4x (2D) / 8x (3D); the coarser
levels attend at every position. Everything is built from ``nn.Linear``/``nn.LayerNorm``/``nn.Embedding`` applied
batch-first, so Opacus's hooks compute per-sample gradients. Modality embeddings are one ``nn.Embedding(1, C)`` per
modality under ``fusion.levels.<l>.embeddings.<m>`` (owned by ``m``; a raw ``nn.Parameter`` has no grad sampler).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .base import Fusion, masked_mean_stacked


def softmax_last(scores: Tensor) -> Tensor:
    """``scores.softmax(dim=-1)`` for a short last axis (the M <= 6 modality keys), from elementwise operations.

    PyTorch's CPU softmax kernel vectorises along the softmaxed axis, which here holds 6 values per row: measured on
    the default model's level-0 scores (12, 2048, 2, 6, 6), this form takes half the time forward + backward (16 vs
    30 ms) and a quarter forward only. Values agree to float rounding; rows of only ``-inf`` give NaN, as
    ``softmax`` does.
    """
    # the shift is a constant for the gradient (softmax is shift-invariant), so it is detached
    e = (scores - scores.amax(dim=-1, keepdim=True).detach()).exp()
    return e / e.sum(dim=-1, keepdim=True)


class ModalityAttention(nn.Module):
    """Multi-head attention across modality tokens at each position, missing modalities masked out of the keys.

    Split in two for subset evaluation: :meth:`scores` (independent of the mask) and :meth:`pooled_update` (the
    masked softmax and the mean over present query modalities).

    Args:
        channels: token width C.
        heads: attention heads; must divide ``channels``.
        modalities: modality names (for the per-modality embeddings).
    """

    def __init__(self, channels: int, heads: int, modalities: Sequence[str]) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention width {channels} is not divisible by {heads} heads")
        self.heads = heads
        self.modalities = tuple(modalities)
        self.embeddings = nn.ModuleDict({m: nn.Embedding(1, channels) for m in modalities})
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def scores(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens`` (B, P, M, C) -> (scaled scores ``q k^T / sqrt(d)`` (B, P, h, Mq, Mk), values (B, P, h, M, d)),
        ``d = C / h``; nothing here depends on which modalities are present."""
        b, p, m, c = tokens.shape
        # (B, 1) indices, not (B,): Opacus's expanded-weights mode needs a batch *and* a feature dimension
        index = torch.zeros(b, 1, dtype=torch.long, device=tokens.device)
        emb = torch.cat([self.embeddings[name](index) for name in self.modalities], dim=1)  # (B, M, C)
        # Linear layers see (B, P*M, C): Opacus's ghost-clipping norm sampler takes 2D/3D activations only
        qkv = self.qkv(self.norm(tokens + emb[:, None]).reshape(b, p * m, c))
        q, k, v = qkv.reshape(b, p, m, 3, self.heads, c // self.heads).unbind(dim=3)
        q, k, v = (x.transpose(2, 3) for x in (q, k, v))  # (B, P, h, M, d)
        return q @ k.transpose(-1, -2) / math.sqrt(c // self.heads), v

    def pooled_update(self, scores: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The update averaged over the present modalities, ``sum_i s_i delta_i`` (module docstring).

        Args:
            scores, values: :meth:`scores`' outputs.
            mask: (B, M) float availability; every sample needs a present modality.

        Returns:
            (pooled update (B, P, C), attention (B, M, M) averaged over heads and positions; rows of missing query
            modalities are zero).
        """
        b, p, h, m, d = values.shape
        present = mask > 0
        attn = softmax_last(scores.masked_fill(~present[:, None, None, None, :], float("-inf")))
        share = (mask / mask.sum(dim=1, keepdim=True).clamp_min(1.0)).to(attn.dtype)  # s_i, (B, M)
        # a_j = sum_i s_i A_ij, then sum_j a_j v_j: elementwise products and sums over M <= 6, which the CPU runs
        # faster than batched (1 x M) @ (M x d) products (as for the softmax)
        keys = (attn * share[:, None, None, :, None]).sum(dim=3)  # (B, P, h, Mk)
        mixed = (keys[..., None] * values).sum(dim=3)  # (B, P, h, d)
        weights = attn.detach().mean(dim=(1, 2)) * mask.to(attn.dtype)[:, :, None]
        return self.out(mixed.reshape(b, p, h * d)), weights

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens`` (B, P, M, C), ``mask`` (B, M) -> :meth:`pooled_update` (pooled update (B, P, C), attention
        (B, M, M))."""
        return self.pooled_update(*self.scores(tokens), mask)


#: One level's mask-independent work (:meth:`AttentionFusion.prepare`): the stacked features (B, M, C, *S), the
#: scores (B, P, h, M, M) and the values (B, P, h, M, d) of the (pooled) tokens.
Prepared = tuple[Tensor, Tensor, Tensor]


class AttentionFusion(Fusion):
    """Cross-modal attention at every level; parameters ``fusion.levels.<l>`` (shared core, owner None) and
    ``fusion.levels.<l>.embeddings.<m>`` (owned by ``m``).

    Level 0 attends over 2x average-pooled tokens (its update is upsampled back) when the network has coarser
    levels; the others attend at every position. Heads per level: ``gcd(cfg.attention_heads, channels[l])`` (the config guarantees divisibility only for the
    fused width; at the default config every level uses ``cfg.attention_heads``).
    """

    family = "attention"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.levels = nn.ModuleList(
            ModalityAttention(c, math.gcd(cfg.attention_heads, c), cfg.modalities) for c in cfg.channels
        )
        # Pool factor of each level's tokens: 2 at full resolution when there are coarser levels, else 1.
        depth = len(cfg.channels)
        self.pools: tuple[int, ...] = tuple(2 if l == 0 and depth > 1 else 1 for l in range(depth))
        self.last_attention: Tensor | None = None

    def prepare(self, pyramids: Sequence[Sequence[Tensor]]) -> list[Prepared]:
        """``pyramids[i][l]`` (B, C_l, *S_l) -> per level ``(stacked, scores, values)``: everything of the fusion
        that does not depend on the mask."""
        prepared: list[Prepared] = []
        for l, attn in enumerate(self.levels):
            stacked = torch.stack([p[l] for p in pyramids], dim=1)  # (B, M, C, *S)
            src = stacked
            if self.pools[l] > 1:
                m, c = stacked.shape[1:3]
                pool = F.avg_pool3d if self.spatial_dims == 3 else F.avg_pool2d
                src = pool(stacked.flatten(1, 2), self.pools[l]).unflatten(1, (m, c))
            prepared.append((stacked, *attn.scores(src.flatten(3).permute(0, 3, 1, 2))))  # tokens (B, P, M, C)
        return prepared

    def fuse(self, prepared: Sequence[Prepared], mask: Tensor) -> list[Tensor]:
        """:meth:`prepare`'s output and ``mask`` (B, M) -> fused ``[F^0, ..., F^{L-1}]``, ``F^l`` (B, C_l, *S_l);
        stores the attention (B, M, M) averaged over levels, heads and positions in :attr:`last_attention`."""
        fused: list[Tensor] = []
        weights: list[Tensor] = []
        for l, (attn, (stacked, scores, values)) in enumerate(zip(self.levels, prepared)):
            b, _, c = stacked.shape[:3]
            spatial = stacked.shape[3:]
            update, w = attn.pooled_update(scores, values, mask)  # (B, P, C)
            delta = update.transpose(1, 2).reshape(b, c, *(s // self.pools[l] for s in spatial))
            if self.pools[l] > 1:
                delta = F.interpolate(delta, size=tuple(spatial), mode="nearest")
            fused.append(masked_mean_stacked(stacked, mask) + delta)
            weights.append(w)
        self.last_attention = torch.stack(weights).mean(dim=0)
        return fused

    def forward(self, pyramids: Sequence[Sequence[Tensor]], mask: Tensor) -> list[Tensor]:
        """``pyramids[i][l]`` (B, C_l, *S_l) -> fused ``[F^0, ..., F^{L-1}]`` (:meth:`prepare` then :meth:`fuse`)."""
        return self.fuse(self.prepare(pyramids), mask)
