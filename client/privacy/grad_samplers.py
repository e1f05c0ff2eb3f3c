"""Per-case convolution gradients for Opacus's ``hooks`` mode, computed as one grouped weight-gradient call.

Why: Opacus's own sampler for ``nn.Conv{1,2,3}d`` unfolds every input (im2col) and multiplies with ``einsum``. On a
3D network that copy dominates a DP-SGD step: for the 3x3x3 layers of the default fusion model it costs 3-30x the
layer's ordinary weight gradient, and summed over the layers more than a whole non-private step; a DP epoch took
2.5-3.5x a non-private one, and 1.4-1.5x with this sampler (``bench/dp_overhead.py [--profile]``,
docs/benchmarks.md).

How: the per-case weight gradients of a convolution with ``groups=g`` over a batch of ``n`` cases are exactly the
weight gradient of *one* convolution with ``groups=n*g`` over the batch folded into channels: input
``(1, n*C_in, *S)``, output gradient ``(1, n*C_out, *S')`` → weight gradient ``(n*C_out, C_in/g, *k)``, which is
``(n, C_out, C_in/g, *k)`` case by case. ``torch.ops.aten.convolution_backward`` computes it with the backend's
weight-gradient kernel (oneDNN on CPU, cuDNN on CUDA) and no im2col buffer, at about the cost of the batch's
ordinary weight gradient.

Layers this does not cover (padding modes other than ``zeros``, string padding) fall back to Opacus's sampler.
:func:`install` registers it for Opacus's ``hooks`` and fast-gradient-clipping modes; :func:`uninstall` restores
Opacus's sampler (the benchmark compares both). The registry is read at every backward hook, so switching applies
to already-wrapped models too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_grad_sample_grouped(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    activations: Sequence[torch.Tensor],
    backprops: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-case gradients of a convolution's weight and bias (Opacus grad-sampler signature).

    Args:
        layer: the convolution (``padding_mode="zeros"``, integer padding; others go to Opacus's sampler).
        activations: ``[input]`` with input ``(n, C_in, *S)``.
        backprops: gradient of the loss w.r.t. the layer's output, ``(n, C_out, *S')``, already scaled by Opacus.

    Returns:
        ``{weight: (n, C_out, C_in/groups, *k), bias: (n, C_out)}`` for the parameters that require gradients.
    """
    x = activations[0]
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        from opacus.grad_sample.conv import compute_conv_grad_sample

        return compute_conv_grad_sample(layer, list(activations), backprops)
    x = x.to(backprops.dtype)
    n = int(x.shape[0])
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if n == 0:  # Opacus's empty Poisson batch: zero per-case gradients of the right shape
        ret[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return ret
    if layer.weight.requires_grad:
        groups = n * layer.groups
        folded_in = x.reshape(1, n * x.shape[1], *x.shape[2:])
        folded_out = backprops.reshape(1, n * backprops.shape[1], *backprops.shape[2:])
        w_shape = [n * layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size]
        # only the weight's shape matters for its own gradient: an expanded scalar allocates nothing
        w_stub = backprops.new_empty(1).expand(w_shape)
        spatial = x.dim() - 2
        grad_w = torch.ops.aten.convolution_backward(
            folded_out, folded_in, w_stub, None, list(layer.stride), list(layer.padding), list(layer.dilation),
            False, [0] * spatial, groups, [False, True, False],
        )[1]
        ret[layer.weight] = grad_w.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, backprops.shape[1], -1).sum(dim=2)
    return ret


def install() -> None:
    """Use :func:`conv_grad_sample_grouped` for Conv1d/2d/3d in Opacus's hooks and fast-clipping modes."""
    from opacus.grad_sample import register_grad_sampler

    register_grad_sampler(list(_CONV_TYPES))(conv_grad_sample_grouped)


def uninstall() -> None:
    """Restore Opacus's own (unfold-based) convolution sampler."""
    from opacus.grad_sample import register_grad_sampler
    from opacus.grad_sample.conv import compute_conv_grad_sample

    register_grad_sampler(list(_CONV_TYPES))(compute_conv_grad_sample)


def installed() -> bool:
    """Whether Opacus's hooks mode currently uses :func:`conv_grad_sample_grouped` for ``nn.Conv3d``."""
    from opacus.grad_sample import GradSampleModule

    return GradSampleModule.GRAD_SAMPLERS.get(nn.Conv3d) is conv_grad_sample_grouped
