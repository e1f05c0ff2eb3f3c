"""``fedfusion certs``: the key material of a deployment (CA, SuperLink TLS certificate, SuperNode auth keys).

What it writes under ``--out`` (see ``deploy/README.md`` for who keeps which file)::

    OUT/
      ca/ca.key                 CA private key: keep OFFLINE at the coordinator; signs SuperLink certificates
      ca/ca.pem                 CA certificate: public; every site and every `flwr` user needs it
      superlink/server.key      SuperLink TLS private key: stays on the server machine
      superlink/server.pem      SuperLink TLS certificate, SANs = --hosts
      superlink/ca.pem          copy of ca/ca.pem (flower-superlink --ssl-ca-certfile)
      supernodes/site-01/node.key   SuperNode auth private key (OpenSSH EC P-384): NEVER leaves site-01
      supernodes/site-01/node.pub   its public key: sent to the coordinator, who registers it
      supernodes/site-01/ca.pem     copy of ca/ca.pem (fedfusion site --root-certificates)
      supernodes.csv            site,public key (OpenSSH): what the coordinator registers with `flwr supernode register`

Flower 1.41 formats: the SuperLink serves TLS with a PEM certificate/key signed by the CA; SuperNode
authentication uses an EC key on a NIST curve, private key in OpenSSH format
(``flower-supernode --auth-supernode-private-key``), public key in OpenSSH format
(``flwr supernode register node.pub``). ``ssh-keygen -t ecdsa -b 384 -N "" -f node.key`` makes the same pair.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from models.atomic import atomic_write

@dataclass(frozen=True)
class SiteKeys:
    """One SuperNode's authentication key pair (paths)."""

    name: str
    private_key: Path  # OpenSSH EC private key, mode 0600; stays at the site
    public_key: Path  # OpenSSH EC public key; registered at the SuperLink


@dataclass(frozen=True)
class DeploymentKeys:
    """Paths of everything :func:`make_deployment_keys` wrote."""

    out: Path
    ca_key: Path
    ca_cert: Path
    server_key: Path
    server_cert: Path
    sites: tuple[SiteKeys, ...]
    supernodes_csv: Path


def _ec_key():  # -> ec.EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())  # P-384: what Flower's docs use for node auth; TLS accepts it


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (0600), atomically."""
    atomic_write(path, lambda fh: fh.write(data), mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data), mode=0o644)


def _pem_private(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def parse_hosts(hosts: str | list[str]) -> list[str]:
    """Split ``"a.example.org,10.0.0.5"`` into names; error on an empty list."""
    items = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    out = [h.strip() for h in items if h.strip()]
    if not out:
        raise ValueError("--hosts is empty: give the SuperLink's DNS names and/or IPs, e.g. --hosts localhost,127.0.0.1")
    return out


def _san_list(hosts: list[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(out: Path, common_name: str = "fedfusion deployment CA", days: int = 3650) -> tuple[Path, Path]:
    """Create ``out/ca/ca.key`` and ``out/ca/ca.pem`` (self-signed CA, EC P-384). Returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    ca_key, ca_cert = out / "ca" / "ca.key", out / "ca" / "ca.pem"
    _write_private(ca_key, _pem_private(key))
    _write_public(ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return ca_key, ca_cert


def make_server_cert(
    ca_key_path: Path, ca_cert_path: Path, hosts: list[str], out_dir: Path, days: int = 825
) -> tuple[Path, Path]:
    """Sign a SuperLink TLS certificate for ``hosts`` (DNS names and IPs as SANs) with the CA.

    Writes ``out_dir/server.key`` (0600), ``out_dir/server.pem`` and a copy of the CA as ``out_dir/ca.pem``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = _ec_key()
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_list(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key, server_cert = out_dir / "server.key", out_dir / "server.pem"
    _write_private(server_key, _pem_private(key))
    _write_public(server_cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_public(out_dir / "ca.pem", ca_cert_path.read_bytes())
    return server_key, server_cert


def make_node_keys(out_dir: Path, name: str) -> SiteKeys:
    """Make one SuperNode authentication key pair in OpenSSH format: ``node.key`` (0600) and ``node.pub``."""
    from cryptography.hazmat.primitives import serialization

    key = _ec_key()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv_path, pub_path = out_dir / "node.key", out_dir / "node.pub"
    _write_private(priv_path, private)
    _write_public(pub_path, public + f" {name}\n".encode())
    return SiteKeys(name=name, private_key=priv_path, public_key=pub_path)


def site_names(n: int) -> list[str]:
    """``site-01 … site-NN``: the same names the phantom generator gives its site folders."""
    return [f"site-{i:02d}" for i in range(1, n + 1)]


def make_deployment_keys(
    out: Path, hosts: list[str] | str, supernodes: int | list[str], *, force: bool = False
) -> DeploymentKeys:
    """Make the CA, the SuperLink certificate for ``hosts`` and one auth key pair per SuperNode.

    Args:
        out: output folder (created).
        hosts: DNS names / IPs the SuperLink is reached at (every one becomes a SAN).
        supernodes: number of sites (named ``site-01``…) or their names.
        force: overwrite existing keys; without it an existing ``out/ca/ca.key`` is an error, because
            replacing a CA silently would cut every site off.
    """
    out = Path(out)
    host_list = parse_hosts(hosts)
    names = site_names(supernodes) if isinstance(supernodes, int) else list(supernodes)
    if isinstance(supernodes, int) and supernodes < 0:
        raise ValueError(f"--supernodes must be >= 0, got {supernodes}")
    if (out / "ca" / "ca.key").exists() and not force:
        raise FileExistsError(
            f"{out / 'ca' / 'ca.key'} exists: refusing to replace an existing CA (every site trusts it). "
            "Use another --out, or --force to start over."
        )
    ca_key, ca_cert = make_ca(out)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, host_list, out / "superlink")
    sites = []
    for name in names:
        site_dir = out / "supernodes" / name
        sites.append(make_node_keys(site_dir, name))
        _write_public(site_dir / "ca.pem", ca_cert.read_bytes())
    csv_path = out / "supernodes.csv"
    lines = ["site,public_key"] + [f"{s.name},{s.public_key.read_text().split(' ' + s.name)[0].strip()}" for s in sites]
    _write_public(csv_path, ("\n".join(lines) + "\n").encode())
    return DeploymentKeys(
        out=out, ca_key=ca_key, ca_cert=ca_cert, server_key=server_key, server_cert=server_cert,
        sites=tuple(sites), supernodes_csv=csv_path,
    )


def command(
    out: Annotated[Path, typer.Option("--out", help="Output folder for the key material.")] = Path("certs"),
    hosts: Annotated[
        str, typer.Option("--hosts", help="Comma-separated DNS names/IPs of the SuperLink (certificate SANs).")
    ] = "localhost,127.0.0.1",
    supernodes: Annotated[int, typer.Option("--supernodes", help="Number of SuperNode key pairs (site-01…).")] = 3,
    site_key: Annotated[
        str | None,
        typer.Option(
            "--site-key",
            help="Only make ONE SuperNode key pair named SITE in --out (run this at the site: the private key "
            "never leaves it; send node.pub to the coordinator).",
            metavar="SITE",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing keys.")] = False,
) -> None:
    """Make the CA, SuperLink certificate and SuperNode keys for a deployment."""
    if site_key is not None:
        target = out / site_key
        if (target / "node.key").exists() and not force:
            raise typer.BadParameter(f"{target / 'node.key'} exists; use --force to replace it", param_hint="--out")
        keys = make_node_keys(target, site_key)
        typer.echo(f"SuperNode key pair for {site_key}:\n  private (keep here, never send): {keys.private_key}\n"
                   f"  public (send to the coordinator): {keys.public_key}")
        return
    try:
        made = make_deployment_keys(out, hosts, supernodes, force=force)
    except (ValueError, FileExistsError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"CA:                {made.ca_cert}  (private key {made.ca_key}: keep offline)")
    typer.echo(f"SuperLink TLS:     {made.server_cert}, {made.server_key}  (SANs: {', '.join(parse_hosts(hosts))})")
    for s in made.sites:
        typer.echo(f"SuperNode {s.name}: {s.private_key} (stays at the site), {s.public_key} (register it)")
    typer.echo(f"Registration list: {made.supernodes_csv}")
    if shutil.which("flwr"):
        typer.echo("Register each site at the SuperLink: flwr supernode register <site>/node.pub <connection>")
