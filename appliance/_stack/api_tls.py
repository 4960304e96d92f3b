"""The API's TLS certificate (issue 15): one issued on this machine by the stack's CA, or the
operator's own.

The API is the one service that may listen on a network interface; there it serves HTTPS only.
Two pairs may live in `tls/`:

- `api.crt` / `api.key`, issued by `ensure_generated` from the stack's CA (`pki.py`): EC P-256,
  valid a year, for `localhost`, `127.0.0.1`, `::1`, this host's name and the operator's extra
  names (`APPLIANCE_API_TLS_NAMES`). `appliance prepare` reissues it when the names change or it
  expires within 30 days; a client trusts it through `tls/ca.crt`.
- `api-operator.crt` / `api-operator.key`, installed by `appliance api-cert install` after
  `check_operator_pair` accepted them: PEM, the key matches, valid now, no CA certificate, and
  serverAuth among its extended key usages (or none). When both files exist they are served
  instead of the generated pair; clients trust them through the system's store.

Keys are 0600 (given to the API's user when services run as their own users); certificates
are public (0644). The API reads its pair at start only: a new pair needs a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..settings import normalise_tls_name
from .pki import Pki, issue_server_leaf, load_ca, write_private
from .procs import StackError
from .users import RunAs

#: How long a generated certificate is valid, and how close to its end `prepare` reissues it.
GENERATED_LIFETIME = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)

#: The names every generated certificate covers: the API as the machine itself reaches it.
LOOPBACK_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

_MIN_RSA_BITS = 2048


class InvalidCertificate(StackError):
    """Raised when a certificate or key offered for the API is unusable (nothing is written)."""


@dataclass(frozen=True)
class ApiCertFiles:
    """Where the API's two possible certificate pairs live in `tls/`."""

    dir: Path

    @property
    def generated(self) -> tuple[Path, Path]:
        """The `(certificate, key)` the stack's CA issued."""
        return self.dir / "api.crt", self.dir / "api.key"

    @property
    def operator(self) -> tuple[Path, Path]:
        """The `(certificate, key)` the operator installed."""
        return self.dir / "api-operator.crt", self.dir / "api-operator.key"

    @property
    def operator_supplied(self) -> bool:
        """Whether the operator's pair is installed (both files): then it is the one served."""
        return all(path.is_file() for path in self.operator)

    def served(self) -> tuple[Path, Path]:
        """The pair the API serves: the operator's when installed, else the generated one."""
        return self.operator if self.operator_supplied else self.generated


def wanted_names(extra: Iterable[str]) -> tuple[str, ...]:
    """Every name a generated certificate must cover: loopback, this host's name, `extra`."""
    names = [*LOOPBACK_NAMES]
    try:
        names.append(normalise_tls_name(socket.gethostname()))
    except ValueError:
        pass  # A host name that is no DNS name cannot be a SAN; the other names still serve.
    names.extend(normalise_tls_name(name) for name in extra)
    return tuple(dict.fromkeys(names))


def ensure_generated(
    pki: Pki, extra_names: Iterable[str], *, force: bool = False, now: dt.datetime | None = None
) -> bool:
    """Issue `tls/api.crt` and `api.key` from the stack's CA unless the pair is there, from this
    CA, matching, for exactly the wanted names and valid beyond `RENEW_BEFORE` (or `force`).
    True when it issued."""
    names = wanted_names(extra_names)
    files = ApiCertFiles(pki.dir)
    ca = load_ca(pki)
    if not force and not _needs_issue(files, ca[0], names, now or _now()):
        return False
    cert_path, key_path = files.generated
    issue_server_leaf(
        cert_path, key_path, ca, "sandbox-appliance API", _general_names(names), GENERATED_LIFETIME
    )
    return True


def _needs_issue(
    files: ApiCertFiles, ca_cert: x509.Certificate, names: tuple[str, ...], now: dt.datetime
) -> bool:
    cert_path, key_path = files.generated
    if not cert_path.is_file() or not key_path.is_file():
        return True
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return True
    if key.public_key() != cert.public_key():
        return True  # An interrupted issue left a key that does not match its certificate.
    if set(sans) != set(_general_names(names)):
        return True
    return cert.not_valid_after_utc - now < RENEW_BEFORE


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def check_operator_pair(
    raw_cert: bytes, raw_key: bytes, now: dt.datetime | None = None
) -> x509.Certificate:
    """The leaf of an operator's certificate chain (PEM, leaf first) once it is fit to serve
    the API with `raw_key`; InvalidCertificate naming the first reason it is not."""
    now = now or _now()
    try:
        chain = x509.load_pem_x509_certificates(raw_cert)
    except ValueError as exc:
        raise InvalidCertificate(f"the certificate is not PEM: {exc}") from None
    leaf = chain[0]
    key = _load_key(raw_key)
    if key.public_key() != leaf.public_key():
        raise InvalidCertificate("the key does not match the certificate")
    if leaf.not_valid_after_utc <= now:
        raise InvalidCertificate(f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if leaf.not_valid_before_utc > now:
        raise InvalidCertificate(
            f"the certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    _check_usage(leaf)
    _check_loadable(raw_cert, raw_key)
    return leaf


def _load_key(raw_key: bytes) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(raw_key, password=None)
    except TypeError:
        raise InvalidCertificate("the key is encrypted: give it unencrypted (0600)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCertificate(f"the key is not a PEM private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= _MIN_RSA_BITS:
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    raise InvalidCertificate(
        f"the key must be EC or RSA of at least {_MIN_RSA_BITS} bits, not {type(key).__name__}"
    )


def _check_usage(leaf: x509.Certificate) -> None:
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise InvalidCertificate("the certificate is a CA certificate, not a server's")
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        raise InvalidCertificate("the certificate's extended key usage lacks serverAuth")


def _check_loadable(raw_cert: bytes, raw_key: bytes) -> None:
    """What the API will do with the pair at start: load it into a TLS server context."""
    with tempfile.TemporaryDirectory() as scratch:
        cert_path, key_path = Path(scratch) / "c.pem", Path(scratch) / "k.pem"
        write_private(cert_path, raw_cert)
        write_private(key_path, raw_key)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise InvalidCertificate(f"TLS cannot serve this pair: {exc}") from None


def install_operator_pair(
    files: ApiCertFiles, raw_cert: bytes, raw_key: bytes, owner: RunAs | None
) -> x509.Certificate:
    """Check the operator's pair (`check_operator_pair`), then install it: the key first (0600,
    to `owner` when given), then the certificate, which makes the pair the served one."""
    leaf = check_operator_pair(raw_cert, raw_key)
    cert_path, key_path = files.operator
    cert_path.unlink(missing_ok=True)  # Served again only once both files are the new ones.
    write_private(key_path, raw_key)
    write_private(cert_path, raw_cert)
    os.chmod(cert_path, 0o644)
    if owner is not None:
        owner.own(key_path, cert_path)
    return leaf


def remove_operator_pair(files: ApiCertFiles) -> bool:
    """Remove the operator's pair (the generated one is served again); True if it was there."""
    was = any(path.exists() for path in files.operator)
    for path in files.operator:
        path.unlink(missing_ok=True)
    return was


def describe(cert_path: Path, operator_supplied: bool) -> dict[str, Any]:
    """What `appliance api-cert show` prints about a served certificate (its leaf)."""
    cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(getattr(name, "value", name)) for name in sans]
    except x509.ExtensionNotFound:
        names = []
    return {
        "path": str(cert_path),
        "operator_supplied": operator_supplied,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": names,
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": fingerprint(cert.public_bytes(serialization.Encoding.DER)),
    }


def fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, as `openssl x509 -fingerprint` writes it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def sha256_of(cert_path: Path) -> str:
    """The fingerprint of the leaf in `cert_path` (see `fingerprint`)."""
    cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
