"""TLS with client certificates (mTLS) on every gRPC link, from the config's `tls` section.

Every service has a name (coordinator, tokenizer, api, or a node's id) and a certificate for it,
signed by the cluster's CA. Servers require a client certificate from that CA, so only holders of
one can call them (join, forward, be forwarded to); clients check the server's certificate
against the CA *and* against the name of the service they mean to reach
(`grpc.ssl_target_name_override`), so a node cannot pose as another whatever its address.
With `tls.enabled` false every link is plaintext, as before (one host, loopback, or a network you
trust) and Join needs `coordinator.join_token`.

Certificates are checked when a service starts (present, readable, in their validity period,
signed by the CA, the key matching), so a bad one fails there with a message naming the service
and the file, instead of as an opaque handshake error on the peer.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import grpc

from pipeserve.common.config import Config, TlsConfig
from pipeserve.common.errors import ConfigError


def paths(tls: TlsConfig, name: str) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) files of service `name`."""
    return Path(tls.ca_file), Path(tls.cert_file.format(name=name)), Path(tls.key_file.format(name=name))


def _read(path: Path, what: str, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{name}: cannot read {what} {path} ({exc.strerror}); create the cluster's certificates with "
            f"`make certs` or set tls.{what}"
        ) from exc


def check_certificate(tls: TlsConfig, name: str, now: dt.datetime | None = None) -> None:
    """Raise ConfigError naming `name` and the file unless its certificate is usable now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    ca_path, cert_path, key_path = paths(tls, name)
    try:
        ca = x509.load_pem_x509_certificate(_read(ca_path, "ca_file", name))
        cert = x509.load_pem_x509_certificate(_read(cert_path, "cert_file", name))
        key = serialization.load_pem_private_key(_read(key_path, "key_file", name), password=None)
    except ValueError as exc:
        raise ConfigError(f"{name}: a TLS file is not valid PEM ({exc})") from exc
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise ConfigError(
            f"{name}: certificate {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            f"renew it (`make certs`)"
        )
    if now < cert.not_valid_before_utc:
        raise ConfigError(
            f"{name}: certificate {cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    if now > ca.not_valid_after_utc:
        raise ConfigError(
            f"{name}: the CA certificate {ca_path} expired on {ca.not_valid_after_utc:%Y-%m-%d} UTC"
        )
    if cert.issuer != ca.subject:
        raise ConfigError(
            f"{name}: certificate {cert_path} was issued by {cert.issuer.rfc4514_string()}, not by the "
            f"cluster's CA {ca.subject.rfc4514_string()} ({ca_path})"
        )
    pub = ca.public_key()
    try:
        if isinstance(pub, rsa.RSAPublicKey):
            assert cert.signature_hash_algorithm is not None
            pub.verify(
                cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
            )
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            assert cert.signature_hash_algorithm is not None
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except Exception as exc:  # cryptography's InvalidSignature
        raise ConfigError(f"{name}: certificate {cert_path} is not signed by the CA in {ca_path}") from exc
    if key.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError(f"{name}: key {key_path} does not belong to certificate {cert_path}")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if name not in dns:
        raise ConfigError(
            f"{name}: certificate {cert_path} is for {dns or 'no DNS name'}, not {name!r}: peers check that "
            f"the certificate names the service they connect to"
        )


def server_credentials(tls: TlsConfig, name: str) -> grpc.ServerCredentials:
    ca, cert, key = paths(tls, name)
    return grpc.ssl_server_credentials(
        [(_read(key, "key_file", name), _read(cert, "cert_file", name))],
        root_certificates=_read(ca, "ca_file", name),
        require_client_auth=True,
    )


def channel_credentials(tls: TlsConfig, name: str) -> grpc.ChannelCredentials:
    ca, cert, key = paths(tls, name)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "ca_file", name),
        private_key=_read(key, "key_file", name),
        certificate_chain=_read(cert, "cert_file", name),
    )


def aio_channel(
    cfg: Config, me: str, peer: str, address: str, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    """An asyncio channel from service `me` to service `peer` at `address` (TLS when enabled)."""
    if not cfg.tls.enabled:
        return grpc.aio.insecure_channel(address, options=options)
    opts = [*options, ("grpc.ssl_target_name_override", peer)]
    return grpc.aio.secure_channel(address, channel_credentials(cfg.tls, me), options=opts)


def sync_channel(
    cfg: Config | None, me: str, peer: str, address: str, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    if cfg is None or not cfg.tls.enabled:
        return grpc.insecure_channel(address, options=options or [])
    opts = [*(options or []), ("grpc.ssl_target_name_override", peer)]
    return grpc.secure_channel(address, channel_credentials(cfg.tls, me), options=opts)


def add_port(server: Any, address: str, cfg: Config | None, name: str) -> int:
    """Bind `address` on `server`, with mTLS when the config enables it; returns the port (0: failed)."""
    if cfg is None or not cfg.tls.enabled:
        return server.add_insecure_port(address)
    check_certificate(cfg.tls, name)
    return server.add_secure_port(address, server_credentials(cfg.tls, name))


def describe_failure(text: str) -> str:
    """A hint for a gRPC failure text that looks like a TLS problem (empty otherwise)."""
    t = text.lower()
    if "certificate_verify_failed" in t or "certificate verify failed" in t:
        return " (TLS: the peer's certificate was not accepted: another CA, expired, or not for this name)"
    if "handshake" in t or "ssl" in t or "tls" in t:
        return " (TLS handshake failed: is TLS enabled on both sides, with certificates from one CA?)"
    return ""
