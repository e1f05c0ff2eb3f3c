"""The site's task, as in Flower's example apps: model and data (cached, :mod:`client.runtime`), train, evaluate.

A round loads the received weights, trains or evaluates, and is checked against and charged to the site's privacy
ledger (:mod:`client.privacy.session`). Where the site's folder, state and policy come from is :mod:`client.site`;
what the run asks is the run config (:mod:`common.runconfig`).

What a reply reveals beyond DP (docs/site.md, "What leaves the site"):

* train replies carry case counts rounded up to the policy's ``count-granularity`` (:func:`bucketed`), the same
  every round; no training loss (an exact mean loss over the site's cases is not DP);
* evaluate replies carry only Gaussian-noised sufficient statistics over held-out patients
  (:mod:`common.evalstats`), charged to the ledger, at most once per model and round (:mod:`client.evaluations`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from common import evalstats, replies, timings
from models.modalities import MODALITIES

from .evaluations import EvaluationBook, model_digest
from .holdout import MIN_PATIENTS_FOR_VALIDATION
from .privacy.engine import CasesOnly, load_plain_state_dict
from .privacy.policy import SitePolicy
from .privacy.release import gaussian_release
from .privacy.session import NO_DP_METRICS, BudgetExhausted, DPSession, commit_release, reserve_release
from .runtime import SiteRuntime, clear_cache, get_runtime, training_parts
from .site import SiteDecline, resolve_site

log = logging.getLogger("fedfusion.site")

__all__ = ["SiteDecline", "bucketed", "clear_cache", "evaluate_round", "note_training_declined", "train_round"]


def bucketed(count: int, granularity: int) -> float:
    """``count`` rounded *up* to a multiple of ``granularity`` (0 stays 0: whether a site has any case of a
    modality is sent as is, the server's modality-aware aggregation needs it)."""
    g = max(1, int(granularity))
    return float(0 if count <= 0 else g * math.ceil(count / g))


def _load(rt: SiteRuntime, state: Mapping[str, torch.Tensor]) -> None:
    try:
        load_plain_state_dict(rt.model, state)
    except ValueError as exc:
        raise SiteDecline(replies.BAD_REQUEST, str(exc)) from exc


def train_round(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], state: Mapping[str, torch.Tensor], server_round: int,
    run_id: str = "",
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One local training round: reserve it in the privacy ledger, load ``state`` (plain parameter names), train,
    commit the reservation (or release it when training failed: no update left the site).

    ``run_id`` keys the optimizer state a site keeps across the run's rounds (``optimizer-state = keep``).

    Returns:
        the new state dict (plain names, CPU tensors) of the run's trainable set only (``dp-trainable``: frozen
        parameters are not sent back) and the numeric reply metrics.

    Raises:
        SiteDecline: policy refusal, exhausted budget, no data, or arrays that do not match the model.
    """
    rt, policy = get_runtime(node_config, run_config)
    module, loader, optimizer, loss_fn = training_parts(rt, policy)
    dp, reservation = rt.dp, None
    if dp is not None:
        try:
            reservation = dp.reserve()
        except BudgetExhausted as exc:
            log.error("site %s DECLINES round %d: %s. Raise the ceiling only after a privacy review.",
                      rt.settings.site_name, server_round, exc)
            raise SiteDecline(
                replies.DECLINED_BUDGET, "privacy budget exhausted: the next round would exceed the site's max-epsilon",
                epsilon_total=exc.spent, epsilon_next=exc.after, max_epsilon=exc.ceiling, delta=exc.delta,
            ) from exc
    try:
        state_out, metrics, seconds, loss = _train(rt, policy, module, loader, optimizer, loss_fn, state,
                                                   server_round, run_id)
    except BaseException:
        # nothing of this round has left the site: the reservation goes back (a crash instead keeps it spent)
        if dp is not None and reservation is not None:
            dp.release(reservation)
        raise
    if dp is not None and reservation is not None:
        metrics.update(dp.commit(reservation))
        log.info("site %s round %d: %d cases of %d patients, loss %.4f, %.1f s; epsilon %.3f (+%.3f) of max %.3f at "
                 "delta %g", rt.settings.site_name, server_round, rt.num_cases, rt.num_patients, loss, seconds,
                 metrics["epsilon-total"], metrics["epsilon-round"], policy.max_epsilon, dp.request.delta)
    else:
        metrics.update(NO_DP_METRICS)
        log.warning("site %s round %d trained WITHOUT differential privacy (loss %.4f, %.1f s)",
                    rt.settings.site_name, server_round, loss, seconds)
    return state_out, metrics


def _train(
    rt: SiteRuntime, policy: SitePolicy, module: Any, loader: Any, optimizer: Any, loss_fn: Any,
    state: Mapping[str, torch.Tensor], server_round: int, run_id: str = "",
) -> tuple[dict[str, torch.Tensor], dict[str, float], float, float]:
    """Load ``state``, run the local epochs; returns the new state (the trainable set only), the non-privacy reply
    metrics, the seconds and the mean training loss (for the site's log only: a loss is not sent)."""
    from models.schedule import LRSchedule
    from models.trainable import parse_trainable, trained_names
    from models.training import ProximalTerm, train_epoch

    from .privacy.multiplicity import MultiViewLoader
    from .privacy.optimizers import load_state, save_state, state_file

    _load(rt, state)
    # Every random draw of the round (DP noise, Poisson sampling, modality dropout, nn.Dropout) comes from the OS
    # CSPRNG, or from a stream fixed by run seed, round and site name when the site's policy asks for reproducible
    # noise (client.privacy.randomness): never from a value the server sends alone.
    randomness = rt.round_randomness(policy.reproducible_noise, server_round)
    if randomness.is_reproducible and rt.dp is not None:
        log.warning("site %s round %d: REPRODUCIBLE DP NOISE (policy reproducible-noise=true): whoever knows the run "
                    "config's seed and this site's name can recompute and remove it. Experiments only.",
                    rt.settings.site_name, server_round)
    if rt.private is not None:
        rt.private.randomness = randomness
    torch.manual_seed(randomness.seed64())  # torch's global RNG: nn.Dropout
    generator = torch.Generator().manual_seed(randomness.seed64())  # modality dropout
    if isinstance(loader, MultiViewLoader):
        loader.generator = torch.Generator().manual_seed(randomness.seed64())  # augmentation of the views
    rt.model.train()
    # FedProx: the training loop adds the proximal gradient after DP noise (post-processing) or to the loss.
    prox = (ProximalTerm(dict(rt.model.named_parameters()), rt.train.proximal_mu, rt.train.proximal_scope)
            if rt.train.proximal_mu > 0 else None)
    # each round starts from the received global weights: forget momentum (a DPOptimizer shares its original
    # optimizer's state), unless the run keeps the site's optimizer state across rounds (saved in its state dir)
    optimizer.state.clear()
    kept = None
    if rt.train.optimizer_state == "keep":
        updated = [n for n, p in rt.model.named_parameters() if p.requires_grad]
        kept = state_file(rt.settings.state_dir, run_id, rt.train.optimizer, updated)
        load_state(kept, optimizer, rt.train.optimizer, updated)
    # the learning rate follows the run's schedule over the site's steps of all rounds (the same on every round's
    # fresh process: it depends on the round number and the plan only)
    per_round = rt.dp.steps_per_round if rt.dp is not None else len(loader) * rt.train.local_epochs
    schedule = LRSchedule.for_run(rt.train.lr, rt.train.num_server_rounds * per_round, rt.train.lr_schedule,
                                  rt.train.lr_warmup)
    step = (max(server_round, 1) - 1) * per_round
    single_view = None
    if (rt.dp is not None and rt.model_cfg.single_modality_loss > 0 and isinstance(loader, MultiViewLoader)
            and loader.views >= 2):
        # DP-SGD takes one pass per layer: the single-modality term becomes one of each case's views, drawn first
        # among the modalities the trainable set adds (the others' encoders are frozen). On the demo it lifted CT
        # and ultrasound alone (docs/results.md, issue 14)
        added = parse_trainable(rt.dp_request.trainable)[1]
        prefer = (torch.tensor([m in added for m in rt.model_cfg.modalities], dtype=torch.float32)
                  if added else None)
        single_view = (loader.views, prefer)
    t0 = time.perf_counter()
    losses = []
    for _ in range(rt.train.local_epochs):
        # amp="auto": mixed precision on a GPU without DP; float32 on the CPU and always under DP
        stats = train_epoch(module, loader, optimizer, loss_fn, rt.device,
                            modality_dropout=rt.model_cfg.modality_dropout,
                            modality_dropout_mode=rt.model_cfg.modality_dropout_mode, generator=generator, proximal=prox,
                            amp="auto", schedule=schedule, start_step=step,
                            # DP-SGD's per-case gradients take one pass per layer: no second pass (single_view
                            # is the term's DP form)
                            single_modality_loss=0.0 if rt.dp is not None else rt.model_cfg.single_modality_loss,
                            single_view=single_view)
        step += int(stats.get("steps", 0))
        losses.append(float(stats.get("loss", math.nan)))
    seconds = time.perf_counter() - t0
    if kept is not None:
        save_state(kept, optimizer, rt.train.optimizer, updated)

    finite = [x for x in losses if math.isfinite(x)]
    loss = float(sum(finite) / len(finite)) if finite else math.nan  # the site log's, never the reply's
    granularity = int(policy.count_granularity)
    metrics: dict[str, float] = {
        "num-examples": bucketed(rt.num_cases, granularity), "site-index": rt.settings.site_index,
        # Wall seconds of the local epochs alone (no loading, no transport): bench/round_overhead.py compares the
        # federation's round time against the sum of these.
        "train-seconds": float(seconds),
        # 1: this round's noise can be recomputed by whoever knows the run config (the site's own choice)
        "dp-reproducible-noise": 1.0 if randomness.is_reproducible else 0.0,
    }
    for m in MODALITIES:
        metrics[f"cases-{m}"] = bucketed(rt.counts.get(m, 0), granularity)
        metrics[f"has-{m}"] = 1.0 if rt.counts.get(m, 0) > 0 else 0.0
    own = rt.model.state_dict()
    state_out = {k: own[k].detach().cpu().clone() for k in trained_names(own, rt.dp_request.trainable)}
    return state_out, metrics, seconds, loss


def note_training_declined(node_config: Mapping[str, Any], run_config: Mapping[str, Any], run_id: str) -> None:
    """Remember in the site's state that it declined training in ``run_id``: it then answers no evaluation in it."""
    try:
        settings = resolve_site(node_config, run_config)
    except SiteDecline:
        return  # no site folder: there is no state to protect either
    EvaluationBook.load(settings.state_dir).note_training_declined(run_id)


def evaluate_round(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
    server_round: int = 0, run_id: str = "",
) -> dict[str, float]:
    """Evaluate received weights on the site's held-out patients; reply with DP-noised sufficient statistics.

    The exact statistics (:func:`common.evalstats.site_sums`) get Gaussian noise of std ``eval-noise-multiplier``
    times their sensitivity per patient (:data:`common.evalstats.SENSITIVITY`), and the release is charged to the
    site's ledger as ``(eval-noise-multiplier, 1.0, 1)``.

    Raises:
        SiteDecline: REFUSED_EVALUATION (policy forbids evaluation, no held-out patients, model or round already
            evaluated, training declined in this run), DECLINED_BUDGET (the release would pass ``max-epsilon``),
            BAD_REQUEST (arrays that do not fit the model).
    """
    rt, policy = get_runtime(node_config, run_config)
    if not policy.allow_evaluation:
        raise SiteDecline(replies.REFUSED_EVALUATION, "this site's policy does not allow evaluation "
                          "(allow-evaluation = false)")
    if not rt.split.validation_groups:
        raise SiteDecline(replies.REFUSED_EVALUATION,
                          "the site has too few patients to hold any out for evaluation; it trains on all of them",
                          min_patients=MIN_PATIENTS_FOR_VALIDATION)
    delta = _release_delta(rt, policy)
    z = float(policy.eval_noise_multiplier)
    try:
        reservation = reserve_release(rt.settings.state_dir, policy, z, delta, rt.dp_request.accountant)
    except BudgetExhausted as exc:
        raise SiteDecline(
            replies.DECLINED_BUDGET, "privacy budget exhausted: an evaluation would exceed the site's max-epsilon",
            epsilon_total=exc.spent, epsilon_next=exc.after, max_epsilon=exc.ceiling, delta=exc.delta,
        ) from exc
    try:
        _load(rt, state)  # a misfit is a bad request, refused before the slot is taken
        EvaluationBook.load(rt.settings.state_dir).claim(run_id, server_round, model_digest(state))
        started = timings.clock()
        exact = _validation_statistics(rt)
        timings.done(started, rt.settings.site_name, "evaluate-compute", round=server_round)
    except BaseException:
        DPSession.release(reservation)  # nothing was released: the reservation goes back
        raise
    noisy = gaussian_release(exact, noise_multiplier=z, sensitivity=evalstats.SENSITIVITY)
    privacy = commit_release(reservation, delta, rt.dp_request.accountant)
    log.info("site %s round %d: evaluated on %d held-out patients (%d cases); released with noise multiplier %g, "
             "epsilon %.3f (+%.3f) of max %.3f", rt.settings.site_name, server_round, len(rt.split.validation_groups),
             rt.num_validation_cases, z, privacy["epsilon-total"], privacy["epsilon-round"], policy.max_epsilon)
    out: dict[str, float] = {
        "num-examples": bucketed(rt.num_validation_cases, int(policy.count_granularity)),
        "site-index": rt.settings.site_index, "eval-noise-multiplier": z, **privacy,
    }
    out.update({k: float(v) for k, v in zip(evalstats.STATISTIC_KEYS, noisy)})
    return out


def _release_delta(rt: SiteRuntime, policy: SitePolicy) -> float:
    """The delta the ledger is read at: the run's (checked against the site's max-delta), else the site's."""
    asked = rt.dp_request.delta
    return float(asked) if 0 < asked <= policy.max_delta else float(policy.max_delta)


def _validation_statistics(rt: SiteRuntime) -> np.ndarray:
    """Exact statistic vector (:func:`common.evalstats.site_sums`) of the model on the held-out patients' cases,
    each with the modalities it has."""
    from models.evaluation import predict
    from models.metrics import REGIONS, segmentation_metrics

    held = Subset(rt.dataset, rt.split.validation)
    loader = DataLoader(CasesOnly(held), batch_size=max(1, min(rt.train.batch_size, len(held))), shuffle=False)
    pred = predict(rt.model, loader, rt.device)
    if not bool(pred.used.all()):  # every case of the dataset has a run modality; a gap here is a bug
        raise RuntimeError("a held-out case could not be evaluated (no modality of the run)")
    seg = segmentation_metrics(pred.seg_pred, pred.seg_true, hd95=False)
    dice = torch.stack([seg[f"dice-{r}"] for r in REGIONS], dim=1).numpy()
    return evalstats.site_sums(dice, pred.probs.numpy(), pred.labels.numpy(), rt.split.validation_positions(),
                               has_seg=pred.has_seg.numpy(), has_label=pred.has_label.numpy())
