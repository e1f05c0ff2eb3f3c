"""A site's start-up work before round 1: the ``query.prepare`` handler builds and caches the runtime and training
parts without charging the privacy ledger; ``fedfusion site``'s start-up step builds the preprocessed cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import runtime
from client.client_app import prepare
from client.prepare import warm_site_cache
from client.privacy.accountant import ACCOUNTANT_FILE
from common import replies
from tests.client_helpers import context, initial_state, make_phantoms, message, run_config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("phantoms"), sites=1, cases=3, scenario="iid", fmt="nifti")


def test_prepare_builds_the_round_parts_and_charges_nothing(phantoms: Path, tmp_path: Path) -> None:
    runtime.clear_cache()
    node = {"data-dir": str(phantoms / "site-01"), "state-dir": str(tmp_path / "state")}
    reply = prepare(message("query.prepare", initial_state()), context(node, run_config()))
    assert not reply.has_error(), reply.error
    # 3 patients: too few to hold any out, so it will not evaluate
    assert dict(reply.content["metrics"]) == {"ready": 1.0, "can-evaluate": 0.0}
    rt, _ = runtime.get_runtime(node, run_config())
    assert rt.parts is not None and rt.dp is not None  # round 1 finds the DP engine built
    assert not (tmp_path / "state" / ACCOUNTANT_FILE).exists()  # nothing reserved or spent
    runtime.clear_cache()


def test_prepare_answers_a_refusal_as_round_one_would(phantoms: Path, tmp_path: Path) -> None:
    runtime.clear_cache()
    node = {"data-dir": str(phantoms / "site-01"), "state-dir": str(tmp_path / "state")}
    reply = prepare(message("query.prepare", initial_state()), context(node, run_config(**{"dp-enabled": False})))
    assert reply.has_error() and reply.error.code == replies.REFUSED_POLICY
    runtime.clear_cache()


def test_site_start_up_builds_the_preprocessed_cache(phantoms: Path, tmp_path: Path) -> None:
    assert warm_site_cache(phantoms / "site-01", tmp_path / "state") == 3
    assert len(list((tmp_path / "state" / "preprocessed").glob("*.npz"))) == 3
    assert (tmp_path / "state" / "site-salt").is_file()


def test_inspect_with_a_state_folder_builds_the_cache(phantoms: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedfusion.cli import app

    result = CliRunner().invoke(app, ["inspect", str(phantoms / "site-01"), "--state", str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "state" / "preprocessed").glob("*.npz"))) == 3
