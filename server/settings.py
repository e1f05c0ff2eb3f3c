"""The server's section of the run config (:mod:`common.runconfig` holds the schema; pyproject.toml the defaults).

``ServerSettings.from_run_config`` validates the run config through the schema and checks what only the server
knows: the strategy registry (:mod:`server.strategies`) and the protection combinations it can honour.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from common.runconfig import RunConfigError, section

from .strategies import MEAN_STRATEGIES, STRATEGIES


class UnsupportedConfiguration(ValueError):
    """A run config combination the server refuses (the message says why and what to use instead)."""


@dataclass(frozen=True)
class ServerSettings:
    """Server-side run config values (dash-separated keys in the run config, underscores here; meanings in
    :data:`common.runconfig.SCHEMA`)."""

    num_server_rounds: int
    seed: int
    strategy: str
    aggregation: str
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    round_timeout: float
    prepare_sites: bool
    eval_every: int
    eval_subsets: str
    best_metric: str
    select_subsets: str
    data_dir: str
    test_dir: str
    select_dir: str
    unseen_dir: str
    run_dir: str
    resume: str
    proximal_mu: float
    lr: float
    server_lr: float
    trimmed_beta: float
    krum_malicious: int
    update_norm_factor: float
    claim_factor: float
    client_dp: str
    client_dp_noise: float
    client_dp_clip: float
    secagg: bool
    eval_batch_size: int
    eval_hd95: str
    device: str
    dp_trainable: str
    server_ema: float
    init_checkpoint: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "ServerSettings":
        """The server keys of ``run_config`` (missing keys take pyproject's defaults), checked.

        Raises:
            RunConfigError: an unknown key or a bad value, naming the key.
        """
        settings = section(cls, run_config)
        settings.check()
        return settings

    def check(self) -> None:
        """What the schema cannot check: the strategy registry (this layer's)."""
        if self.strategy not in STRATEGIES:
            raise RunConfigError("strategy", f"{self.strategy!r} is not a registered strategy; choose one of "
                                 f"{', '.join(STRATEGIES)}")

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
        if self.client_dp == "client-side" and self.dp_trainable != "all":
            raise UnsupportedConfiguration(
                f"client-dp = client-side with dp-trainable = {self.dp_trainable} is not supported: Flower's "
                "fixedclipping_mod at the site pairs the reply's arrays with the received ones by position, and a "
                "site replies with its trainable arrays only. Use client-dp = server-side (the server clips the "
                "whole update, whose frozen part is zero) or dp-trainable = all."
            )
        if self.client_dp != "none" and self.strategy not in MEAN_STRATEGIES:
            raise UnsupportedConfiguration(
                f"client-dp = {self.client_dp} with strategy = {self.strategy} is not supported: Flower's "
                "DifferentialPrivacy*FixedClipping wrappers calibrate their noise to a mean of clipped updates; "
                "a server optimiser (fedadam) or a robust selection (median, trimmed-mean, krum) changes the "
                "sensitivity, so the noise would not give the stated protection. Use strategy = fedavg or fedprox "
                "with client-dp, or client-dp = none with this strategy."
            )

    def to_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}
