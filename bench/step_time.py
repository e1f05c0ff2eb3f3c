"""Training-step time of the default model: PyTorch's stock convolutions vs fedfusion's fast path, per layer and step.

Three tables, all from one process, every comparison interleaved (stock and fast alternate, so machine load hits
both alike), medians of the repeats:

1. per Conv3d shape of the network (``models.fast_conv``): forward, input gradient, weight+bias gradient, stock vs
   fast, and for reference the input gradient as a forward convolution with the flipped kernel (stride-1 layers; the
   idea the fast path measured and did not use); then one training pass of the layer (autograd forward + backward,
   as in a step) stock vs fast, and summed over the network's layers;
2. whole training steps (forward with the loss, backward, optimizer) of the run config's model and batch: non-private
   and DP-SGD (Opacus hooks mode with fedfusion's grouped per-case conv sampler), each with stock and fast
   convolutions, and non-private in bfloat16 autocast (``models.precision``); wall and CPU time per phase, ratios
   against the stock non-private step; the fast path's gradients are checked against the stock path's first;
3. what is left: the profiler's self time of a non-private step by kind of operation, stock vs fast.

Timing on a shared machine: wall time counts the waits for a core other jobs hold; process CPU time (all threads)
does not, and is the steadier number. ``OMP_WAIT_POLICY`` is PASSIVE unless set: with libgomp's default (spinning
waits) a 2-thread step on 2 cores shared with other jobs took 5-15x its unloaded time, stock and fast alike.

    .venv/bin/python bench/step_time.py                 # 2 threads, default model, run-config batch
    .venv/bin/python bench/step_time.py --write-docs    # also docs/benchmarks.md, section step-time
"""

from __future__ import annotations

import os

# before torch loads libgomp (see the docstring)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import collections  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

#: Whole-step modes: name -> (label, DP-SGD, conv backward, mixed precision).
MODES: dict[str, tuple[str, bool, str, str]] = {
    "stock": ("non-private, stock convs", False, "stock", "off"),
    "fast": ("non-private, fast convs", False, "fast", "off"),
    "dp-stock": ("DP-SGD, stock convs", True, "stock", "off"),
    "dp-fast": ("DP-SGD, fast convs", True, "fast", "off"),
    # autocast runs every convolution stock (models.fast_conv defers to it)
    "bf16": ("non-private, bf16 autocast (stock convs)", False, "stock", "bf16"),
}
BASE_MODE = "stock"


# ------------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lap(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """``(wall s, process CPU s)`` of one call of ``fn``."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """Median ``(wall s, CPU s)`` of each function over ``repeats`` rounds, one call of each per round (one
    untimed warm-up round first: allocator and oneDNN primitive caches)."""
    for fn in fns.values():
        fn()
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            runs[k].append(lap(fn, device))
    return {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}


# ----------------------------------------------------------------------------------------------------- the model
def default_model() -> tuple[Any, int]:
    """``(ModelConfig, batch size)`` of the run config in pyproject.toml."""
    from common import runconfig

    rc = runconfig.load({})
    return runconfig.model_config(rc), int(rc["batch-size"])


def random_batch(cfg: Any, batch: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(image (B, M, *S), mask (B, M), seg (B, *S), label (B,))``: random inputs, every modality present."""
    g = torch.Generator().manual_seed(seed)
    m = len(cfg.modalities)
    image = torch.randn(batch, m, *cfg.spatial_size, generator=g)
    seg = torch.randint(0, cfg.num_seg_classes, (batch, *cfg.spatial_size), generator=g)
    label = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return image.to(device), torch.ones(batch, m, device=device), seg.to(device), label.to(device)


@dataclass
class Step:
    """One training step of a mode, split in phases: ``run()`` returns ``[(wall, cpu)]`` for forward (with the
    loss), backward and optimizer."""

    model: nn.Module
    module: nn.Module
    optimizer: Any
    loss_fn: Any
    precision: Any
    batch: tuple[Tensor, Tensor, Tensor, Tensor]
    device: torch.device

    def run(self) -> list[tuple[float, float]]:
        image, mask, seg, label = self.batch
        self.optimizer.zero_grad(set_to_none=True)
        out: dict[str, Tensor] = {}

        def forward() -> None:
            with self.precision.autocast():
                out["loss"] = self.loss_fn(*self.module(image, mask), seg, label)[0]

        return [lap(forward, self.device), lap(lambda: self.precision.backward(out["loss"]), self.device),
                lap(lambda: self.precision.step(self.optimizer), self.device)]


def make_step(mode: str, cfg: Any, batch: int, device: torch.device, seed: int = 0) -> Step:
    """The :class:`Step` of ``mode`` (a key of :data:`MODES`): model (seeded), optimizer, DP wrapper, inputs."""
    from torch.utils.data import DataLoader, TensorDataset

    from client.privacy.engine import make_private
    from client.privacy.randomness import RandomStream
    from models.fast_conv import set_conv_backward
    from models.losses import MultiTaskLoss
    from models.network import build_model
    from models.precision import MixedPrecision
    from models.training import make_optimizer

    _, private, conv, amp = MODES[mode]
    torch.manual_seed(seed)
    model = build_model(cfg).to(device).train()
    set_conv_backward(model, conv)
    module, opt, loss_fn = model, make_optimizer(model, lr=1e-3), MultiTaskLoss()
    inputs = random_batch(cfg, batch, device, seed)
    if private:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = make_private(model, opt, DataLoader(TensorDataset(inputs[0].cpu()), batch_size=batch), loss_fn,
                                 noise_multiplier=1.0, max_grad_norm=1.0,
                                 randomness=RandomStream.reproducible(seed))
        module, opt, loss_fn = parts.module, parts.optimizer, parts.loss_fn
    return Step(model, module, opt, loss_fn, MixedPrecision.resolve(amp, device, private=private), inputs, device)


def gradient_difference(cfg: Any, batch: int, device: torch.device) -> tuple[float, float]:
    """``(max |fast - stock| over all parameter gradients, max |stock gradient|)`` of one non-private step on the
    same weights and batch (dropout off)."""
    grads = []
    for conv in ("stock", "fast"):
        step = make_step(conv, cfg, batch, device)
        for m in step.model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        image, mask, seg, label = step.batch
        step.loss_fn(*step.model(image, mask), seg, label)[0].backward()
        grads.append([p.grad.detach().clone() for p in step.model.parameters()])
    diff = max(float((f - s).abs().max()) for s, f in zip(*grads))
    return diff, max(float(s.abs().max()) for s in grads[0])


def time_steps(steps: dict[str, Step], repeats: int) -> dict[str, Any]:
    """Per step, medians over ``repeats`` interleaved runs (two untimed warm-up runs each): ``{name: {"total":
    (wall, cpu), "phases": [(wall, cpu)] * 3}}``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: full backward hook on inputs without grad
        for s in steps.values():
            s.run()
            s.run()
        runs: dict[str, list[list[tuple[float, float]]]] = {m: [] for m in steps}
        for _ in range(repeats):
            for m, s in steps.items():
                runs[m].append(s.run())
    out: dict[str, Any] = {}
    for m, rs in runs.items():
        total = (statistics.median(sum(p[0] for p in r) for r in rs), statistics.median(sum(p[1] for p in r) for r in rs))
        phases = [(statistics.median(r[i][0] for r in rs), statistics.median(r[i][1] for r in rs)) for i in range(3)]
        out[m] = {"total": total, "phases": phases}
    return out


# ---------------------------------------------------------------------------------------------------- per layer
@dataclass(frozen=True)
class ConvShape:
    """A convolution of the network as called in training (input shape without the batch)."""

    cin: int
    cout: int
    size: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    bias: bool
    input_grad: bool

    def label(self) -> str:
        return (f"{self.cin}->{self.cout} at {'x'.join(map(str, self.size))}, k{'x'.join(map(str, self.kernel))} "
                f"s{self.stride[0]}" + ("" if self.input_grad else " (no input grad)"))


def conv_shapes(cfg: Any, batch: int) -> collections.Counter:
    """Count of every distinct :class:`ConvShape` in one training forward of the network (grouped and dilated
    convolutions do not occur in fedfusion's networks)."""
    from models.network import build_model

    shapes: collections.Counter = collections.Counter()

    def record(layer: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        assert layer.groups == 1 and set(layer.dilation) == {1}, "grouped/dilated conv: extend ConvShape"
        x = inputs[0]
        shapes[ConvShape(layer.in_channels, layer.out_channels, tuple(x.shape[2:]), layer.kernel_size, layer.stride,
                         layer.padding, layer.bias is not None, x.requires_grad)] += 1

    net = build_model(cfg).train()
    handles = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    image, mask, _, _ = random_batch(cfg, batch, torch.device("cpu"))
    net(image, mask)
    for h in handles:
        h.remove()
    return shapes


def layer_times(shape: ConvShape, batch: int, repeats: int) -> dict[str, float]:
    """CPU ms per call (median) of the stock and fast pieces of one convolution (see the module docstring); keys
    absent where a piece does not apply (input gradient of a first layer, flipped kernel of a strided layer, fast
    path of a pointwise layer, which stays stock)."""
    from models.fast_conv import channels_last_forward, conv_grads, fast_conv, scales_one_channel, set_conv_backward

    cpu = torch.device("cpu")
    conv_cls = nn.Conv3d if len(shape.size) == 3 else nn.Conv2d
    stock = conv_cls(shape.cin, shape.cout, shape.kernel, stride=shape.stride, padding=shape.padding, bias=shape.bias)
    fast = conv_cls(shape.cin, shape.cout, shape.kernel, stride=shape.stride, padding=shape.padding, bias=shape.bias)
    fast.load_state_dict(stock.state_dict())
    switched = set_conv_backward(fast, "fast") == 1
    x = torch.randn(batch, shape.cin, *shape.size)
    w, b = stock.weight.detach(), (stock.bias.detach() if shape.bias else None)
    gy = torch.randn_like(stock(x))
    spatial = len(shape.size)
    conf = (list(shape.stride), list(shape.padding), [1] * spatial, False, [0] * spatial, 1)
    bias_sizes = [shape.cout] if shape.bias else None
    fmt = torch.channels_last_3d if spatial == 3 else torch.channels_last
    # what the fast forward saves for the backward: a channels-last copy on stride-1 layers
    x_saved = x.contiguous(memory_format=fmt) if channels_last_forward(shape.stride) else x

    def train_pass(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            inp = x.detach().requires_grad_(shape.input_grad)
            layer(inp).backward(gy)
        return run

    conv = F.conv3d if spatial == 3 else F.conv2d
    fns: dict[str, Callable[[], Any]] = {
        "fwd stock": lambda: conv(x, w, b, shape.stride, shape.padding),
        "wgrad stock": lambda: torch.ops.aten.convolution_backward(gy, x, w, bias_sizes, *conf,
                                                                   [False, True, shape.bias]),
        "pass stock": train_pass(stock),
        "pass fast": train_pass(fast),
    }
    # a pointwise layer of one input channel is a broadcast product on the fast path: its gradients are autograd's
    channels_last = switched and not scales_one_channel(w, shape.stride, shape.padding, 1)
    if switched:
        fns["fwd fast"] = lambda: fast_conv(x, w, b, shape.stride, shape.padding, (1,) * spatial, 1)
    if channels_last:
        fns["wgrad fast"] = lambda: conv_grads(gy, x_saved, w, shape.stride, shape.padding, [1] * spatial, 1,
                                               (False, True, shape.bias))
    if shape.input_grad:
        fns["xgrad stock"] = lambda: torch.ops.aten.convolution_backward(gy, x, w, None, *conf, [True, False, False])
        if channels_last:
            fns["xgrad fast"] = lambda: conv_grads(gy, x_saved, w, shape.stride, shape.padding, [1] * spatial, 1,
                                                   (True, False, False))
        if all(s == 1 for s in shape.stride):
            flipped = w.flip(list(range(2, 2 + spatial))).transpose(0, 1).contiguous()
            back_pad = [k - 1 - p for k, p in zip(shape.kernel, shape.padding)]
            fns["xgrad flipped"] = lambda: conv(gy, flipped, None, 1, back_pad)
    return {k: v[1] * 1000 for k, v in interleaved(fns, repeats, cpu).items()}


def layer_table(shapes: collections.Counter, batch: int, repeats: int) -> tuple[str, float, float]:
    """Markdown table of :func:`layer_times` per shape, and the network's summed training-pass CPU ms (stock,
    fast)."""
    rows = [
        "| n | convolution | forward stock | forward fast | input grad stock | input grad fast | input grad flipped "
        "fwd | weight grad stock | weight grad fast | fwd+bwd stock | fwd+bwd fast | x faster |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total_stock = total_fast = 0.0
    for shape, n in sorted(shapes.items(), key=lambda kv: -kv[1] * kv[0].cin * kv[0].cout * _voxels(kv[0])):
        t = layer_times(shape, batch, repeats)
        total_stock += n * t["pass stock"]
        total_fast += n * t["pass fast"]
        cell = lambda k: f"{t[k]:.2f}" if k in t else "–"  # noqa: E731
        rows.append(f"| {n} | {shape.label()} | {cell('fwd stock')} | {cell('fwd fast')} | {cell('xgrad stock')} | "
                    f"{cell('xgrad fast')} | {cell('xgrad flipped')} | {cell('wgrad stock')} | {cell('wgrad fast')} | "
                    f"{t['pass stock']:.2f} | {t['pass fast']:.2f} | {t['pass stock'] / t['pass fast']:.2f} |")
        print(rows[-1], flush=True)
    rows.append(f"| {sum(shapes.values())} | all convolutions of one step (n x fwd+bwd) | | | | | | | | "
                f"{total_stock:.1f} | {total_fast:.1f} | {total_stock / total_fast:.2f} |")
    return "\n".join(rows), total_stock, total_fast


def _voxels(shape: ConvShape) -> int:
    out = 1
    for s in shape.size:
        out *= s
    return out


# ------------------------------------------------------------------------------------------------ what is left
#: Profiler op names by kind (self CPU time); anything else is "other".
KINDS: dict[str, tuple[str, ...]] = {
    "convolution forward": ("aten::mkldnn_convolution", "aten::slow_conv3d_forward", "aten::_slow_conv2d_forward",
                            "aten::thnn_conv2d"),
    "convolution backward": ("aten::convolution_backward", "aten::slow_conv3d_backward",
                             "aten::_slow_conv2d_backward"),
    "layout copies and casts": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"),
    "attention (bmm, softmax, mask)": ("aten::bmm", "aten::_softmax", "aten::_softmax_backward_data",
                                       "aten::masked_fill_", "aten::masked_fill"),
    "linear (mm)": ("aten::mm", "aten::addmm"),
    "normalisation": ("aten::native_group_norm", "aten::native_group_norm_backward", "aten::native_layer_norm",
                      "aten::native_layer_norm_backward"),
    "concatenation": ("aten::cat",),
    "pooling and upsampling": ("aten::avg_pool3d", "aten::avg_pool3d_backward", "aten::upsample_nearest3d",
                               "aten::upsample_nearest3d_backward", "aten::avg_pool2d", "aten::avg_pool2d_backward",
                               "aten::upsample_nearest2d", "aten::upsample_nearest2d_backward"),
}


def op_kinds(modes: list[str], cfg: Any, batch: int, device: torch.device, rounds: int) -> dict[str, dict[str, float]]:
    """Per mode, the self CPU ms of a profiled step by kind (:data:`KINDS`; ``total`` is their sum), median over
    ``rounds`` interleaved profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    steps = {m: make_step(m, cfg, batch, device) for m in modes}
    kind_of = {op: kind for kind, ops in KINDS.items() for op in ops}
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for m in modes:
        steps[m].run()
    for _ in range(rounds):
        for m, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step.run()
            per_kind: dict[str, float] = collections.defaultdict(float)
            for ev in prof.key_averages():
                per_kind[kind_of.get(ev.key, "other")] += ev.self_cpu_time_total / 1000
            per_kind["total"] = sum(per_kind.values())
            runs[m].append(per_kind)
    return {m: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in [*KINDS, "other", "total"]}
            for m, rs in runs.items()}


def kinds_table(stock: dict[str, float], fast: dict[str, float]) -> str:
    rows = ["| kind of operation | stock ms | fast ms | share of the fast step |", "|---|---:|---:|---:|"]
    for kind in [*KINDS, "other", "total"]:
        s, f = stock.get(kind, 0.0), fast.get(kind, 0.0)
        rows.append(f"| {kind} | {s:.0f} | {f:.0f} | {f / fast['total']:.0%} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------- main
def step_table(times: dict[str, Any], labels: dict[str, str] | None = None, base: str = BASE_MODE) -> str:
    """Markdown table of :func:`time_steps`'s result, ratios against ``base``; ``labels``: row names (default: the
    :data:`MODES` labels)."""
    labels = labels or {k: v[0] for k, v in MODES.items()}
    base_wall, base_cpu = times[base]["total"]
    rows = [f"| mode | step wall s | x {labels[base]} | step CPU s | x {labels[base]} | wall s: forward / "
            "backward / optimizer | CPU s: forward / backward / optimizer |", "|---|---:|---:|---:|---:|---|---|"]
    for mode, t in times.items():
        wall, cpu = t["total"]
        ph = t["phases"]
        rows.append(f"| {labels[mode]} | {wall:.3f} | {wall / base_wall:.2f} | {cpu:.3f} | {cpu / base_cpu:.2f} | "
                    + " / ".join(f"{p[0]:.3f}" for p in ph) + " | " + " / ".join(f"{p[1]:.3f}" for p in ph) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--batch-size", type=int, default=0, help="cases per step; 0 = the run config's batch-size")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per mode (median)")
    ap.add_argument("--layer-repeats", type=int, default=9, help="timed calls per layer piece (median)")
    ap.add_argument("--profile-rounds", type=int, default=3, help="profiled steps per mode for what is left")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="whole-step modes, from: " + "; ".join(f"{k} ({v[0]})" for k, v in MODES.items()))
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (the per-layer table is CPU only)")
    ap.add_argument("--skip-layers", action="store_true", help="no per-layer table")
    ap.add_argument("--write-docs", action="store_true", help="update section step-time of docs/benchmarks.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", module="opacus")

    from models.network import build_model
    from models.training import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg, run_batch = default_model()
    batch = args.batch_size or run_batch
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or BASE_MODE not in modes:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)} (must include {BASE_MODE!r})")
    params = sum(p.numel() for p in build_model(cfg).parameters())
    load0 = os.getloadavg()
    desc = (f"run-config model: {cfg.family} fusion, {len(cfg.modalities)} modalities, {cfg.spatial_dims}D "
            f"{'x'.join(map(str, cfg.spatial_size))}, channels {','.join(map(str, cfg.channels))}, {params:,} "
            f"parameters, batch {batch}")
    print(f"{desc}; device {device}, {args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {load0[0]:.1f}", flush=True)

    diff, scale = gradient_difference(cfg, batch, device)
    print(f"fast vs stock gradients (one non-private step): max abs difference {diff:.2e} (largest gradient "
          f"{scale:.2e})", flush=True)

    layers = ""
    if not args.skip_layers:
        print("\nper layer (CPU ms per call, median):", flush=True)
        layers, _, _ = layer_table(conv_shapes(cfg, batch), batch, args.layer_repeats)

    print("\nwhole steps ...", flush=True)
    times = time_steps({m: make_step(m, cfg, batch, device) for m in modes}, args.repeats)
    steps = step_table(times)
    print(steps, flush=True)

    print("\nwhat is left (profiler, one step) ...", flush=True)
    by_kind = op_kinds(["stock", "fast"], cfg, batch, device, args.profile_rounds)
    kinds = kinds_table(by_kind["stock"], by_kind["fast"])
    print(kinds)
    load1 = os.getloadavg()

    if args.write_docs:
        from simulations.mdsections import write_section

        def ratio(mode: str, i: int) -> str:
            return f"{times[mode]['total'][i] / times[BASE_MODE]['total'][i]:.2f}" if mode in times else "–"

        header = (
            f"`bench/step_time.py{' --threads ' + str(args.threads) if args.threads != 2 else ''}` "
            f"({time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, device {device}, "
            f"{args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average "
            f"{load0[0]:.1f} at the start and {load1[0]:.1f} at the end on {os.cpu_count()} CPUs shared with other "
            f"jobs). {desc}. Fast vs stock gradients of one step: max abs difference {diff:.1e} (largest gradient "
            f"{scale:.1e})."
        )
        body = [header, ""]
        if layers:
            body += [f"Per convolution shape (CPU ms per call, median of {args.layer_repeats} interleaved calls; "
                     "fwd+bwd = one autograd training pass of the layer):", "", layers, ""]
        body += [f"Whole training steps (median of {args.repeats} interleaved steps; forward includes the loss; "
                 "DP-SGD = Opacus hooks mode with the grouped conv sampler, clipping and noise in the optimizer):",
                 "", steps, "",
                 f"Fast non-private step: {ratio('fast', 0)}x the stock one in wall time, {ratio('fast', 1)}x in "
                 f"CPU time; DP-SGD with fast convs: {ratio('dp-fast', 0)}x / {ratio('dp-fast', 1)}x the stock "
                 "non-private step.",
                 "", f"What is left: self time of a profiled non-private step by kind of operation (median of "
                 f"{args.profile_rounds} interleaved profiled steps; the profiler times each operation's wall span "
                 "on its thread, so under load the shares are steadier than the milliseconds):", "", kinds]
        path = write_section(ROOT / "docs" / "benchmarks.md", "step-time", "\n".join(body) + "\n",
                             heading="## Training step: stock vs fast convolutions", new_file_title="# Benchmarks")
        print(f"updated {path}")


if __name__ == "__main__":
    main()
