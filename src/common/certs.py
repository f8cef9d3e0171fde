"""`make certs` / `pipeserve certs`: a CA and one certificate per service of a cluster.

Writes ca.crt (+ ca.key, keep it private: it admits new members), and <name>.crt / <name>.key for
the coordinator, the tokenizer, the API and every node of the config (plus any extra names, e.g.
replicas that will join later). Each certificate's subject alternative names are the service's
name (what peers check), localhost, 127.0.0.1 and the host of its configured address. EC P-256
keys; the CA lasts 10 years, service certificates `days` (default 825).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipeserve.common.config import Config


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pipeserve"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def make_ca(out: Path, cn: str = "", days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new CA in `out` (ca.crt, ca.key); its name carries a random tag so that errors can tell
    one cluster's CA from another's."""
    out.mkdir(parents=True, exist_ok=True)
    cn = cn or f"pipeserve cluster CA {secrets.token_hex(4)}"
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key, out / "ca.key")
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_cert(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    name: str,
    out: Path,
    hosts: Iterable[str] = (),
    days: int = 825,
    not_before: dt.datetime | None = None,
) -> Path:
    """Write <name>.crt and <name>.key signed by `ca`; returns the certificate's path."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    dns, ips = [name, "localhost"], [ipaddress.ip_address("127.0.0.1")]
    for h in hosts:
        try:
            ip = ipaddress.ip_address(h)
            if ip not in ips:
                ips.append(ip)
        except ValueError:
            if h not in dns:
                dns.append(h)
    san = [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_key(key, out / f"{name}.key")
    path = out / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def load_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())


def service_hosts(cfg: Config) -> dict[str, list[str]]:
    """Every service of the config -> the hosts it is reached at."""

    def host(address: str) -> list[str]:
        return [address.rsplit(":", 1)[0]]

    out = {
        "coordinator": host(cfg.coordinator.address),
        "tokenizer": host(cfg.tokenizer.address),
        "api": [cfg.api.host] if cfg.api.host not in ("0.0.0.0", "::") else [],
    }
    for n in cfg.nodes:
        out[n.id] = host(n.address)
    return out


def make_cluster_certs(
    cfg: Config, out: Path, extra_names: Iterable[str] = (), days: int = 825
) -> list[Path]:
    """A CA (reused when `out` has one) and a certificate for every service of `cfg` and extra names."""
    ca = load_ca(out) if (out / "ca.key").is_file() and (out / "ca.crt").is_file() else make_ca(out)
    hosts = service_hosts(cfg)
    for extra in extra_names:
        hosts.setdefault(extra, [])
    return [make_cert(ca, name, out, h, days) for name, h in hosts.items()]
