"""Faster CPU convolutions (backward above all) for the small-channel 2D/3D convolutions of fedfusion's networks.

Why: PyTorch's CPU convolution on plain (``contiguous``, NCDHW) tensors is slow for the networks' narrow layers
(4-16 channels, 3x3x3 kernels): on the default model's full-resolution 4->4 layer (batch 12, 16x32x32, 2 threads)
its input gradient took 3.3x the channels-last one, its weight gradient 2x and the layer's whole training pass 2.3x
(``bench/step_time.py``, docs/benchmarks.md). oneDNN's kernels for channels-last tensors (NDHWC) do the same
arithmetic faster at these widths.

How (:class:`FastConvFunction`): the same convolution and the same ``aten.convolution_backward``, on channels-last
copies of the input, kernel and output gradient (one backward call for input, weight and bias gradients), the
forward too for stride-1 layers (:func:`channels_last_forward`); results are returned contiguous, so the rest of the
network sees the layouts the stock path gives it. Memory: a stride-1 layer keeps the channels-last copy of its input
for the backward (31 MiB more than the stock path for the default model at batch 12). Gradients equal the stock
path's up to float rounding (tests/test_fast_conv.py). Measured and not used: the input gradient as a forward
convolution with the flipped kernel (faster than the plain backward, slower than the channels-last one;
``bench/step_time.py`` prints it).

:func:`covers` says which layers this handles: exact ``nn.Conv2d``/``nn.Conv3d`` with a spatial kernel and more than
one input channel per group (pointwise convolutions of several channels and the spatial 1-channel first layers were
as fast or faster stock), zero padding given as integers or ``'valid'``, any stride, dilation, groups, with or
without bias; and the pointwise convolution of a single input channel (the residual path on the image), computed
as a broadcast product. Calls on another device than the CPU (cuDNN's backward is not slow), inside autocast, without
autograd or inside functorch transforms (Opacus's ``functorch`` mode vmaps the layer) take PyTorch's own
convolution, so switching the path never changes what a model computes, only how fast.

Opacus: :func:`set_conv_backward` keeps every module an ``nn.Conv2d``/``nn.Conv3d`` (Opacus finds grad samplers by
exact type) and only sets the module's ``forward``; Opacus's forward hooks still see the layer's input and its full
backward hooks the gradient of its output, so per-case gradients (hooks mode, fedfusion's grouped sampler) are
unchanged (tests/test_fast_conv.py).

Which path a run uses is the run config's ``conv-backward`` key (``fast`` | ``stock``;
``common.runconfig.TrainConfig.conv_backward``): whoever builds a network to train calls
``set_conv_backward(model, train_config.conv_backward)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "CONV_BACKWARDS",
    "FastConvFunction",
    "channels_last_forward",
    "conv_backward_of",
    "conv_grads",
    "covers",
    "fast_conv",
    "scales_one_channel",
    "set_conv_backward",
]

#: The values of the run config's ``conv-backward`` key.
CONV_BACKWARDS: tuple[str, ...] = ("fast", "stock")

#: The module classes the fast path knows (exact types, as Opacus dispatches on them).
_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv3d)

#: Marker attribute on a switched module (its ``forward`` is then an instance attribute).
_MARK = "_fedfusion_fast_conv"


def _channels_last(spatial: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial == 3 else torch.channels_last


def _conv(spatial: int) -> Any:
    return F.conv3d if spatial == 3 else F.conv2d


def channels_last_forward(stride: Sequence[int]) -> bool:
    """Whether :class:`FastConvFunction` runs the forward on channels-last tensors: stride-1 layers (measured 1.1-2x
    faster there, e.g. the default model's 4->4 full-resolution layer; strided ones were 1.5x slower)."""
    return all(int(s) == 1 for s in stride)


def conv_grads(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of a convolution's loss w.r.t. input, weight and bias: PyTorch's backward on channels-last tensors.

    Args:
        grad_out: ``(N, C_out, *S_out)`` gradient w.r.t. the output (2 or 3 spatial axes), any layout.
        x: ``(N, C_in, *S_in)`` the convolution's input, any layout (a channels-last one is used without a copy).
        weight: ``(C_out, C_in / groups, *k)``.
        stride, padding, dilation, groups: the convolution's settings (zero padding, one int per spatial axis).
        need: which of (input, weight, bias) gradients to compute; the others come back ``None``.

    Returns:
        ``(grad input (N, C_in, *S_in), grad weight (C_out, C_in/groups, *k), grad bias (C_out,))``, input and
        weight gradients contiguous, each equal to ``aten.convolution_backward``'s on the plain tensors up to float
        rounding (oneDNN sums in another order).
    """
    need_x, need_w, need_b = need
    spatial = grad_out.dim() - 2
    if not (need_x or need_w):
        return None, None, (grad_out.sum(dim=[0, *range(2, 2 + spatial)]) if need_b else None)
    fmt = _channels_last(spatial)
    # the input's values matter only for the weight's gradient; for the input's own gradient its shape and layout
    # (channels-last makes oneDNN pick its channels-last kernel) are enough
    inp = x.contiguous(memory_format=fmt) if need_w else torch.empty_like(x, memory_format=fmt)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad_out.contiguous(memory_format=fmt), inp, weight.contiguous(memory_format=fmt),
        [weight.shape[0]] if need_b else None, list(stride), list(padding), list(dilation), False, [0] * spatial,
        groups, [need_x, need_w, need_b])
    return (gx.contiguous() if need_x else None, gw.contiguous() if need_w else None, gb if need_b else None)


class FastConvFunction(torch.autograd.Function):
    """``conv{2,3}d(x, weight, bias)`` computed on channels-last tensors where that is faster.

    Forward: PyTorch's convolution, on channels-last copies for stride-1 layers (:func:`channels_last_forward`),
    returned contiguous. Backward: :func:`conv_grads`. Equal to the stock path up to float rounding. Not twice
    differentiable (``once_differentiable``): nothing in fedfusion differentiates a gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> Tensor:
        spatial = x.dim() - 2
        w = weight
        if channels_last_forward(stride):
            # the channels-last copy of x is also what the backward needs: keep it rather than x
            x = x.contiguous(memory_format=_channels_last(spatial))
            w = weight.contiguous(memory_format=_channels_last(spatial))
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return _conv(spatial)(x, w, bias, stride, padding, dilation, groups).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = conv_grads(grad_out, x, weight, stride, padding, dilation, groups,
                                (need_x, need_w, bool(need_b and has_bias)))
        return gx, gw, gb, None, None, None, None


def _stock_path(x: Tensor) -> bool:
    """Whether a call must take PyTorch's own convolution (see the module docstring for why each)."""
    return (x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
            or torch._C._are_functorch_transforms_active()  # Opacus functorch mode vmaps the layer
            or not torch.is_grad_enabled())


def fast_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int) -> Tensor:
    """``F.conv2d``/``F.conv3d`` (by ``x.dim()``) with zero integer padding, using :class:`FastConvFunction` where
    it applies (CPU, autograd on, no autocast, no functorch transform) and PyTorch's convolution elsewhere."""
    if x.dim() not in (4, 5):
        raise ValueError(f"fast_conv takes (N, C, H, W) or (N, C, D, H, W) input, got shape {tuple(x.shape)}")
    if _stock_path(x):
        return _conv(x.dim() - 2)(x, weight, bias, list(stride), list(padding), list(dilation), groups)
    if scales_one_channel(weight, stride, padding, groups):
        return _scale(x, weight, bias)
    return FastConvFunction.apply(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def scales_one_channel(weight: Tensor, stride: Sequence[int], padding: Sequence[int], groups: int) -> bool:
    """Whether the convolution is a pointwise one of a single input channel (stride 1, no padding, one group):
    each output channel is the input times a scalar plus the bias."""
    return (weight.shape[1] == 1 and groups == 1 and all(k == 1 for k in weight.shape[2:])
            and all(int(s) == 1 for s in stride) and all(int(p) == 0 for p in padding))


def _scale(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``(N, 1, *S)`` times ``weight (C_out, 1, 1, ...)`` plus ``bias``: the pointwise convolution of one input
    channel as a broadcast product (autograd's backward: a product and a sum). Why: with more than one thread
    PyTorch runs it through oneDNN, which first copies the input into a 16-channel blocked layout; at 2 threads
    that took 10x the product (``bench/step_time.py``)."""
    shape = (1, weight.shape[0]) + (1,) * (x.dim() - 2)
    y = x * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def covers(module: nn.Module) -> bool:
    """Whether :func:`set_conv_backward` switches ``module``: an exact ``nn.Conv2d``/``nn.Conv3d`` (a subclass may
    override ``forward``) with zero padding given as integers or ``'valid'`` (``'same'`` may pad unevenly, other
    modes pad before the call) that is either

    * a convolution with more than one kernel tap and more than one input channel per group (channels-last
      :class:`FastConvFunction`), or
    * a pointwise convolution of a single input channel (a broadcast product, see :func:`_scale`).

    Left stock, as fast or faster there in ``bench/step_time.py``: pointwise convolutions of several channels and
    spatial ones of a single input channel per group (the first layers on the image)."""
    if type(module) not in _CONV_TYPES:
        return False
    padding = module.padding  # type: ignore[union-attr]
    if module.padding_mode != "zeros" or (isinstance(padding, str) and padding != "valid"):
        return False
    pointwise = all(k == 1 for k in module.kernel_size)  # type: ignore[union-attr]
    single_channel = module.in_channels // module.groups == 1  # type: ignore[operator]
    if pointwise and single_channel:
        pads = (0,) if isinstance(padding, str) else padding
        return scales_one_channel(module.weight, module.stride, pads, module.groups)  # type: ignore[arg-type]
    return not pointwise and not single_channel


class _FastForward:
    """The ``forward`` :func:`set_conv_backward` gives a convolution: :func:`fast_conv` with the module's settings.
    A class rather than a bound method so that a switched model still deep-copies and pickles."""

    def __init__(self, module: nn.Conv2d | nn.Conv3d) -> None:
        self.module = module

    def __call__(self, x: Tensor) -> Tensor:
        m = self.module
        if x.dim() != len(m.kernel_size) + 2:  # unbatched input: the stock forward handles it
            return type(m).forward(m, x)
        padding = [0] * (x.dim() - 2) if isinstance(m.padding, str) else m.padding
        return fast_conv(x, m.weight, m.bias, m.stride, padding, m.dilation, m.groups)


def set_conv_backward(model: nn.Module, mode: str) -> int:
    """Switch every convolution of ``model`` that :func:`covers` to the ``fast`` backward, or back to ``stock``.

    The modules keep their class, parameters and state dict; ``fast`` sets an instance ``forward`` calling
    :func:`fast_conv`, ``stock`` removes it. Safe to call on an Opacus-wrapped model (``GradSampleModule``) and
    before or after ``.to(device)``.

    Returns:
        the number of convolutions now on the fast path (0 for ``stock``).

    Raises:
        ValueError: ``mode`` is not one of :data:`CONV_BACKWARDS`.
    """
    if mode not in CONV_BACKWARDS:
        raise ValueError(f"conv backward {mode!r} is not one of {', '.join(CONV_BACKWARDS)} (run config key "
                         "'conv-backward')")
    switched = 0
    for m in model.modules():
        if mode == "fast" and covers(m):
            m.forward = _FastForward(m)  # type: ignore[method-assign]
            setattr(m, _MARK, True)
            switched += 1
        elif mode == "stock" and getattr(m, _MARK, False):
            del m.forward
            delattr(m, _MARK)
    return switched


def conv_backward_of(model: nn.Module) -> str:
    """``fast`` when some convolution of ``model`` is switched by :func:`set_conv_backward`, else ``stock``."""
    return "fast" if any(getattr(m, _MARK, False) for m in model.modules()) else "stock"
