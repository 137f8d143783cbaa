"""TLS for the HTTPS listener: load a PEM chain, or make a self-signed one.

Certificates are generated with ``cryptography`` (pyOpenSSL's own
dependency; pyOpenSSL's certificate-building API is deprecated) and served
through pyOpenSSL by Twisted, with TLS 1.2 as the floor.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl


class TLSError(Exception):
    """The certificate or key cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class CertificatePaths:
    certificate: Path
    private_key: Path


def generated_paths(state_dir: Path) -> CertificatePaths:
    return CertificatePaths(state_dir / "tls" / "cert.pem", state_dir / "tls" / "key.pem")


def ensure_self_signed(state_dir: Path, server_name: str) -> CertificatePaths:
    """Create a self-signed certificate in state_dir once; reuse it afterwards."""
    paths = generated_paths(state_dir)
    if paths.certificate.exists() and paths.private_key.exists():
        return paths
    paths.certificate.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for candidate in {server_name, "127.0.0.1", "::1"}:
        if not candidate:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(candidate)))
        except ValueError:
            names.append(x509.DNSName(candidate))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name or "zprovd")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(paths.private_key, key_pem)
    _write_private(paths.certificate, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return paths


def names_server(paths: CertificatePaths, server_name: str) -> bool:
    """Whether the certificate's subject alternative names include ``server_name``
    (an unreadable certificate counts as naming it: loading it reports that)."""
    if not server_name:
        return True
    try:
        cert = x509.load_pem_x509_certificate(paths.certificate.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return True
    try:
        return ipaddress.ip_address(server_name) in names.get_values_for_type(x509.IPAddress)
    except ValueError:
        return server_name.lower() in (n.lower() for n in names.get_values_for_type(x509.DNSName))


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_pem_chain(paths: CertificatePaths) -> tuple[crypto.PKey, list[crypto.X509]]:
    """Read and check a key and a certificate chain (leaf first)."""
    try:
        key_pem = paths.private_key.read_bytes()
    except OSError as exc:
        raise TLSError(f"cannot read private key {paths.private_key}: {exc.strerror}") from None
    try:
        chain_pem = paths.certificate.read_bytes()
    except OSError as exc:
        raise TLSError(f"cannot read certificate {paths.certificate}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TLSError(f"{paths.private_key} is not an unencrypted PEM private key ({exc})") from None
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise TLSError(f"{paths.certificate} is not a PEM certificate chain ({exc})") from None
    if chain[0].public_key().public_numbers() != key.public_key().public_numbers():
        raise TLSError(f"{paths.certificate} does not match the private key {paths.private_key}")
    return crypto.PKey.from_cryptography_key(key), [crypto.X509.from_cryptography(c) for c in chain]


def load_client_cas(path: Path) -> list[crypto.X509]:
    """The device CAs (vendors' factory certificate authorities) to trust."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TLSError(f"cannot read client_ca {path}: {exc.strerror}") from None
    try:
        return [crypto.X509.from_cryptography(c) for c in x509.load_pem_x509_certificates(data)]
    except ValueError as exc:
        raise TLSError(f"{path} is not a PEM bundle of CA certificates ({exc})") from None


def server_context(paths: CertificatePaths, client_ca: Path | None = None) -> ssl.CertificateOptions:
    """TLS 1.2 at least.  With ``client_ca``, a client certificate is asked
    for (not required: generic files and Zoiper need none) and, when one is
    sent, the handshake fails unless it chains to one of those CAs."""
    key, chain = load_pem_chain(paths)
    options: dict = {}
    if client_ca is not None:
        options = dict(verify=True, caCerts=load_client_cas(client_ca), requireCertificate=False)
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        **options,
    )
