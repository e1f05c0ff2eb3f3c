"""The run config: one typed schema for every key of ``[tool.flwr.app.config]`` in pyproject.toml.

pyproject.toml holds the *values* (the defaults a run starts from; Flower ships them in the FAB); :data:`SCHEMA`
holds what each key *is* (type, section, meaning, which values are valid). Nothing else in fedfusion restates a
default: every reader of a run config — the ServerApp, the ClientApp, ``fedfusion simulate``/``train-central``,
experiments and benches — goes through :func:`validate` (or :func:`load`, which adds overrides), and takes typed
sections from it (:class:`TrainConfig`, :class:`DPConfig`, :func:`model_config`; the server reads its own section
in :mod:`server.settings`).

Errors are one :class:`RunConfigError` naming the key, the value and what is valid:

>>> validate({"local-epochs": "three"})
Traceback (most recent call last):
...
common.runconfig.RunConfigError: run config 'local-epochs': cannot read 'three' as an integer (local epochs per round)

Keys whose valid values are an extension point are checked against their registry: ``model-family`` against
:data:`models.fusion.FUSIONS` here, ``strategy`` against the server's strategy registry by :mod:`server.settings`
(this layer sits below the server and cannot see it).
"""

from __future__ import annotations

import functools
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from models.config import MODALITY_DROPOUT_MODES, ModelConfig
from models.fast_conv import CONV_BACKWARDS
from models.modalities import MODALITIES
from models.trainable import trainable_problem
from models.training import PROXIMAL_SCOPES

__all__ = [
    "ACCOUNTANTS",
    "OPTIMIZERS",
    "PROJECT_DIR",
    "SCHEMA",
    "ConfigValue",
    "DPConfig",
    "Key",
    "RunConfigError",
    "TrainConfig",
    "as_kind",
    "default_model_config",
    "defaults",
    "load",
    "model_config",
    "model_entries",
    "parse_assignments",
    "section",
    "validate",
]

#: The project directory: where pyproject.toml (the Flower app) lives.
PROJECT_DIR = Path(__file__).resolve().parents[1]

ConfigValue = bool | int | float | str
Check = Callable[[Any], "str | None"]  # returns what is wrong, or None

#: Site optimizers (run-config key ``optimizer``; built by :mod:`client.privacy.optimizers`).
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "adam-bc")
#: Privacy accountants a site's ledger can be read with (run-config key ``dp-accountant``;
#: :mod:`client.privacy.accountant`).
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


class RunConfigError(ValueError):
    """A run config key that is unknown or holds an invalid value; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"run config {key!r}: {message}")


@dataclass(frozen=True)
class Key:
    """One run-config key.

    Attributes:
        name: the key (dash-separated, as in pyproject.toml and ``flwr run --run-config``).
        kind: ``bool``, ``int``, ``float`` or ``str`` (comma lists are strings).
        section: who reads it: ``run``, ``train``, ``dp``, ``model``, ``server``, ``eval``, ``paths``, ``client-dp``.
        help: one line: what it means (shown in errors and the docs).
        check: extra validation of the typed value (range, choice); returns the problem or ``None``.
    """

    name: str
    kind: type
    section: str
    help: str
    check: Check | None = None


# ----------------------------------------------------------------------------------------------- value checks
def _at_least(low: float, *, strict: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = v > low if strict else v >= low
        return None if ok and math.isfinite(v) else f"must be {'>' if strict else '>='} {low:g}"

    return check


def _within(low: float, high: float, *, high_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = low <= v < high if high_open else low <= v <= high
        return None if ok else f"must be in [{low:g}, {high:g}{')' if high_open else ']'}"

    return check


def _one_of(*options: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else f"choose one of {', '.join(options)}"

    return check


def _positive_ints(v: str) -> str | None:
    try:
        values = [int(s) for s in v.split(",") if s.strip()]
    except ValueError:
        return "must be comma-separated integers, e.g. 16,32,32"
    return None if values and all(x > 0 for x in values) else "must be comma-separated positive integers"


def _modality_list(v: str) -> str | None:
    names = [s.strip() for s in v.split(",") if s.strip()]
    unknown = [n for n in names if n not in MODALITIES]
    if not names or unknown:
        return f"must be comma-separated modalities from {', '.join(MODALITIES)}" + (
            f" (unknown: {', '.join(unknown)})" if unknown else "")
    return None


def _family(v: str) -> str | None:
    from models.fusion import FUSIONS

    return None if v in FUSIONS else f"choose one of {', '.join(FUSIONS)} (models.fusion.FUSIONS)"


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


# ---------------------------------------------------------------------------------------------------- schema
_KEYS: tuple[Key, ...] = (
    # run
    Key("num-server-rounds", int, "run", "federated rounds", _at_least(1)),
    Key("seed", int, "run", "seed of model initialisation and of simulated data; never of a site's DP noise"),
    # local training
    Key("local-epochs", int, "train", "local epochs per round", _at_least(1)),
    Key("lr", float, "train", "site learning rate", _at_least(0, strict=True)),
    Key("lr-base-scale", float, "train", "learning-rate factor for the trained parameters that no modality added to "
        "dp-trainable owns (the pretrained heads of head+ct+us) against those the +modalities own; 1, or a set "
        "without +modalities = one rate",
        lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
    Key("lr-schedule", str, "train", "learning rate over the run's steps: constant, cosine or poly (models.schedule)",
        _one_of("constant", "cosine", "poly")),
    Key("lr-warmup", float, "train", "share of the run's steps warming the learning rate up linearly",
        _within(0, 1, high_open=True)),
    Key("balance-classes", bool, "train", "logit-adjust the classification loss by the site's class shares"),
    Key("batch-size", int, "train", "expected cases per step (DP: Poisson batch)", _at_least(1)),
    Key("proximal-mu", float, "train", "FedProx proximal weight (0 = off)", _at_least(0)),
    Key("proximal-scope", str, "train", "what the FedProx term holds near the global model: all trainable "
        "parameters, or only the modality encoders", _one_of(*PROXIMAL_SCOPES)),
    Key("conv-backward", str, "train", "CPU convolution backward: fast (models/fast_conv.py) or stock (PyTorch's); "
        "same gradients", _one_of(*CONV_BACKWARDS)),
    Key("augment-multiplicity", int, "train", "0 = no site augmentation; K >= 1: K augmented views (flips, intensity "
        "scale/shift) of each case per step, the case's gradient is their mean (taken before DP clipping)",
        _at_least(0)),
    Key("optimizer", str, "train", "site optimizer: adam, sgd (momentum 0.9) or adam-bc (DP-Adam with the noise "
        "variance taken out of the second moment, Tang et al. 2024)", _one_of(*OPTIMIZERS)),
    Key("optimizer-state", str, "train", "keep: the site keeps its optimizer state across the rounds of a run "
        "(tensors in its state directory); reset: each round starts a fresh optimizer", _one_of("reset", "keep")),
    # patient-level DP
    Key("dp-enabled", bool, "dp", "train with DP-SGD (a site may refuse false)"),
    Key("dp-target-epsilon", float, "dp", "epsilon a site plans to spend over the run", _at_least(0, strict=True)),
    Key("dp-delta", float, "dp", "delta epsilon is reported at", _within(0, 1, high_open=True)),
    Key("dp-noise-multiplier", float, "dp", "noise std / clipping norm; 0 = derive from dp-target-epsilon",
        _at_least(0)),
    Key("dp-max-grad-norm", float, "dp", "per-case clipping norm", _at_least(0, strict=True)),
    Key("dp-trainable", str, "dp", "parameters the sites train (all, shared = not modality-owned, head = prediction "
        "heads, none; +m adds modality m's parameters, e.g. head+ct+us or none+ct+us; models/trainable.py); the "
        "rest keeps the global values, is not noised and not sent", trainable_problem),
    Key("dp-accountant", str, "dp", "how epsilon is computed from the site's ledger: rdp (Renyi DP) or prv "
        "(Opacus's PRV accountant, tighter)", _one_of(*ACCOUNTANTS)),
    # model
    Key("model-family", str, "model", "fusion family", _family),
    Key("model-modalities", str, "model", "comma-separated modalities of the network", _modality_list),
    Key("model-spatial-dims", int, "model", "2 (slices) or 3 (volumes)", _within(2, 3)),
    Key("model-spatial-size", str, "model", "input grid, comma-separated (D,H,W or H,W)", _positive_ints),
    Key("model-channels", str, "model", "encoder widths per level, comma-separated", _positive_ints),
    Key("model-attention-heads", int, "model", "cross-modal attention heads", _at_least(1)),
    Key("model-modality-dropout", float, "model", "training probability of dropping a present modality",
        _within(0, 1, high_open=True)),
    Key("model-modality-dropout-mode", str, "model", "independent (each present modality dropped with the dropout "
        "probability) or subsets (a uniform non-empty subset of them, for a share 2 x dropout of the cases)",
        _one_of(*MODALITY_DROPOUT_MODES)),
    Key("model-single-modality-loss", float, "model", "weight of the training loss on one present modality per case "
        "(fusion and decoder run again on it alone; 0 = off); under DP-SGD, which takes one pass per layer, > 0 "
        "with augment-multiplicity >= 2 makes each case's last view one modality alone instead (a 1/K share)",
        _at_least(0)),
    Key("model-dropout", float, "model", "dropout before the classifier", _within(0, 1, high_open=True)),
    # server
    Key("strategy", str, "server", "Flower strategy (the server's registry: server.strategies)", _non_empty),
    Key("aggregation", str, "server", "modality-aware or plain averaging", _one_of("modality-aware", "plain")),
    Key("fraction-train", float, "server", "fraction of sites sampled for training", _within(0, 1)),
    Key("fraction-evaluate", float, "server", "fraction of sites sampled for evaluation", _within(0, 1)),
    Key("min-train-nodes", int, "server", "fewest sites a training round needs", _at_least(0)),
    Key("min-evaluate-nodes", int, "server", "fewest sites an evaluation round needs", _at_least(0)),
    Key("min-available-nodes", int, "server", "fewest connected sites to start a round", _at_least(0)),
    Key("round-timeout", float, "server", "seconds a round waits for replies", _at_least(0, strict=True)),
    Key("prepare-sites", bool, "server", "before round 1, ask every site to build its runtime (imports, data, "
        "network, DP engine) so that round 1 costs what later rounds cost"),
    Key("server-lr", float, "server", "fedadam: server learning rate (eta)", _at_least(0, strict=True)),
    Key("trimmed-beta", float, "server", "trimmed-mean: fraction cut at each end", _within(0, 0.5, high_open=True)),
    Key("krum-malicious", int, "server", "krum: assumed number of malicious sites", _at_least(0)),
    Key("update-norm-factor", float, "server", "reject updates whose norm exceeds this x the round's (low) median "
        "or this x the global model's norm",
        _at_least(1, strict=True)),
    Key("server-ema", float, "server", "decay of the server's moving average of the global weights, which is "
        "evaluated and saved as best.pt (post-processing); 0 = off", _within(0, 1, high_open=True)),
    Key("claim-factor", float, "server", "reject a site whose first claimed num-examples exceeds this x the median "
        "claim (later claims may not exceed the first)", _at_least(1, strict=True)),
    # global evaluation
    Key("eval-every", int, "eval", "held-out evaluation every N rounds (0 = after the last only)", _at_least(0)),
    Key("eval-subsets", str, "eval", "modality subsets of the held-out evaluations before the last round (the last "
        "evaluates every subset): full+singles, all or full", _one_of("full+singles", "all", "full")),
    Key("best-metric", str, "eval", "metric that picks checkpoints/best.pt on the selection set (subset-mean/<m>: "
        "<m> averaged over select-subsets; else the exact key, all/<m> or mean/<m>)", _non_empty),
    Key("select-subsets", str, "eval", "modality subsets of the selection set's evaluation, whose mean picks "
        "best.pt: full+singles, all or full", _one_of("full+singles", "all", "full")),
    Key("eval-batch-size", int, "eval", "held-out cases per forward pass", _at_least(1)),
    Key("device", str, "eval", "server evaluation device: auto, cpu, cuda, cuda:N", _non_empty),
    Key("eval-hd95", str, "eval", "HD95 in global evaluation: full (full set only), all or none",
        _one_of("full", "all", "none")),
    # where things are
    Key("data-dir", str, "paths", "simulation: folder of site-* folders (+ heldout/)"),
    Key("test-dir", str, "paths", "held-out set the reported numbers come from ('' = <data-dir>/heldout)"),
    Key("select-dir", str, "paths", "model-selection set for checkpoints/best.pt ('' = <data-dir>/validation when it "
        "exists, else the held-out set itself, with a warning)"),
    Key("unseen-dir", str, "paths", "held-out cohort from an unseen scanner, evaluated after the last round ('' = "
        "<data-dir>/heldout-unseen when it exists)"),
    Key("run-dir", str, "paths", "run directory (config, metrics, checkpoints, report)", _non_empty),
    Key("resume", str, "paths", "'' = fresh run; a run directory = continue it from its last checkpoint"),
    Key("init-checkpoint", str, "paths", "'' = initial weights from seed; a fedfusion checkpoint file = the round-0 "
        "global model (its model config must be the run's)"),
    # client-level protection
    Key("client-dp", str, "client-dp", "Flower's client-level DP wrappers: none, server-side, client-side",
        _one_of("none", "server-side", "client-side")),
    Key("client-dp-noise", float, "client-dp", "noise multiplier of the client-level mechanism", _at_least(0)),
    Key("client-dp-clip", float, "client-dp", "clipping norm of each site's update", _at_least(0, strict=True)),
    Key("secagg", bool, "client-dp", "SecAgg+ (refused: see docs/server.md)"),
)


def _index(keys: Iterable[Key]) -> dict[str, Key]:
    out: dict[str, Key] = {}
    for k in keys:
        if k.name in out:
            raise AssertionError(f"run config key {k.name!r} is defined twice in the schema")
        out[k.name] = k
    return out


#: Every run-config key, by name (exactly one definition each; tests/test_runconfig.py checks pyproject agrees).
SCHEMA: dict[str, Key] = _index(_KEYS)

_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


# ------------------------------------------------------------------------------------------------ reading
@functools.lru_cache(maxsize=4)
def _pyproject_table(project_dir: Path) -> tuple[tuple[str, ConfigValue], ...]:
    path = project_dir / "pyproject.toml"
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise FileNotFoundError(
            f"{path} not found: fedfusion's run configuration lives in the project's pyproject.toml; run fedfusion "
            "from a checkout (pip install -e .) or a Flower app bundle"
        ) from exc
    try:
        table = data["tool"]["flwr"]["app"]["config"]
    except KeyError as exc:
        raise KeyError(f"{path} has no [tool.flwr.app.config] table") from exc
    return tuple(table.items())


def defaults(project_dir: Path = PROJECT_DIR) -> dict[str, ConfigValue]:
    """The run config pyproject.toml's ``[tool.flwr.app.config]`` holds, validated against :data:`SCHEMA`.

    Raises:
        RunConfigError: a key of the table that the schema lacks, a schema key the table lacks, or a bad value.
    """
    table = dict(_pyproject_table(Path(project_dir)))
    missing = sorted(set(SCHEMA) - set(table))
    if missing:
        raise RunConfigError(missing[0], f"is in the schema but not in {project_dir / 'pyproject.toml'} "
                             "[tool.flwr.app.config]; every key needs its default there")
    return _typed(table)


def coerce(key: str, value: Any) -> ConfigValue:
    """``value`` (a TOML value, a Flower ``ConfigRecord`` value or a CLI string) as ``key``'s type, checked.

    Raises:
        RunConfigError: unknown key, unreadable or invalid value.
    """
    spec = SCHEMA.get(key)
    if spec is None:
        raise RunConfigError(key, "is not a run config key; valid keys (pyproject.toml [tool.flwr.app.config]): "
                             + ", ".join(SCHEMA))
    try:
        typed = as_kind(value, spec.kind)
    except (TypeError, ValueError, OverflowError):
        raise RunConfigError(key, f"cannot read {value!r} as {_KIND_NAMES[spec.kind]} ({spec.help})") from None
    problem = spec.check(typed) if spec.check is not None else None
    if problem:
        raise RunConfigError(key, f"{typed!r} {problem} ({spec.help})")
    return typed


def as_kind(value: Any, kind: type) -> ConfigValue:
    """``value`` as ``kind`` (``bool``: true/false/1/0/yes/no/on/off; ``int``; ``float``; ``str``); the one parser of
    config values (run config, site policy). Raises ``ValueError``/``TypeError`` when it cannot."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise ValueError(value)
    if isinstance(value, bool):  # True is an int in Python; a boolean where a number belongs is a mistake
        raise TypeError(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value) if not isinstance(value, str) else int(value.strip())
    if kind is float:
        out = float(value)
        if math.isnan(out):
            raise ValueError(value)
        return out
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if not isinstance(value, (str, int, float)):
        raise TypeError(value)
    return str(value).strip()


def _typed(values: Mapping[str, Any]) -> dict[str, ConfigValue]:
    return {key: coerce(key, value) for key, value in values.items()}


def validate(run_config: Mapping[str, Any], project_dir: Path = PROJECT_DIR) -> dict[str, ConfigValue]:
    """The complete, typed, checked run config: ``run_config``'s values over pyproject's defaults.

    Flower hands apps the FAB's defaults merged with the submitter's overrides, so a key is missing only when a
    caller builds a partial config by hand (tests, benches); it then takes pyproject's default.

    Raises:
        RunConfigError: an unknown key or a bad value, naming the key.
    """
    typed = _typed(run_config)
    base = defaults(project_dir) if set(SCHEMA) - set(typed) else {}
    return {**base, **typed}


def load(overrides: Mapping[str, Any] | None = None, project_dir: Path = PROJECT_DIR) -> dict[str, ConfigValue]:
    """pyproject's defaults with ``overrides`` applied (``None`` values are ignored), validated."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return validate({**defaults(project_dir), **given}, project_dir)


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings (the CLI's ``--set``) as a dict; the schema checks them later."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip().strip("'\"")
    return out


# ----------------------------------------------------------------------------------------------- sections
S = TypeVar("S")


def section(cls: type[S], run_config: Mapping[str, Any], prefix: str = "") -> S:
    """An instance of the dataclass ``cls`` whose field ``a_b`` holds key ``<prefix>a-b`` of the validated config.

    Raises:
        RunConfigError: bad values; AssertionError when ``cls`` has a field the schema lacks (a programming error).
    """
    rc = validate(run_config)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        key = prefix + f.name.replace("_", "-")
        assert key in SCHEMA, f"{cls.__name__}.{f.name} has no run config key {key!r} in the schema"
        kwargs[f.name] = rc[key]
    return cls(**kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Local training of one round (keys without prefix; see :data:`SCHEMA` for meanings)."""

    local_epochs: int
    lr: float
    lr_base_scale: float
    lr_schedule: str
    lr_warmup: float
    balance_classes: bool
    batch_size: int
    proximal_mu: float
    proximal_scope: str
    conv_backward: str
    seed: int
    num_server_rounds: int
    augment_multiplicity: int
    optimizer: str
    optimizer_state: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "TrainConfig":
        return section(cls, run_config)


@dataclass(frozen=True)
class DPConfig:
    """What a run asks of the sites' patient-level DP (keys ``dp-*``). A site checks it against its own policy.

    Attributes:
        enabled: train with DP-SGD.
        target_epsilon: epsilon the run plans to spend over all its rounds (used when deriving the noise).
        delta: delta epsilon is computed at.
        noise_multiplier: Gaussian noise std / clipping norm; 0 = derive from ``target_epsilon``.
        max_grad_norm: per-case clipping norm (L2).
        trainable: the parameter set the sites train (:func:`models.trainable.parse_trainable`; also without DP).
        accountant: how epsilon is computed from the ledger (:data:`ACCOUNTANTS`).
    """

    enabled: bool
    target_epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    trainable: str
    accountant: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "DPConfig":
        return section(cls, run_config, prefix="dp-")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in str(text).split(",") if s.strip())


def model_config(run_config: Mapping[str, Any]) -> ModelConfig:
    """The :class:`~models.config.ModelConfig` of the run config's ``model-*`` keys.

    Raises:
        RunConfigError: a bad ``model-*`` value, or values that do not fit together (named).
    """
    rc = validate(run_config)
    try:
        return ModelConfig(
            family=str(rc["model-family"]),
            modalities=tuple(s.strip() for s in str(rc["model-modalities"]).split(",") if s.strip()),
            spatial_dims=int(rc["model-spatial-dims"]),
            spatial_size=_ints(str(rc["model-spatial-size"])),
            channels=_ints(str(rc["model-channels"])),
            attention_heads=int(rc["model-attention-heads"]),
            modality_dropout=float(rc["model-modality-dropout"]),
            dropout=float(rc["model-dropout"]),
            modality_dropout_mode=str(rc["model-modality-dropout-mode"]),
            single_modality_loss=float(rc["model-single-modality-loss"]),
        )
    except ValueError as exc:
        raise RunConfigError("model-*", str(exc)) from exc


def model_entries(cfg: ModelConfig) -> dict[str, ConfigValue]:
    """The ``model-*`` run-config entries of ``cfg`` (inverse of :func:`model_config`)."""
    return {
        "model-family": cfg.family,
        "model-modalities": ",".join(cfg.modalities),
        "model-spatial-dims": cfg.spatial_dims,
        "model-spatial-size": ",".join(str(s) for s in cfg.spatial_size),
        "model-channels": ",".join(str(c) for c in cfg.channels),
        "model-attention-heads": cfg.attention_heads,
        "model-modality-dropout": cfg.modality_dropout,
        "model-modality-dropout-mode": cfg.modality_dropout_mode,
        "model-single-modality-loss": cfg.single_modality_loss,
        "model-dropout": cfg.dropout,
    }


def default_model_config(**changes: Any) -> ModelConfig:
    """The model of pyproject's run config, with ``changes`` (ModelConfig field names) applied."""
    cfg = model_config(defaults())
    return cfg.replace(**changes) if changes else cfg
