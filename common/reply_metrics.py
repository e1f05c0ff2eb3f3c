"""The numbers a site's replies may carry: the whitelist the server logs and aggregates (client and server contract).

A site is untrusted input to the server: whatever its ``MetricRecord`` holds beyond these names (strings, lists,
unknown keys, identity claims such as the old ``site-index``) is dropped before anything is logged or averaged, so
no site can write arbitrary keys into ``RUN/metrics.jsonl`` or into the aggregated round record. A new metric a
site should report is one name added here.

* :data:`TRAIN_METRICS`: train replies (``client.task.train_round``);
* :data:`EVALUATE_METRICS`: evaluate replies (``client.task.evaluate_round``: :mod:`common.evalstats` sums);
* :data:`DECLINE_METRICS`: the ``key=value`` numbers of a decline reason (:func:`common.replies.parse_reason`).
"""

from __future__ import annotations

from collections.abc import Mapping

from common.evalstats import STATISTIC_KEYS
from models.modalities import MODALITIES

__all__ = ["DECLINE_METRICS", "EVALUATE_METRICS", "IGNORED_METRICS", "TRAIN_METRICS", "WEIGHT_KEY", "known_numbers"]

#: The claimed number of cases behind a reply: its aggregation weight.
WEIGHT_KEY = "num-examples"

#: What a train reply may report (per-modality counts for every modality of :data:`MODALITIES`).
TRAIN_METRICS: frozenset[str] = frozenset(
    {
        WEIGHT_KEY, "train-seconds", "declined",
        "dp-enabled", "dp-reproducible-noise", "epsilon-total", "epsilon-round", "delta", "noise-multiplier",
        "max-grad-norm",
        *(f"cases-{m}" for m in MODALITIES), *(f"has-{m}" for m in MODALITIES),
    }
)

#: What an evaluate reply may report: the (bucketed) case count, the DP-noised sufficient statistics of
#: :mod:`common.evalstats` and the release's privacy numbers; never the site's own metrics.
EVALUATE_METRICS: frozenset[str] = frozenset(
    {WEIGHT_KEY, "eval-noise-multiplier", "epsilon-total", "epsilon-round", "delta", *STATISTIC_KEYS}
)

#: Names older sites send that the server ignores without a warning (``site-index``: the server names a site by
#: its node, :mod:`server.scopes`, never by a number the site chooses).
IGNORED_METRICS: frozenset[str] = frozenset({"site-index"})

#: The numbers a declining site's error reason may carry (``client.task``: budget spent / next / ceiling).
DECLINE_METRICS: frozenset[str] = frozenset({"epsilon-total", "epsilon-next", "max-epsilon", "delta"})


def known_numbers(metrics: Mapping[str, object], allowed: frozenset[str]) -> tuple[dict[str, float], list[str]]:
    """The scalar numeric entries of ``metrics`` whose names are in ``allowed``, and the names dropped.

    Booleans, strings, lists and unknown names are dropped; non-finite numbers are kept (the log writes them as
    ``null`` and aggregation skips them).

    Returns:
        ``(kept, dropped)``: ``kept`` maps name -> float; ``dropped`` lists the other names in input order, except
        those of :data:`IGNORED_METRICS`.
    """
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for key, value in metrics.items():
        if key in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
            kept[key] = float(value)
        elif key not in IGNORED_METRICS:
            dropped.append(str(key))
    return kept, dropped
