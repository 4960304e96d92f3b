"""The local stack's private PKI: one CA, a loopback server certificate, one client cert per role.

Everything is EC P-256. Keys are written 0600 in a 0700 directory. `ensure_pki` is idempotent: it
keeps what exists and only issues what is missing or about to expire, always from the same CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Roles that get a TLS client certificate. `vault` is OpenBao's Redis database plugin.
CLIENT_ROLES: tuple[str, ...] = ("admin", "api", "worker", "flower", "vault")

_CA_LIFETIME = dt.timedelta(days=3650)
_LEAF_LIFETIME = dt.timedelta(days=397)
_RENEW_BEFORE = dt.timedelta(days=30)
_ORG = "sandbox-appliance local stack"


@dataclass(frozen=True)
class Pki:
    """Paths of the stack's CA, server certificate and per-role client certificates (PEM)."""

    dir: Path

    @property
    def ca(self) -> Path:
        """The CA certificate every service and client trusts."""
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The CA private key (used only by `ensure_pki` to issue certificates)."""
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The server certificate for `127.0.0.1` and `localhost`."""
        return self.dir / "server.crt"

    @property
    def server_key(self) -> Path:
        """The server certificate's private key."""
        return self.dir / "server.key"

    def client(self, role: str) -> tuple[Path, Path]:
        """The `(certificate, key)` paths of `role`'s client certificate."""
        if role not in CLIENT_ROLES:
            raise ValueError(f"unknown client role {role!r}; expected one of {CLIENT_ROLES}")
        return self.dir / f"client-{role}.crt", self.dir / f"client-{role}.key"


def ensure_pki(tls_dir: Path) -> Pki:
    """Create (or complete) the PKI in `tls_dir` and return its paths."""
    pki = Pki(tls_dir)
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    ca_cert, ca_key = _ensure_ca(pki)
    if _needs_issue(pki.server_cert, ca_cert):
        loopback = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        _issue_leaf(
            pki.server_cert,
            pki.server_key,
            ca_cert,
            ca_key,
            "localhost",
            server=True,
            sans=loopback,
        )
    for role in CLIENT_ROLES:
        cert, key = pki.client(role)
        if _needs_issue(cert, ca_cert):
            _issue_leaf(cert, key, ca_cert, ca_key, role, server=False)
    return pki


def load_ca(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The stack's CA certificate and key, which `ensure_pki` made (ValueError if it did not)."""
    if not (pki.ca.exists() and pki.ca_key.exists()):
        raise ValueError(f"no CA in {pki.dir}: run `appliance prepare` first")
    return _ensure_ca(pki)


def issue_server_leaf(
    cert_path: Path,
    key_path: Path,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    sans: list[x509.GeneralName],
    lifetime: dt.timedelta,
) -> None:
    """Issue a P-256 server certificate for `sans` from `ca`, valid for `lifetime`: the key
    written 0600 first, then the certificate (0644)."""
    _issue_leaf(
        cert_path, key_path, ca[0], ca[1], common_name, server=True, sans=sans, lifetime=lifetime
    )


def _ensure_ca(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if pki.ca.exists() and pki.ca_key.exists():
        cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
        key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{pki.ca_key} is not an EC private key")
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("sandbox-appliance local CA")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(pki.ca_key, _key_pem(key))
    _write_public(pki.ca, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issue_leaf(
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server: bool,
    sans: list[x509.GeneralName] | None = None,
    lifetime: dt.timedelta = _LEAF_LIFETIME,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _needs_issue(cert_path: Path, ca_cert: x509.Certificate) -> bool:
    """A leaf is (re)issued when missing, not from this CA, or expiring within `_RENEW_BEFORE`."""
    key_path = cert_path.with_suffix(".key")
    if not cert_path.exists() or not key_path.exists():
        return True
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return True
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if key.public_key() != cert.public_key():
        return True  # An interrupted issue left a key that does not match its certificate.
    return cert.not_valid_after_utc - _now() < _RENEW_BEFORE


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, readable by the owner only from the first byte (0600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _atomic_write(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _atomic_write(path, data, 0o644)


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically as a new file of `mode`: safe in a directory that a
    service's user may write (a symlink planted at `path` is replaced, never followed)."""
    _atomic_write(path, data, mode)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)
