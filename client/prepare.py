"""The site's answer to the server's ``query.prepare`` message: build, before round 1, what round 1 would build.

Round 1 used to pay every start-up cost of a site inside its first train message: importing torch, Opacus and
MONAI, reading its cases, building the network, planning the DP noise (a search of seconds) and Opacus's engine.
The ServerApp now asks every connected site to prepare before the first round (run config ``prepare-sites``);
the site builds its cached runtime and training parts for the run config (:mod:`client.runtime`) and answers
``ready = 1`` and whether it will evaluate (``can-evaluate``). Nothing is trained, released or charged to the
privacy ledger, and the reply says nothing about the site's data beyond what its replies to round 1 would (a site
that would decline training answers with the same error reply; one that would refuse evaluation, for its policy or
for too few patients to hold any out, says so up front).

Where it helps: a simulation's virtual sites keep the runtime in their worker process; a deployed site keeps its
on-disk caches (preprocessed cases, the derived noise multiplier) warm; its imports are paid once by the site
daemon (:mod:`client.warm`). :func:`warm_site_cache` is the daemon's own start-up step: the preprocessed cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .runtime import get_runtime, training_parts

__all__ = ["prepare_site", "warm_site_cache"]


def prepare_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict[str, float]:
    """Build the site's runtime and training parts for ``run_config``; returns the reply metrics: ``ready = 1`` and
    ``can-evaluate`` (0 when its policy forbids evaluation or it holds no validation patients: what its evaluate
    replies would refuse with anyway, so the server need not ask).

    Raises:
        SiteDecline: the same refusals a train message would meet (policy, no data, bad run config, DP plan).
    """
    rt, policy = get_runtime(node_config, run_config)
    training_parts(rt, policy)
    can_evaluate = bool(policy.allow_evaluation) and bool(rt.split.validation_groups)
    return {"ready": 1.0, "can-evaluate": 1.0 if can_evaluate else 0.0}


def warm_site_cache(data_dir: Path, state_dir: Path, series_map: Path | None = None,
                    run_config: Mapping[str, Any] | None = None) -> int:
    """Build a deployed site's preprocessed cache (``<state>/preprocessed``) for ``run_config``'s model (default:
    the run config this installation ships, the one a coordinator most likely submits), as its first message would;
    returns the usable cases. What ``fedfusion site`` does at start-up, and ``fedfusion inspect --state``.

    Cases already cached for the same inputs are only listed (:mod:`common.data.dataset`); a run that asks for other
    modalities or another input size builds its own entries beside these on its first message.

    Raises:
        SiteDecline: no usable case for the run config's modalities (the site log says why).
    """
    from common import runconfig

    from .runtime import load_site_dataset
    from .site import resolve_site

    node: dict[str, Any] = {"data-dir": str(data_dir), "state-dir": str(state_dir)}
    if series_map is not None:
        node["series-map"] = str(series_map)
    rc = runconfig.validate(dict(run_config or {}))
    return len(load_site_dataset(resolve_site(node, rc), runconfig.model_config(rc)))
