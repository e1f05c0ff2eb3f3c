"""Modality-aware aggregation, composable with Flower's Message-API strategies.

Plain FedAvg averages every parameter over every site. In a multimodal federation that is wrong for the
encoders: a site without CT still sends the (untrained) CT encoder back, and averaging it in dilutes what the
CT sites learnt. :class:`ModalityAwareStrategy` wraps any Flower strategy derived from
:class:`flwr.serverapp.strategy.FedAvg` and changes only *which* replies, with *which* weights, each parameter is
aggregated over:

* parameters are partitioned by owner, read from their names (:func:`models.modalities.owner_modality`);
* shared parameters (owner ``None``: fusion core, decoder, classifier) are aggregated over all replies, weighted
  by ``num-examples``;
* parameters of modality ``m`` are aggregated only over replies with ``has-m = 1`` (and ``cases-m > 0``),
  weighted by ``cases-m`` (the site's training cases carrying ``m``). A site without ``m`` can never overwrite or
  dilute ``m``'s parameters. If no reply in the round has ``m``, ``m``'s parameters keep their global values.

*How* a group is combined is the wrapped strategy's own rule, called once per ownership group on replies that
carry only that group's arrays and whose ``num-examples`` is the group weight: a weighted mean for
FedAvg/FedProx, coordinate-wise median for FedMedian, trimmed mean for FedTrimmedAvg, Krum selection for Krum
(each among that group's eligible sites).

Server optimisers (FedOpt family: FedAdam, FedYogi, FedAdagrad) combine with a weighted mean and then take an
optimiser step on the pseudo-gradient ``delta = mean - global``. Here the modality-aware mean is what feeds that
step: it is handed to the strategy's own ``aggregate_train`` as one pre-averaged reply (weight 1, so Flower's
mean returns it exactly), so Flower's FedAdam code computes ``m_t``, ``v_t`` and the update. For modalities
absent from the round the parameters and their optimiser moments are restored afterwards, so momentum from past
rounds does not move an encoder no site trained.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from common.arrays import DecodedArray, record_of, values
from models.modalities import MODALITIES, owner_modality

from .validation import WEIGHT_KEY, reply_arrays, reply_metrics

logger = logging.getLogger(__name__)

#: Group name of the shared parameters.
SHARED = "shared"


def ownership_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Partition parameter names by owner: ``{"shared": [...], "<modality>": [...]}`` (input order kept)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(owner_modality(name) or SHARED, []).append(name)
    return groups


def modality_weight(metrics: Mapping[str, object], modality: str) -> float:
    """Weight of a site's update for ``modality``'s parameters: ``cases-<m>`` if the site has ``m``, else 0.

    A site has ``m`` when ``has-<m>`` is truthy (if the site does not send ``has-<m>``, when ``cases-<m> > 0``).
    A site that sends neither is treated as lacking ``m``: it can never overwrite an encoder it may not have.
    """
    cases = metrics.get(f"cases-{modality}")
    has = metrics.get(f"has-{modality}")
    try:
        cases_f = float(cases) if cases is not None else 0.0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        cases_f = 0.0
    if not math.isfinite(cases_f) or cases_f <= 0:
        return 0.0
    if has is not None:
        try:
            if float(has) < 0.5:  # type: ignore[arg-type]
                return 0.0
        except (TypeError, ValueError):
            return 0.0
    return cases_f


def _with_content(msg: Message, content: RecordDict) -> Message:
    """A copy of ``msg`` (same metadata, so the same source node) with other content."""
    return Message(content=content, metadata=copy.copy(msg.metadata))


def group_reply(msg: Message, names: Sequence[str], weight: float) -> Message:
    """A reply carrying only ``names`` of ``msg``'s arrays and ``num-examples = weight``."""
    arrays = reply_arrays(msg)
    assert arrays is not None
    content = RecordDict(
        {
            "arrays": record_of({n: arrays[n] for n in names}),
            "metrics": MetricRecord({WEIGHT_KEY: float(weight)}),
        }
    )
    return _with_content(msg, content)


@contextmanager
def quiet_flwr() -> Iterator[None]:
    """Silence Flower's INFO lines while a strategy is called once per group (they would repeat M+1 times)."""
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        flwr_logger.setLevel(level)


class ModalityAwareStrategy(Strategy):
    """Wraps a Flower ``FedAvg``-family strategy so each ownership group is aggregated over its eligible sites.

    Sampling, configuration and evaluation are the wrapped strategy's, untouched. Only ``aggregate_train``
    differs (see the module docstring).

    Args:
        strategy: the wrapped strategy (FedAvg, FedProx, FedAdam/FedYogi/FedAdagrad, FedMedian, FedTrimmedAvg,
            Krum, MultiKrum, or another FedAvg subclass whose ``aggregate_train`` is a pure combination of replies).
        modalities: the model's modalities (any parameter owned by another modality is treated as shared).
    """

    def __init__(self, strategy: FedAvg, modalities: Sequence[str] = MODALITIES) -> None:
        if not isinstance(strategy, FedAvg):
            raise TypeError(
                f"modality-aware aggregation wraps a FedAvg-family strategy, got {type(strategy).__name__}; "
                "wrap the base strategy first and put DP wrappers around the modality-aware one"
            )
        self.strategy = strategy
        self.modalities = tuple(modalities)
        #: groups without any eligible site in the last aggregated round (kept at their global values)
        self.last_absent: list[str] = []
        #: eligible sites (node ids) per group in the last aggregated round

    def __repr__(self) -> str:
        return f"ModalityAware({type(self.strategy).__name__})"

    # -- delegation --------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = {k: values(v) for k, v in arrays.items()}  # read-only: kept, not copied, by DecodedArray
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        logger.info("modality-aware aggregation over %s for modalities %s", type(self.strategy).__name__,
                    ",".join(self.modalities))
        self.strategy.summary()

    # -- aggregation -------------------------------------------------------------------------------
    def _combine(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """The wrapped strategy's combination rule (without any server optimiser step)."""
        with quiet_flwr():
            if isinstance(self.strategy, FedOpt):
                # FedOpt's own aggregate_train would also take the optimiser step; its combination is FedAvg's.
                arrays, _ = FedAvg.aggregate_train(self.strategy, server_round, replies)
            else:
                arrays, _ = self.strategy.aggregate_train(server_round, replies)
        return arrays

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate validated train replies group by group.

        Each reply must carry one ArrayRecord with the global model's keys and one MetricRecord with
        ``num-examples`` and, per modality, ``cases-<m>`` / ``has-<m>`` (replies are validated by the outer
        :class:`server.strategy.FedFusionStrategy` first).

        Returns:
            the new global arrays (``None`` when no reply could be aggregated) and the replies' metrics
            weighted by ``num-examples``.
        """
        replies = [r for r in replies if not r.has_error()]
        if not replies:
            return None, None
        first = reply_arrays(replies[0])
        if first is None:
            return None, None
        current: dict[str, np.ndarray] | None = getattr(self, "_current", None)
        if current is None:
            current = {k: values(v) for k, v in first.items()}  # used only if no site has some modality
        names = list(first.keys())
        groups = ownership_groups(names)
        out: dict[str, Array] = {}
        absent: list[str] = []
        eligible_log: dict[str, list[int]] = {}
        for group, group_names in groups.items():
            sub: list[Message] = []
            for msg in replies:
                metrics = reply_metrics(msg) or MetricRecord()
                if group == SHARED or group not in self.modalities:
                    weight = float(metrics.get(WEIGHT_KEY, 0.0))  # type: ignore[arg-type]
                else:
                    weight = modality_weight(metrics, group)
                if weight > 0:
                    sub.append(group_reply(msg, group_names, weight))
            eligible_log[group] = [int(m.metadata.src_node_id) for m in sub]
            if not sub:
                absent.append(group)
                for n in group_names:
                    out[n] = DecodedArray(current[n])
                continue
            combined = self._combine(server_round, sub)
            if combined is None:
                absent.append(group)
                for n in group_names:
                    out[n] = DecodedArray(current[n])
                continue
            for n in group_names:
                out[n] = combined[n]
        self.last_absent = absent
        if absent:
            logger.info("round %d: no site has %s this round: their parameters keep the global values",
                        server_round, ", ".join(absent))
        for group, nodes in eligible_log.items():
            if group != SHARED:
                logger.debug("round %d: %s aggregated over nodes %s", server_round, group, nodes)

        averaged = record_of({n: out[n] for n in names})
        if isinstance(self.strategy, FedOpt):
            averaged = self._server_step(server_round, replies[0], averaged, absent, groups)

        metrics = MetricRecord(weighted_metrics([reply_metrics(r) or MetricRecord() for r in replies]))
        return averaged, metrics

    def _server_step(
        self,
        server_round: int,
        template: Message,
        averaged: ArrayRecord,
        absent: Sequence[str],
        groups: Mapping[str, Sequence[str]],
    ) -> ArrayRecord:
        """Feed the modality-aware mean to the FedOpt strategy's own update (FedAdam, FedYogi, ...)."""
        opt = self.strategy
        assert isinstance(opt, FedOpt)
        frozen = [n for g in absent for n in groups[g]]
        saved = {
            "m_t": {n: opt.m_t[n].copy() for n in frozen} if opt.m_t else None,
            "v_t": {n: opt.v_t[n].copy() for n in frozen} if opt.v_t else None,
        }
        single = _with_content(
            template, RecordDict({"arrays": averaged, "metrics": MetricRecord({WEIGHT_KEY: 1.0})})
        )
        with quiet_flwr():
            stepped, _ = opt.aggregate_train(server_round, [single])
        if stepped is None:
            return averaged
        if frozen:
            assert opt.current_arrays is not None
            for moment in ("m_t", "v_t"):
                state = getattr(opt, moment)
                if state is None:
                    continue
                for n in frozen:
                    before = saved[moment]
                    state[n] = before[n] if before is not None else np.zeros_like(state[n])
            stepped = ArrayRecord(
                {
                    n: Array(np.asarray(opt.current_arrays[n])) if n in set(frozen) else stepped[n]
                    for n in stepped.keys()
                }
            )
        return stepped


def weighted_metrics(records: Sequence[Mapping[str, object]], weight_key: str = WEIGHT_KEY) -> dict[str, float]:
    """Weighted mean of each numeric scalar metric over the records that carry it (weights: ``weight_key``).

    Unlike Flower's ``aggregate_metricrecords`` this tolerates records with different keys (a site may send a
    metric another does not) and skips non-finite values. The weight key itself is summed.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total = 0.0
    for rec in records:
        w = rec.get(weight_key, 0.0)
        try:
            w = float(w)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if not math.isfinite(w) or w <= 0:
            continue
        total += w
        for key, value in rec.items():
            if key == weight_key or isinstance(value, (list, bool)):
                continue
            if not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    out = {k: sums[k] / weights[k] for k in sums}
    if total > 0:
        out[weight_key] = total
    return out
