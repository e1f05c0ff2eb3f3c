"""DP-SGD overhead on the default fusion model: time per epoch and peak memory, private vs non-private.

Runs, in one process and interleaved (so machine load hits every mode alike), one epoch of non-private training and
one epoch of DP-SGD per Opacus per-sample-gradient mode over phantom cases, repeated; prints the median time per
epoch, the ratio DP / non-private and the peak memory of each, and checks every mode for correctness first: with
noise 0 its clipped, summed gradient of one batch must equal a reference computed case by case with plain
autograd. The fastest correct mode should be ``client.privacy.engine.DEFAULT_GRAD_SAMPLE_MODE``.

    .venv/bin/python bench/dp_overhead.py                      # default model, 16 phantom cases, batch 4
    .venv/bin/python bench/dp_overhead.py --write-docs         # also update docs/benchmarks.md

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size during the epoch above the
RSS before it, sampled from /proc every 2 ms (torch's CPU allocations are invisible to tracemalloc).
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

MARK_START = "<!-- dp-overhead:start -->"
MARK_END = "<!-- dp-overhead:end -->"
MODES = ("microbatch", "hooks", "functorch", "ew", "ghost")


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


def build_data(cases: int, seed: int) -> Any:
    from client.data import CaseDataset
    from models.config import ModelConfig
    from simulations.phantom_writers import generate

    cfg = ModelConfig()
    out = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    generate(out / "ph", sites=1, cases_per_site=cases, seed=seed, scenario="iid", shape=cfg.spatial_size,
             fmt="nifti", heldout_cases=0)
    return CaseDataset([out / "ph" / "site-01"], cfg.modalities, cfg.spatial_size)


def make_setup(mode: str, dataset: Any, batch: int, device: torch.device, noise: float, seed: int) -> dict[str, Any]:
    """Model, optimizer, loader and loss for ``mode`` (``none`` = non-private)."""
    from client.privacy.engine import CasesOnly, make_private
    from models.config import ModelConfig
    from models.losses import MultiTaskLoss
    from models.network import build_model
    from models.training import make_optimizer

    torch.manual_seed(seed)
    model = build_model(ModelConfig()).to(device)
    opt = make_optimizer(model, lr=1e-3)
    loader = DataLoader(CasesOnly(dataset), batch_size=batch, shuffle=True)
    loss = MultiTaskLoss()
    if mode == "none":
        return {"model": model, "module": model, "optimizer": opt, "loader": loader, "loss": loss}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = make_private(model, opt, loader, loss, noise_multiplier=noise, max_grad_norm=1.0,
                             grad_sample_mode=mode, seed=seed)
    return {"model": model, "module": parts.module, "optimizer": parts.optimizer, "loader": parts.loader,
            "loss": parts.loss_fn}


def run_epoch(setup: dict[str, Any], device: torch.device) -> float:
    from models.training import train_epoch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_epoch(setup["module"], setup["loader"], setup["optimizer"], setup["loss"], device,
                    modality_dropout=0.0, generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


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


def check_mode(mode: str, dataset: Any, device: torch.device) -> tuple[bool, str]:
    """Whether ``mode``'s clipped summed gradient of one 3-case batch matches the case-by-case reference."""
    from client.privacy.engine import CasesOnly

    try:
        setup = make_setup(mode, dataset, 4, device, noise=1.0, seed=0)
        model, module, opt, loss_fn = setup["model"], setup["module"], setup["optimizer"], setup["loss"]
        for m in model.modules():  # deterministic forward for the comparison
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        view = CasesOnly(dataset)
        batch = {k: torch.stack([view[i][k] for i in range(3)]) for k in CasesOnly.KEYS}
        model.train()
        opt.zero_grad()
        out = loss_fn(*module(batch["image"].to(device), batch["mask"].to(device)), batch["seg"].to(device),
                      batch["label"].to(device))
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        opt.clip_and_accumulate()
        got = [p.summed_grad for p in model.parameters() if p.requires_grad]
        # the reference runs on a fresh copy: the mode's hooks stay attached to ``model``
        from models.config import ModelConfig
        from models.network import build_model

        twin = build_model(ModelConfig()).to(device)
        twin.load_state_dict(model.state_dict())
        for m in twin.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        twin.train()
        ref = reference_clipped_sum(twin, batch, 1.0, device)
        err = max(float((g.double() - r.double()).abs().max()) for g, r in zip(got, ref))
        scale = max(float(r.abs().max()) for r in ref)
        ok = err <= 1e-4 * max(scale, 1.0)
        return ok, f"max abs error {err:.2e} (gradient scale {scale:.2e})"
    except Exception as exc:  # noqa: BLE001 - a failing mode is a result of the benchmark
        return False, f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=16, help="phantom training cases (one site)")
    ap.add_argument("--batch-size", type=int, default=4, help="expected (Poisson) batch size")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per mode (median reported)")
    ap.add_argument("--modes", default=",".join(MODES), help="grad-sample modes to try")
    ap.add_argument("--slow-repeats", type=int, default=1,
                    help="timed epochs for modes slower than 5x non-private after the first repeat")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--write-docs", action="store_true", help="update the table in docs/benchmarks.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # Opacus/torch hook warnings would drown the table

    from models.config import ModelConfig
    from models.training import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    dataset = build_data(args.cases, seed=0)
    cfg = ModelConfig()
    print(f"model: default ModelConfig ({cfg.family}, {len(cfg.modalities)} modalities, spatial {cfg.spatial_size}, "
          f"channels {cfg.channels}); {len(dataset)} cases, batch {args.batch_size}, device {device}, "
          f"{args.threads} threads")

    correct: dict[str, tuple[bool, str]] = {}
    for mode in modes:
        correct[mode] = check_mode(mode, dataset, device)
        print(f"  check {mode:10s}: {'OK ' if correct[mode][0] else 'BAD'} {correct[mode][1]}", flush=True)

    runnable = ["none", *[m for m in modes if correct[m][0]]]
    setups = {m: make_setup(m, dataset, args.batch_size, device, noise=1.0, seed=0) for m in runnable}
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
                with PeakRSS() as rss:
                    times[m].append(run_epoch(setups[m], device))
                mem[m] = max(mem[m], rss.extra_mb)
        print(f"  repeat {rep + 1}/{args.repeats} done", flush=True)

    base_t = statistics.median(times["none"])
    rows = []
    for m in ["none", *modes]:
        if m != "none" and not correct[m][0]:
            rows.append((m, None, None, None, correct[m][1]))
            continue
        t = statistics.median(times[m])
        rows.append((m, t, t / base_t, mem[m], "" if m == "none" else "correct"))
    best = min((r for r in rows if r[0] != "none" and r[1] is not None), key=lambda r: r[1], default=None)

    mem_label = "peak GPU memory above start, MiB" if device.type == "cuda" else "peak RSS above start, MiB"
    lines = [
        f"| mode | s / epoch | ratio vs non-private | {mem_label} | note |",
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
            f"device {device}, {args.threads} threads, {len(dataset)} phantom cases, batch {args.batch_size}, "
            f"median of {args.repeats} interleaved epochs; modes slower than 5x timed once):"
        )
        write_docs(header + "\n\n" + table + "\n")


def write_docs(section: str) -> None:
    from simulations.mdsections import write_section

    path = write_section(ROOT / "docs" / "benchmarks.md", "dp-overhead", section,
                         heading="## DP-SGD overhead (site training)", new_file_title="# Benchmarks")
    print(f"updated {path}")


if __name__ == "__main__":
    main()
