"""The run-config schema: one definition per pyproject key, one clear error per bad key or value, one source of
defaults, and CLI help derived from the registries."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common import runconfig
from common.runconfig import SCHEMA, DPConfig, RunConfigError, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_table() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_every_pyproject_key_has_exactly_one_schema_definition() -> None:
    table = _pyproject_table()
    assert set(table) == set(SCHEMA), f"pyproject only: {set(table) - set(SCHEMA)}; schema only: {set(SCHEMA) - set(table)}"
    # "exactly one": count Key("name", ...) literals in the schema module's source
    tree = ast.parse((ROOT / "common" / "runconfig.py").read_text())
    names = [n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Key"
             and n.args and isinstance(n.args[0], ast.Constant)]
    assert sorted(names) == sorted(table), "a key is defined twice, or not at all"
    assert runconfig.defaults() == {k: runconfig.coerce(k, v) for k, v in table.items()}


def test_no_default_is_restated_in_code() -> None:
    """The typed sections have no defaults of their own: a missing key comes from pyproject, nowhere else."""
    from dataclasses import MISSING, fields

    from models.config import ModelConfig
    from server.settings import ServerSettings

    for cls in (TrainConfig, DPConfig, ServerSettings):
        with_default = [f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING]
        assert not with_default, f"{cls.__name__} restates defaults for {with_default}"
    run_fields = {"family", "modalities", "spatial_dims", "spatial_size", "channels", "attention_heads",
                  "modality_dropout", "dropout", "modality_dropout_mode", "single_modality_loss"}
    assert not [f.name for f in fields(ModelConfig) if f.name in run_fields and f.default is not MISSING]


def test_sections_read_pyproject_defaults_and_overrides() -> None:
    table = _pyproject_table()
    train = TrainConfig.from_run_config({"lr": "0.01"})
    assert train.lr == 0.01 and train.local_epochs == table["local-epochs"]
    dp = DPConfig.from_run_config({})
    assert dp.target_epsilon == table["dp-target-epsilon"] and dp.enabled is table["dp-enabled"]
    cfg = runconfig.model_config({})
    assert ",".join(map(str, cfg.channels)) == table["model-channels"]
    assert runconfig.model_config(runconfig.model_entries(cfg)) == cfg


@pytest.mark.parametrize(
    ("config", "key", "phrase"),
    [
        ({"no-such-key": 1}, "no-such-key", "is not a run config key"),
        ({"local-epochs": "three"}, "local-epochs", "cannot read 'three' as an integer"),
        ({"local-epochs": 0}, "local-epochs", "must be >= 1"),
        ({"lr": -1.0}, "lr", "must be > 0"),
        ({"lr": "nan"}, "lr", "cannot read"),
        ({"dp-enabled": "maybe"}, "dp-enabled", "true or false"),
        ({"dp-delta": 1.5}, "dp-delta", "must be in [0, 1)"),
        ({"aggregation": "mean"}, "aggregation", "choose one of modality-aware, plain"),
        ({"model-family": "late"}, "model-family", "choose one of input, single"),
        ({"model-modalities": "t1,pet"}, "model-modalities", "unknown: pet"),
        ({"model-channels": "4,x"}, "model-channels", "comma-separated integers"),
        ({"batch-size": True}, "batch-size", "cannot read True"),
        ({"model-spatial-size": "15,32,32", "model-channels": "4,8,16"}, "model-*", "divisible by 4"),
    ],
)
def test_bad_keys_and_values_give_one_error_naming_the_key(config: dict, key: str, phrase: str) -> None:
    with pytest.raises(RunConfigError) as info:
        runconfig.model_config(runconfig.validate(config))
    assert info.value.key == key and f"run config {key!r}" in str(info.value)
    assert phrase in str(info.value)


def test_the_server_checks_its_registry_and_the_site_declines_bad_configs() -> None:
    from client.site import SiteDecline
    from client.task import train_round
    from common import replies
    from server.settings import ServerSettings

    with pytest.raises(RunConfigError, match="'strategy'.*choose one of fedavg"):
        ServerSettings.from_run_config({"strategy": "fedsgd"})
    with pytest.raises(SiteDecline) as info:
        train_round({"data-dir": "/nonexistent"}, {"lr": "fast"}, {}, 1)
    assert info.value.code == replies.BAD_REQUEST and "'lr'" in info.value.reason


def test_cli_help_lists_every_registered_family_strategy_scenario_and_experiment() -> None:
    from fedfusion.cli import app
    from models.fusion import FUSIONS
    from server.strategies import STRATEGIES
    from simulations.experiments import EXPERIMENTS
    from simulations.scenarios import SCENARIOS

    runner = CliRunner()

    def help_text(*command: str) -> str:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    simulate = help_text("simulate")
    for name in [*FUSIONS, *STRATEGIES, *SCENARIOS]:
        assert name in simulate, f"`fedfusion simulate --help` omits {name}"
    assert all(f in help_text("train-central") for f in FUSIONS)
    assert all(s in help_text("phantoms") for s in SCENARIOS)
    assert all(e in help_text("experiment") for e in EXPERIMENTS)
