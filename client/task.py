"""Site-side glue between Flower's messages and fedfusion's models, readers and privacy engine.

Everything expensive (reading and resampling the site's studies, building the network, Opacus's ``make_private``,
deriving the noise multiplier) happens once per site process and is cached at module level, keyed by what it
depends on (site folder, series map, model config, DP and optimiser settings); the training parts are built by the
first train message only. A round only loads the received weights, trains or evaluates, and charges the privacy
ledger. In simulation a site process serves every round; a deployed SuperNode starts a fresh ClientApp process per
message, so there the on-disk caches in the site's state directory (preprocessed cases, derived noise multipliers)
carry the savings.

Where a site's settings come from:

* node config (deployment: ``flower-supernode --node-config`` or ``fedfusion site``): ``data-dir`` (the site
  folder), ``state-dir``, ``series-map``, ``device`` (auto|cpu|cuda), ``num-threads`` and the privacy policy keys
  (see :mod:`client.privacy.policy`).
* simulation: node config has only ``partition-id``/``num-partitions``; partition ``i`` is the ``i``-th sorted
  ``site-*`` folder of the run config's ``data-dir`` and its state directory is ``<run-dir>/site-state/<site>``.
* run config (the server's, pyproject ``[tool.flwr.app.config]``): epochs, lr, batch size, ``proximal-mu``,
  ``dp-*``, ``model-*``, ``seed``, ``num-server-rounds``.
"""

from __future__ import annotations

import json
import logging
import re
import math
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from common import replies
from common.layout import partition_site, simulated_state_dir
from client.privacy.accountant import PersistentAccountant
from client.privacy.engine import (
    DEFAULT_GRAD_SAMPLE_MODE,
    CasesOnly,
    PrivateParts,
    derive_noise_multiplier,
    load_plain_state_dict,
    make_private,
    sample_rate_of,
    steps_per_epoch,
)
from client.privacy.policy import DPRequest, PolicyRefusal, SitePolicy
from models.atomic import atomic_write_text
from models.config import ModelConfig
from models.modalities import MODALITIES

log = logging.getLogger("fedfusion.site")


class SiteDecline(Exception):
    """The site will not do what was asked; becomes an error reply with ``code`` (see :mod:`common.replies`)."""

    def __init__(self, code: int, text: str, **numbers: float) -> None:
        self.code = code
        self.reason = replies.make_reason(code, text, **numbers)
        super().__init__(self.reason)


# ---------------------------------------------------------------------------------------------------------------
# Site settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteSettings:
    """Where one site's data and state live and how it computes.

    Attributes:
        site_dir: the site folder (case folders + labels.csv).
        state_dir: the site's persistent state (privacy ledger, policy file).
        series_map: optional SeriesDescription → modality rules file.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        num_threads: torch CPU threads (0 = leave as is).
        node_config: the raw node config (policy keys are read from it).
    """

    site_dir: Path
    state_dir: Path
    series_map: Path | None
    device: str
    num_threads: int
    node_config: tuple[tuple[str, Any], ...]

    @property
    def site_name(self) -> str:
        return self.site_dir.name

    @property
    def site_index(self) -> float:
        """The site's number for the server's logs: node config ``site-index``, else the NN of a ``site-NN`` folder,
        else NaN (the server then names the site by its node id). A site number, never anything about patients."""
        given = dict(self.node_config).get("site-index")
        if given is not None:
            return float(given)
        m = re.fullmatch(r"site-(\d+)", self.site_name)
        return float(m.group(1)) if m else float("nan")


def resolve_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteSettings:
    """Site settings from the node config (deployment) or from the partition id (simulation).

    Raises:
        SiteDecline(NO_USABLE_DATA): when the site folder cannot be found, saying what to set.
    """
    nc = dict(node_config)
    data_dir = str(nc.get("data-dir", "") or "")
    if data_dir:
        site_dir = Path(data_dir).expanduser().resolve()
        default_state = site_dir.parent / f"{site_dir.name}-state"
    elif "partition-id" in nc:
        root = Path(str(run_config["data-dir"])).expanduser().resolve()
        try:
            site_dir = partition_site(root, int(nc["partition-id"]))
        except (OSError, ValueError) as exc:
            log.error("simulated site: %s", exc)  # names local paths: stays in the site log
            raise SiteDecline(
                replies.NO_USABLE_DATA,
                f"simulation partition {nc['partition-id']} has no site folder in the run config's data-dir; make "
                "num-supernodes match the number of site folders",
            ) from exc
        run_dir = Path(str(run_config["run-dir"])).expanduser().resolve()
        default_state = simulated_state_dir(run_dir, site_dir.name)
    else:
        raise SiteDecline(
            replies.NO_USABLE_DATA,
            "this SuperNode has no data-dir in its node config; start it with "
            "--node-config \"data-dir='/path/to/site' state-dir='/path/to/state'\"",
        )
    state_dir = Path(str(nc.get("state-dir", "") or default_state)).expanduser().resolve()
    smap = str(nc.get("series-map", "") or "")
    return SiteSettings(
        site_dir=site_dir,
        state_dir=state_dir,
        series_map=Path(smap).expanduser().resolve() if smap else None,
        device=str(nc.get("device", "auto") or "auto"),
        num_threads=int(nc.get("num-threads", 0) or 0),
        node_config=tuple(sorted((str(k), v) for k, v in nc.items())),
    )


def resolve_torch_device(name: str) -> torch.device:
    """``auto`` → CUDA when present else CPU; an unknown name or ``cuda`` without a GPU is a clear decline."""
    from models.training import resolve_device

    try:
        return resolve_device(name)
    except ValueError as exc:
        raise SiteDecline(replies.BAD_REQUEST, f"node config device: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# Data (cached per process)
# ---------------------------------------------------------------------------------------------------------------
_LOCK = threading.RLock()
_DATASETS: dict[tuple[Any, ...], Any] = {}
_RUNTIMES: dict[tuple[Any, ...], "SiteRuntime"] = {}


def load_site_dataset(settings: SiteSettings, cfg: ModelConfig) -> Any:
    """The site's :class:`common.data.CaseDataset` for ``cfg``'s modalities and size (read once per process).

    Unreadable cases are skipped and logged by the reader (kind and site-local path; the log stays on site).
    """
    key = (str(settings.site_dir), str(settings.series_map), cfg.modalities, cfg.spatial_size)
    with _LOCK:
        if key in _DATASETS:
            return _DATASETS[key]
        from common.data import CaseDataset

        # Flower's deployed SuperNode starts a fresh ClientApp process per message, so the in-process cache only
        # helps in simulation; the on-disk cache of preprocessed arrays (inside the site's private state
        # directory) makes later rounds skip DICOM decoding and resampling.
        kwargs: dict[str, Any] = dict(
            site_dirs=[settings.site_dir], modalities=cfg.modalities, spatial_size=cfg.spatial_size,
            augment=False, cache=True, cache_dir=settings.state_dir / "preprocessed",
        )
        if settings.series_map is not None:
            kwargs["series_mapping"] = settings.series_map
        t0 = time.perf_counter()
        try:
            ds = CaseDataset(**kwargs)
        except (ValueError, OSError) as exc:
            # The message names local paths: it stays in the site log; the server gets a generic reason.
            log.error("site %s: no usable data: %s", settings.site_name, exc)
            raise SiteDecline(
                replies.NO_USABLE_DATA,
                "the site has no usable case for this run's modalities (the site log and `fedfusion inspect` say why)",
            ) from exc
        log.info(
            "site %s: %d usable cases loaded in %.1f s", settings.site_name, len(ds), time.perf_counter() - t0
        )
        _DATASETS[key] = ds
        return ds


def modality_counts(dataset: Any) -> dict[str, int]:
    """Cases carrying each modality of :data:`MODALITIES` (0 for modalities the run does not use)."""
    counts: dict[str, int] = {m: 0 for m in MODALITIES}
    for m, n in dataset.modality_counts().items():
        if m in counts:
            counts[m] = int(n)
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Run-config parsing
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """The training part of the run config."""

    # the defaults of pyproject.toml [tool.flwr.app.config], for a run config that lacks a key
    local_epochs: int = 3
    lr: float = 0.002
    batch_size: int = 12
    proximal_mu: float = 0.0
    seed: int = 0
    num_server_rounds: int = 5

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> "TrainSettings":
        d = cls()
        try:
            out = cls(
                local_epochs=int(rc.get("local-epochs", d.local_epochs)),
                lr=float(rc.get("lr", d.lr)),
                batch_size=int(rc.get("batch-size", d.batch_size)),
                proximal_mu=float(rc.get("proximal-mu", d.proximal_mu)),
                seed=int(rc.get("seed", d.seed)),
                num_server_rounds=int(rc.get("num-server-rounds", d.num_server_rounds)),
            )
        except (TypeError, ValueError) as exc:
            raise SiteDecline(replies.BAD_REQUEST, f"unreadable run config value: {exc}") from exc
        if out.local_epochs < 1 or out.batch_size < 1 or not out.lr > 0 or out.proximal_mu < 0:
            raise SiteDecline(
                replies.BAD_REQUEST,
                "run config needs local-epochs >= 1, batch-size >= 1, lr > 0 and proximal-mu >= 0",
                local_epochs=out.local_epochs, batch_size=out.batch_size, lr=out.lr, proximal_mu=out.proximal_mu,
            )
        return out


def model_config_of(run_config: Mapping[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_flat(dict(run_config))
    except (TypeError, ValueError) as exc:
        raise SiteDecline(replies.BAD_REQUEST, f"the run config's model-* keys are invalid: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# The per-process site runtime
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SiteRuntime:
    """One site's cached training state for one (model config, training settings, DP settings) combination."""

    settings: SiteSettings
    model_cfg: ModelConfig
    train: TrainSettings
    dp: DPRequest
    device: torch.device
    dataset: Any
    model: torch.nn.Module
    loss_fn: Any
    noise_multiplier: float = 0.0
    #: DP-SGD parts (DP runs) or ``(module, loader, optimizer, loss)`` (DP off), built by the first train message:
    #: a deployed ClientApp process lives for one message, and an evaluate message needs neither.
    private: PrivateParts | None = None
    plain: tuple[Any, DataLoader, Any, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def num_cases(self) -> int:
        return len(self.dataset)

    def site_seed(self, server_round: int) -> int:
        """A per-site, per-round seed from the run seed (sites must not draw the same noise)."""
        return (self.train.seed * 1_000_003 + server_round * 7919 + zlib.crc32(self.settings.site_name.encode())) % (
            2**31 - 1
        )


def _build_model(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    from models.network import build_model

    return build_model(cfg).to(device)


def _make_loss() -> Any:
    from models.losses import MultiTaskLoss

    return MultiTaskLoss()


def _make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    from models.training import make_optimizer

    return make_optimizer(model, lr=lr)


def get_runtime(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> tuple[SiteRuntime, SitePolicy]:
    """The cached runtime for this site and run config, built on first use; plus the site's current policy.

    The policy is re-read every call (cheap) so an operator tightening ``privacy-policy.toml`` takes effect at the
    next round; the request is checked against it before anything is built.

    Raises:
        SiteDecline: refused policy, no usable data, bad run config.
    """
    settings = resolve_site(node_config, run_config)
    try:
        policy = SitePolicy.resolve(dict(settings.node_config), settings.state_dir)
        dp = DPRequest.from_run_config(run_config)
    except ValueError as exc:
        raise SiteDecline(replies.BAD_REQUEST, f"privacy settings unreadable: {exc}") from exc
    try:
        policy.check(dp)
    except PolicyRefusal as exc:
        log.error("site %s REFUSES this run: %s", settings.site_name, exc)
        raise SiteDecline(replies.REFUSED_POLICY, str(exc)) from exc
    cfg = model_config_of(run_config)
    ts = TrainSettings.from_run_config(run_config)
    key = (settings, cfg.to_json(), ts, dp, policy.secure_mode, policy.min_noise_multiplier)
    with _LOCK:
        rt = _RUNTIMES.get(key)
        if rt is not None:
            return rt, policy
        if settings.num_threads > 0:
            torch.set_num_threads(settings.num_threads)
        device = resolve_torch_device(settings.device)
        dataset = load_site_dataset(settings, cfg)
        if len(dataset) == 0:
            raise SiteDecline(
                replies.NO_USABLE_DATA,
                "the site has no usable case for this run's modalities (see the site log for skipped cases)",
            )
        torch.manual_seed(ts.seed)  # the initial weights are replaced by the server's, but keep builds repeatable
        model = _build_model(cfg, device)
        rt = SiteRuntime(
            settings=settings, model_cfg=cfg, train=ts, dp=dp, device=device, dataset=dataset, model=model,
            loss_fn=_make_loss(),
        )
        rt.counts = modality_counts(dataset)
        # Modalities this site never has cannot train their encoders here (the server keeps those encoders from the
        # sites that have them); freezing them before Opacus sees the parameters spares their per-case gradients.
        model.set_site_modalities([m for m in cfg.modalities if rt.counts.get(m, 0) > 0])
        _RUNTIMES[key] = rt
        return rt, policy


def _training_parts(rt: SiteRuntime, policy: SitePolicy) -> tuple[Any, Any, Any, Any]:
    """``(module, loader, optimizer, loss)`` to train with: Opacus's DP-SGD parts, or the plain ones when the run
    (with the site's consent) has DP off. Built once per runtime, on the first train message."""
    with _LOCK:
        if rt.private is None and rt.plain is None:
            loader = DataLoader(CasesOnly(rt.dataset), batch_size=min(rt.train.batch_size, rt.num_cases),
                                shuffle=True, drop_last=False)
            optimizer = _make_optimizer(rt.model, rt.train.lr)
            if rt.dp.enabled:
                rt.noise_multiplier = _noise_for(rt, policy)
                rt.model.train()  # Opacus validates training mode; an evaluate message may have left it in eval
                rt.private = make_private(
                    rt.model, optimizer, loader, rt.loss_fn,
                    noise_multiplier=rt.noise_multiplier, max_grad_norm=rt.dp.max_grad_norm,
                    grad_sample_mode=DEFAULT_GRAD_SAMPLE_MODE, secure_mode=policy.secure_mode, seed=rt.train.seed,
                )
                if not policy.secure_mode:
                    log.info(
                        "site %s: Opacus secure_mode is OFF (seeded noise, fine for experiments); set "
                        "secure-mode=true in the node config for production", rt.settings.site_name,
                    )
            else:
                log.warning(
                    "site %s: TRAINING WITHOUT DIFFERENTIAL PRIVACY (run config dp-enabled=false, allowed by this "
                    "site's policy allow-no-dp=true). Updates leave the site with no formal privacy guarantee.",
                    rt.settings.site_name,
                )
                rt.plain = (rt.model, loader, optimizer, rt.loss_fn)
    if rt.private is not None:
        p = rt.private
        return p.module, p.loader, p.optimizer, p.loss_fn
    assert rt.plain is not None
    return rt.plain


def _noise_for(rt: SiteRuntime, policy: SitePolicy) -> float:
    """The run's noise multiplier: given, or derived from the target epsilon over the planned rounds x epochs;
    never below the site's floor (raising noise only strengthens privacy, so the site may do it unasked)."""
    if rt.dp.noise_multiplier > 0:
        return rt.dp.noise_multiplier
    q = sample_rate_of(rt.num_cases, rt.train.batch_size)
    steps = rt.train.num_server_rounds * rt.train.local_epochs * steps_per_epoch(rt.num_cases, rt.train.batch_size)
    # the binary search costs seconds; deployed ClientApp processes live for one message, so remember results
    cache_file = rt.settings.state_dir / "noise-cache.json"
    cache_key = f"rdp|{rt.dp.target_epsilon!r}|{rt.dp.delta!r}|{q!r}|{steps}"
    try:
        cached = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file.exists() else {}
    except (OSError, ValueError):
        cached = {}
    if cache_key in cached:
        sigma = float(cached[cache_key])
    else:
        try:
            sigma = derive_noise_multiplier(
                target_epsilon=rt.dp.target_epsilon, delta=rt.dp.delta, sample_rate=q, steps=steps
            )
        except ValueError as exc:
            raise SiteDecline(replies.BAD_REQUEST, str(exc)) from exc
        cached[cache_key] = sigma
        try:
            atomic_write_text(cache_file, json.dumps(cached, indent=1))
        except OSError as exc:  # a cache, not state: never fail a round for it
            log.warning("could not write %s: %s", cache_file, exc)
    log.info(
        "site %s: noise multiplier %.4f derived for epsilon=%g, delta=%g over %d rounds x %d epochs (%d steps, q=%.4f)",
        rt.settings.site_name, sigma, rt.dp.target_epsilon, rt.dp.delta, rt.train.num_server_rounds,
        rt.train.local_epochs, steps, q,
    )
    if sigma < policy.min_noise_multiplier:
        log.info("site %s: raising noise multiplier %.4f to the site floor %.4f", rt.settings.site_name, sigma,
                 policy.min_noise_multiplier)
        sigma = policy.min_noise_multiplier
    return sigma


# ---------------------------------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------------------------------
def _train_epoch(rt: SiteRuntime, module: Any, loader: Any, optimizer: Any, loss_fn: Any, generator: torch.Generator,
                 proximal: Any) -> dict[str, Any]:
    from models.training import train_epoch

    return train_epoch(
        module, loader, optimizer, loss_fn, rt.device,
        modality_dropout=rt.model_cfg.modality_dropout, generator=generator, proximal=proximal,
    )


def _loss_of(stats: Mapping[str, Any]) -> float:
    return float(stats.get("loss", float("nan")))


def train_round(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], state: Mapping[str, torch.Tensor], server_round: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One local training round: load ``state`` (plain parameter names), train, charge the ledger.

    Returns:
        the new state dict (plain names, CPU tensors) and the numeric reply metrics.

    Raises:
        SiteDecline: policy refusal, exhausted budget, no data, or arrays that do not match the model.
    """
    rt, policy = get_runtime(node_config, run_config)
    module, loader, optimizer, loss_fn = _training_parts(rt, policy)
    accountant = PersistentAccountant.load(rt.settings.state_dir) if rt.private is not None else None
    if accountant is not None and rt.private is not None:
        parts = rt.private
        steps = rt.train.local_epochs * parts.steps_per_epoch
        spent = accountant.epsilon(rt.dp.delta)
        after = accountant.prospective_epsilon(parts.noise_multiplier, parts.sample_rate, steps, rt.dp.delta)
        if after > policy.max_epsilon:
            log.error(
                "site %s DECLINES round %d: it has spent epsilon=%.3f (delta=%g); this round would bring it to %.3f, "
                "above the site's ceiling max-epsilon=%.3f. Raise the ceiling only after a privacy review.",
                rt.settings.site_name, server_round, spent, rt.dp.delta, after, policy.max_epsilon,
            )
            raise SiteDecline(
                replies.DECLINED_BUDGET,
                "privacy budget exhausted: the next round would exceed the site's max-epsilon",
                epsilon_total=spent, epsilon_next=after, max_epsilon=policy.max_epsilon, delta=rt.dp.delta,
            )
    try:
        load_plain_state_dict(rt.model, state)
    except ValueError as exc:
        raise SiteDecline(replies.BAD_REQUEST, str(exc)) from exc

    seed = rt.site_seed(server_round)
    torch.manual_seed(seed)  # Poisson sampling and shuffling draw from torch's global RNG
    generator = torch.Generator().manual_seed(seed)  # modality dropout
    rt.model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    from models.training import ProximalTerm

    # FedProx: the training loop adds the proximal gradient after DP noise (post-processing) or to the loss.
    prox = ProximalTerm(dict(rt.model.named_parameters()), rt.train.proximal_mu) if rt.train.proximal_mu > 0 else None
    # each round starts from the received global weights: forget momentum (a DPOptimizer shares its
    # original optimizer's state)
    optimizer.state.clear()
    for _ in range(rt.train.local_epochs):
        stats = _train_epoch(rt, module, loader, optimizer, loss_fn, generator, prox)
        losses.append(_loss_of(stats))
    seconds = time.perf_counter() - t0

    metrics: dict[str, float] = {"num-examples": float(rt.num_cases), "site-index": rt.settings.site_index}
    finite = [x for x in losses if math.isfinite(x)]
    metrics["train-loss"] = float(sum(finite) / len(finite)) if finite else 0.0
    # Wall seconds of the local epochs alone (no loading, no transport): bench/round_overhead.py compares the
    # federation's round time against the sum of these.
    metrics["train-seconds"] = float(seconds)
    for m in MODALITIES:
        metrics[f"cases-{m}"] = float(rt.counts.get(m, 0))
        metrics[f"has-{m}"] = 1.0 if rt.counts.get(m, 0) > 0 else 0.0
    if accountant is not None and rt.private is not None:
        parts = rt.private
        before = accountant.epsilon(rt.dp.delta)
        # Charge the planned steps (epochs x ceil(N/B)): the Poisson loader has exactly that many steps and the
        # training loop takes a noise-only step for an empty batch, so planned = applied.
        accountant.record(parts.noise_multiplier, parts.sample_rate, rt.train.local_epochs * parts.steps_per_epoch,
                          rt.dp.delta)
        total = accountant.epsilon(rt.dp.delta)
        metrics.update({
            "dp-enabled": 1.0, "epsilon-total": total, "epsilon-round": total - before, "delta": rt.dp.delta,
            "noise-multiplier": parts.noise_multiplier, "max-grad-norm": parts.max_grad_norm,
        })
        log.info(
            "site %s round %d: %d cases, loss %.4f, %.1f s; epsilon %.3f (+%.3f) of max %.3f at delta %g",
            rt.settings.site_name, server_round, rt.num_cases, metrics["train-loss"], seconds, total, total - before,
            policy.max_epsilon, rt.dp.delta,
        )
    else:
        metrics.update({"dp-enabled": 0.0, "epsilon-total": 0.0, "epsilon-round": 0.0, "delta": 0.0,
                        "noise-multiplier": 0.0, "max-grad-norm": 0.0})
        log.warning("site %s round %d trained WITHOUT differential privacy (loss %.4f, %.1f s)",
                    rt.settings.site_name, server_round, metrics["train-loss"], seconds)
    state_out = {k: v.detach().cpu().clone() for k, v in rt.model.state_dict().items()}
    return state_out, metrics


def evaluate_round(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Evaluate received weights on the site's cases (each with the modalities it has). Numbers only.

    Evaluation does not spend privacy budget but its metrics are not DP-protected either (see docs/site.md).
    """
    rt, _policy = get_runtime(node_config, run_config)
    try:
        load_plain_state_dict(rt.model, state)
    except ValueError as exc:
        raise SiteDecline(replies.BAD_REQUEST, str(exc)) from exc
    rt.model.eval()
    metrics = _local_metrics(rt)
    out: dict[str, float] = {"num-examples": float(rt.num_cases), "site-index": rt.settings.site_index}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


def _local_metrics(rt: SiteRuntime) -> dict[str, float]:
    """Segmentation (Dice, IoU, precision per region; no HD95, for speed) and classification metrics of the model on
    all local cases, each with the modalities it has. Keys are :mod:`models.metrics` names; always the same keys
    (NaN where a metric is undefined, e.g. AUROC with one class) so replies stay consistent across sites."""
    from models.evaluation import predict
    from models.metrics import classification_metrics, mean_over_cases, segmentation_metrics

    loader = DataLoader(CasesOnly(rt.dataset), batch_size=max(1, min(rt.train.batch_size, rt.num_cases)), shuffle=False)
    pred = predict(rt.model, loader, rt.device)
    used = pred.used
    out = mean_over_cases(segmentation_metrics(pred.seg_pred[used], pred.seg_true[used], hd95=False))
    out.update(classification_metrics(pred.probs[used], pred.labels[used]))
    return out


def clear_cache() -> None:
    """Forget every cached dataset and runtime (tests; a daemon never needs it)."""
    with _LOCK:
        _RUNTIMES.clear()
        _DATASETS.clear()
