"""Static checks of the deployment files (Docker is not available here) and of the key material they expect.

The compose file, Dockerfile and systemd units must run the same commands as the loopback tests: both are
compared with the argument builders of :mod:`fedfusion.deployment` that ``tests/test_deployment_*.py`` use.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import stat
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from common import flwr_cli
from fedfusion import deployment as dep
from client.daemon import format_node_config
from fedfusion.commands import certs

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _site_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if name.startswith("site-")}


def _mounts(svc: dict) -> dict[str, str]:
    """container path -> host source (or named volume) of a compose service."""
    out = {}
    for vol in svc.get("volumes", []):
        parts = vol.split(":")
        out[parts[1]] = parts[0]
    return out


# ------------------------------------------------------------------------------------------------ compose
def test_compose_builds_the_dockerfile_and_names_existing_paths(compose: dict) -> None:
    services = compose["services"]
    assert {"keys", "superlink", "register", "admin", "site-01", "site-02", "site-03"} <= set(services)
    for name, svc in services.items():
        build = svc["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context should be the repository root"
        assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
    # scripts the containers run exist in the repository (and are copied into the image)
    register_cmd = services["register"]["command"]
    assert (ROOT / register_cmd[1]).is_file()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY deploy/scripts deploy/scripts" in dockerfile
    # every host path mounted that is part of the repository layout exists or is documented as generated
    readme = (DEPLOY / "README.md").read_text()
    for svc in services.values():
        for container, source in _mounts(svc).items():
            if source.startswith("./"):
                top = source.split("/")[1]
                assert top in ("certs", "data", "runs"), source
                assert f"deploy/{top}" in readme, f"README must say how to create deploy/{top} ({source})"


def test_each_site_mounts_its_own_data_state_and_key(compose: dict) -> None:
    sites = _site_services(compose)
    assert len(sites) == 3
    seen_data, seen_state, seen_keys = set(), set(), set()
    for name, svc in sites.items():
        mounts = _mounts(svc)
        data, state, keys = mounts["/data"], mounts["/state"], mounts["/keys"]
        assert name in data and name in state and name in keys, f"{name} mounts another site's folders: {mounts}"
        assert svc["volumes"][0].endswith(":ro"), "site data is mounted read-only"
        assert state in compose["volumes"], f"{name}: state must be a persistent named volume"
        seen_data.add(data), seen_state.add(state), seen_keys.add(keys)
        # no site sees another site's data
        for other in sites:
            if other != name:
                assert all(other not in src for src in mounts.values())
    assert len(seen_data) == len(seen_state) == len(seen_keys) == 3


def test_compose_superlink_is_the_tested_command_tls_auth_sqlite(compose: dict) -> None:
    svc = compose["services"]["superlink"]
    expected = dep.superlink_command(
        database="/state/superlink.db",
        tls=dep.ServerTLS(Path("/certs/server.pem"), Path("/certs/server.key"), Path("/certs/ca.pem")),
        host="0.0.0.0",
        port=dep.DEFAULT_SUPERLINK_PORT,
    )
    assert [str(c) for c in svc["command"]] == expected
    assert "--enable-supernode-auth" in expected and "--ssl-certfile" in expected
    mounts = _mounts(svc)
    assert mounts["/state"] in compose["volumes"], "the SQLite database must live on a persistent volume"
    assert svc["ports"] == [f"{dep.DEFAULT_SUPERLINK_PORT}:{dep.DEFAULT_SUPERLINK_PORT}"], "publish the Fleet API only"


def test_compose_control_api_is_reached_only_from_the_superlinks_network_namespace(compose: dict) -> None:
    """The Control API (runs, key registration) listens on the SuperLink container's loopback; only the one-shot
    registration and the administrator's flwr share that namespace, the sites connect to the Fleet port."""
    services = compose["services"]
    cmd = [str(c) for c in services["superlink"]["command"]]
    control = cmd[cmd.index("--control-address") + 1]
    assert control == dep.DEFAULT_CONTROL_ADDRESS and control.startswith("127.0.0.1:")
    for name in ("register", "admin"):
        svc = services[name]
        assert svc["network_mode"] == "service:superlink", name
        argv = [str(c) for c in svc.get("entrypoint", [])] + [str(c) for c in svc["command"]]
        assert argv[argv.index("--superlink") + 1] == control, name
    assert services["admin"]["profiles"] == ["admin"], "the admin tool never starts with `up`"
    for name, svc in _site_services(compose).items():
        assert "network_mode" not in svc, name
        assert f"superlink:{dep.DEFAULT_SUPERLINK_PORT}" in [str(c) for c in svc["command"]], name


def test_compose_keys_are_installed_for_the_image_user_one_volume_per_service(compose: dict) -> None:
    """The containers run as uid 10001 and could not read the host user's 0600 keys: the one-shot ``keys`` service
    (root, no network) copies each service's key folder into a named volume that only that service mounts."""
    services = compose["services"]
    keys = services["keys"]
    assert keys["user"] == "0:0" and keys["network_mode"] == "none" and keys["restart"] == "no"
    cmd = [str(c) for c in keys["command"]]
    assert cmd[cmd.index("--owner") + 1] == f"{dep.IMAGE_UID}:{dep.IMAGE_UID}"
    assert f"--uid {dep.IMAGE_UID}" in (DEPLOY / "Dockerfile").read_text(), "the image's user is the keys' owner"
    installs = dict(a.split("=") for a in cmd if a.startswith("/src/"))  # host folder (in /src) -> volume mount
    keys_mounts = _mounts(keys)
    assert keys_mounts["/src"] == "./certs"
    wanted = {"superlink": ("/certs", "/src/superlink")}
    wanted.update({name: ("/keys", f"/src/supernodes/{name}") for name in _site_services(compose)})
    for service, (key_path, folder) in wanted.items():
        volume = _mounts(services[service])[key_path]
        assert volume in compose["volumes"], f"{service}: its keys come from a named volume, not host files"
        assert keys_mounts[installs[folder]] == volume, f"{service}: {folder} is not installed into {volume}"
        users = sorted(n for n, svc in services.items() if volume in _mounts(svc).values())
        assert users == sorted(["keys", service]), f"{volume} is mounted by {users}"
    assert services["superlink"]["depends_on"]["keys"]["condition"] == "service_completed_successfully"


def test_install_keys_gives_the_files_to_the_image_user_with_private_modes(tmp_path: Path) -> None:
    made = certs.make_deployment_keys(tmp_path / "certs", "localhost", 1)
    owned: list[tuple[str, int, int]] = []
    written = dep.install_keys(made.sites[0].private_key.parent, tmp_path / "vol",
                               chown=lambda path, uid, gid: owned.append((path, uid, gid)))
    assert sorted(f.name for f in written) == ["ca.pem", "node.key", "node.pub"]
    assert {(uid, gid) for _, uid, gid in owned} == {(dep.IMAGE_UID, dep.IMAGE_UID)}
    assert sorted(Path(p).name for p, _, _ in owned) == ["ca.pem", "node.key", "node.pub", "vol"]
    assert stat.S_IMODE(os.stat(tmp_path / "vol").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "vol" / "node.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "vol" / "ca.pem").st_mode) == 0o644
    assert (tmp_path / "vol" / "node.key").read_bytes() == made.sites[0].private_key.read_bytes()
    # the script the compose file runs: real chown to ourselves (root is needed for uid 10001)
    import subprocess

    out = subprocess.run([sys.executable, str(DEPLOY / "scripts" / "install_keys.py"), "--owner",
                          f"{os.getuid()}:{os.getgid()}", f"{made.server_cert.parent}={tmp_path / 'sl'}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "sl" / "server.key").st_mode) == 0o600
    with pytest.raises(FileNotFoundError, match="no key files"):
        dep.install_keys(tmp_path / "missing", tmp_path / "x")


@pytest.mark.parametrize("path, forwarded", [
    ("/v1/fleet/pull-messages", True), ("/v1/fleet/get-fab", True), ("/v1/control/start-run", False),
    ("/v1/control/register-supernode", False), ("/v1/runtime/pull-messages", False), ("/v1/fleet/../control/list-runs",
                                                                                      False),
    ("/v1/fleet//x", False), ("/docs", False), ("/health", False), ("/v1/fleetx/pull-messages", False),
])
def test_fleet_listener_forwards_only_fleet_api_paths(path: str, forwarded: bool) -> None:
    import asyncio

    from fedfusion.superlink import FleetOnly

    reached: list[str] = []
    sent: list[dict] = []

    async def inner(scope: dict, receive: object, send: object) -> None:
        reached.append(scope["path"])

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(FleetOnly(inner)({"type": "http", "path": path, "root_path": ""}, None, send))  # type: ignore[arg-type]
    assert (reached == [path]) is forwarded
    if not forwarded:
        assert sent[0]["status"] == 404


def test_compose_sites_run_the_tested_site_command(compose: dict) -> None:
    expected = dep.site_command(
        data="/data", superlink=f"superlink:{dep.DEFAULT_SUPERLINK_PORT}", state="/state",
        root_certificates="/keys/ca.pem", private_key="/keys/node.key",
    )
    for name, svc in _site_services(compose).items():
        assert [str(c) for c in svc["command"]] == expected, name
        assert svc["depends_on"]["register"]["condition"] == "service_completed_successfully"


def test_nothing_insecure_by_default() -> None:
    for path in [DEPLOY / "docker-compose.yml", DEPLOY / "Dockerfile", *sorted((DEPLOY / "systemd").glob("*.service"))]:
        assert "--insecure" not in path.read_text(), f"{path.name} must not run insecure by default"


def test_insecure_builders_warn(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(UserWarning, match="insecure"):
        cmd = dep.superlink_command(database="x.db", tls=None, insecure=True)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    assert "WARNING: insecure mode" in capsys.readouterr().err
    with pytest.raises(ValueError, match="TLS files are required"):
        dep.superlink_command(database="x.db", tls=None)
    with pytest.raises(ValueError, match="required unless insecure"):
        dep.supernode_command(superlink="h:1", root_certificates=None, private_key=None, node_config={})


def test_dockerfile_installs_like_bare_metal_and_offline_runtime() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(\S+)\s+\S+", text, flags=re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "scripts/install.sh" in text
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
    assert re.search(r"^USER\s+fedfusion", text, flags=re.M), "the image must not run as root"
    # the image ships the packages the Flower app is made of
    for pkg in flwr_cli.APP_PACKAGES:
        assert f"COPY {pkg} {pkg}" in text
    # entry points the compose file uses exist as console scripts of this environment
    for exe in ("fedfusion", "flower-superlink", "flower-supernode", "flwr"):
        assert (VENV_BIN / exe).exists(), exe


# ------------------------------------------------------------------------------------------------ systemd
def _unit(path: Path) -> tuple[configparser.ConfigParser, dict[str, list[str]]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    multi: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            multi.setdefault(key.strip(), []).append(value.strip())
    return parser, multi


def _exec_start(multi: dict[str, list[str]]) -> list[str]:
    (line,) = multi["ExecStart"]
    argv = shlex.split(line)
    exe = Path(argv[0])
    assert exe.parent == Path("/opt/fedfusion/.venv/bin"), "units use the install of scripts/install.sh"
    assert (VENV_BIN / exe.name).exists(), f"{exe.name} is not a console script of this project's environment"
    return [exe.name, *argv[1:]]


def test_superlink_unit() -> None:
    parser, multi = _unit(DEPLOY / "systemd" / "fedfusion-superlink.service")
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    argv = _exec_start(multi)
    expected = dep.superlink_command(
        database="/var/lib/fedfusion/superlink.db", tls=dep.ServerTLS.from_dir("/etc/fedfusion/superlink"),
        host="0.0.0.0", port=dep.DEFAULT_SUPERLINK_PORT,
    )
    assert argv == expected
    assert parser["Service"]["User"] == "fedfusion"
    assert "/var/lib/fedfusion" in parser["Service"]["ReadWritePaths"]


def test_site_unit() -> None:
    parser, multi = _unit(DEPLOY / "systemd" / "fedfusion-site.service")
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    argv = _exec_start(multi)
    expected = dep.site_command(
        data="${FEDFUSION_DATA}", superlink="${FEDFUSION_SUPERLINK}", state="/var/lib/fedfusion-site",
        root_certificates="/etc/fedfusion/site/ca.pem", private_key="/etc/fedfusion/site/node.key",
    )
    assert argv == expected
    assert parser["Service"]["EnvironmentFile"] == "/etc/fedfusion/site.env"
    assert parser["Service"]["Restart"] == "on-failure"
    # Flower's home (apps are unpacked there) must be outside the state directory (ledger, policy)
    from client.supernode_guard import check_flwr_home

    env = dict(v.split("=", 1) for v in multi["Environment"])
    check_flwr_home(Path("/var/lib/fedfusion-site"), Path(env["FLWR_HOME"]))
    assert env["FLWR_HOME"] in parser["Service"]["ReadWritePaths"].split()


# ------------------------------------------------------------------------------------------------ key material
def test_certs_chain_sans_permissions_and_flower_formats(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    from flwr.cli.supernode.register import try_load_public_key

    made = certs.make_deployment_keys(tmp_path / "c", "superlink.example.org,10.1.2.3,localhost", 2)
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private in (made.ca_key, made.server_key, *(s.private_key for s in made.sites)):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600, private
    assert [s.name for s in made.sites] == ["site-01", "site-02"]
    for site in made.sites:
        key = load_ssh_private_key(site.private_key.read_bytes(), None)  # what flower-supernode does
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert try_load_public_key(site.public_key)  # what `flwr supernode register` does
        assert (site.private_key.parent / "ca.pem").read_bytes() == made.ca_cert.read_bytes()
    rows = made.supernodes_csv.read_text().splitlines()
    assert rows[0] == "site,public_key" and rows[1].startswith("site-01,ecdsa-sha2-nistp384 ")


def test_certs_refuse_to_replace_a_ca_and_reject_empty_hosts(tmp_path: Path) -> None:
    certs.make_deployment_keys(tmp_path, "localhost", 1)
    with pytest.raises(FileExistsError, match="refusing to replace"):
        certs.make_deployment_keys(tmp_path, "localhost", 1)
    with pytest.raises(ValueError, match="--hosts is empty"):
        certs.make_deployment_keys(tmp_path / "other", " , ", 1)


def test_certs_command_site_key_only(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedfusion.cli import app

    result = CliRunner().invoke(app, ["certs", "--out", str(tmp_path), "--site-key", "site-07"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "site-07" / "node.key").is_file() and (tmp_path / "site-07" / "node.pub").is_file()
    assert not (tmp_path / "ca").exists(), "--site-key makes the site's key pair only"
    again = CliRunner().invoke(app, ["certs", "--out", str(tmp_path), "--site-key", "site-07"])
    assert again.exit_code != 0 and "exists" in again.output


# ------------------------------------------------------------------------------------------------ flwr glue
def test_flwr_connection_is_read_by_flower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    flwr_cli.write_flwr_home(tmp_path / "home", "127.0.0.1:9092", ca)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    conn = read_superlink_connection(flwr_cli.CONNECTION_NAME)
    assert conn.address == "127.0.0.1:9092"
    assert Path(conn.root_certificates) == ca.resolve()
    assert read_superlink_connection(None).name == flwr_cli.CONNECTION_NAME  # made the default


def test_staging_drops_legacy_federation_tables_and_keeps_the_rest(tmp_path: Path) -> None:
    fake = tmp_path / "project"
    fake.mkdir()
    (fake / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.flwr.federations]\ndefault = "local"\n\n'
        '[tool.flwr.federations.local]\noptions.num-supernodes = 2\n\n'
        '[tool.flwr.app.config]\nlr = 0.1\n'
    )
    data = tomllib.loads((flwr_cli.stage_app(tmp_path / "app", project_dir=fake) / "pyproject.toml").read_text())
    assert "federations" not in data["tool"]["flwr"]
    assert data["project"] == {"name": "x"} and data["tool"]["flwr"]["app"]["config"] == {"lr": 0.1}


def test_staged_app_builds_a_fab_without_touching_the_checkout(tmp_path: Path) -> None:
    import zipfile
    from io import BytesIO

    from flwr.cli.build import build_fab_from_disk

    before = (ROOT / "pyproject.toml").read_bytes()
    staged = flwr_cli.stage_app(tmp_path / "app")
    data = tomllib.loads((staged / "pyproject.toml").read_text())
    assert "federations" not in data["tool"]["flwr"]
    original = tomllib.loads(before.decode())
    assert data["tool"]["flwr"]["app"] == original["tool"]["flwr"]["app"]
    fab = build_fab_from_disk(staged)
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert "client/client_app.py" in names and "pyproject.toml" in names
    assert not any(n.startswith("tests/") for n in names)
    assert (ROOT / "pyproject.toml").read_bytes() == before


def test_node_config_formatting_round_trips_through_flower() -> None:
    from flwr.common.config import parse_config_args

    cfg = {"data-dir": "/srv/data dir/site-01", "state-dir": "/var/lib/x", "max-epsilon": 8.0, "gpu": False}
    assert parse_config_args([format_node_config(cfg)]) == cfg
    with pytest.raises(ValueError, match="quotes"):
        format_node_config({"data-dir": 'a"b'})


def test_readme_names_real_commands_and_files() -> None:
    text = (DEPLOY / "README.md").read_text()
    for rel in re.findall(r"(deploy/[\w./-]+\.(?:py|yml|service|sh))", text):
        assert (ROOT / rel).exists(), f"README refers to {rel}, which does not exist"
    for needle in ("fedfusion certs", "flwr supernode register", "flwr run", "flwr ls", "flwr log", "run-dir",
                   "node.key", "--enable-supernode-auth", "--database"):
        assert needle in text, needle
