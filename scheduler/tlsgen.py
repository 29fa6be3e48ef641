"""A self-signed CA and server certificate for a scheduler without configured TLS.

TLS stays on by default even for a first try on one machine: on first start the
scheduler writes ``ca.pem`` (give it to agents as ``coordinator.ca_file``) and a
server certificate for localhost, 127.0.0.1, ::1 and the hostname. Keys are 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gpu-scheduler"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _valid(files: TlsFiles, now: datetime.datetime) -> bool:
    if not all(p.exists() for p in (files.ca_cert, files.server_cert, files.server_key)):
        return False
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    return cert.not_valid_after_utc - now > RENEW_BEFORE


def ensure(directory: Path, now: datetime.datetime | None = None) -> TlsFiles:
    """The CA and server certificate in ``directory``, created or renewed as needed."""
    now = now or datetime.datetime.now(datetime.UTC)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if _valid(files, now):
        return files
    ca_key_path = directory / "ca.key"
    if files.ca_cert.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("gpu-scheduler local CA"))
            .issuer_name(_name("gpu-scheduler local CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(ca_key_path, _key_pem(ca_key), 0o600)
        _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    hostname = socket.gethostname()
    if hostname and hostname != "localhost":
        names.append(x509.DNSName(hostname))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(files.server_key, _key_pem(key), 0o600)
    _write(files.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info(
        "generated a self-signed TLS certificate; give agents the CA as coordinator.ca_file",
        extra={"ca_file": str(files.ca_cert), "server_cert": str(files.server_cert)},
    )
    return files


def relay_certificate(
    directory: Path, domain: str, now: datetime.datetime | None = None
) -> tuple[Path, Path]:
    """A wildcard certificate for ``*.domain`` (and ``domain``, localhost, 127.0.0.1)
    signed by the scheduler's CA, for the relay's buyer listener; made or renewed here.

    Buyers trust ``ca.pem`` (curl --cacert) or the operator configures a public one.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    files = ensure(directory, now)
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in domain)[:100]
    cert_path, key_path = directory / f"relay-{safe}.pem", directory / f"relay-{safe}.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.not_valid_after_utc - now > RENEW_BEFORE:
            return cert_path, key_path
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    loaded = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName(f"*.{domain}"),
        x509.DNSName(domain),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"*.{domain}"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(loaded, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("generated the relay's wildcard certificate", extra={"domain": domain})
    return cert_path, key_path
