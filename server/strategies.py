"""The Flower strategies a run can name (run config ``strategy``): the registry.

Each entry builds a :class:`flwr.serverapp.strategy.FedAvg`-family strategy from the server's settings and the
sampling arguments every strategy shares. Flower is imported inside the builders, so listing the names (run-config
validation, CLI help) stays cheap. Adding a strategy = one builder + one line in :data:`STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from flwr.serverapp.strategy import FedAvg

    from .settings import ServerSettings

Builder = Callable[["ServerSettings", dict[str, Any]], "FedAvg"]


def _fedavg(s: "ServerSettings", common: dict[str, Any]) -> "FedAvg":
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(**common)


def _fedprox(s: "ServerSettings", common: dict[str, Any]) -> "FedAvg":
    from flwr.serverapp.strategy import FedProx

    return FedProx(**common, proximal_mu=s.proximal_mu)


def _fedadam(s: "ServerSettings", common: dict[str, Any]) -> "FedAvg":
    from flwr.serverapp.strategy import FedAdam

    return FedAdam(**common, eta=s.server_lr, eta_l=s.lr)


def _trimmed_mean(s: "ServerSettings", common: dict[str, Any]) -> "FedAvg":
    from flwr.serverapp.strategy import FedTrimmedAvg

    return FedTrimmedAvg(**common, beta=s.trimmed_beta)


def _median(s: "ServerSettings", common: dict[str, Any]) -> "FedAvg":
    from flwr.serverapp.strategy import FedMedian

    return FedMedian(**common)


def _krum(s: "ServerSettings", common: dict[str, Any]) -> "FedAvg":
    from flwr.serverapp.strategy import Krum

    return Krum(**common, num_malicious_nodes=s.krum_malicious)


#: strategy name -> (builder, one-line description).
STRATEGIES: dict[str, tuple[Builder, str]] = {
    "fedavg": (_fedavg, "weighted mean of the sites' models"),
    "fedprox": (_fedprox, "FedAvg with the sites' proximal term (proximal-mu)"),
    "fedadam": (_fedadam, "server-side Adam on the mean update (server-lr)"),
    "trimmed-mean": (_trimmed_mean, "coordinate-wise trimmed mean (trimmed-beta)"),
    "median": (_median, "coordinate-wise median"),
    "krum": (_krum, "Krum selection (krum-malicious)"),
}

#: strategies that take a plain (weighted) mean of clipped updates: the only ones Flower's client-level DP
#: wrappers calibrate their noise for.
MEAN_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")


def build(settings: "ServerSettings", common: dict[str, Any]) -> "FedAvg":
    """The strategy ``settings.strategy`` names (``settings`` were checked: the name is registered)."""
    return STRATEGIES[settings.strategy][0](settings, common)
