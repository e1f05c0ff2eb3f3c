"""DP-SGD overhead on the default fusion model: time per epoch and peak memory, private vs non-private.

Runs, in one process and interleaved (so machine load hits every mode alike), one epoch of non-private training and
one epoch of DP-SGD per per-sample-gradient mode over phantom cases, repeated; prints the median time per epoch,
the ratio DP / non-private and the peak memory of each, and checks every mode for correctness first: its clipped,
summed gradient of one batch must equal a reference computed case by case with plain autograd. The fastest correct
mode should be ``client.privacy.engine.DEFAULT_GRAD_SAMPLE_MODE``.

The default model is the one a site trains by default: the ``model-*`` keys, ``batch-size`` of the run config in
pyproject.toml (``--model wide`` takes the same network with channels 8,16,32). Modes: Opacus's ``hooks`` (with fedfusion's
grouped-convolution sampler for Conv layers, :mod:`client.privacy.grad_samplers`), ``hooks-unfold`` (Opacus's
hooks mode with its own unfold-based conv sampler, for comparison), ``functorch``, ``ew``, ``ghost``, and
fedfusion's ``microbatch`` (one batch-1 pass per case).

    .venv/bin/python bench/dp_overhead.py                      # default model, 48 phantom cases, run-config batch
    .venv/bin/python bench/dp_overhead.py --write-docs         # also update docs/benchmarks.md
    .venv/bin/python bench/dp_overhead.py --profile            # where a DP step's time goes, per conv layer too
    .venv/bin/python bench/dp_overhead.py --multiplicity 4 --modes hooks --write-docs   # K augmented views per case

With ``--multiplicity K`` (run config ``augment-multiplicity``) both sides train on K augmented views of every case
(the site's :class:`client.privacy.multiplicity.MultiViewLoader`; DP-SGD averages each case's K view gradients
before clipping, as the site does), so the ratio counts DP's cost per view: K views cost K times the compute in
either case, and what is left is what privacy adds.

Time per epoch is scaled to exactly N cases (a Poisson epoch trains on N cases only in expectation; see run_epoch).
Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation at the start of an epoch; on CPU the peak
resident set size during the first two epochs above the RSS before them, each mode in a fresh child process, sampled
from /proc every 2 ms (torch's CPU allocations are invisible to tracemalloc).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

MODES = ("hooks", "hooks-unfold", "microbatch", "functorch", "ew", "ghost")
#: bench-only modes: (engine mode, use fedfusion's grouped conv sampler)
VARIANTS = {"hooks-unfold": ("hooks", False)}


def variant(mode: str) -> tuple[str, bool]:
    """``(client.privacy.engine mode, grouped conv sampler on)`` of a bench mode."""
    return VARIANTS.get(mode, (mode, True))


class PeakRSS:
    """Peak resident memory (bytes) of this process while the context is open, above the RSS at entry."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self) -> "PeakRSS":
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


#: ``--model wide``: the run config's network with these encoder widths (what train-central users often pick).
WIDE_CHANNELS = "8,16,32"


def default_model(which: str) -> tuple[Any, int]:
    """``(ModelConfig, batch size)`` of the run config in pyproject.toml (``run``), or that config with the wider
    channels :data:`WIDE_CHANNELS` (``wide``)."""
    from common import runconfig

    rc = runconfig.load({"model-channels": WIDE_CHANNELS} if which == "wide" else {})
    return runconfig.model_config(rc), int(rc["batch-size"])


class conv_sampler:
    """Context: Opacus's registry holds fedfusion's grouped conv sampler (``grouped=True``) or Opacus's own."""

    def __init__(self, mode: str) -> None:
        self.grouped = variant(mode)[1]

    def __enter__(self) -> None:
        from client.privacy import grad_samplers

        (grad_samplers.install if self.grouped else grad_samplers.uninstall)()

    def __exit__(self, *exc: Any) -> None:
        from client.privacy import grad_samplers

        grad_samplers.install()


def build_data(cfg: Any, cases: int, seed: int) -> tuple[Any, Path]:
    """``(dataset, site directory)`` of ``cases`` fresh phantom cases (NIfTI, all modalities present)."""
    from simulations.phantom_writers import generate

    out = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    generate(out / "ph", sites=1, cases_per_site=cases, seed=seed, scenario="iid", shape=cfg.spatial_size,
             fmt="nifti", heldout_cases=0)
    return load_data(cfg, out / "ph" / "site-01"), out / "ph" / "site-01"


def load_data(cfg: Any, site: Path) -> Any:
    from common.data import CaseDataset

    return CaseDataset([site], cfg.modalities, cfg.spatial_size)


def probe_memory(args: argparse.Namespace) -> None:
    """Child process: peak RSS growth (MiB) over two epochs of ``args.probe_memory`` in a fresh process.

    Why a child: in the timing process each mode's RSS is blurred by what the allocator kept from the modes before
    it; a fresh process sees one mode's own working set (first-epoch allocations included).
    """
    torch.set_num_threads(args.threads)
    cfg, _ = default_model(args.model)
    dataset = load_data(cfg, Path(args.probe_data))
    setup = make_setup(args.probe_memory, cfg, dataset, args.batch_size, torch.device("cpu"), noise=1.0, seed=0,
                       views=args.multiplicity)
    with PeakRSS() as rss:
        for _ in range(2):
            run_epoch(setup, torch.device("cpu"))
    print(f"PEAK_MIB {rss.extra_mb:.1f}")


def child_memory(mode: str, args: argparse.Namespace, site: Path) -> float:
    """Peak RSS growth of ``mode`` measured by :func:`probe_memory` in a fresh interpreter (NaN on failure)."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-memory", mode, "--probe-data", str(site),
           "--model", args.model, "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--multiplicity", str(args.multiplicity)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in res.stdout.splitlines():
        if line.startswith("PEAK_MIB "):
            return float(line.split()[1])
    print(f"  memory probe for {mode} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return float("nan")


def make_setup(mode: str, cfg: Any, dataset: Any, batch: int, device: torch.device, noise: float,
               seed: int, views: int = 0) -> dict[str, Any]:
    """Model, optimizer, loader and loss for ``mode`` (``none`` = non-private); ``views`` > 0: that many augmented
    views per case, averaged per case before clipping under DP (as the site does)."""
    from client.privacy.engine import CasesOnly, make_private
    from client.privacy.multiplicity import MultiViewLoader, install_view_averaging
    from client.privacy.randomness import RandomStream
    from models.losses import MultiTaskLoss
    from models.network import build_model
    from models.training import make_optimizer

    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    opt = make_optimizer(model, lr=1e-3)
    loader = DataLoader(CasesOnly(dataset), batch_size=batch, shuffle=True)
    loss = MultiTaskLoss()
    rows = len(dataset) * max(1, views)  # what one epoch trains on: cases x views
    if mode == "none":
        return {"mode": mode, "model": model, "module": model, "optimizer": opt, "rows": rows,
                "loader": MultiViewLoader(loader, views, torch.Generator().manual_seed(seed)) if views else loader,
                "loss": loss}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = make_private(model, opt, loader, loss, noise_multiplier=noise, max_grad_norm=1.0,
                             grad_sample_mode=variant(mode)[0],
                             randomness=RandomStream.reproducible(seed))
    dp_loader: Any = parts.loader
    if views:
        dp_loader = MultiViewLoader(parts.loader, views, torch.Generator().manual_seed(seed))
        install_view_averaging(parts.optimizer, dp_loader)
    return {"mode": mode, "model": model, "module": parts.module, "optimizer": parts.optimizer, "loader": dp_loader,
            "loss": parts.loss_fn, "rows": rows}


def run_epoch(setup: dict[str, Any], device: torch.device) -> float:
    """Seconds of one epoch, scaled to exactly ``len(dataset)`` cases.

    Why scaled: a DP epoch draws its batches by Poisson sampling, so the cases it trains on are ``len(dataset)`` only
    in expectation (std ~12 % at 48 cases, batch 12): an unscaled median ratio moves by that much from run to run.
    Time per trained case times the dataset size compares like with like.
    """
    from models.training import train_epoch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with warnings.catch_warnings(), conv_sampler(setup["mode"]):
        warnings.simplefilter("ignore")
        stats = train_epoch(setup["module"], setup["loader"], setup["optimizer"], setup["loss"], device,
                            modality_dropout=0.0, generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds * setup["rows"] / max(stats["num-examples"], 1.0)


def reference_clipped_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], clip: float,
                          device: torch.device) -> list[torch.Tensor]:
    """Sum over cases of each case's gradient clipped to ``clip`` (flat L2), by plain autograd, case by case."""
    from models.losses import MultiTaskLoss

    loss_fn = MultiTaskLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(batch["image"].shape[0]):
        seg_l, cls_l = model(batch["image"][i : i + 1].to(device), batch["mask"][i : i + 1].to(device))
        loss, _ = loss_fn(seg_l, cls_l, batch["seg"][i : i + 1].to(device), batch["label"][i : i + 1].to(device))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t.add_(g * factor)
    return total


def linear_tokens(cfg: Any) -> int:
    """Most tokens per case any ``nn.Linear`` of the network sees (1 for a ``(B, C)`` input)."""
    from models.network import build_model

    tokens = [1]

    def hook(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0]
        tokens.append(int(torch.tensor(x.shape[1:-1]).prod()) if x.dim() > 2 else 1)

    model = build_model(cfg).eval()
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, len(cfg.modalities), *cfg.spatial_size), torch.ones(1, len(cfg.modalities)))
    for h in handles:
        h.remove()
    return max(tokens)


def ghost_gram_gib(tokens: int, batch: int) -> float:
    """GiB of the Gram matrices Opacus's ghost norm sampler builds for a Linear input of ``tokens`` per case.

    It forms ``a a^T`` and ``g g^T`` of ``(batch, T, T)`` floats each: quadratic in ``T``, which the attention
    family's level-0 tokens (positions x modalities) make large.
    """
    return 2 * batch * tokens**2 * 4 / 2**30


def memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def check_mode(mode: str, cfg: Any, dataset: Any, device: torch.device, tokens: int) -> tuple[bool, str]:
    """Whether ``mode``'s clipped summed gradient of one 3-case batch matches the case-by-case reference."""
    if mode == "ghost" and (need := ghost_gram_gib(tokens, 3)) > memory_gib() / 2:
        return False, f"not run: ghost norms need {need:.0f} GiB of Gram matrices even at 3 cases"
    try:
        with conv_sampler(mode):
            return _check_mode(mode, cfg, dataset, device)
    except Exception as exc:  # noqa: BLE001 - a failing mode is a result of the benchmark
        return False, f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every Dropout's p set to 0 (a deterministic forward for the comparison), returned."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _check_mode(mode: str, cfg: Any, dataset: Any, device: torch.device) -> tuple[bool, str]:
    from client.privacy.engine import CasesOnly

    setup = make_setup(mode, cfg, dataset, 4, device, noise=1.0, seed=0)
    model, module, opt, loss_fn = setup["model"], setup["module"], setup["optimizer"], setup["loss"]
    without_dropout(model)
    view = CasesOnly(dataset)
    batch = {k: torch.stack([view[i][k] for i in range(3)]) for k in CasesOnly.KEYS}
    model.train()
    opt.zero_grad()
    out = loss_fn(*module(batch["image"].to(device), batch["mask"].to(device)), batch["seg"].to(device),
                  batch["label"].to(device))
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    # ghost clipping's backward already clipped (second pass over rescaled losses); its optimizer only accumulates
    (opt.accumulate if mode == "ghost" else opt.clip_and_accumulate)()
    got = [p.summed_grad for p in model.parameters() if p.requires_grad]
    # the reference runs on a fresh copy: the mode's hooks stay attached to ``model``
    from models.network import build_model

    twin = build_model(cfg).to(device)
    twin.load_state_dict(model.state_dict())
    without_dropout(twin).train()
    ref = reference_clipped_sum(twin, batch, 1.0, device)
    err = max(float((g.double() - r.double()).abs().max()) for g, r in zip(got, ref))
    scale = max(float(r.abs().max()) for r in ref)
    ok = err <= 1e-3 * scale  # float32: ghost clipping's Gram-matrix norms agree to ~3e-4 relative, the others ~3e-6
    return ok, f"max abs error {err:.2e} (gradient scale {scale:.2e})"


def profile(cfg: Any, batch: int, steps: int = 5) -> None:
    """Where a DP step's time goes (``--profile``): phases and grad samplers per step, then every conv shape.

    Per step at ``batch`` on random inputs: forward / backward / optimizer seconds, non-private vs DP (hooks), and
    the seconds Opacus spends in each layer type's grad sampler. Per distinct Conv3d shape of the network (ms):
    the batch's ordinary weight gradient, the per-case weight gradients by fedfusion's grouped call and by
    Opacus's unfold, and the input gradient by PyTorch's convolution backward vs a forward convolution with the
    flipped kernel (stride-1 layers).
    """
    import collections

    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.conv import compute_conv_grad_sample
    from torch.utils.data import TensorDataset

    from client.privacy import grad_samplers
    from client.privacy.engine import make_private
    from client.privacy.randomness import RandomStream
    from client.privacy.grad_samplers import conv_grad_sample_grouped
    from models.losses import MultiTaskLoss
    from models.network import build_model
    from models.training import make_optimizer

    m = len(cfg.modalities)
    x, mask = torch.randn(batch, m, *cfg.spatial_size), torch.ones(batch, m)
    seg, label = torch.randint(0, 4, (batch, *cfg.spatial_size)), torch.randint(0, 2, (batch,))
    loss_fn = MultiTaskLoss()
    in_sampler: dict[str, float] = collections.defaultdict(float)
    grad_samplers.install()  # what make_private registers, so that the timing wrappers wrap the samplers it uses
    originals = dict(GradSampleModule.GRAD_SAMPLERS)

    def timed_sampler(kind: type, fn: Any) -> Any:
        def run(layer: Any, acts: Any, backprops: torch.Tensor) -> Any:
            t0 = time.perf_counter()
            out = fn(layer, acts, backprops)
            in_sampler[kind.__name__] += time.perf_counter() - t0
            return out
        return run

    def phases(module: Any, opt: Any) -> tuple[float, float, float]:
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _ = loss_fn(*module(x, mask), seg, label)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    print(f"\nper step at batch {batch} (s, mean of {steps}):")
    for mode in ("none", "hooks"):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        module, opt = model, make_optimizer(model, lr=1e-3)
        if mode == "hooks":
            parts = make_private(model, opt, DataLoader(TensorDataset(x), batch_size=batch), loss_fn,
                                 noise_multiplier=1.0, max_grad_norm=1.0, randomness=RandomStream.reproducible(0))
            module, opt = parts.module, parts.optimizer
            for kind, fn in originals.items():
                GradSampleModule.GRAD_SAMPLERS[kind] = timed_sampler(kind, fn)
        for _ in range(2):
            phases(module, opt)
        in_sampler.clear()
        runs = [phases(module, opt) for _ in range(steps)]
        fwd, bwd, upd = (sum(r[i] for r in runs) / steps for i in range(3))
        samplers = ", ".join(f"{k} {v / steps:.3f}" for k, v in sorted(in_sampler.items(), key=lambda kv: -kv[1]))
        print(f"  {'non-private' if mode == 'none' else 'DP hooks':11s} forward {fwd:.3f}  backward {bwd:.3f}  "
              f"optimizer {upd:.3f}  total {fwd + bwd + upd:.3f}"
              + (f"  (grad samplers: {samplers})" if samplers else ""))
    GradSampleModule.GRAD_SAMPLERS.update(originals)

    shapes: collections.Counter = collections.Counter()
    def record(layer: Any, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        shapes[(layer.in_channels, layer.out_channels, tuple(inputs[0].shape[2:]), layer.kernel_size, layer.stride,
                layer.padding)] += 1

    net = build_model(cfg)
    handles = [c.register_forward_hook(record) for c in net.modules() if isinstance(c, torch.nn.Conv3d)]
    with torch.no_grad():
        net(x, mask)
    for h in handles:
        h.remove()

    def ms(fn: Any, repeats: int = 5) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats * 1000

    print(f"\nConv3d layers at batch {batch} (ms per call; n = layers of that shape):")
    print("  n  in->out  input       k s | weight grad  per-case grouped  per-case unfold | input grad  flipped fwd")
    for (cin, cout, size, k, stride, pad), n in sorted(shapes.items(), key=lambda kv: -kv[1]):
        layer = torch.nn.Conv3d(cin, cout, k, stride=stride, padding=pad)
        inp = torch.randn(batch, cin, *size)
        gy = torch.randn_like(layer(inp))
        args3 = (list(stride), list(pad), [1, 1, 1], False, [0, 0, 0], 1)
        w_grad = ms(lambda: torch.ops.aten.convolution_backward(gy, inp, layer.weight, None, *args3,
                                                               [False, True, False]))
        grouped = ms(lambda: conv_grad_sample_grouped(layer, [inp], gy))
        unfold = ms(lambda: compute_conv_grad_sample(layer, [inp], gy))
        x_grad = ms(lambda: torch.ops.aten.convolution_backward(gy, inp, layer.weight, None, *args3,
                                                               [True, False, False]))
        flipped = "-"
        if stride == (1, 1, 1):
            w_flip = layer.weight.detach().flip(2, 3, 4).transpose(0, 1).contiguous()
            flipped = f"{ms(lambda: torch.nn.functional.conv3d(gy, w_flip, padding=pad)):.2f}"
        print(f"  {n:<2d} {cin:>2d}->{cout:<3d} {'x'.join(map(str, size)):11s} {k[0]} {stride[0]} | {w_grad:11.2f}  "
              f"{grouped:16.2f}  {unfold:15.2f} | {x_grad:10.2f}  {flipped:>11s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("run", "wide"), default="run",
                    help="run: the run config's model-* keys in pyproject.toml (what sites train); "
                         f"wide: the run config's network with channels {WIDE_CHANNELS}")
    ap.add_argument("--cases", type=int, default=48, help="phantom training cases (one site)")
    ap.add_argument("--batch-size", type=int, default=0,
                    help="expected (Poisson) batch size; 0 = the run config's batch-size")
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per mode (median reported)")
    ap.add_argument("--modes", default=",".join(MODES), help="grad-sample modes to try")
    ap.add_argument("--slow-repeats", type=int, default=1,
                    help="timed epochs for modes slower than 5x non-private after the first repeat")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--multiplicity", type=int, default=0,
                    help="augmented views per case on both sides (augment-multiplicity); 0 = none")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--write-docs", action="store_true", help="update the table in docs/benchmarks.md")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the table: where a DP step's time goes (phases, grad samplers, conv layers)")
    ap.add_argument("--probe-memory", default="", help=argparse.SUPPRESS)  # internal: child for one mode
    ap.add_argument("--probe-data", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # Opacus/torch hook warnings would drown the table
    if args.probe_memory:
        probe_memory(args)
        return

    from models.network import build_model
    from models.training import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    cfg, run_batch = default_model(args.model)
    args.batch_size = args.batch_size or run_batch
    if args.profile:
        profile(cfg, args.batch_size)
        return
    dataset, site = build_data(cfg, args.cases, seed=0)
    params = sum(p.numel() for p in build_model(cfg).parameters())
    model_desc = (f"{'run-config' if args.model == 'run' else 'wide (channels ' + WIDE_CHANNELS + ')'} model: {cfg.family} fusion, "
                  f"{len(cfg.modalities)} modalities, {cfg.spatial_dims}D {'x'.join(map(str, cfg.spatial_size))}, "
                  f"channels {','.join(map(str, cfg.channels))}, {params:,} parameters")
    views = f", {args.multiplicity} augmented views per case" if args.multiplicity else ""
    print(f"{model_desc}; {len(dataset)} cases{views}, batch {args.batch_size}, device {device}, "
          f"{args.threads} threads")

    tokens = linear_tokens(cfg)
    correct: dict[str, tuple[bool, str]] = {}
    for mode in modes:
        correct[mode] = check_mode(mode, cfg, dataset, device, tokens)
        print(f"  check {mode:10s}: {'OK ' if correct[mode][0] else 'BAD'} {correct[mode][1]}", flush=True)

    if "ghost" in modes and correct["ghost"][0]:
        need = ghost_gram_gib(tokens, args.batch_size)
        if need > memory_gib() / 2:
            correct["ghost"] = (False, f"correct on 3 cases ({correct['ghost'][1]}), not timed: Opacus's ghost "
                                       f"norms for the attention Linear layers need {need:.0f} GiB of Gram matrices "
                                       f"at batch {args.batch_size} (quadratic in tokens per case), "
                                       f"{memory_gib():.0f} GiB here")
            print(f"  ghost: {correct['ghost'][1]}", flush=True)
    runnable = ["none", *[m for m in modes if correct[m][0]]]
    setups = {m: make_setup(m, cfg, dataset, args.batch_size, device, noise=1.0, seed=0, views=args.multiplicity)
              for m in runnable}
    for m in runnable:  # warm-up epoch (allocator, lazy init)
        run_epoch(setups[m], device)
    times: dict[str, list[float]] = {m: [] for m in runnable}
    mem: dict[str, float] = {m: 0.0 for m in runnable}
    for rep in range(args.repeats):
        for m in runnable:
            if rep > 0 and len(times[m]) >= args.slow_repeats and times["none"] and \
                    statistics.median(times[m]) > 5 * statistics.median(times["none"]):
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                times[m].append(run_epoch(setups[m], device))
                mem[m] = max(mem[m], (torch.cuda.max_memory_allocated(device) - base) / 2**20)
            else:
                times[m].append(run_epoch(setups[m], device))
        print(f"  repeat {rep + 1}/{args.repeats} done", flush=True)
    if device.type != "cuda":
        for m in runnable:
            mem[m] = child_memory(m, args, site)
        print("  memory probes done", flush=True)

    base_t = statistics.median(times["none"])
    rows = []
    for m in ["none", *modes]:
        if m != "none" and not correct[m][0]:
            rows.append((m, None, None, None, correct[m][1]))
            continue
        t = statistics.median(times[m])
        rows.append((m, t, t / base_t, mem[m], "" if m == "none" else "correct"))
    best = min((r for r in rows if r[0] != "none" and r[1] is not None), key=lambda r: r[1], default=None)

    mem_label = ("peak GPU memory above start, MiB" if device.type == "cuda"
                 else "peak RSS growth (fresh process, 2 epochs), MiB")
    lines = [
        f"| mode | s / epoch of N cases{' x K views' if args.multiplicity else ''} | ratio vs non-private | "
        f"{mem_label} | note |",
        "|---|---|---|---|---|",
    ]
    for m, t, ratio, mb, note in rows:
        name = "non-private" if m == "none" else m + (" (default)" if best and m == best[0] else "")
        if t is None:
            lines.append(f"| {name} | – | – | – | {note} |")
        else:
            lines.append(f"| {name} | {t:.2f} | {ratio:.2f} | {mb:.0f} | {note} |")
    table = "\n".join(lines)
    print()
    print(table)
    if best:
        print(f"\nfastest correct DP mode: {best[0]} (ratio {best[2]:.2f}); "
              f"client.privacy.engine.DEFAULT_GRAD_SAMPLE_MODE should name it")
    if args.write_docs:
        header = (
            f"`bench/dp_overhead.py` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, "
            f"device {device}, {args.threads} threads, {len(dataset)} phantom cases{views}, batch {args.batch_size}, "
            f"median of {args.repeats} interleaved epochs; modes slower than 5x timed once). {model_desc}:"
        )
        name = "dp-overhead" if args.model == "run" else "dp-overhead-wide"
        write_docs(header + "\n\n" + table + "\n", name + ("-multiplicity" if args.multiplicity else ""))


def write_docs(section: str, name: str) -> None:
    from simulations.mdsections import write_section

    heading = ("## DP-SGD overhead with augmentation multiplicity (per view)" if name.endswith("-multiplicity")
               else "## DP-SGD overhead (site training)")
    path = write_section(ROOT / "docs" / "benchmarks.md", name, section, heading=heading,
                         new_file_title="# Benchmarks")
    print(f"updated {path}")


if __name__ == "__main__":
    main()
