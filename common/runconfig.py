"""Run configuration: the Flower app config in pyproject.toml is the single source of truth.

CLI commands (``simulate``, ``site``, experiments) start from these defaults and override keys by name; an
unknown key is an error that lists the valid ones, exactly as ``flwr run --run-config`` refuses it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The project directory: where pyproject.toml (the Flower app) lives.
PROJECT_DIR = Path(__file__).resolve().parents[1]

ConfigValue = bool | int | float | str


def pyproject_path(project_dir: Path = PROJECT_DIR) -> Path:
    path = project_dir / "pyproject.toml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: fedfusion's run configuration lives in the project's pyproject.toml; "
            "run fedfusion from a checkout (pip install -e .) or pass the project directory"
        )
    return path


def default_run_config(project_dir: Path = PROJECT_DIR) -> dict[str, ConfigValue]:
    """The ``[tool.flwr.app.config]`` table of pyproject.toml (flat, dash-separated keys)."""
    with open(pyproject_path(project_dir), "rb") as fh:
        data = tomllib.load(fh)
    try:
        return dict(data["tool"]["flwr"]["app"]["config"])
    except KeyError as exc:
        raise KeyError(f"{pyproject_path(project_dir)} has no [tool.flwr.app.config] table") from exc


def fuse(defaults: Mapping[str, ConfigValue], overrides: Mapping[str, Any]) -> dict[str, ConfigValue]:
    """Apply ``overrides`` (``None`` values are ignored) to ``defaults``, keeping each default's type.

    Raises:
        KeyError: for a key that is not in the app config, listing the valid keys.
        ValueError: for a value that cannot take the default's type.
    """
    out = dict(defaults)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in defaults:
            raise KeyError(
                f"unknown run config key {key!r}; valid keys (pyproject.toml [tool.flwr.app.config]): "
                + ", ".join(sorted(defaults))
            )
        out[key] = coerce(key, value, defaults[key])
    return out


def coerce(key: str, value: Any, like: ConfigValue) -> ConfigValue:
    """Convert ``value`` (often a CLI string) to the type of the default ``like``."""
    try:
        if isinstance(like, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run config {key!r}: cannot read {value!r} as {type(like).__name__}") from exc


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """Parse ``KEY=VALUE`` strings (the ``--set`` CLI option)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip().strip("'\"")
    return out
