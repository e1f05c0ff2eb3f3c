"""What a site process builds once and keeps: its dataset, its network, and the training parts of a run.

Everything expensive (reading and resampling the site's studies, building the network, Opacus's ``make_private``,
deriving the noise multiplier) happens once per site process and is cached here, keyed by what it depends on (site
folder, series map, model config, training and DP settings); the training parts are built by the server's prepare
message (:mod:`client.prepare`) or the first train message. The caches are bounded (:mod:`client.runtime_cache`):
a simulation worker serves whichever virtual sites come, and a dropped site builds again from the on-disk caches.
A deployed SuperNode starts a fresh ClientApp process per message, so there the on-disk caches in the site's state
directory (preprocessed cases, derived noise multipliers) carry the savings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from common import replies, runconfig, timings
from common.runconfig import DPConfig, RunConfigError, TrainConfig
from models.config import ModelConfig
from models.modalities import MODALITIES

from .holdout import SiteSplit, split_site
from .privacy.engine import DEFAULT_GRAD_SAMPLE_MODE, CasesOnly, PrivateParts, make_private
from .privacy.policy import PolicyRefusal, SitePolicy
from .privacy.randomness import RandomStream
from .privacy.session import DPSession
from .runtime_cache import LRUCache, dataset_bytes, runtime_bytes
from .site import SiteDecline, SiteSettings, resolve_site, resolve_torch_device, site_salt

log = logging.getLogger("fedfusion.site")

__all__ = ["SiteRuntime", "clear_cache", "get_runtime", "training_parts"]

_LOCK = threading.RLock()
# bounded: a simulation worker serves many sites (client/runtime_cache.py)
_DATASETS: LRUCache[tuple[Any, ...], Any] = LRUCache(weigh=dataset_bytes)
_RUNTIMES: LRUCache[tuple[Any, ...], "SiteRuntime"] = LRUCache(weigh=runtime_bytes)


def load_site_dataset(settings: SiteSettings, cfg: ModelConfig) -> Any:
    """The site's :class:`common.data.CaseDataset` for ``cfg``'s modalities and size (read once per process).

    Unreadable cases are skipped and logged by the reader (kind and site-local path; the log stays on site).
    Patient identifiers are keyed with the salt of ``settings.cache_dir`` (:func:`client.site.site_salt`; a deployed
    site's own state directory).
    """
    key = (str(settings.site_dir), str(settings.state_dir), str(settings.series_map), cfg.modalities,
           cfg.spatial_size)
    with _LOCK:
        if key in _DATASETS:
            return _DATASETS[key]
        from common.data import CaseDataset

        # The on-disk cache of preprocessed arrays (a deployed site's private state directory; a simulated site's
        # data-set cache) makes later processes skip DICOM decoding and resampling.
        kwargs: dict[str, Any] = dict(
            site_dirs=[settings.site_dir], modalities=cfg.modalities, spatial_size=cfg.spatial_size,
            augment=False, cache=True, cache_dir=settings.cache_dir / "preprocessed",
            patient_salt=site_salt(settings.cache_dir),
        )
        if settings.series_map is not None:
            kwargs["series_mapping"] = settings.series_map
        t0, started = time.perf_counter(), timings.clock()
        try:
            ds = CaseDataset(**kwargs)
        except (ValueError, OSError) as exc:
            # The message names local paths: it stays in the site log; the server gets a generic reason.
            log.error("site %s: no usable data: %s", settings.site_name, exc)
            raise SiteDecline(
                replies.NO_USABLE_DATA,
                "the site has no usable case for this run's modalities (the site log and `fedfusion inspect` say why)",
            ) from exc
        log.info("site %s: %d usable cases loaded in %.1f s", settings.site_name, len(ds), time.perf_counter() - t0)
        _DATASETS[key] = ds
        timings.done(started, settings.site_name, "dataset")
        return ds


def modality_counts(dataset: Any, indices: list[int] | None = None) -> dict[str, int]:
    """Cases (of ``indices``, default all) carrying each modality of :data:`MODALITIES` (0 for modalities the run
    does not use)."""
    counts: dict[str, int] = {m: 0 for m in MODALITIES}
    for m, n in dataset.modality_counts(indices).items():
        if m in counts:
            counts[m] = int(n)
    return counts


@dataclass
class SiteRuntime:
    """One site's cached state for one (model config, training settings, DP settings) combination.

    ``split`` divides the dataset's patients into training and held-out validation (:mod:`client.holdout`):
    training, its counts and its DP plan see only the training patients, evaluation only the held-out ones.
    ``dp`` (DP runs) and ``parts`` (the module, loader, optimizer and loss to train with: Opacus's DP-SGD parts, or
    the plain ones when the run has DP off with the site's consent) are built by the first train message: a deployed
    ClientApp process lives for one message, and an evaluate message needs neither.
    """

    settings: SiteSettings
    model_cfg: ModelConfig
    train: TrainConfig
    dp_request: DPConfig
    device: torch.device
    dataset: Any
    model: torch.nn.Module
    loss_fn: Any
    split: SiteSplit
    counts: dict[str, int] = field(default_factory=dict)
    dp: DPSession | None = None
    private: PrivateParts | None = None
    parts: tuple[Any, DataLoader, Any, Any] | None = None

    @property
    def num_cases(self) -> int:
        """Training cases (studies)."""
        return len(self.split.train)

    @property
    def num_patients(self) -> int:
        """Training patients: the privacy units DP-SGD samples."""
        return len(self.split.train_groups)

    @property
    def num_validation_cases(self) -> int:
        """Held-out cases (studies)."""
        return len(self.split.validation)

    def round_randomness(self, reproducible: bool, server_round: int) -> RandomStream:
        """The stream every random draw of a round comes from: fresh OS entropy, or (only when the site's policy sets
        ``reproducible-noise``) a stream fixed by the run seed, the round and the site's name, so that sites still
        draw different noise from each other."""
        if reproducible:
            return RandomStream.reproducible(self.train.seed, server_round, self.settings.site_name)
        return RandomStream.fresh()


def get_runtime(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> tuple[SiteRuntime, SitePolicy]:
    """The cached runtime for this site and run config, built on first use; plus the site's current policy.

    The policy is re-read every call (cheap) so an operator tightening ``privacy-policy.toml`` takes effect at the
    next round; the request is checked against it before anything is built.

    Raises:
        SiteDecline: refused policy, no usable data, bad run config.
    """
    try:
        rc = runconfig.validate(run_config)
        cfg = runconfig.model_config(rc)
        ts = TrainConfig.from_run_config(rc)
        dp = DPConfig.from_run_config(rc)
    except RunConfigError as exc:
        raise SiteDecline(replies.BAD_REQUEST, str(exc)) from exc
    settings = resolve_site(node_config, rc)
    try:
        policy = SitePolicy.resolve(dict(settings.node_config), settings.state_dir)
    except ValueError as exc:
        raise SiteDecline(replies.BAD_REQUEST, f"privacy settings unreadable: {exc}") from exc
    try:
        policy.check(dp)
        policy.check_workload(cfg, ts)
    except PolicyRefusal as exc:
        log.error("site %s REFUSES this run: %s", settings.site_name, exc)
        raise SiteDecline(replies.REFUSED_POLICY, str(exc)) from exc
    key = (settings, cfg.to_json(), ts, dp, policy.min_noise_multiplier, policy.allow_evaluation)
    with _LOCK:
        rt = _RUNTIMES.get(key)
        if rt is not None:
            return rt, policy
        started = timings.clock()
        if settings.num_threads > 0:
            torch.set_num_threads(settings.num_threads)
        device = resolve_torch_device(settings.device)
        dataset = load_site_dataset(settings, cfg)
        if len(dataset) == 0:
            raise SiteDecline(
                replies.NO_USABLE_DATA,
                "the site has no usable case for this run's modalities (see the site log for skipped cases)",
            )
        from models.fast_conv import set_conv_backward
        from models.losses import MultiTaskLoss, label_prior
        from models.network import build_model

        torch.manual_seed(ts.seed)  # the initial weights are replaced by the server's, but keep builds repeatable
        model = build_model(cfg).to(device)
        set_conv_backward(model, ts.conv_backward)  # before make_private: Opacus wraps the switched modules
        # a site that answers no evaluation has no reason to keep patients out of training
        split = split_site(dataset, site_salt(settings.state_dir), hold_out=policy.allow_evaluation)
        log.info("site %s: %d patients (%d cases) train, %d patients (%d cases) held out for evaluation",
                 settings.site_name, len(split.train_groups), len(split.train), len(split.validation_groups),
                 len(split.validation))
        # Logit adjustment by the site's class shares: a function of every training label, outside DP-SGD's
        # per-patient clipping, so under DP it would release label information no ledger entry pays for. A private
        # site trains with plain cross-entropy instead (docs/site.md).
        prior = None
        if ts.balance_classes and not dp.enabled:
            known = dataset.known_labels(split.train)  # unlabelled cases' placeholders never count
            prior = label_prior(known) if known else None
        rt = SiteRuntime(settings=settings, model_cfg=cfg, train=ts, dp_request=dp, device=device, dataset=dataset,
                         model=model, loss_fn=MultiTaskLoss(class_prior=prior), split=split)
        rt.counts = modality_counts(dataset, split.train)
        # Modalities this site never has cannot train their encoders here (the server keeps those encoders from the
        # sites that have them); freezing them before Opacus sees the parameters spares their per-case gradients.
        model.set_site_modalities([m for m in cfg.modalities if rt.counts.get(m, 0) > 0])
        _RUNTIMES[key] = rt
        timings.done(started, settings.site_name, "runtime")
        return rt, policy


def training_parts(rt: SiteRuntime, policy: SitePolicy) -> tuple[Any, Any, Any, Any]:
    """``(module, loader, optimizer, loss)`` to train with (built once per runtime, on the first train message).

    Raises:
        SiteDecline(BAD_REQUEST): the run's privacy target cannot be planned for this site.
    """
    with _LOCK:
        if rt.parts is None:
            started = timings.clock()
            from models.trainable import freeze_untrained, parameter_groups

            from .privacy.multiplicity import MultiViewLoader, install_view_averaging
            from .privacy.optimizers import build_optimizer, set_noise_std

            try:
                # dp-trainable: what is not trained is frozen before Opacus sees it (neither clipped nor noised)
                freeze_untrained(rt.model, rt.dp_request.trainable)
            except ValueError as exc:
                raise SiteDecline(replies.BAD_REQUEST, str(exc)) from exc
            if not any(p.requires_grad for p in rt.model.parameters()):
                # e.g. none+ct+us at a site without CT or ultrasound: its absent modalities' parameters are frozen
                raise SiteDecline(
                    replies.NO_USABLE_DATA,
                    f"this site has nothing to train: dp-trainable = {rt.dp_request.trainable} trains only "
                    "parameters of modalities this site does not hold "
                    f"(it holds {', '.join(m for m in rt.model_cfg.modalities if rt.counts.get(m, 0) > 0)})")
            train_cases = CasesOnly(Subset(rt.dataset, rt.split.train))
            loader = DataLoader(train_cases, batch_size=min(rt.train.batch_size, rt.num_cases),
                                shuffle=True, drop_last=False, pin_memory=rt.device.type == "cuda")
            groups = parameter_groups(rt.model, rt.dp_request.trainable, rt.train.lr_base_scale)
            optimizer = build_optimizer(rt.train.optimizer, rt.model, lr=rt.train.lr, groups=groups)
            views = rt.train.augment_multiplicity
            if rt.dp_request.enabled:
                try:
                    # the privacy unit is the patient: the plan's sampling rate is per patient
                    rt.dp = DPSession.plan(
                        rt.settings.state_dir, rt.dp_request, policy, num_cases=rt.num_patients,
                        batch_size=rt.train.batch_size, local_epochs=rt.train.local_epochs,
                        num_rounds=rt.train.num_server_rounds, site_name=rt.settings.site_name,
                    )
                except ValueError as exc:
                    raise SiteDecline(replies.BAD_REQUEST, str(exc)) from exc
                rt.model.train()  # Opacus validates training mode; an evaluate message may have left it in eval
                rt.private = make_private(
                    rt.model, optimizer, loader, rt.loss_fn,
                    noise_multiplier=rt.dp.noise_multiplier, max_grad_norm=rt.dp_request.max_grad_norm,
                    grad_sample_mode=DEFAULT_GRAD_SAMPLE_MODE, groups=rt.split.train_positions(),
                )
                p = rt.private
                # the ledger charges the session's plan: it must be what Opacus's Poisson loader does
                assert (p.sample_rate, p.steps_per_epoch * rt.train.local_epochs) == (
                    rt.dp.sample_rate, rt.dp.steps_per_round), "DP plan and Opacus loader disagree"
                # the noise per coordinate of the averaged gradient, which adam-bc takes out of its second moment
                set_noise_std(p.optimizer, p.noise_multiplier * p.max_grad_norm / p.optimizer.expected_batch_size)
                dp_loader: Any = p.loader
                if views > 0:
                    dp_loader = MultiViewLoader(p.loader, views)
                    install_view_averaging(p.optimizer, dp_loader)
                rt.parts = (p.module, dp_loader, p.optimizer, p.loss_fn)
            else:
                log.warning(
                    "site %s: TRAINING WITHOUT DIFFERENTIAL PRIVACY (run config dp-enabled=false, allowed by this "
                    "site's policy allow-no-dp=true). Updates leave the site with no formal privacy guarantee.",
                    rt.settings.site_name,
                )
                rt.parts = (rt.model, MultiViewLoader(loader, views) if views > 0 else loader, optimizer, rt.loss_fn)
            timings.done(started, rt.settings.site_name, "training-parts")
        return rt.parts


def clear_cache() -> None:
    """Forget every cached dataset and runtime (tests; a daemon never needs it)."""
    with _LOCK:
        _RUNTIMES.clear()
        _DATASETS.clear()
