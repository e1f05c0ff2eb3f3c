"""Wall time of the every-modality-subset held-out evaluation (``models.evaluation.evaluate_subsets``), per family.

Compares, on the same held-out cases and model (the run config's model per family with ``--channels``, default
8,16,32: 3D, 16x32x32, six modalities, 63 subsets):

* ``reference``: one full network forward per subset (``shared_encoding=False``) — the evaluation before
  ``FusionNet.forward_subsets`` — with HD95 for every subset (the server's former default) and for the full set only;
* ``shared``: encoders once per batch, fusion + decoder per subset, ``subset_batch`` subsets stacked along the batch
  axis, HD95 for the full set only (the server's default ``eval-hd95 = "full"``).

Every timed variant's metrics are checked against the reference (max absolute difference printed). The held-out set
is loaded (and resampled) once before timing, as the server's cached dataset is. Wall time and process CPU time
(all threads) are printed: on a shared machine CPU time is the steadier number.

Usage::

    .venv/bin/python bench/subset_eval_speed.py --heldout DATA/heldout [--checkpoint C.pt] [--threads 1]

``--checkpoint`` gives trained weights for a family (its config is used as is); other families are untrained
(seed 0). Untrained networks predict speckle, which makes HD95 (edge distances) far slower than on trained
predictions: time the every-subset-HD95 reference with trained weights (``--skip-reference-all-hd95`` otherwise).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.fusion import FUSIONS  # noqa: E402

FAMILIES = tuple(FUSIONS)  # the registry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heldout", type=Path, required=True, help="site-layout held-out folder (case folders + labels)")
    p.add_argument("--checkpoint", type=Path, action="append", default=[],
                   help="trained checkpoint (models/checkpoint.py) used for its family instead of an untrained "
                        "model; repeatable")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--channels", default="8,16,32", help="encoder widths of the untrained models")
    p.add_argument("--batch-size", type=int, default=2, help="held-out cases per batch (server eval-batch-size)")
    p.add_argument("--subset-batch", default="1,8,21,63", help="comma-separated subset_batch values to time")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-reference-all-hd95", action="store_true", help="skip the slowest reference variant")
    args = p.parse_args(argv)

    import torch

    from common.evaluation import heldout_loader, load_heldout, load_model
    from common.runconfig import default_model_config
    from models.evaluation import evaluate_subsets
    from models.network import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}")
    trained = {}
    for path in args.checkpoint:
        ckpt_model, ckpt_cfg, _ = load_model(path, "cpu")
        trained[ckpt_cfg.family] = (path, ckpt_model, ckpt_cfg)
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        if family in trained:
            path, model, cfg = trained[family]
            source = str(path)
        else:
            cfg = default_model_config(family=family, channels=tuple(int(c) for c in args.channels.split(",")))
            torch.manual_seed(0)
            model = build_model(cfg)
            source = "untrained, seed 0"
        ds = load_heldout(cfg, args.heldout)
        cases = [ds[i] for i in range(len(ds))]  # load + resample once (the server caches its dataset too)
        loader = heldout_loader(cases, args.batch_size)

        def timed(**kw: object) -> tuple[float, float, dict[str, float]]:
            t0, c0 = time.perf_counter(), time.process_time()
            report = evaluate_subsets(model, loader, "cpu", **kw)
            return time.perf_counter() - t0, time.process_time() - c0, report.to_flat()

        print(f"\n{family} ({source}), {len(cases)} cases, {2 ** len(cfg.modalities) - 1} subsets", flush=True)
        variants: list[tuple[str, dict[str, object]]] = []
        if not args.skip_reference_all_hd95:
            variants.append(("reference, hd95 every subset", dict(shared_encoding=False, hd95=True)))
        variants.append(("reference, hd95 full set only", dict(shared_encoding=False, hd95="full")))
        variants += [(f"shared, subset_batch {k}, hd95 full set only",
                      dict(shared_encoding=True, hd95="full", subset_batch=int(k)))
                     for k in args.subset_batch.split(",")]
        variants.append(("shared, subset_batch 1, no hd95", dict(shared_encoding=True, hd95=False, subset_batch=1)))
        ref: dict[str, float] | None = None
        for name, kw in variants:
            secs, cpu, flat = timed(**kw)
            if ref is None or (kw.get("hd95") == "full" and not kw["shared_encoding"]):
                ref = flat
            common = [k for k in flat if k in ref and math.isfinite(flat[k]) and math.isfinite(ref[k])]
            diff = max(abs(flat[k] - ref[k]) for k in common)
            print(f"  {name:45s} wall {secs:7.2f} s  cpu {cpu:7.2f} s  max |metric diff| vs reference {diff:.2e}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
