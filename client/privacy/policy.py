"""The site's privacy policy: the site, not the server, has the last word on privacy.

A policy bounds what any run may ask of the site:

=======================  ==========  ==========================================================================
key                      default     meaning
=======================  ==========  ==========================================================================
``max-epsilon``          10.0        lifetime ceiling on epsilon (all rounds of all runs); rounds that would
                                     exceed it are declined
``max-delta``            1e-5        largest delta a run may ask for (epsilon is reported at the run's delta)
``min-noise-multiplier`` 0.5         smallest Gaussian noise multiplier accepted
``max-grad-norm``        1.0         largest per-case clipping norm accepted
``allow-no-dp``          false       whether a run may train without DP at all (logged as a WARNING)
``secure-mode``          false       Opacus ``secure_mode`` (cryptographically secure noise; needs torchcsprng).
                                     Off for tests/experiments; turn it on in production.
``allow-evaluation``     true        whether the site answers evaluate messages at all (each answer is a
                                     Gaussian-noised release charged to the ledger, see
                                     :mod:`client.privacy.release`)
``eval-noise-multiplier``  5.0       Gaussian noise std / L2 sensitivity of an evaluation release (> 0)
``count-granularity``    10          case counts in train replies are rounded up to a multiple of this
                                     (1 = exact counts)
=======================  ==========  ==========================================================================

Sources, highest precedence first: the node config (``--node-config "max-epsilon=4.0 ..."``), then a policy file
in the site state directory (``privacy-policy.toml``, or ``privacy-policy.json``), then the defaults above.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.runconfig import DPConfig, as_kind
from models.atomic import atomic_write_text

log = logging.getLogger(__name__)

POLICY_TOML = "privacy-policy.toml"
POLICY_JSON = "privacy-policy.json"


class PolicyRefusal(ValueError):
    """A run asked for weaker privacy than the site's policy allows (the message says what and how to fix)."""


@dataclass(frozen=True)
class SitePolicy:
    """The bounds a site puts on every run (see the module docstring for keys and defaults)."""

    max_epsilon: float = 10.0
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.5
    max_grad_norm: float = 1.0
    allow_no_dp: bool = False
    secure_mode: bool = False
    allow_evaluation: bool = True
    eval_noise_multiplier: float = 5.0
    count_granularity: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_epsilon", "max_delta", "min_noise_multiplier", "max_grad_norm", "eval_noise_multiplier",
                     "count_granularity"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"site privacy policy: {_key(name)} must be a finite number >= 0, got {v!r}")
        if not 0 < self.max_delta < 1:
            raise ValueError(f"site privacy policy: max-delta must be in (0, 1), got {self.max_delta}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"site privacy policy: max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.eval_noise_multiplier <= 0:
            raise ValueError(
                f"site privacy policy: eval-noise-multiplier must be > 0, got {self.eval_noise_multiplier} (to "
                "stop answering evaluations set allow-evaluation = false)"
            )
        if self.count_granularity < 1 or self.count_granularity != int(self.count_granularity):
            raise ValueError(
                f"site privacy policy: count-granularity must be a whole number >= 1, got {self.count_granularity}"
            )

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, node_config: Mapping[str, Any], state_dir: str | os.PathLike[str] | None) -> "SitePolicy":
        """Policy from defaults < policy file in ``state_dir`` < ``node_config``."""
        merged: dict[str, Any] = {}
        if state_dir is not None:
            merged.update(read_policy_file(state_dir))
        merged.update(_parse(node_config, "node config"))
        return cls(**merged)

    def to_flat(self) -> dict[str, float | bool]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    # -- checks --------------------------------------------------------------------------------------
    def check(self, req: DPConfig) -> None:
        """Refuse a run config asking for weaker privacy than this policy.

        Raises:
            PolicyRefusal: naming the run config key, the value asked and the site's bound.
        """
        if not req.enabled:
            if not self.allow_no_dp:
                raise PolicyRefusal(
                    "the run asks to train WITHOUT differential privacy (dp-enabled=false) but this site's policy "
                    "does not allow it; the site can allow it with allow-no-dp=true in its node config or "
                    "privacy policy file"
                )
            return
        problems = []
        if req.noise_multiplier < 0 or not math.isfinite(req.noise_multiplier):
            problems.append(f"dp-noise-multiplier={req.noise_multiplier} is not a number >= 0")
        elif 0 < req.noise_multiplier < self.min_noise_multiplier:
            problems.append(
                f"dp-noise-multiplier={req.noise_multiplier} is below the site's min-noise-multiplier="
                f"{self.min_noise_multiplier}"
            )
        if not (req.max_grad_norm > 0 and math.isfinite(req.max_grad_norm)):
            problems.append(f"dp-max-grad-norm={req.max_grad_norm} must be > 0")
        elif req.max_grad_norm > self.max_grad_norm:
            problems.append(
                f"dp-max-grad-norm={req.max_grad_norm} is above the site's max-grad-norm={self.max_grad_norm}"
            )
        if req.noise_multiplier == 0 and not (0 < req.target_epsilon <= self.max_epsilon):
            problems.append(
                f"dp-target-epsilon={req.target_epsilon} is not in (0, max-epsilon={self.max_epsilon}]"
            )
        if not 0 < req.delta <= self.max_delta:
            problems.append(f"dp-delta={req.delta} is not in (0, max-delta={self.max_delta}]")
        if problems:
            raise PolicyRefusal(
                "the run config asks for weaker privacy than this site accepts: " + "; ".join(problems)
                + ". The site refuses whatever the server sends; ask the federation to change its run config."
            )


def read_policy_file(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Parsed policy values from ``<state_dir>/privacy-policy.toml`` (or ``.json``); ``{}`` when neither exists."""
    d = Path(state_dir)
    for name, loader in ((POLICY_TOML, _load_toml), (POLICY_JSON, _load_json)):
        path = d / name
        if path.exists():
            try:
                raw = loader(path)
            except (OSError, ValueError) as exc:
                raise ValueError(f"site privacy policy file {path} is unreadable: {exc}; fix or remove it") from exc
            if not isinstance(raw, dict):
                raise ValueError(f"site privacy policy file {path} must hold a table/object of key = value")
            return _parse(raw, str(path))
    return {}


def write_policy_file(state_dir: str | os.PathLike[str], values: Mapping[str, Any]) -> Path:
    """Merge ``values`` (dash keys) into ``<state_dir>/privacy-policy.toml`` (atomic write) and return its path.

    Values already in the file and not given are kept; the merged policy is validated before writing.
    """
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    merged = read_policy_file(d)
    merged.update(_parse(values, "arguments"))
    SitePolicy(**merged)  # validate before writing
    lines = ["# fedfusion site privacy policy (node config keys of the same name take precedence)"]
    for name in sorted(merged):
        v = merged[name]
        lines.append(f"{_key(name)} = {'true' if v is True else 'false' if v is False else repr(float(v))}")
    path = d / POLICY_TOML
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# -- helpers -----------------------------------------------------------------------------------------
def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _parse(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(SitePolicy):
        for key in (_key(f.name), f.name):
            if key in data:
                v = data[key]
                kind = bool if f.type in (bool, "bool") else float
                try:
                    out[f.name] = as_kind(v, kind)
                except (TypeError, ValueError) as exc:
                    wanted = "true or false" if kind is bool else "a number"
                    raise ValueError(f"{source}: bad value for {key}: {v!r} is not {wanted}") from exc
                break
    return out


def _load_toml(path: Path) -> Any:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
