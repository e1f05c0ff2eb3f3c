"""How a site says "no": error codes of the site's error replies (lightweight; the server may import this).

A site that does not train this round answers with a Flower *error* Message (``Message(error=Error(code, reason),
reply_to=msg)``), never with a fake update: Flower's strategies drop error replies before aggregating
(``Strategy._check_and_log_replies``), so a declining site can never poison or stall an aggregation, and the
server sees why in the log. The reason is one line of plain text holding only fedfusion's own words and numbers
(never anything read from local data), ending with ``key=value`` pairs that :func:`parse_reason` reads back.
"""

from __future__ import annotations

import re

#: The site's privacy budget would exceed its ceiling (``max-epsilon``) this round: it declines to train.
DECLINED_BUDGET = 4001
#: The run config asks for weaker privacy than the site's policy allows (or DP off when not allowed), or more
#: computation than its caps (spatial size, channels, batch size, local epochs, rounds).
REFUSED_POLICY = 4002
#: The site has no usable case (all unreadable, or none with the run's modalities).
NO_USABLE_DATA = 4003
#: The request itself is unusable (arrays that do not match the run's model config, bad run config value).
BAD_REQUEST = 4004
#: Anything else that went wrong on the site (logged there in full; the reason names only the exception type).
SITE_FAILURE = 4005
#: The site will not evaluate this request: its policy forbids evaluation, it holds out no validation patients
#: (too few patients), it already evaluated this model or round, or it declined training in this run. Not a
#: training decline: the server keeps sampling the site for training.
REFUSED_EVALUATION = 4006

CODES: dict[int, str] = {
    DECLINED_BUDGET: "declined-budget",
    REFUSED_POLICY: "refused-policy",
    NO_USABLE_DATA: "no-usable-data",
    BAD_REQUEST: "bad-request",
    SITE_FAILURE: "site-failure",
    REFUSED_EVALUATION: "refused-evaluation",
}

_PAIR = re.compile(r"([a-z][a-z0-9-]*)=(-?[0-9.eE+-]+|inf|nan)")


def make_reason(code: int, text: str, **numbers: float) -> str:
    """``"fedfusion <name>: <text> [k=v ...]"``; numbers keys use dashes (``epsilon_total`` -> ``epsilon-total``)."""
    pairs = " ".join(f"{k.replace('_', '-')}={float(v):.6g}" for k, v in numbers.items())
    return f"fedfusion {CODES.get(code, 'error')}: {text}" + (f" [{pairs}]" if pairs else "")


def parse_reason(reason: str | None) -> dict[str, float]:
    """The ``key=value`` numbers of a reason made by :func:`make_reason` (``{}`` when there are none)."""
    if not reason or "[" not in reason:
        return {}
    tail = reason[reason.rfind("[") :]
    return {k: float(v) for k, v in _PAIR.findall(tail)}


def is_decline(code: int) -> bool:
    """True for codes that mean "this site will not train under this run" (budget or policy): the server should
    stop sampling the site for the rest of the run."""
    return code in (DECLINED_BUDGET, REFUSED_POLICY)
