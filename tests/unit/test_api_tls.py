"""The API's TLS certificate (issue 15): the generated one (issued, kept, reissued when its names
change or it nears its end) and the checks an operator's pair must pass before it is installed."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from appliance import stack
from appliance._stack import Pki, ensure_pki
from appliance._stack.api_tls import (
    GENERATED_LIFETIME,
    ApiCertFiles,
    InvalidCertificate,
    check_operator_pair,
    ensure_generated,
    install_operator_pair,
    remove_operator_pair,
    sha256_of,
    wanted_names,
)
from appliance.cli import main
from appliance.settings import Settings, normalise_tls_name

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return ensure_pki(tmp_path / "tls")


def _sans(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in names}


def test_the_generated_certificate_is_the_stack_cas_p256_server_certificate(pki: Pki) -> None:
    assert ensure_generated(pki, ("api.example.test", "10.0.2.15"))
    cert_path, key_path = ApiCertFiles(pki.dir).generated
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pki.ca.read_bytes()))
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    assert _sans(cert_path) == {*wanted_names(()), "api.example.test", "10.0.2.15"}
    assert {"localhost", "127.0.0.1", "::1"} <= _sans(cert_path)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert GENERATED_LIFETIME <= lifetime <= GENERATED_LIFETIME + dt.timedelta(minutes=6)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert cert_path.stat().st_mode & 0o777 == 0o644


def test_it_is_kept_until_its_names_change_or_it_nears_its_end(pki: Pki) -> None:
    cert_path = ApiCertFiles(pki.dir).generated[0]
    assert ensure_generated(pki, ("a.example.test",))
    first = sha256_of(cert_path)
    assert not ensure_generated(pki, ("A.example.test",))  # The same name, normalised.
    assert sha256_of(cert_path) == first
    assert not ensure_generated(pki, ("a.example.test",), now=NOW + dt.timedelta(days=334))
    assert ensure_generated(pki, ("a.example.test",), now=NOW + dt.timedelta(days=336))
    second = sha256_of(cert_path)
    assert second != first
    assert ensure_generated(pki, ("b.example.test",))
    assert "b.example.test" in _sans(cert_path) and "a.example.test" not in _sans(cert_path)
    third = sha256_of(cert_path)
    assert ensure_generated(pki, ("b.example.test",), force=True)
    assert sha256_of(cert_path) not in (first, second, third)


def test_a_key_that_does_not_match_is_reissued(pki: Pki) -> None:
    ensure_generated(pki, ())
    cert_path, key_path = ApiCertFiles(pki.dir).generated
    other = ec.generate_private_key(ec.SECP256R1())
    key_path.write_bytes(_pem_key(other))
    assert ensure_generated(pki, ())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()


@pytest.mark.parametrize(
    "bad", ["a b", "*.example.test", "-a.test", "a..b", "x" * 64, "", "é.test"]
)
def test_names_that_are_neither_dns_names_nor_addresses_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a DNS name or an IP address"):
        normalise_tls_name(bad)
    if bad.strip():
        with pytest.raises(ValueError):
            Settings(api_tls_names=f"ok.test,{bad}")


def test_the_setting_normalises_names() -> None:
    settings = Settings(api_tls=True, api_tls_names=" Api.Example.TEST ,10.0.2.15,0:0::1,")
    assert settings.api_tls_names == ("api.example.test", "10.0.2.15", "::1")


@given(st.text(max_size=80))
def test_a_name_is_refused_or_makes_a_san(raw: str) -> None:
    try:
        name = normalise_tls_name(raw)
    except ValueError:
        return
    try:
        ipaddress.ip_address(name)
    except ValueError:
        x509.DNSName(name)  # Raises on anything that is not an IA5 DNS name.
        assert name == name.lower() and len(name) <= 253


# The operator's pair.


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _operator_pair(
    *,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    start: dt.datetime = NOW - dt.timedelta(days=1),
    end: dt.datetime = NOW + dt.timedelta(days=90),
    usages: list[x509.ObjectIdentifier] | None = None,
    ca: bool = False,
) -> tuple[bytes, bytes]:
    """A self-issued certificate for api.example.test (PEM) and its key (PEM)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.example.test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("api.example.test")]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def test_a_fit_pair_is_accepted_ec_or_rsa_with_or_without_eku() -> None:
    check_operator_pair(*_operator_pair(usages=[ExtendedKeyUsageOID.SERVER_AUTH]))
    check_operator_pair(*_operator_pair())
    check_operator_pair(*_operator_pair(key=rsa.generate_private_key(65537, 2048)))


def test_a_chain_with_the_leaf_first_is_accepted() -> None:
    leaf, key = _operator_pair()
    other, _ = _operator_pair()
    assert check_operator_pair(leaf + other, key).public_bytes(serialization.Encoding.PEM) == leaf


@pytest.mark.parametrize(
    ("pair", "reason"),
    [
        (lambda: (_operator_pair()[0], _operator_pair()[1]), "does not match"),
        (lambda: _operator_pair(end=NOW - dt.timedelta(days=1)), "expired"),
        (lambda: _operator_pair(start=NOW + dt.timedelta(days=1)), "not valid before"),
        (lambda: _operator_pair(usages=[ExtendedKeyUsageOID.CLIENT_AUTH]), "lacks serverAuth"),
        (lambda: _operator_pair(ca=True), "CA certificate"),
        (lambda: (b"not a certificate", _operator_pair()[1]), "not PEM"),
        (lambda: (_operator_pair()[0], b"not a key"), "not a PEM private key"),
        (lambda: _operator_pair(key=rsa.generate_private_key(65537, 1024)), "at least 2048"),
    ],
)
def test_an_unfit_pair_is_refused_with_its_reason(pair: object, reason: str) -> None:
    cert, key = pair()  # type: ignore[operator]
    with pytest.raises(InvalidCertificate, match=reason):
        check_operator_pair(cert, key)


def test_an_encrypted_key_is_refused() -> None:
    cert, _ = _operator_pair()
    key = ec.generate_private_key(ec.SECP256R1())
    cert, _ = _operator_pair(key=key)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass"),
    )
    with pytest.raises(InvalidCertificate, match="encrypted"):
        check_operator_pair(cert, encrypted)


def test_install_then_remove_switches_the_served_pair(pki: Pki) -> None:
    files = ApiCertFiles(pki.dir)
    ensure_generated(pki, ())
    assert files.served() == files.generated and not files.operator_supplied
    cert, key = _operator_pair()
    install_operator_pair(files, cert, key, owner=None)
    assert files.served() == files.operator and files.operator_supplied
    assert files.operator[0].read_bytes() == cert and files.operator[1].read_bytes() == key
    assert files.operator[1].stat().st_mode & 0o777 == 0o600
    assert remove_operator_pair(files)
    assert files.served() == files.generated
    assert not remove_operator_pair(files)


def test_the_cli_refuses_a_mismatched_pair_with_exit_2_and_writes_nothing(
    pki: Pki, tmp_path: Path
) -> None:
    state = pki.dir.parent
    (state / "stack.json").write_text(json.dumps({"ports": {}, "api_tls": True}))
    ensure_generated(pki, ())
    before = {p.name: p.read_bytes() for p in pki.dir.iterdir()}
    cert_file, key_file = tmp_path / "op.crt", tmp_path / "op.key"
    cert_file.write_bytes(_operator_pair()[0])
    key_file.write_bytes(_operator_pair()[1])
    result = CliRunner().invoke(
        main,
        [
            "--state",
            str(state),
            "api-cert",
            "install",
            "--cert",
            str(cert_file),
            "--key",
            str(key_file),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "the key does not match the certificate" in result.output
    assert {p.name: p.read_bytes() for p in pki.dir.iterdir()} == before


def test_the_api_is_started_with_and_exports_the_served_pair_only_when_tls_is_on(
    pki: Pki,
) -> None:
    state = pki.dir.parent
    ports = stack.load_ports(state, dict.fromkeys(stack.DEFAULT_PORTS, 0))
    files = ApiCertFiles(pki.dir)
    (state / "stack.json").write_text(json.dumps({"ports": vars(ports)}))
    assert "--tls-cert" not in stack._argv("api", ports, state, {})
    assert not set(files.generated) & set(stack.service_files(state, "api")["tls"])
    assert stack.api_url(state).startswith("http://")

    (state / "stack.json").write_text(json.dumps({"ports": vars(ports), "api_tls": True}))
    ensure_generated(pki, ())
    argv = stack._argv("api", ports, state, {})
    assert argv[argv.index("--tls-cert") + 1 :][:3] == [
        str(files.generated[0]),
        "--tls-key",
        str(files.generated[1]),
    ]
    assert set(files.generated) <= set(stack.service_files(state, "api")["tls"])
    assert not set(files.generated) & set(stack.service_files(state, "worker")["tls"])
    assert stack.api_url(state) == f"https://127.0.0.1:{ports.api}"

    install_operator_pair(files, *_operator_pair(), owner=None)
    argv = stack._argv("api", ports, state, {})
    assert argv[argv.index("--tls-cert") + 1] == str(files.operator[0])
    exported = set(stack.service_files(state, "api")["tls"])
    assert set(files.operator) <= exported and not set(files.generated) & exported
