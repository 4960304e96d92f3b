"""The API over TLS (issue 15), on a whole stack started by `appliance up` with APPLIANCE_API_TLS=1
(in the state's appliance.env): a signed job through `appliance submit` over HTTPS, what a
client that is not in the know gets (plain HTTP, another CA, TLS 1.1, a handshake never
finished), the operator's own certificate installed and served after a restart, and a new name
that makes `prepare` reissue the generated certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance import stack
from appliance._stack import ensure_pki
from appliance._stack.api_tls import fingerprint, sha256_of
from appliance.cli import SignedClient

from .conftest import FREE_PORTS, Stack

ADD = "def add(a, b):\n    return a + b\n"
HEADER_SECONDS = 2


def _write_env(state: Path, names: str) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / "appliance.env").write_text(
        f"APPLIANCE_API_TLS=1\nAPPLIANCE_API_TLS_NAMES={names}\n"
        f"APPLIANCE_API_HEADER_TIMEOUT_SECONDS={HEADER_SECONDS}\n"
    )
    (state / "appliance.env").chmod(0o644)


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("tls-stack")
    _write_env(state, "api.example.test")
    try:
        yield Stack(state, stack.up(state, FREE_PORTS))
    finally:
        stack.down(state)


def _address(tls_stack: Stack) -> tuple[str, int]:
    url = urlsplit(tls_stack.status["api_url"])
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


def _served_fingerprint(tls_stack: Stack) -> str:
    pem = ssl.get_server_certificate(_address(tls_stack))
    return fingerprint(ssl.PEM_cert_to_DER_cert(pem))


def _module(tmp_path: Path) -> Path:
    path = tmp_path / "add.py"
    path.write_text(ADD)
    return path


def _submit_42(tls_stack: Stack, tmp_path: Path, *extra: str) -> None:
    done = tls_stack.cli(
        "submit", str(_module(tmp_path)), "add", "--args", "[2, 40]", "--wait", *extra
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 42


def test_a_signed_job_runs_over_https_through_the_cli(tls_stack: Stack, tmp_path: Path) -> None:
    assert tls_stack.status["api_url"].startswith("https://127.0.0.1:")
    assert tls_stack.status["api_tls"]["ca"] == str(tls_stack.state / "tls" / "ca.crt")
    _submit_42(tls_stack, tmp_path)
    served = sha256_of(tls_stack.state / "tls" / "api.crt")
    assert _served_fingerprint(tls_stack) == served


def test_plain_http_to_the_tls_port_gets_no_answer(tls_stack: Stack) -> None:
    host, port = _address(tls_stack)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.get(f"http://{host}:{port}/readyz", timeout=5)


def test_a_client_trusting_another_ca_refuses_the_api(tls_stack: Stack, tmp_path: Path) -> None:
    other = ensure_pki(tmp_path / "other")
    done = tls_stack.cli(
        "submit", str(_module(tmp_path)), "add", "--args", "[2, 40]", "--ca", str(other.ca)
    )
    assert done.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr
    # Nor does the system's trust store know the stack's CA.
    client = SignedClient(tls_stack.status["api_url"], "local", tls_stack.local_key())
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        client.request("GET", "/get-result", params={"key": "x"})


def _handshake(address: tuple[str, int], version: ssl.TLSVersion) -> str:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # This client tests the protocol version only.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # Lets this client offer TLS 1.1 at all.
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(address, timeout=5) as raw, context.wrap_socket(raw) as tls:
        return str(tls.version())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_1_1_is_refused_and_1_2_accepted(tls_stack: Stack) -> None:
    assert _handshake(_address(tls_stack), ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        _handshake(_address(tls_stack), ssl.TLSVersion.TLSv1_1)


def test_a_handshake_never_finished_is_dropped_at_the_header_deadline(tls_stack: Stack) -> None:
    """uvicorn sees a TLS connection only once its handshake is done: without a deadline of
    its own, a silent client would hold the socket for asyncio's 60 s."""
    with socket.create_connection(_address(tls_stack), timeout=30) as silent:
        start = time.monotonic()
        assert silent.recv(1) == b""
        assert time.monotonic() - start < HEADER_SECONDS + 5


def _operator_ca(directory: Path) -> tuple[Path, Path, Path]:
    """An operator's own CA and a leaf for 127.0.0.1 from it: (ca.crt, leaf.crt, leaf.key)."""
    directory.mkdir()
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.operator.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("api.operator.test"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.crt", directory / "leaf.crt", directory / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _restart(tls_stack: Stack) -> None:
    stack.down(tls_stack.state)
    tls_stack.status = stack.up(tls_stack.state)


def test_install_of_a_mismatched_pair_exits_2_and_writes_nothing(
    tls_stack: Stack, tmp_path: Path
) -> None:
    _, leaf, _ = _operator_ca(tmp_path / "a")
    _, _, other_key = _operator_ca(tmp_path / "b")
    tls = tls_stack.state / "tls"
    before = {p.name: p.read_bytes() for p in tls.iterdir()}
    done = tls_stack.cli("api-cert", "install", "--cert", str(leaf), "--key", str(other_key))
    assert done.returncode == 2
    assert "the key does not match the certificate" in done.stderr
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == before


def test_an_installed_operator_certificate_is_served_after_a_restart(
    tls_stack: Stack, tmp_path: Path
) -> None:
    generated = _served_fingerprint(tls_stack)
    ca, leaf, key = _operator_ca(tmp_path / "operator")
    done = tls_stack.cli("api-cert", "install", "--cert", str(leaf), "--key", str(key))
    assert done.returncode == 0, done.stderr
    assert "appliance down && appliance up" in done.stdout
    key_copy = tls_stack.state / "tls" / "api-operator.key"
    assert key_copy.stat().st_mode & 0o777 == 0o600
    if tls_stack.status["service_users"].get("enabled"):
        assert key_copy.owner() == "appliance-api"
    assert _served_fingerprint(tls_stack) == generated  # Read at start only.

    _restart(tls_stack)
    assert _served_fingerprint(tls_stack) == sha256_of(leaf) != generated
    shown = json.loads(tls_stack.cli("api-cert", "show", "--json").stdout)
    assert shown["operator_supplied"] and shown["sha256"] == sha256_of(leaf)
    assert tls_stack.status["api_tls"]["ca"] is None  # The system's store, or --ca.
    _submit_42(tls_stack, tmp_path, "--ca", str(ca))

    assert tls_stack.cli("api-cert", "remove").returncode == 0
    _restart(tls_stack)
    assert _served_fingerprint(tls_stack) == generated
    _submit_42(tls_stack, tmp_path)


def test_a_new_name_makes_prepare_reissue_the_certificate(tls_stack: Stack) -> None:
    cert = tls_stack.state / "tls" / "api.crt"
    before = sha256_of(cert)
    stack.prepare(tls_stack.state)
    assert sha256_of(cert) == before  # The same names: kept.
    _write_env(tls_stack.state, "api.example.test,api2.example.test,192.0.2.7")
    try:
        stack.prepare(tls_stack.state)
        shown = json.loads(tls_stack.cli("api-cert", "show", "--json").stdout)
        assert shown["sha256"] == sha256_of(cert) != before
        assert {"api2.example.test", "192.0.2.7", "localhost", "127.0.0.1"} <= set(shown["sans"])
        recorded = json.loads((tls_stack.state / "stack.json").read_text())
        assert recorded["api_tls"] is True
        assert recorded["api_tls_names"] == ["api.example.test", "api2.example.test", "192.0.2.7"]
    finally:
        _write_env(tls_stack.state, "api.example.test")
        stack.prepare(tls_stack.state)
