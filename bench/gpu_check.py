"""GPU check: what a maintainer with a CUDA GPU runs (under 5 minutes) to see that fedfusion trains right and how fast.

Checks, each printed PASS or FAIL with its numbers (exit status 1 if any fails):

1. gradients: the run config's model, same weights and batch, dropout off: loss and every parameter gradient on the
   GPU equal the CPU's (TF32 off for the check; float32, other kernels, so within ``1e-4`` of the largest gradient).
   The GPU model has ``set_conv_backward(model, "fast")`` applied: on CUDA that switch must change nothing;
2. DP-SGD per-case gradients on the GPU: Opacus hooks mode with fedfusion's grouped conv sampler
   (``client.privacy.grad_samplers``, a grouped convolution on cuDNN) equals Opacus's functorch mode on the same
   model and batch;
3. mixed precision (``models.precision``, ``amp="auto"``: bfloat16, or float16 with loss scaling on GPUs without
   bfloat16): the loss of one batch is within 5 % of float32's; an epoch of ``models.training.train_epoch`` from a
   pinned-memory loader trains (finite loss, float32 weights that moved) and its batches were pinned;
4. step times (median of interleaved steps, ``bench/step_time.py``'s steps): non-private float32, non-private AMP,
   DP-SGD; ratios against non-private float32.

Without CUDA it says so and exits 0. ``--device cpu`` runs the same checks with the CPU in the GPU's place (CPU vs
CPU, bfloat16 autocast, no pinning): a dry run of this script on any machine.

    .venv/bin/python bench/gpu_check.py                # on a machine with a CUDA GPU
    .venv/bin/python bench/gpu_check.py --device cpu   # dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import step_time  # noqa: E402  (bench/step_time.py: the default model, random batches, timed steps)

#: Gradients of two devices (or two code paths) agree when the largest difference is within this fraction of the
#: largest gradient (float32 with different kernels and summation orders).
GRAD_TOL = 1e-4
#: Mixed precision's loss may differ from float32's by this fraction.
AMP_LOSS_TOL = 0.05


class Report:
    """PASS/FAIL lines; ``failed`` counts the failures."""

    def __init__(self) -> None:
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _gradients(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[float, list[Tensor]]:
    """(loss, parameter gradients on the CPU) of one forward/backward of ``model`` on ``batch``."""
    from models.losses import MultiTaskLoss

    image, mask, seg, label = batch
    model.zero_grad(set_to_none=True)
    loss, _ = MultiTaskLoss()(*model(image, mask), seg, label)
    loss.backward()
    return float(loss.detach()), [p.grad.detach().cpu() for p in model.parameters()]


def _max_diff(a: list[Tensor], b: list[Tensor]) -> tuple[float, float]:
    """(max |a - b| over all tensors, max |b|)."""
    return (max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b)),
            max(float(y.abs().max()) for y in b))


def check_gradients(report: Report, cfg: Any, device: torch.device, batch: int) -> None:
    """Check 1: the device's gradients (fast conv switch on) equal the CPU's stock ones."""
    from models.fast_conv import set_conv_backward
    from models.network import build_model

    torch.manual_seed(0)
    ref = _no_dropout(build_model(cfg)).train()
    dev = _no_dropout(build_model(cfg)).train()
    dev.load_state_dict(ref.state_dict())
    dev.to(device)
    set_conv_backward(dev, "fast")
    cpu_batch = step_time.random_batch(cfg, batch, torch.device("cpu"))
    loss_ref, g_ref = _gradients(ref, cpu_batch)
    loss_dev, g_dev = _gradients(dev, tuple(t.to(device) for t in cpu_batch))
    diff, scale = _max_diff(g_dev, g_ref)
    report.check("loss, device vs CPU", math.isclose(loss_dev, loss_ref, rel_tol=1e-5),
                 f"{loss_dev:.6f} vs {loss_ref:.6f}")
    report.check("gradients, device vs CPU", diff <= GRAD_TOL * scale,
                 f"max abs difference {diff:.2e}, largest gradient {scale:.2e} (tolerance {GRAD_TOL:g} x largest)")


def check_dp_per_case(report: Report, cfg: Any, device: torch.device, batch: int) -> None:
    """Check 2: per-case gradients, Opacus hooks + grouped conv sampler vs functorch, on the device."""
    from opacus import GradSampleModule

    from client.privacy import grad_samplers
    from models.losses import MultiTaskLoss
    from models.network import build_model

    torch.manual_seed(0)
    nets = [_no_dropout(build_model(cfg)).to(device) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    grad_samplers.install()
    wrapped = [GradSampleModule(nets[0]).train(), GradSampleModule(nets[1], force_functorch=True).train()]
    image, mask, seg, label = step_time.random_batch(cfg, batch, device, seed=1)
    mask[0, 1:3] = 0  # a case with missing modalities
    image = image * mask.reshape(*mask.shape, *([1] * cfg.spatial_dims))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full backward hook on inputs without grad: expected
        for w in wrapped:
            MultiTaskLoss()(*w(image, mask), seg, label)[0].backward()
    hooks = [p.grad_sample.detach().cpu() for p in nets[0].parameters()]
    func = [p.grad_sample.detach().cpu() for p in nets[1].parameters()]
    diff, scale = _max_diff(hooks, func)
    report.check("DP per-case gradients, hooks (grouped conv sampler) vs functorch", diff <= GRAD_TOL * scale,
                 f"{batch} cases, max abs difference {diff:.2e}, largest per-case gradient {scale:.2e}")


def check_amp(report: Report, cfg: Any, device: torch.device, batch: int) -> None:
    """Check 3: AMP loss close to float32; an AMP epoch from a pinned loader trains."""
    from torch.utils.data import DataLoader

    from client.privacy.engine import CasesOnly
    from models.losses import MultiTaskLoss
    from models.network import build_model
    from models.precision import MixedPrecision
    from models.training import make_optimizer, train_epoch

    # "auto" is float32 on the CPU: the dry run takes bfloat16 to run the same autocast code
    precision = MixedPrecision.resolve("auto" if device.type == "cuda" else "bf16", device, private=False)
    torch.manual_seed(0)
    model = _no_dropout(build_model(cfg)).to(device)
    image, mask, seg, label = step_time.random_batch(cfg, batch, device, seed=2)
    loss_fn = MultiTaskLoss()
    with torch.no_grad():
        ref = float(loss_fn(*model(image, mask), seg, label)[0])
        with precision.autocast():
            low = float(loss_fn(*model(image, mask), seg, label)[0])
    report.check(f"AMP ({precision.dtype}) loss vs float32", abs(low - ref) <= AMP_LOSS_TOL * abs(ref),
                 f"{low:.5f} vs {ref:.5f}")

    cpu_batch = [t.cpu() for t in (image, mask, seg, label)]
    items = [dict(zip(CasesOnly.KEYS, (t[i] for t in cpu_batch))) for i in range(batch)]
    pin = device.type == "cuda"
    loader = DataLoader(items, batch_size=max(1, batch // 2), pin_memory=pin)
    pinned = all(b["image"].is_pinned() for b in loader) if pin else None
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model, lr=1e-3)
    stats = train_epoch(model, loader, opt, loss_fn, device, amp=precision)
    moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    ok = math.isfinite(stats["loss"]) and all(p.dtype is torch.float32 for p in model.parameters()) \
        and moved > len(before) // 2 and pinned is not False
    report.check("AMP epoch from a pinned-memory loader", ok,
                 f"{int(stats['steps'])} steps, loss {stats['loss']:.4f}, {moved}/{len(before)} parameters moved, "
                 + ("batches pinned" if pinned else "no pinning (CPU)" if pinned is None else "batches NOT pinned"))


def time_modes(cfg: Any, device: torch.device, batch: int, repeats: int) -> str:
    """Check 4: step times, non-private float32 / AMP / DP-SGD, as a Markdown table."""
    from models.precision import MixedPrecision

    fp32 = step_time.make_step("stock", cfg, batch, device)
    amp_mode = "auto" if device.type == "cuda" else "bf16"
    amp = dataclasses.replace(step_time.make_step("stock", cfg, batch, device),
                              precision=MixedPrecision.resolve(amp_mode, device, private=False))
    dp = step_time.make_step("dp-stock", cfg, batch, device)
    times = step_time.time_steps({"fp32": fp32, "amp": amp, "dp": dp}, repeats)
    labels = {"fp32": "non-private, float32", "amp": f"non-private, AMP {amp.precision.dtype}",
              "dp": "DP-SGD (hooks, grouped conv sampler), float32"}
    return step_time.step_table(times, labels, base="fp32")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (dry run)")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per mode")
    ap.add_argument("--check-batch", type=int, default=3, help="cases in the correctness checks")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CPU side of the checks)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: SKIPPED, no CUDA device here (torch {torch.__version__}, "
              f"CUDA build: {torch.version.cuda or 'none'}); run it on a machine with a GPU, or pass --device cpu "
              "for a dry run")
        return 0
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg, batch = step_time.default_model()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"gpu_check on {name}, torch {torch.__version__}; run-config model {cfg.family}, "
          f"{'x'.join(map(str, cfg.spatial_size))}, channels {','.join(map(str, cfg.channels))}, batch {batch}")
    report = Report()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact float32 for the checks
    try:
        check_gradients(report, cfg, device, args.check_batch)
        check_dp_per_case(report, cfg, device, args.check_batch)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    check_amp(report, cfg, device, args.check_batch)
    print(f"\nstep times at batch {batch} (median of {args.repeats} interleaved steps):")
    print(time_modes(cfg, device, batch, args.repeats))
    print(f"\n{'all checks passed' if not report.failed else f'{report.failed} check(s) FAILED'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
