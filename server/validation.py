"""Update validation: what a site sends is checked against the current global model before aggregation.

A reply is rejected (logged with its node id and the reason, and left out of the round) when

* it carries no ``ArrayRecord`` or no ``MetricRecord``, or ``num-examples`` is missing, not finite or ``<= 0``;
* its array keys differ from the global model's (missing or unexpected parameters);
* an array's shape or dtype differs from the global array of the same name;
* an array holds NaN or Inf;
* the L2 norm of its update ``||w_site - w_global||`` (over all parameters, float64) is far beyond the round's
  typical update norm: ``> norm_factor x reference``, where the reference is the *low median* of this round's
  update norms when at least ``min_replies_for_median`` structurally valid replies arrived, else the median
  accepted norm of previous rounds, else (a first round with two replies) the smaller of the two norms;
* its update norm exceeds ``norm_factor x ||w_global||``: an absolute bound that needs no other reply (a first
  round with a single reply), as no honest round of local training moves the model by many times its own size;
* with client-side clipping (``max_update_norm``), its update norm exceeds the clipping norm: the site did not
  clip (e.g. its ClientApp lacks Flower's ``fixedclipping_mod``).

The low median (the smaller middle value; :func:`server.claims.low_median`) is robust: one huge update cannot
raise the reference it is judged by, even among two replies, where the plain median (the mean of the two) would
let a x1000 update pass at about 2x "the median". With two replies and no history the server cannot tell a huge
update from a tiny one; it keeps the smaller, so a site can at worst make one first round learn little, never
steer the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from common.arrays import values
from common.reply_metrics import WEIGHT_KEY

from .claims import low_median, weight_problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    """One reply left out of a round: the sending node and why."""

    node_id: int
    reason: str


@dataclass
class ValidationResult:
    """Outcome of :meth:`UpdateValidator.validate`.

    Attributes:
        accepted: replies that may be aggregated, in arrival order.
        rejected: replies left out, with reasons.
        norms: update L2 norm of every structurally valid reply, by node id.
    """

    accepted: list[Message] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    norms: dict[int, float] = field(default_factory=dict)


def reply_arrays(msg: Message) -> ArrayRecord | None:
    """The single ArrayRecord of a reply (``None`` if it has none or several)."""
    records = msg.content.array_records
    if len(records) != 1:
        return None
    return next(iter(records.values()))


def reply_metrics(msg: Message) -> MetricRecord | None:
    """The single MetricRecord of a reply (``None`` if it has none or several)."""
    records = msg.content.metric_records
    if len(records) != 1:
        return None
    return next(iter(records.values()))


def _short(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(sorted(names)[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")


class UpdateValidator:
    """Checks replies against the current global arrays; keeps the accepted-norm history across rounds.

    Args:
        norm_factor: ``k`` of the outlier tests (reject norms ``> k x`` the reference and ``> k x`` the global
            model's norm). Must be > 1.
        min_replies_for_median: replies needed to prefer the round's own low median over earlier rounds' norms.
        max_update_norm: if set, reject updates whose norm exceeds it (client-side clipping check).
        clip_tolerance: relative slack on ``max_update_norm`` for float round-off.
    """

    def __init__(
        self,
        norm_factor: float = 10.0,
        min_replies_for_median: int = 3,
        max_update_norm: float | None = None,
        clip_tolerance: float = 1e-3,
    ) -> None:
        if not norm_factor > 1.0:
            raise ValueError(f"update norm factor must be > 1 (got {norm_factor}); the default is 10")
        self.norm_factor = float(norm_factor)
        self.min_replies_for_median = max(1, int(min_replies_for_median))
        self.max_update_norm = max_update_norm
        self.clip_tolerance = clip_tolerance
        #: median accepted update norm of each past round (oldest first), for rounds with few replies
        self.history: list[float] = []

    # -- state for checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [float(x) for x in state.get("history", [])]

    # -- checks ------------------------------------------------------------------------------------
    def structural_problem(self, msg: Message, global_arrays: Mapping[str, np.ndarray]) -> str | None:
        """Why a reply cannot be aggregated at all (``None`` if it is structurally fine); values are checked by
        :meth:`update_norm`, which decodes each array once."""
        if msg.has_error():
            return f"error reply: {msg.error.reason}"
        arrays = reply_arrays(msg)
        if arrays is None:
            return f"expected exactly one ArrayRecord, got {len(msg.content.array_records)}"
        metrics = reply_metrics(msg)
        if metrics is None:
            return f"expected exactly one MetricRecord, got {len(msg.content.metric_records)}"
        problem = weight_problem(metrics.get(WEIGHT_KEY))
        if problem is not None:
            return problem
        keys = set(arrays.keys())
        expected = set(global_arrays.keys())
        if keys != expected:
            parts = []
            if expected - keys:
                parts.append(f"missing {_short(list(expected - keys))}")
            if keys - expected:
                parts.append(f"unexpected {_short(list(keys - expected))}")
            return "wrong parameter keys: " + "; ".join(parts)
        for name, ref in global_arrays.items():
            arr = arrays[name]
            if tuple(arr.shape) != tuple(ref.shape):
                return f"wrong shape for {name}: {tuple(arr.shape)} (global model has {tuple(ref.shape)})"
            try:
                dtype = np.dtype(arr.dtype)
            except Exception:  # noqa: BLE001 - a sender's string numpy cannot parse (TypeError, SyntaxError, ...)
                return f"wrong dtype for {name}: {str(arr.dtype)[:40]!r} is not a dtype (global model has {ref.dtype})"
            if dtype != ref.dtype:
                return f"wrong dtype for {name}: {arr.dtype} (global model has {ref.dtype})"
        return None

    @staticmethod
    def update_norm(arrays: ArrayRecord, global64: Mapping[str, np.ndarray]) -> float | str:
        """L2 norm of ``arrays - global64`` over all parameters (float64, unitless), or why the values are unusable.

        Args:
            arrays: a structurally valid reply (:meth:`structural_problem` found nothing).
            global64: the global model, name -> float64 array.
        """
        total = 0.0
        for name, ref in global64.items():
            try:
                got = values(arrays[name])  # a DecodedArray keeps its values; any other header is parsed once
            except ValueError as exc:  # bytes that do not match the declared dtype/shape passed the shape check
                return f"unreadable values in {name}: {exc}"
            if got.dtype.kind in "fc" and not np.isfinite(got).all():
                return f"non-finite values (NaN or Inf) in {name}"
            diff = got.astype(np.float64) - ref
            total += float(np.dot(diff.ravel(), diff.ravel()))
        return math.sqrt(total)

    def reference(self, norms: Sequence[float]) -> float | None:
        """The typical update norm this round's ``norms`` are judged by (``None``: nothing to compare with).

        The round's own low median with at least ``min_replies_for_median`` norms; else the median accepted norm
        of earlier rounds; else, with two norms in a first round, the smaller one.
        """
        if len(norms) >= self.min_replies_for_median:
            return low_median(norms)
        if self.history:
            return float(np.median(self.history))
        if len(norms) >= 2:
            return low_median(norms)
        return None

    def validate(self, replies: Sequence[Message], global_arrays: Mapping[str, np.ndarray]) -> ValidationResult:
        """Split ``replies`` into accepted and rejected ones (see the module docstring for the rules).

        Args:
            replies: train replies of one round (error replies are rejected with their reason).
            global_arrays: the global model the round started from, name -> array.
        """
        result = ValidationResult()
        candidates: list[tuple[Message, float]] = []
        global64 = {name: ref.astype(np.float64) for name, ref in global_arrays.items()}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            problem = self.structural_problem(msg, global_arrays)
            if problem is not None:
                result.rejected.append(Rejection(node, problem))
                continue
            arrays = reply_arrays(msg)
            assert arrays is not None
            norm = self.update_norm(arrays, global64)
            if isinstance(norm, str):
                result.rejected.append(Rejection(node, norm))
                continue
            result.norms[node] = norm
            candidates.append((msg, norm))

        reference = self.reference([n for _, n in candidates])
        global_norm = math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in global64.values()))

        accepted_norms: list[float] = []
        for msg, norm in candidates:
            node = int(msg.metadata.src_node_id)
            if self.max_update_norm is not None and norm > self.max_update_norm * (1 + self.clip_tolerance):
                result.rejected.append(
                    Rejection(
                        node,
                        f"update norm {norm:.4g} exceeds the client-side clipping norm {self.max_update_norm:.4g}: "
                        "the site did not clip (add flwr.clientapp.mod.fixedclipping_mod to its ClientApp)",
                    )
                )
                continue
            if global_norm > 0 and norm > self.norm_factor * global_norm:
                result.rejected.append(
                    Rejection(
                        node,
                        f"update norm {norm:.4g} is {norm / global_norm:.1f}x the global model's own norm "
                        f"{global_norm:.4g} (limit {self.norm_factor:g}x)",
                    )
                )
                continue
            if reference is not None and reference > 0 and norm > self.norm_factor * reference:
                result.rejected.append(
                    Rejection(
                        node,
                        f"update norm {norm:.4g} is {norm / reference:.1f}x the round's typical norm "
                        f"{reference:.4g} (limit {self.norm_factor:g}x)",
                    )
                )
                continue
            result.accepted.append(msg)
            accepted_norms.append(norm)
        if accepted_norms:
            self.history.append(float(np.median(accepted_norms)))
            self.history = self.history[-20:]  # a sliding window: the model's update scale drifts over training
        return result


def log_rejections(server_round: int, rejected: Sequence[Rejection]) -> None:
    """One warning line per rejected reply, naming the node and the reason."""
    for rej in rejected:
        logger.warning("round %d: rejected update from node %d: %s", server_round, rej.node_id, rej.reason)
