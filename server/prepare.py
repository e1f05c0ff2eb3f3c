"""Before round 1: ask every connected site to build what its first round needs (``query.prepare``).

A site's first message used to pay its start-up work (imports of torch, Opacus and MONAI; reading and
preprocessing its cases; the network; the DP noise search and Opacus's engine): round 1 cost several times a later
round. With run config ``prepare-sites = true`` the ServerApp sends each site connected at the start (at least
``min-available-nodes``, waited for as a round would) one ``query.prepare`` message and waits for the answers
before round 1; :mod:`client.prepare` builds and caches those parts, charges nothing to the privacy ledger and
answers ``ready`` (with ``can-evaluate``) or the error reply it would give to round 1. A site that fails to prepare
is still asked to train and answers round 1 as it would have; a site that says it will not evaluate is not sent
evaluate messages (:attr:`server.strategy.FedFusionStrategy.without_validation`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import timings

__all__ = ["PREPARE", "Prepared", "prepare_sites"]

logger = logging.getLogger(__name__)

#: The message type sites answer with :func:`client.prepare.prepare_site`.
PREPARE = "query.prepare"


def _connected(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Node ids connected once at least ``minimum`` are (or ``timeout`` seconds have passed)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)


@dataclass
class Prepared:
    """What the sites answered: counts for the log, and the nodes that said they will not evaluate."""

    sites: int = 0
    ready: int = 0
    failed: int = 0
    silent: int = 0
    cannot_evaluate: set[int] = field(default_factory=set)


def prepare_sites(grid: Grid, min_available_nodes: int, timeout: float) -> Prepared:
    """Send ``query.prepare`` to every connected site and wait for the answers (at most ``timeout`` seconds).

    Returns:
        ``sites`` asked, ``ready``, ``failed`` (error replies), ``silent`` (no answer), and the nodes whose answer
        says ``can-evaluate = 0`` (the ServerApp does not send them evaluate messages).
    """
    with timings.phase("server", "prepare") as timing:
        nodes = _connected(grid, max(1, min_available_nodes), timeout)
        messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=PREPARE)
                    for node in nodes]
        t0 = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
        errors = Counter(int(r.error.code) for r in replies if r.has_error())
        out = Prepared(sites=len(nodes), ready=len(replies) - sum(errors.values()), failed=sum(errors.values()),
                       silent=len(nodes) - len(replies))
        for r in replies:
            metrics = None if r.has_error() else r.content.metric_records.get("metrics")
            if metrics is not None and float(metrics.get("can-evaluate", 1.0)) == 0.0:
                out.cannot_evaluate.add(int(r.metadata.src_node_id))
        timing.update(sites=out.sites, ready=out.ready, failed=out.failed, silent=out.silent)
    logger.info("prepared %d of %d sites before round 1 in %.1f s%s%s%s", out.ready, out.sites,
                time.perf_counter() - t0,
                f"; error replies by code: {dict(errors)}" if errors else "",
                f"; {out.silent} did not answer" if out.silent else "",
                f"; {len(out.cannot_evaluate)} will not evaluate (policy or too few patients)"
                if out.cannot_evaluate else "")
    return out
