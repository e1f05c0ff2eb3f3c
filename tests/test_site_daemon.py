"""``fedfusion site`` without a network: argument building, policy writing, and the refusal to start on bad data."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.daemon import DaemonError, SiteOptions, format_node_config, prepare, supernode_argv
from client.privacy.policy import SitePolicy
from tests.client_helpers import make_phantoms


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("ph"), sites=1, cases=2, scenario="iid", fmt="nifti") / "site-01"


def _pem(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    p.write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    return p


def test_supernode_argv_tls_auth_and_node_config(site: Path, tmp_path: Path) -> None:
    ca, key = _pem(tmp_path, "ca.pem"), _pem(tmp_path, "node.key")
    opts = SiteOptions(data=site, superlink="link.example.org:9092", state=tmp_path / "my state",
                       root_certificates=ca, auth_private_key=key, device="cpu", runtime_port=9190, site_index=3)
    guard = supernode_argv(opts, python="python3")
    # the SuperNode runs through the app-pin guard of this installation, with the site's state directory
    assert guard[:5] == ["python3", "-m", "client.supernode_guard", "--state", str((tmp_path / "my state").resolve())]
    argv = guard[guard.index("--") + 1:]
    assert argv[:2] == ["--superlink", "link.example.org:9092"]
    assert argv[argv.index("--root-certificates") + 1] == str(ca.resolve())
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert argv[argv.index("--port") + 1] == "9190" and "--insecure" not in argv
    # the node config parses back, with Flower's own parser, to what the ClientApp reads
    from flwr.common.config import parse_config_args

    parsed = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert parsed == {"data-dir": str(site.resolve()), "state-dir": str((tmp_path / "my state").resolve()),
                      "device": "cpu", "site-index": 3}


def test_tls_required_unless_insecure(site: Path, tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match="root-certificates"):
        supernode_argv(SiteOptions(data=site, superlink="h:1"), python="x")
    with pytest.raises(DaemonError, match="no such file"):
        supernode_argv(SiteOptions(data=site, superlink="h:1", root_certificates=tmp_path / "nope.pem"),
                       python="x")
    argv = supernode_argv(SiteOptions(data=site, superlink="h:1", insecure=True), python="x")
    assert "--insecure" in argv and "--root-certificates" not in argv
    with pytest.raises(DaemonError, match="quotes"):
        format_node_config({"data-dir": 'a"b'})


def test_prepare_writes_and_merges_the_policy(site: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    prepare(SiteOptions(data=site, superlink="h:1", insecure=True, state=state, max_epsilon=4.0,
                        allow_no_dp=True), python="x")
    prepare(SiteOptions(data=site, superlink="h:1", insecure=True, state=state, min_noise_multiplier=0.9),
            python="x")
    policy = SitePolicy.resolve({}, state)
    assert (policy.max_epsilon, policy.allow_no_dp, policy.min_noise_multiplier) == (4.0, True, 0.9)


def test_refuses_to_start_without_usable_case(tmp_path: Path) -> None:
    bad = tmp_path / "site-01"
    (bad / "case-0001").mkdir(parents=True)
    (bad / "case-0001" / "x.dcm").write_bytes(b"garbage")
    (bad / "labels.csv").write_text("case_id,label\ncase-0001,0\n")
    with pytest.raises(DaemonError) as err:
        prepare(SiteOptions(data=bad, superlink="h:1", insecure=True, state=tmp_path / "s"), python="x")
    assert err.value.exit_code == 2 and "no usable case" in str(err.value)

    from fedfusion.cli import app

    result = CliRunner().invoke(app, ["site", "--data", str(bad), "--superlink", "h:1", "--insecure",
                                      "--state", str(tmp_path / "s"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "s" / "privacy-policy.toml").exists()


def test_cli_dry_run_prints_the_supernode_command(site: Path, tmp_path: Path) -> None:
    from fedfusion.cli import app

    result = CliRunner().invoke(app, ["site", "--data", str(site), "--superlink", "127.0.0.1:9092", "--insecure",
                                      "--state", str(tmp_path / "s"), "--max-epsilon", "5", "--dry-run"])
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output.strip().splitlines()[-1])
    assert argv[1:3] == ["-m", "client.supernode_guard"] and "--insecure" in argv
    assert SitePolicy.resolve({}, tmp_path / "s").max_epsilon == 5.0
