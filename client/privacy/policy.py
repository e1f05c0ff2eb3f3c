"""The site's policy: the site, not the server, has the last word on privacy and on what it computes.

A policy bounds what any run may ask of the site:

========================== ========== =======================================================================
key                        default    meaning
========================== ========== =======================================================================
``max-epsilon``            10.0       lifetime ceiling on epsilon (all rounds of all runs); rounds that would
                                      exceed it are declined
``max-delta``              1e-5       largest delta a run may ask for (epsilon is reported at the run's delta)
``min-noise-multiplier``   0.5        smallest Gaussian noise multiplier accepted
``max-grad-norm``          1.0        largest per-case clipping norm accepted
``allow-no-dp``            false      whether a run may train without DP at all (logged as a WARNING)
``reproducible-noise``     false      draw DP noise, Poisson sampling and dropout from a stream fixed by the
                                      run's seed, the round and the site's name instead of the OS CSPRNG
                                      (experiments only: whoever knows the run config can recompute the noise;
                                      the site's replies then carry ``dp-reproducible-noise = 1``)
``secure-mode``            false      a lock for production sites: refuse to load a policy that turns
                                      ``reproducible-noise`` on (the noise is from the OS CSPRNG either way)
``allow-evaluation``       true       whether the site answers evaluate messages at all (each answer is a
                                      Gaussian-noised release charged to the ledger, see
                                      :mod:`client.privacy.release`)
``eval-noise-multiplier``  5.0        Gaussian noise std / L2 sensitivity of an evaluation release (> 0)
``count-granularity``      10         case counts in train replies are rounded up to a multiple of this
                                      (1 = exact counts)
``max-spatial-voxels``     2097152    largest ``model-spatial-size`` a run may ask for, in voxels per case
                                      (128^3)
``max-channels``           256        widest ``model-channels`` entry a run may ask for
``max-batch-size``         64         largest ``batch-size``
``max-local-epochs``       20         largest ``local-epochs``
``max-rounds``             1000       largest ``num-server-rounds``
``allowed-apps``           (empty)    SHA-256 digests of the FABs this site runs (``fedfusion app-hash``);
                                      enforced by the SuperNode guard (:mod:`client.supernode_guard`), outside
                                      the app; empty: any app is run (with a warning)
========================== ========== =======================================================================

Sources, highest precedence first: the node config (``--node-config "max-epsilon=4.0 ..."``), then a policy file
in the site state directory (``privacy-policy.toml``, or ``privacy-policy.json``), then the defaults above. A run
config asking more than the policy allows is refused with a reason that names the key, the value asked and the
site's bound (:class:`PolicyRefusal`, error reply ``refused-policy``).
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
from typing import TYPE_CHECKING, Any

from common.runconfig import DPConfig, TrainConfig, as_kind
from models.atomic import atomic_write_text

if TYPE_CHECKING:
    from models.config import ModelConfig

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
    reproducible_noise: bool = False
    secure_mode: bool = False
    allow_evaluation: bool = True
    eval_noise_multiplier: float = 5.0
    count_granularity: float = 10.0
    max_spatial_voxels: int = 128**3
    max_channels: int = 256
    max_batch_size: int = 64
    max_local_epochs: int = 20
    max_rounds: int = 1000
    allowed_apps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_epsilon", "max_delta", "min_noise_multiplier", "max_grad_norm", "eval_noise_multiplier",
                     "count_granularity"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"site privacy policy: {_key(name)} must be a finite number >= 0, got {v!r}")
        for name in _WORKLOAD_CAPS:
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"site policy: {_key(name)} must be a whole number >= 1, got {v!r}")
        bad = [a for a in self.allowed_apps if not _is_sha256(a)]
        if bad:
            raise ValueError(f"site policy: allowed-apps holds {bad[:3]}, not SHA-256 hex digests (64 hex characters, "
                             "as `fedfusion app-hash APP` prints them)")
        if self.secure_mode and self.reproducible_noise:
            raise ValueError(
                "site privacy policy: secure-mode=true forbids reproducible-noise=true (reproducible noise can be "
                "recomputed by whoever knows the run config); remove reproducible-noise, or set secure-mode=false "
                "on a site that only runs experiments"
            )
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

    def to_flat(self) -> dict[str, float | int | bool | tuple[str, ...]]:
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


    def check_workload(self, model: ModelConfig, train: TrainConfig) -> None:
        """Refuse a run config demanding more computation than this site allows (instead of running out of memory).

        Raises:
            PolicyRefusal: naming each run config key, the value asked and the site's cap.
        """
        asked = {
            "max_spatial_voxels": ("model-spatial-size", ",".join(map(str, model.spatial_size)),
                                   math.prod(model.spatial_size), " voxels per case"),
            "max_channels": ("model-channels", ",".join(map(str, model.channels)), max(model.channels),
                             " channels in its widest layer"),
            "max_batch_size": ("batch-size", train.batch_size, train.batch_size, ""),
            "max_local_epochs": ("local-epochs", train.local_epochs, train.local_epochs, ""),
            "max_rounds": ("num-server-rounds", train.num_server_rounds, train.num_server_rounds, ""),
        }
        problems = []
        for name, (key, value, amount, unit) in asked.items():
            cap = getattr(self, name)
            if amount > cap:
                what = f"{key}={value}" + (f" ({amount}{unit})" if unit else "")
                problems.append(f"{what} is above the site's {_key(name)}={cap}")
        if problems:
            raise PolicyRefusal(
                "the run config asks more than this site computes: " + "; ".join(problems)
                + ". Ask the federation for a smaller run, or raise the cap in the site's policy."
            )


#: Policy fields that cap what a run may demand of the site's machine (whole numbers >= 1).
_WORKLOAD_CAPS = ("max_spatial_voxels", "max_channels", "max_batch_size", "max_local_epochs", "max_rounds")


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
        lines.append(f"{_key(name)} = {_toml_value(merged[name])}")
    path = d / POLICY_TOML
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# -- helpers -----------------------------------------------------------------------------------------
def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


_KINDS: dict[str, type] = {"bool": bool, "int": int, "float": float, "tuple[str, ...]": tuple}


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _digests(value: Any) -> tuple[str, ...]:
    """A list of digests (TOML array) or a comma-separated string (node config) as a tuple of lower-case hex."""
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(i, str) for i in items):
        raise TypeError(value)
    return tuple(i.strip().lower() for i in items if i.strip())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(f'"{i}"' for i in v) + "]"
    return repr(float(v))


def _parse(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(SitePolicy):
        for key in (_key(f.name), f.name):
            if key in data:
                v = data[key]
                kind = _KINDS[str(f.type)]
                try:
                    out[f.name] = _digests(v) if kind is tuple else as_kind(v, kind)
                except (TypeError, ValueError) as exc:
                    wanted = {bool: "true or false", int: "a whole number", float: "a number",
                              tuple: "a list of SHA-256 digests"}[kind]
                    raise ValueError(f"{source}: bad value for {key}: {v!r} is not {wanted}") from exc
                break
    return out


def _load_toml(path: Path) -> Any:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
