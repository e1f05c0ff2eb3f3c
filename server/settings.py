"""The server's view of the run config (pyproject.toml ``[tool.flwr.app.config]`` is the source of truth).

``ServerSettings.from_run_config`` reads the keys the ServerApp uses, with the same defaults as pyproject.toml
(Flower's simulation API may hand over an empty run config), and checks each value, naming the key and the
valid choices on error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "trimmed-mean", "median", "krum")
AGGREGATIONS: tuple[str, ...] = ("modality-aware", "plain")
CLIENT_DP: tuple[str, ...] = ("none", "server-side", "client-side")
#: ``eval-hd95``: HD95 in the server's per-round held-out evaluation for the full modality set only, every subset,
#: or never (HD95's distance transforms dominate an every-subset evaluation).
EVAL_HD95: tuple[str, ...] = ("full", "all", "none")


class UnsupportedConfiguration(ValueError):
    """A run config combination the server refuses (the message says why and what to use instead)."""


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(value)
    return bool(value)


@dataclass(frozen=True)
class ServerSettings:
    """Server-side run config values (dash-separated keys in the run config, underscores here)."""

    num_server_rounds: int = 5
    seed: int = 0
    strategy: str = "fedavg"
    aggregation: str = "modality-aware"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    eval_every: int = 1
    best_metric: str = "dice-whole"
    data_dir: str = "data/phantoms"
    test_dir: str = ""
    run_dir: str = "runs/latest"
    resume: str = ""
    proximal_mu: float = 0.0
    lr: float = 0.002
    server_lr: float = 0.1
    trimmed_beta: float = 0.2
    krum_malicious: int = 0
    update_norm_factor: float = 10.0
    client_dp: str = "none"
    client_dp_noise: float = 1.0
    client_dp_clip: float = 1.0
    secagg: bool = False
    eval_batch_size: int = 2
    eval_hd95: str = "full"
    device: str = "auto"

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "ServerSettings":
        """Read and check the server keys of ``run_config`` (missing keys take the defaults)."""
        kwargs: dict[str, Any] = {}
        defaults = cls()
        for name, default in asdict(defaults).items():
            key = name.replace("_", "-")
            if key not in run_config:
                continue
            raw = run_config[key]
            try:
                if isinstance(default, bool):
                    value: Any = _bool(raw)
                elif isinstance(default, int):
                    value = int(raw)
                elif isinstance(default, float):
                    value = float(raw)
                else:
                    value = str(raw).strip()
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"run config {key!r}: cannot read {raw!r} as {type(default).__name__}"
                ) from exc
            kwargs[name] = value
        settings = cls(**kwargs)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ``ValueError`` naming the key for any out-of-range value."""
        def choice(key: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                raise ValueError(f"run config {key!r} is {value!r}; choose one of {', '.join(options)}")

        choice("strategy", self.strategy, STRATEGIES)
        choice("aggregation", self.aggregation, AGGREGATIONS)
        choice("client-dp", self.client_dp, CLIENT_DP)
        choice("eval-hd95", self.eval_hd95, EVAL_HD95)
        if self.num_server_rounds < 1:
            raise ValueError(f"run config 'num-server-rounds' must be >= 1, got {self.num_server_rounds}")
        for key, value in (("fraction-train", self.fraction_train), ("fraction-evaluate", self.fraction_evaluate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"run config {key!r} must be in [0, 1], got {value}")
        for key, value in (
            ("min-train-nodes", self.min_train_nodes),
            ("min-evaluate-nodes", self.min_evaluate_nodes),
            ("min-available-nodes", self.min_available_nodes),
        ):
            if value < 0:
                raise ValueError(f"run config {key!r} must be >= 0, got {value}")
        if self.round_timeout <= 0:
            raise ValueError(f"run config 'round-timeout' must be > 0 seconds, got {self.round_timeout}")
        if self.eval_every < 0:
            raise ValueError(f"run config 'eval-every' must be >= 0 (0 = only after the last round), got {self.eval_every}")
        if not 0.0 <= self.trimmed_beta < 0.5:
            raise ValueError(f"run config 'trimmed-beta' must be in [0, 0.5), got {self.trimmed_beta}")
        if self.update_norm_factor <= 1.0:
            raise ValueError(f"run config 'update-norm-factor' must be > 1, got {self.update_norm_factor}")
        if self.client_dp != "none" and (self.client_dp_clip <= 0 or self.client_dp_noise < 0):
            raise ValueError(
                "run config 'client-dp-clip' must be > 0 and 'client-dp-noise' >= 0 when client-dp is on, "
                f"got clip {self.client_dp_clip}, noise {self.client_dp_noise}"
            )

    def check_protection(self) -> None:
        """Refuse protection combinations the server cannot honour (see docs/server.md)."""
        if self.secagg:
            raise UnsupportedConfiguration(
                "secagg = true is not supported: in Flower 1.41 SecAgg+ exists only as the legacy workflow "
                "(flwr.server.workflow.SecAggPlusWorkflow, which needs a LegacyContext and a legacy "
                "flwr.server.strategy.Strategy), not for the Message-API strategies (flwr.serverapp.strategy) "
                "fedfusion's server is built on. Secure aggregation also hides each site's update from the server, "
                "so per-update validation and per-modality weighting (which needs each site's arrays) cannot run. "
                "Use client-dp = server-side or client-side for client-level protection, and site-level DP-SGD "
                "(dp-enabled) for patient-level privacy; set secagg = false."
            )
        if self.client_dp != "none" and self.strategy not in ("fedavg", "fedprox"):
            raise UnsupportedConfiguration(
                f"client-dp = {self.client_dp} with strategy = {self.strategy} is not supported: Flower's "
                "DifferentialPrivacy*FixedClipping wrappers calibrate their noise to a mean of clipped updates; "
                "a server optimiser (fedadam) or a robust selection (median, trimmed-mean, krum) changes the "
                "sensitivity, so the noise would not give the stated protection. Use strategy = fedavg or fedprox "
                "with client-dp, or client-dp = none with this strategy."
            )

    def to_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}
