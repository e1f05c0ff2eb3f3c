"""Mixed precision in the training loop (models/precision.py): what each mode resolves to, float32 under DP-SGD,
and bf16/fp16 epochs (fp16's loss scaler included) running on the CPU, the same code a CUDA site runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.losses import MultiTaskLoss
from models.network import build_model
from models.precision import AMP_MODES, MixedPrecision
from models.training import make_optimizer, train_epoch
from tests.client_helpers import TINY


def _batches(n_batches: int = 2, b: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    m = len(TINY.modalities)
    return [{"image": torch.randn(b, m, *TINY.spatial_size, generator=g), "mask": torch.ones(b, m),
             "seg": torch.randint(0, TINY.num_seg_classes, (b, *TINY.spatial_size), generator=g),
             "label": torch.randint(0, TINY.num_classes, (b,), generator=g)} for _ in range(n_batches)]


def test_modes_resolve() -> None:
    assert AMP_MODES == ("off", "auto", "bf16", "fp16")
    assert not MixedPrecision.resolve("off", "cpu", private=False).enabled
    assert not MixedPrecision.resolve("auto", "cpu", private=False).enabled  # CPU: float32 unless asked
    assert not MixedPrecision.resolve("auto", "cpu", private=True).enabled
    bf16 = MixedPrecision.resolve("bf16", "cpu", private=False)
    assert bf16.dtype is torch.bfloat16 and bf16.scaler is None
    fp16 = MixedPrecision.resolve("fp16", "cpu", private=False)
    assert fp16.dtype is torch.float16 and fp16.scaler is not None
    with pytest.raises(ValueError, match="DP-SGD"):
        MixedPrecision.resolve("bf16", "cpu", private=True)
    with pytest.raises(ValueError, match="not one of"):
        MixedPrecision.resolve("half", "cpu", private=False)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_amp_epoch_trains_float32_weights(mode: str) -> None:
    torch.manual_seed(0)
    model = build_model(TINY)
    opt = make_optimizer(model, 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    precision = MixedPrecision.resolve(mode, "cpu", private=False)
    stats = train_epoch(model, _batches(), opt, MultiTaskLoss(), "cpu", amp=precision)
    assert stats["steps"] == 2 and math.isfinite(stats["loss"])
    assert all(p.dtype is torch.float32 for p in model.parameters())
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed > len(before) // 2
    if precision.scaler is not None:  # the scale is kept for the next epoch
        assert precision.scaler.get_scale() > 0


def test_amp_loss_is_close_to_float32() -> None:
    """One bf16 forward of the same weights and batch gives the float32 loss to bf16 accuracy."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    batch = _batches(1)[0]
    loss_fn = MultiTaskLoss()
    args = (batch["image"], batch["mask"])
    with torch.no_grad():
        ref, _ = loss_fn(*model(*args), batch["seg"], batch["label"])
        with MixedPrecision.resolve("bf16", "cpu", private=False).autocast():
            low, _ = loss_fn(*model(*args), batch["seg"], batch["label"])
    assert low.dtype is torch.float32
    assert abs(float(low) - float(ref)) < 0.05 * abs(float(ref))


def test_dp_training_refuses_mixed_precision() -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=2)
    with pytest.raises(ValueError, match="DP-SGD"):
        train_epoch(model, [], opt, MultiTaskLoss(), "cpu", amp="bf16")
    with pytest.raises(ValueError, match="DP-SGD"):
        train_epoch(model, [], opt, MultiTaskLoss(), "cpu", amp=MixedPrecision("cpu", torch.bfloat16))
    stats = train_epoch(model, [], opt, MultiTaskLoss(), "cpu", amp="auto")  # auto: float32 under DP
    assert stats["steps"] == 0
