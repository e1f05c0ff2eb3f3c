"""Composition of fedfusion's server behaviour with Flower's Message-API strategies.

The strategy the ServerApp runs is a chain of wrappers, outermost first::

    FedFusionStrategy            round offset (resume), declined-site exclusion, claimed-weight bounds,
      │                          update validation, reply sanitising, per-site metrics log, dtype restore
      ├─ DifferentialPrivacy{ServerSide,ClientSide}FixedClipping   (Flower; only with client-dp)
      │    └─ ModalityAwareStrategy                                 (only with aggregation = modality-aware)
      │         └─ FedAvg | FedProx | FedAdam | FedTrimmedAvg | FedMedian | Krum   (Flower; `strategy`)

Every layer is a :class:`flwr.serverapp.strategy.Strategy`, so ``FedFusionStrategy.start`` is Flower's own
round loop. Flower's ``Strategy.start`` has no start-round argument: to resume at round ``r + 1`` the ServerApp
calls ``start(num_rounds = N - r)`` and ``FedFusionStrategy`` adds ``round_offset = r`` to every round number
before it reaches the inner strategies, the clients' ``server-round`` config and the logs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from common import evalstats, packing, timings
from common.arrays import DecodedArray, record_of, values as array_values
from common import replies as site_replies
from common.reply_metrics import DECLINE_METRICS, EVALUATE_METRICS, TRAIN_METRICS, known_numbers
from models.modalities import MODALITIES
from models.runlog import GLOBAL_SCOPE, MetricsLog
from models.trainable import is_trained, trained_names

from .aggregation import SHARED, ModalityAwareStrategy, modality_weight, ownership_groups, weighted_metrics
from . import strategies
from .claims import ClaimGuard
from .scopes import SiteScopes
from .settings import ServerSettings
from .validation import WEIGHT_KEY, Rejection, UpdateValidator, log_rejections, reply_arrays, reply_metrics


logger = logging.getLogger(__name__)

#: Substrings of an error reply's reason that mean "this site's privacy budget is spent".
DECLINE_MARKERS = ("budget", "declin")


class FederationExhausted(RuntimeError):
    """Too few sites remain (after dropping those that declined) to meet the minimum for a round."""


# ----------------------------------------------------------------------------------------------------------
# building the chain
# ----------------------------------------------------------------------------------------------------------
def build_base_strategy(settings: ServerSettings) -> FedAvg:
    """The Flower strategy named by run config ``strategy`` (:mod:`server.strategies`), with the sampling keys."""
    common: dict[str, Any] = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_train_nodes,
        min_evaluate_nodes=settings.min_evaluate_nodes,
        min_available_nodes=settings.min_available_nodes,
        weighted_by_key=WEIGHT_KEY,
    )
    return strategies.build(settings, common)


def build_strategy(
    settings: ServerSettings,
    modalities: Sequence[str] = MODALITIES,
    metrics_log: MetricsLog | None = None,
    round_offset: int = 0,
) -> "FedFusionStrategy":
    """Build the whole chain for ``settings`` (refusing unsupported protection combinations first)."""
    settings.check_protection()
    base = build_base_strategy(settings)
    inner: Strategy = base
    if settings.aggregation == "modality-aware":
        inner = ModalityAwareStrategy(base, modalities)
    max_update_norm: float | None = None
    if settings.client_dp != "none":
        # Flower calibrates noise stdv = noise * clip / num_sampled_clients; min-train-nodes is the smallest
        # sample a round can have, so the noise is never below what the guarantee needs.
        num_sampled = max(1, settings.min_train_nodes)
        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if settings.client_dp == "server-side"
            else DifferentialPrivacyClientSideFixedClipping
        )
        inner = wrapper(inner, settings.client_dp_noise, settings.client_dp_clip, num_sampled)
        if settings.client_dp == "client-side":
            max_update_norm = settings.client_dp_clip
        if settings.aggregation == "modality-aware":
            logger.warning(
                "client-dp with modality-aware aggregation: Flower's noise is calibrated for a mean over "
                ">= %d sites; a modality held by fewer sites gets proportionally less protection for its "
                "encoder (see docs/server.md)",
                num_sampled,
            )
    validator = UpdateValidator(norm_factor=settings.update_norm_factor, max_update_norm=max_update_norm)
    return FedFusionStrategy(
        inner,
        base,
        validator=validator,
        claims=ClaimGuard(settings.claim_factor, modalities),
        modalities=modalities,
        modality_aware=settings.aggregation == "modality-aware",
        metrics_log=metrics_log,
        round_offset=round_offset,
        trainable=settings.dp_trainable,
    )


def find_optimizer(strategy: Strategy) -> FedOpt | None:
    """The FedOpt (FedAdam, ...) strategy inside a wrapper chain, if any."""
    seen = 0
    node: Any = strategy
    while node is not None and seen < 10:
        if isinstance(node, FedOpt):
            return node
        node = getattr(node, "strategy", None)
        seen += 1
    return None


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _moments_to_tensors(moments: Mapping[str, Any] | None) -> dict[str, torch.Tensor] | None:
    """FedOpt's numpy moments (``{name: array}``) as CPU tensors (a copy), for a weights-only checkpoint."""
    if not moments:
        return None
    return {str(k): torch.from_numpy(np.array(v, copy=True)) for k, v in moments.items()}


def _moments_from_saved(saved: Mapping[str, Any] | None) -> dict[str, np.ndarray] | None:
    """Moments as :func:`_moments_to_tensors` stored them, back to the numpy arrays FedOpt computes with."""
    if not saved:
        return None
    return {k: v.numpy().copy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in saved.items()}


class ExcludingGrid:
    """A view of a Grid without some node ids (declined sites): strategies sample from ``get_node_ids()``."""

    def __init__(self, grid: Grid, excluded: set[int]) -> None:
        self._grid = grid
        self._excluded = excluded

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n not in self._excluded]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def is_decline(msg: Message) -> bool:
    """Whether a reply says the site declines to train (privacy budget spent).

    Understood signals: an error reply with a decline code of :mod:`common.replies` (``declined-budget`` 4001,
    ``refused-policy`` 4002), an error reply whose reason mentions the budget or declining, or a content reply
    whose metrics carry ``declined = 1``.
    """
    if msg.has_error():
        if site_replies.is_decline(int(msg.error.code)):
            return True
        reason = str(msg.error.reason).lower()
        return any(marker in reason for marker in DECLINE_MARKERS)
    metrics = reply_metrics(msg)
    if metrics is None:
        return False
    value = metrics.get("declined", 0)
    if isinstance(value, bool):
        return value
    return isinstance(value, (int, float)) and float(value) >= 0.5


def node_of(msg: Message) -> int:
    """The sending node of a reply, as the SuperLink recorded it (never anything from the reply's content)."""
    return int(msg.metadata.src_node_id)


# ----------------------------------------------------------------------------------------------------------
# the outer strategy
# ----------------------------------------------------------------------------------------------------------
class FedFusionStrategy(Strategy):
    """Outermost layer: makes any inner chain safe to run against real sites and resumable.

    Args:
        inner: the chain below (DP wrapper, modality-aware layer, Flower strategy).
        base: the Flower strategy at the bottom (its sampling settings are read here).
        validator: update validator (keeps its norm history across rounds).
        claims: bounds on claimed weights (keeps each node's pinned claims across rounds); default: factor 10.
        modalities: the model's modalities.
        modality_aware: whether ``inner`` aggregates modality-aware (then groups with no eligible site keep the
            global values even after DP noise).
        metrics_log: where per-site and aggregated metrics go (``None``: not logged).
        round_offset: rounds already completed before this ``start`` (resume).
        trainable: the run's trainable set (``dp-trainable``, :mod:`models.trainable`): a train reply must carry
            exactly the global model's arrays of that set; the other arrays are taken unchanged from the global
            model (the sites froze them).
    """

    def __init__(
        self,
        inner: Strategy,
        base: FedAvg,
        *,
        validator: UpdateValidator,
        claims: ClaimGuard | None = None,
        modalities: Sequence[str] = MODALITIES,
        modality_aware: bool = True,
        metrics_log: MetricsLog | None = None,
        round_offset: int = 0,
        trainable: str = "all",
    ) -> None:
        is_trained("", trainable)  # an unknown set fails here, with the valid ones named
        self.trainable = trainable
        self.strategy = inner
        self.base = base
        self.validator = validator
        self.modalities = tuple(modalities)
        self.claims = claims if claims is not None else ClaimGuard(modalities=self.modalities)
        self.scopes = SiteScopes()
        self.modality_aware = modality_aware
        self.metrics_log = metrics_log
        self.round_offset = int(round_offset)
        self.declined: set[int] = set()
        #: sites that hold no validation patients (too few patients): not asked to evaluate again in this run
        self.without_validation: set[int] = set()
        self.current: dict[str, np.ndarray] = {}
        #: the names of ``current`` the sites train (and send)
        self.trained: list[str] = []
        #: per round: node id -> rejection reason (for tests and the report)
        self.rejections: dict[int, dict[int, str]] = {}
        self.stop_reason: str | None = None

    def __repr__(self) -> str:
        return f"FedFusion({self.strategy!r})"

    def global_round(self, local_round: int) -> int:
        return int(local_round) + self.round_offset

    # -- state for checkpoints ---------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Everything to continue as if never stopped: declined sites, validator history, pinned claims, optimiser
        moments.

        Only tensors, numbers, strings and lists/dicts of them, so the checkpoint loads with
        ``torch.load(weights_only=True)`` (the optimiser's numpy moments are stored as tensors).
        """
        state: dict[str, Any] = {
            "declined": [int(n) for n in sorted(self.declined)],
            "without-validation": [int(n) for n in sorted(self.without_validation)],
            "validator": self.validator.state_dict(),
            "claims": self.claims.state_dict(),
        }
        opt = find_optimizer(self.strategy)
        if opt is not None:
            state["optimizer"] = {
                "class": type(opt).__name__,
                "m_t": _moments_to_tensors(opt.m_t),
                "v_t": _moments_to_tensors(opt.v_t),
            }
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.declined = {int(n) for n in state.get("declined", [])}
        self.without_validation = {int(n) for n in state.get("without-validation", [])}
        self.validator.load_state_dict(state.get("validator", {}))
        self.claims.load_state_dict(state.get("claims", {}))
        opt = find_optimizer(self.strategy)
        saved = state.get("optimizer")
        if opt is not None and saved:
            if saved.get("class") != type(opt).__name__:
                logger.warning(
                    "resume: checkpoint holds %s optimiser state but the strategy is %s; starting its moments "
                    "afresh", saved.get("class"), type(opt).__name__,
                )
                return
            opt.m_t = _moments_from_saved(saved.get("m_t"))
            opt.v_t = _moments_from_saved(saved.get("v_t"))

    # -- sampling ----------------------------------------------------------------------------------
    def _eligible_grid(self, grid: Grid, minimum: int, what: str,
                       unable: set[int] | None = None) -> ExcludingGrid | None:
        """The grid without declined sites (and ``unable`` ones); ``None`` when they leave too few sites for
        ``minimum``."""
        excluded = self.declined | (unable or set())
        view = ExcludingGrid(grid, excluded)
        if excluded:
            total = len(list(grid.get_node_ids()))
            eligible = len(view.get_node_ids())
            if total >= minimum and eligible < minimum:
                why = "have privacy budget left" if not unable else "have budget left and validation patients"
                self.stop_reason = (
                    f"only {eligible} of {total} connected sites {why}, fewer than the "
                    f"{minimum} needed for {what} (min-available-nodes / min-{what}-nodes)"
                )
                return None
        return view

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.global_round(server_round)
        # read-only values, never copied: every DecodedArray made from them this round keeps them as they are
        self.current = {k: array_values(v) for k, v in arrays.items()}
        self.trained = trained_names(self.current, self.trainable)
        self.scopes.refresh(grid)
        minimum = max(self.base.min_available_nodes, self.base.min_train_nodes)
        view = self._eligible_grid(grid, minimum, "train")
        if view is None:
            raise FederationExhausted(self.stop_reason or "too few sites")
        return self._packed(self.strategy.configure_train(rnd, arrays, config, view), arrays)  # type: ignore[arg-type]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.global_round(server_round)
        self.scopes.refresh(grid)
        if self.without_validation and set(grid.get_node_ids()) <= self.without_validation | self.declined:
            # no connected site could answer: an evaluate phase would only collect refusals
            logger.debug("round %d: no site holds validation patients; federated evaluation skipped", rnd)
            return []
        minimum = max(self.base.min_available_nodes, self.base.min_evaluate_nodes)
        view = self._eligible_grid(grid, minimum, "evaluate", self.without_validation)
        if view is None:
            logger.warning("round %d: federated evaluation skipped: %s", rnd, self.stop_reason)
            return []
        return self._packed(self.strategy.configure_evaluate(rnd, arrays, config, view), arrays)  # type: ignore[arg-type]

    # -- transport: one packed vector per message (common/packing.py) --------------------------------------------
    @staticmethod
    def _packed(messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        """``messages`` with the global model ``arrays`` replaced by one packed vector (when it can be packed)."""
        messages = list(messages)
        packed = packing.pack(arrays)
        if not packing.is_packed(packed):
            return messages
        keys = list(arrays.keys())
        for msg in messages:
            for name, record in list(msg.content.array_records.items()):
                if list(record.keys()) == keys:
                    msg.content[name] = packed
        return messages

    def _trained_arrays(self) -> dict[str, np.ndarray]:
        """The global arrays of the run's trainable set (``dp-trainable``), in the global model's order: exactly what
        a train reply carries."""
        return {k: self.current[k] for k in self.trained}

    def _unpacked(self, msg: Message) -> tuple[Message, str | None]:
        """A packed reply with its arrays named again (laid out as the global model), or the reason it cannot be."""
        arrays = reply_arrays(msg) if not msg.has_error() else None
        if arrays is None or not packing.is_packed(arrays):
            return msg, None
        layout = packing.layout_of(self._trained_arrays() or self.current)
        if layout is None:
            return msg, "packed arrays, but the global model is never sent packed (several dtypes)"
        try:
            named = packing.unpack(arrays, layout)
        except ValueError as exc:
            return msg, str(exc)
        # DecodedArray: validation and the strategy's mean read these arrays again; they keep their values
        content = RecordDict({name: (record_of({k: DecodedArray(v) for k, v in named.items()})
                                     if isinstance(record, ArrayRecord) else record)
                              for name, record in msg.content.items()})
        return Message(content=content, metadata=msg.metadata), None

    # -- training ----------------------------------------------------------------------------------
    def _sanitise(self, msg: Message) -> Message:
        """Arrays in the global key order (DP clipping pairs arrays by position), the frozen ones (outside the
        run's trainable set, not sent) filled in from the global model so the inner chain sees whole models, and
        only the numeric metrics aggregation needs (Flower requires identical metric keys across replies)."""
        arrays = reply_arrays(msg)
        metrics = reply_metrics(msg)
        assert arrays is not None and metrics is not None
        keep = {WEIGHT_KEY: float(metrics[WEIGHT_KEY])}  # type: ignore[arg-type]
        if self.modality_aware:
            for m in self.modalities:
                keep[f"cases-{m}"] = modality_weight(metrics, m)
                keep[f"has-{m}"] = 1.0 if keep[f"cases-{m}"] > 0 else 0.0
        content = RecordDict(
            {
                "arrays": record_of({k: arrays[k] if k in arrays else DecodedArray(v)
                                       for k, v in self.current.items()}),
                "metrics": MetricRecord(keep),
            }
        )
        return Message(content=content, metadata=msg.metadata)

    def _log(self, rnd: int, phase: str, scope: str, metrics: Mapping[str, float]) -> None:
        if self.metrics_log is not None and metrics:
            self.metrics_log.write(rnd, phase, scope, metrics)

    def _known(self, rnd: int, node: int, metrics: Mapping[str, Any], allowed: frozenset[str]) -> dict[str, float]:
        """The whitelisted numbers of a site's metrics (:mod:`common.reply_metrics`); the rest is dropped, once
        logged by count (names shortened: they are the site's strings)."""
        kept, dropped = known_numbers(metrics, allowed)
        if dropped:
            shown = ", ".join(repr(name[:40]) for name in dropped[:5])
            logger.warning("round %d: node %d sent %d unknown or non-numeric metric(s) (%s%s); they are ignored",
                           rnd, node, len(dropped), shown, ", ..." if len(dropped) > 5 else "")
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop declines, bound claimed weights, validate, aggregate the accepted replies with the inner chain, log
        the whitelisted numbers.

        Returns ``(None, metrics)`` (global model unchanged) when fewer than ``min-train-nodes`` updates are
        accepted or the aggregate is not finite.
        """
        rnd = self.global_round(server_round)
        with timings.phase("server", "aggregate-train", round=rnd):
            return self._aggregate_train(rnd, list(replies))

    def _aggregate_train(self, rnd: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        unpacked = [self._unpacked(m) for m in replies]
        replies = [m for m, _ in unpacked]
        malformed = {node_of(m): why for m, why in unpacked if why is not None}
        to_validate: list[Message] = []
        n_declined = 0
        for msg in replies:
            node = node_of(msg)
            scope = self.scopes.scope(node)
            if not msg.has_error():
                metrics = reply_metrics(msg)
                if metrics is not None:
                    self._log(rnd, "train", scope, self._known(rnd, node, metrics, TRAIN_METRICS))
            if is_decline(msg):
                n_declined += 1
                if msg.has_error():
                    # the reason's numbers (e.g. epsilon-total) keep the per-site privacy curve complete
                    numbers, _ = known_numbers(site_replies.parse_reason(msg.error.reason), DECLINE_METRICS)
                    self._log(rnd, "train", scope, {**numbers, "declined": 1.0})
                if node not in self.declined:
                    self.declined.add(node)
                    reason = msg.error.reason if msg.has_error() else "declined = 1"
                    logger.warning(
                        "round %d: node %d (%s) declined to train (privacy budget spent: %s); "
                        "it is dropped from future sampling", rnd, node, scope, reason,
                    )
                continue
            to_validate.append(msg)

        # claims first: a reply lying about its weight is out before its norm can shape the round's reference
        claimed = {node_of(m): metrics for m in to_validate
                   if not m.has_error() and (metrics := reply_metrics(m)) is not None}
        overclaims = self.claims.check("train", rnd, claimed)
        expected = self._trained_arrays()
        result = self.validator.validate(
            [m for m in to_validate if node_of(m) not in overclaims and node_of(m) not in malformed], expected)
        result.rejected[:0] = [Rejection(node, reason) for node, reason in {**malformed, **overclaims}.items()]
        self.claims.pin("train", rnd, {node_of(m): claimed[node_of(m)] for m in result.accepted})
        log_rejections(rnd, result.rejected)
        self.rejections[rnd] = {r.node_id: r.reason for r in result.rejected}
        for msg in to_validate:
            node = node_of(msg)
            norm = result.norms.get(node)
            info = {"accepted": 0.0 if node in self.rejections[rnd] else 1.0}
            if norm is not None:
                info["update-norm"] = norm
            self._log(rnd, "validation", self.scopes.scope(node), info)

        accepted = result.accepted
        summary = {
            "sites-accepted": float(len(accepted)),
            "sites-rejected": float(len(result.rejected)),
            "sites-declined": float(n_declined),
        }
        accepted_metrics = [known_numbers(reply_metrics(m) or {}, TRAIN_METRICS)[0] for m in accepted]
        site_metrics = weighted_metrics(accepted_metrics)
        for m in self.modalities:  # counts are summed, not averaged: cases and sites carrying each modality
            if any(f"cases-{m}" in rec for rec in accepted_metrics):
                site_metrics[f"cases-{m}"] = sum(rec.get(f"cases-{m}", 0.0) for rec in accepted_metrics)
                site_metrics[f"has-{m}"] = float(sum(modality_weight(rec, m) > 0 for rec in accepted_metrics))
        metrics_out = {**site_metrics, **summary}
        self._log(rnd, "train", GLOBAL_SCOPE, metrics_out)
        if len(accepted) < max(1, self.base.min_train_nodes):
            logger.warning(
                "round %d: only %d accepted update(s), fewer than min-train-nodes = %d: the global model is kept",
                rnd, len(accepted), self.base.min_train_nodes,
            )
            return None, MetricRecord(metrics_out)

        sanitised = [self._sanitise(m) for m in accepted]
        aggregated, _ = self.strategy.aggregate_train(rnd, sanitised)
        if aggregated is None:
            logger.warning("round %d: aggregation produced no model; the global model is kept", rnd)
            return None, MetricRecord(metrics_out)
        return self._finish(rnd, aggregated, sanitised), MetricRecord(metrics_out)

    def _finish(self, rnd: int, aggregated: ArrayRecord, sanitised: Sequence[Message]) -> ArrayRecord | None:
        """Global dtypes back (Flower's mean computes in float64), absent modalities and parameters outside the
        trainable set kept, finiteness checked."""
        absent: set[str] = set()
        if self.modality_aware:
            groups = ownership_groups(self.current)
            for m in groups:
                if m == SHARED or m not in self.modalities:
                    continue
                if not any(modality_weight(reply_metrics(s) or {}, m) > 0 for s in sanitised):
                    absent.add(m)
        frozen = {n for m in absent for n in ownership_groups(self.current)[m]}
        frozen |= set(self.current) - set(self.trained)  # never trained: exactly the global values, even after DP noise
        out: dict[str, Array] = {}
        for name, ref in self.current.items():
            if name not in aggregated:
                logger.error("round %d: aggregate lacks %s; the global model is kept", rnd, name)
                return None
            if name in frozen:
                out[name] = DecodedArray(ref)
                continue
            value = array_values(aggregated[name])
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                logger.error("round %d: aggregate of %s is not finite; the global model is kept", rnd, name)
                return None
            if ref.dtype.kind in "iub":
                value = np.rint(value)
            out[name] = DecodedArray(np.asarray(value, dtype=ref.dtype).reshape(ref.shape))
        return record_of(out)

    # -- evaluation --------------------------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Global metrics from the sum of the sites' DP-noised evaluation statistics (:mod:`common.evalstats`).

        Each site sends noisy sufficient statistics over its held-out patients, never its own metrics; the sums
        over sites give the global metrics (``cases``, ``dice-<region>``, ``accuracy``, ``recall``,
        ``specificity``, ``f1``, ``auroc``, ROC points), logged with ``sites`` as phase ``site-eval``, scope
        ``global``. Per site, the metrics of its own (noisy) statistics and its privacy numbers are logged too.
        Only whitelisted numbers are read (:mod:`common.reply_metrics`), and ``num-examples`` is bounded like a
        train claim (pinned per node, at most ``claim-factor x`` the median); a reply that claims too much, or has
        no statistics (errors, refusals, older sites), is logged and left out.
        """
        rnd = self.global_round(server_round)
        usable: dict[int, MetricRecord] = {}
        for msg in replies:
            node = node_of(msg)
            if msg.has_error():
                logger.info("round %d: evaluation error from node %d: %s", rnd, node, msg.error.reason)
                if (int(msg.error.code) == site_replies.REFUSED_EVALUATION
                        and "min-patients" in site_replies.parse_reason(msg.error.reason)):
                    # a site too small to hold patients out stays so for the run: do not ask it every round
                    self.without_validation.add(node)
                continue
            metrics = reply_metrics(msg)
            if metrics is None:
                logger.warning("round %d: evaluation reply from node %d ignored: expected exactly one MetricRecord, "
                               "got %d", rnd, node, len(msg.content.metric_records))
                continue
            usable[node] = metrics
        overclaims = self.claims.check("evaluate", rnd, usable)
        for node, reason in overclaims.items():
            logger.warning("round %d: evaluation reply from node %d ignored: %s", rnd, node, reason)
        accepted = {node: metrics for node, metrics in usable.items() if node not in overclaims}
        self.claims.pin("evaluate", rnd, accepted)
        vectors: list[np.ndarray] = []
        for node, metrics in accepted.items():
            values = self._known(rnd, node, metrics, EVALUATE_METRICS)
            stats = evalstats.read_statistics(values)
            if stats is None:
                logger.warning("round %d: node %d sent no DP evaluation statistics; its evaluation is ignored",
                               rnd, node)
                continue
            privacy = {k: values[k] for k in ("epsilon-total", "epsilon-round", "eval-noise-multiplier") if k in values}
            site = {k: v for k, v in evalstats.metrics_from_sums(stats).items() if "@" not in k}
            self._log(rnd, "site-eval", self.scopes.scope(node), {**site, **privacy})
            vectors.append(stats)
        if not vectors:
            return None
        agg = evalstats.metrics_from_sums(evalstats.sum_statistics(vectors))
        agg["sites"] = float(len(vectors))
        self._log(rnd, "site-eval", GLOBAL_SCOPE, agg)
        return MetricRecord(agg)

    def summary(self) -> None:
        logger.info("fedfusion strategy: %r (round offset %d, update norm factor %g, claim factor %g)",
                    self.strategy, self.round_offset, self.validator.norm_factor, self.claims.factor)
        self.strategy.summary()
