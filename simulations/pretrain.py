"""Public pretraining (``fedfusion pretrain``): a checkpoint for a federation's round 0 (``init-checkpoint``).

Data the consortium may share: a public BraTS-layout folder (``site-*`` folders + ``heldout/``), or a "public"
phantom cohort (:func:`public_phantoms`) generated with another seed than the federation's sites and the
``scanner-skew`` scenario, so its scanners (gains, noise, spacing, bias) and anatomy are draws no site shares.

Modes:

* ``supervised``: centralized, non-private training on the public cases with the sites' own loop
  (:func:`simulations.central.train_central`, augmentation on); the checkpoint is its best epoch on the public
  held-out set.
* ``masked``: self-supervised masked-volume reconstruction of the per-modality encoders
  (:class:`models.self_supervised.MaskedVolumeModel`), for public images without labels or segmentations (case
  folders under ``site-*`` folders, or under the data folder itself; no ``labels.csv`` needed), augmented as the
  sites augment (:func:`client.privacy.multiplicity.augment_batch`); the checkpoint holds the pretrained encoders
  and the seed's initialisation elsewhere.

The checkpoint is a :func:`models.checkpoint.save_checkpoint` file (weights-only loadable) whose ``extra``
holds ``provenance``: mode, data folder and (phantoms) generator request, epochs, cases, the final metric, the
time; the ServerApp copies it, with the file's SHA-256, into the run directory and the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import runconfig
from models.modalities import canonical

log = logging.getLogger(__name__)

__all__ = ["MODES", "PUBLIC_CASES", "PUBLIC_SCENARIO", "PUBLIC_SEED", "PUBLIC_SITES", "PretrainResult",
           "PretrainSettings", "pretrain", "public_phantoms", "public_start"]

#: Pretraining modes (see the module docstring).
MODES: tuple[str, ...] = ("supervised", "masked")
#: Scenario of the public phantom cohort: every modality, scanners of its own.
PUBLIC_SCENARIO = "scanner-skew"
#: Default seed of a public phantom cohort (any seed but the federation's).
PUBLIC_SEED = 1_000_003
#: Default size of a public phantom cohort: sites (folders) x cases per site.
PUBLIC_SITES = 2
PUBLIC_CASES = 64


def public_phantoms(data: Path, *, sites: int, cases: int, seed: int, federation_seed: int,
                    shape: tuple[int, int, int] = (32, 64, 64), heldout_cases: int = 8,
                    modalities: Sequence[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Generate (or reuse, for the same request) a public phantom cohort in ``data``; returns its manifest.

    ``modalities``: the modalities the public cases have (``None``: all six). Public brain-tumour collections
    (BraTS) hold the four MRI sequences only, so a cohort like them leaves the CT and ultrasound encoders to the
    federation (``dp-trainable = head+ct+us``, models/trainable.py).

    Raises:
        ValueError: ``seed`` equal to the federation's (the "public" cases would then be the sites' own draws).
    """
    if int(seed) == int(federation_seed):
        raise ValueError(f"the public cohort's seed {seed} is the federation's seed: its phantoms would repeat the "
                         "sites' own draws; choose another --public-seed")
    from .phantom_writers import ensure

    manifest, _ = ensure(Path(data), sites=sites, cases_per_site=cases, seed=int(seed), scenario=PUBLIC_SCENARIO,
                         shape=shape, fmt="nifti", heldout_cases=heldout_cases, progress=progress,
                         modalities=modalities)
    return manifest


@dataclass
class PretrainSettings:
    """One pretraining.

    Attributes:
        data: public data root (``site-*`` folders; ``heldout/`` for ``supervised``).
        out: the checkpoint to write.
        mode: one of :data:`MODES`.
        run_config: run-config overrides (the model, lr, batch size, seed are the federation's by default).
        epochs: passes over the public cases.
        threads: ``torch.set_num_threads`` (None: torch's choice).
        mask_ratio / patch: ``masked`` mode: share of zeroed patches and their side in voxels.
        progress: a progress display.
        phantoms: the public phantom request when :func:`public_phantoms` made ``data`` (recorded as provenance).
    """

    data: Path
    out: Path
    mode: str = "supervised"
    run_config: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 10
    threads: int | None = None
    mask_ratio: float = 0.5
    patch: int = 4
    progress: bool = True
    phantoms: dict[str, Any] | None = None


@dataclass
class PretrainResult:
    """The written checkpoint, its SHA-256, its provenance and the wall time."""

    checkpoint: Path
    sha256: str
    provenance: dict[str, Any]
    seconds: float


def pretrain(settings: PretrainSettings) -> PretrainResult:
    """Pretrain on ``settings.data`` and write ``settings.out`` (see the module docstring).

    Raises:
        ValueError / FileNotFoundError / RunConfigError: bad settings or data, named.
    """
    t0 = time.perf_counter()
    s = settings
    if s.mode not in MODES:
        raise ValueError(f"unknown pretraining mode {s.mode!r}; choose one of {', '.join(MODES)}")
    if s.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {s.epochs}")
    out = Path(s.out)
    if out.suffix != ".pt":
        raise ValueError(f"--out {out} should name a checkpoint file ending in .pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    run_dir = out.with_name(out.stem + "-run")
    rc = runconfig.load(s.run_config)
    model_cfg = runconfig.model_config(rc)
    if s.mode == "supervised":
        state, metric = _supervised(s, run_dir)
    else:
        state, metric = _masked(s, rc, run_dir)
    provenance: dict[str, Any] = {
        "kind": "fedfusion-pretrain", "mode": s.mode, "data": str(Path(s.data).resolve()), "epochs": int(s.epochs),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metric,
        # which encoders the public cases trained (the rest keep the seed's weights): the privacy planner plans a
        # run that trains the others as from scratch
        "modalities": ",".join(seen_modalities(Path(s.data), model_cfg.modalities)),
    }
    manifest = Path(s.data) / "phantoms.json"
    if manifest.is_file():
        provenance["data-manifest-sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    if s.phantoms is not None:
        provenance["phantoms"] = json.dumps(s.phantoms, sort_keys=True)
    from models.checkpoint import save_checkpoint
    from server.initial import sha256_of

    save_checkpoint(out, state, model_cfg, provenance=provenance)
    return PretrainResult(checkpoint=out, sha256=sha256_of(out), provenance=provenance,
                          seconds=time.perf_counter() - t0)


def _supervised(s: PretrainSettings, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from models.checkpoint import load_checkpoint

    from .central import BEST_METRIC, CentralSettings, train_central

    central = CentralSettings.from_run_config(
        Path(s.data), run_dir, s.run_config, epochs=s.epochs, augment=True, threads=s.threads, progress=s.progress,
        final_subsets="full", hd95=False,
    )
    result = train_central(central)
    best = run_dir / "checkpoints" / ("best.pt" if math.isfinite(result.best_value) else "last.pt")
    state, _, _ = load_checkpoint(best)
    return state, {"cases": _count_cases(Path(s.data)), "public-heldout-" + BEST_METRIC.replace("/", "-"):
                   float(result.best_value), "best-epoch": int(result.best_epoch)}


def _masked(s: PretrainSettings, rc: Mapping[str, Any], run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from client.privacy.multiplicity import augment_batch
    from models.network import build_model
    from models.runlog import MetricsLog
    from models.self_supervised import MaskedVolumeModel, patch_keep_mask
    from models.training import make_optimizer

    train = runconfig.TrainConfig.from_run_config(rc)
    cfg = runconfig.model_config(rc)
    if s.threads:
        torch.set_num_threads(int(s.threads))
    images, masks = _unlabelled_volumes(Path(s.data), cfg)
    torch.manual_seed(train.seed)
    model = MaskedVolumeModel(build_model(cfg))
    optimizer = make_optimizer(model, train.lr)
    generator = torch.Generator().manual_seed(train.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    loss = math.nan
    model.train()
    n = int(images.shape[0])
    for epoch in range(1, s.epochs + 1):
        total = 0.0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, train.batch_size):
            idx = order[start : start + train.batch_size]
            image, _ = augment_batch(images[idx], masks[idx], torch.zeros((len(idx), *cfg.spatial_size),
                                                                          dtype=torch.long), generator)
            keep = patch_keep_mask(tuple(image.shape), s.patch, s.mask_ratio, generator)
            optimizer.zero_grad(set_to_none=True)
            value = model(image, masks[idx], keep)
            value.backward()
            optimizer.step()
            total += float(value.detach()) * len(idx)
        loss = total / n
        metrics.write(epoch, "pretrain-masked", "global", {"loss": loss})
        log.info("masked-volume pretraining epoch %d/%d: reconstruction loss %.4f", epoch, s.epochs, loss)
    return model.network_state(), {"cases": n, "reconstruction-mse": float(loss), "mask-ratio": float(s.mask_ratio),
                                   "patch": int(s.patch)}


def _unlabelled_volumes(data: Path, cfg: Any) -> tuple[Any, Any]:
    """``(image (N, M, *S), mask (N, M))`` of every readable case under ``data``'s ``site-*`` folders (or ``data``
    itself); no labels.csv or segmentation needed (unusable cases are logged and skipped)."""
    import numpy as np
    import torch

    from common.data.dataset import preprocess_case
    from common.data.site import CaseError, list_cases, load_case

    folders = [d for d in sorted(Path(data).iterdir()) if d.is_dir() and d.name.startswith("site-")] or [Path(data)]
    images, masks = [], []
    for case_dir in (c for f in folders for c in list_cases(f)):
        try:
            case = load_case(case_dir, cfg.modalities, require_seg=False)
        except CaseError as exc:
            log.warning("skipping %s: %s", case_dir, exc)
            continue
        arrays = preprocess_case(case.images, None, cfg.modalities, cfg.spatial_size)
        images.append(arrays["image"])
        masks.append(arrays["mask"])
    if not images:
        raise ValueError(f"no readable case under {data} (site-* folders of case folders) for modalities "
                         f"{', '.join(cfg.modalities)}")
    return torch.from_numpy(np.stack(images)).float(), torch.from_numpy(np.stack(masks)).float()


def seen_modalities(data: Path, modalities: Sequence[str]) -> list[str]:
    """The ``modalities`` that at least one training case under ``data`` (its ``site-*`` folders, or ``data``
    itself; never a held-out cohort) has, in ``modalities``' order. Files are listed, not read."""
    from common.data.site import discover_sites, list_cases, scan_case

    folders = [site.path for site in discover_sites(data) if not site.heldout] or [Path(data)]
    found: set[str] = set()
    for case_dir in (c for f in folders for c in list_cases(f)):
        found.update(scan_case(case_dir, modalities, load_pixels=False).found)
        if found >= set(modalities):
            break
    return [m for m in modalities if m in found]


def _count_cases(data: Path) -> int:
    from common.data.site import discover_sites, list_cases

    return sum(len(list_cases(site.path)) for site in discover_sites(data) if not site.heldout)


def public_start(folder: Path, run_config: Mapping[str, Any], *, sites: int | None = None, cases: int | None = None,
                 shape: tuple[int, int, int] | None = None, heldout_cases: int | None = None,
                 epochs: int | None = None, mode: str = "supervised", modalities: Sequence[str] | None = None,
                 progress: bool = False) -> Path:
    """The checkpoint a run starts from when it uses public pretraining (``fedfusion simulate``'s default under DP,
    the ``privacy`` experiment): a public phantom cohort of ``sites`` x ``cases`` cases (default
    :data:`PUBLIC_SITES` x :data:`PUBLIC_CASES`; seed :data:`PUBLIC_SEED`, never the federation's; ``shape`` and
    ``heldout_cases`` default to :func:`public_phantoms`') in ``folder/data``, and the run's network pretrained on
    it (``mode``: supervised, or ``masked`` for the encoders alone without the labels; ``epochs`` or
    :class:`PretrainSettings`' default) to ``folder/pretrained.pt`` (``folder/masked.pt`` for ``masked``). Made
    once and reused while the cohort request, the mode and the network are the same, so a rerun pays nothing.
    ``modalities``: the public cases' modalities (:func:`public_phantoms`; ``None``: all six).

    ``run_config``: the run's keys (its network, seed, lr and batch size are used for pretraining).
    """
    from models.checkpoint import load_checkpoint

    rc = runconfig.load(run_config)
    sites = PUBLIC_SITES if sites is None else sites
    cases = PUBLIC_CASES if cases is None else cases
    request: dict[str, Any] = {"sites": sites, "cases": cases, "seed": PUBLIC_SEED}
    if modalities is not None:  # absent for all six, so earlier checkpoints' requests stay equal
        request["modalities"] = ",".join(canonical(modalities))
    if mode not in MODES:
        raise ValueError(f"unknown pretraining mode {mode!r}; choose one of {', '.join(MODES)}")
    out = Path(folder) / ("pretrained.pt" if mode == "supervised" else f"{mode}.pt")
    if out.is_file():
        try:
            _, cfg, extra = load_checkpoint(out)
            provenance = extra.get("provenance", {})
            if (cfg == runconfig.model_config(rc) and provenance.get("mode") == mode
                    and provenance.get("phantoms") == json.dumps(request, sort_keys=True)):
                log.info("public pretraining: reusing %s", out)
                return out
        except Exception as exc:  # an unreadable or foreign file is rebuilt, never trusted
            log.warning("public pretraining: %s is not reusable (%s); pretraining again", out, exc)
    cohort = {k: v for k, v in (("shape", shape), ("heldout_cases", heldout_cases)) if v is not None}
    public_phantoms(Path(folder) / "data", sites=sites, cases=cases, seed=PUBLIC_SEED,
                    federation_seed=int(rc["seed"]), modalities=modalities, progress=progress, **cohort)
    keys = {k: v for k, v in rc.items() if k.startswith("model-") or k in ("seed", "lr", "batch-size")}
    result = pretrain(PretrainSettings(data=Path(folder) / "data", out=out, run_config=keys, progress=progress,
                                       mode=mode, phantoms=request, **({} if epochs is None else {"epochs": epochs})))
    log.info("public pretraining: %s in %.0f s", out, result.seconds)
    return out
