"""The site's task, as in Flower's example apps: model and data (cached, :mod:`client.runtime`), train, evaluate.

A round loads the received weights, trains or evaluates, and — under DP — is checked against and charged to the
site's privacy ledger (:mod:`client.privacy.session`). Where the site's folder, state and policy come from is
:mod:`client.site`; what the run asks is the run config (:mod:`common.runconfig`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from common import replies
from models.modalities import MODALITIES

from .privacy.engine import CasesOnly, load_plain_state_dict
from .privacy.policy import SitePolicy
from .privacy.session import NO_DP_METRICS, BudgetExhausted
from .runtime import SiteRuntime, clear_cache, get_runtime, training_parts
from .site import SiteDecline

log = logging.getLogger("fedfusion.site")

__all__ = ["SiteDecline", "clear_cache", "evaluate_round", "train_round"]


def _load(rt: SiteRuntime, state: Mapping[str, torch.Tensor]) -> None:
    try:
        load_plain_state_dict(rt.model, state)
    except ValueError as exc:
        raise SiteDecline(replies.BAD_REQUEST, str(exc)) from exc


def train_round(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], state: Mapping[str, torch.Tensor], server_round: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One local training round: reserve it in the privacy ledger, load ``state`` (plain parameter names), train,
    commit the reservation (or release it when training failed: no update left the site).

    Returns:
        the new state dict (plain names, CPU tensors) and the numeric reply metrics.

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
        state_out, metrics, seconds = _train(rt, policy, module, loader, optimizer, loss_fn, state, server_round)
    except BaseException:
        # nothing of this round has left the site: the reservation goes back (a crash instead keeps it spent)
        if dp is not None and reservation is not None:
            dp.release(reservation)
        raise
    if dp is not None and reservation is not None:
        metrics.update(dp.commit(reservation))
        log.info("site %s round %d: %d cases, loss %.4f, %.1f s; epsilon %.3f (+%.3f) of max %.3f at delta %g",
                 rt.settings.site_name, server_round, rt.num_cases, metrics["train-loss"], seconds,
                 metrics["epsilon-total"], metrics["epsilon-round"], policy.max_epsilon, dp.request.delta)
    else:
        metrics.update(NO_DP_METRICS)
        log.warning("site %s round %d trained WITHOUT differential privacy (loss %.4f, %.1f s)",
                    rt.settings.site_name, server_round, metrics["train-loss"], seconds)
    return state_out, metrics


def _train(
    rt: SiteRuntime, policy: SitePolicy, module: Any, loader: Any, optimizer: Any, loss_fn: Any,
    state: Mapping[str, torch.Tensor], server_round: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    """Load ``state``, run the local epochs; returns the new state, the non-privacy reply metrics and the seconds."""
    from models.training import ProximalTerm, train_epoch

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
    rt.model.train()
    # FedProx: the training loop adds the proximal gradient after DP noise (post-processing) or to the loss.
    prox = ProximalTerm(dict(rt.model.named_parameters()), rt.train.proximal_mu) if rt.train.proximal_mu > 0 else None
    # each round starts from the received global weights: forget momentum (a DPOptimizer shares its original
    # optimizer's state)
    optimizer.state.clear()
    t0 = time.perf_counter()
    losses = []
    for _ in range(rt.train.local_epochs):
        stats = train_epoch(module, loader, optimizer, loss_fn, rt.device,
                            modality_dropout=rt.model_cfg.modality_dropout, generator=generator, proximal=prox)
        losses.append(float(stats.get("loss", math.nan)))
    seconds = time.perf_counter() - t0

    finite = [x for x in losses if math.isfinite(x)]
    metrics: dict[str, float] = {
        "num-examples": float(rt.num_cases), "site-index": rt.settings.site_index,
        "train-loss": float(sum(finite) / len(finite)) if finite else 0.0,
        # Wall seconds of the local epochs alone (no loading, no transport): bench/round_overhead.py compares the
        # federation's round time against the sum of these.
        "train-seconds": float(seconds),
        # 1: this round's noise can be recomputed by whoever knows the run config (the site's own choice)
        "dp-reproducible-noise": 1.0 if randomness.is_reproducible else 0.0,
    }
    for m in MODALITIES:
        metrics[f"cases-{m}"] = float(rt.counts.get(m, 0))
        metrics[f"has-{m}"] = 1.0 if rt.counts.get(m, 0) > 0 else 0.0
    state_out = {k: v.detach().cpu().clone() for k, v in rt.model.state_dict().items()}
    return state_out, metrics, seconds


def evaluate_round(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Evaluate received weights on the site's cases (each with the modalities it has). Numbers only.

    Evaluation does not spend privacy budget but its metrics are not DP-protected either (see docs/site.md).
    """
    rt, _policy = get_runtime(node_config, run_config)
    _load(rt, state)
    rt.model.eval()
    out: dict[str, float] = {"num-examples": float(rt.num_cases), "site-index": rt.settings.site_index}
    for k, v in _local_metrics(rt).items():
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
