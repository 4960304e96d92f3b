"""Network connections: to a listener on the host's loopback, by any socket API or raw syscall."""

from __future__ import annotations

import time

import pytest

from .conftest import assert_status, attempt, attempt_raw

pytestmark = pytest.mark.timeout(60)

CONNECT = (
    "import socket\n"
    "def f(port):\n"
    "    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
    "    s.settimeout(1)\n"
    "    s.connect(('127.0.0.1', port))\n"
    "    s.sendall(b'escaped')\n"
    "    return 'connected'\n"
)


def _settle() -> None:
    time.sleep(0.2)  # let the listener thread record a connection that might have happened


def test_restricted_code_cannot_import_socket(sb, listener):
    outcome = attempt(sb, CONNECT, listener.port)
    assert_status(outcome, "denied", "PolicyViolation")
    _settle()
    assert listener.accepted == []


def test_raw_connect_to_host_loopback_is_refused(raw, listener):
    outcome = attempt_raw(raw, CONNECT, listener.port)
    assert_status(outcome, "runtime_error", "PermissionError")
    _settle()
    assert listener.accepted == []


@pytest.mark.parametrize(
    "call",
    [
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
        "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)",
        "socket.socket(socket.AF_INET6, socket.SOCK_STREAM)",
        "socket.socketpair()",
        "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)",
    ],
)
def test_raw_socket_creation_is_refused(raw, call):
    source = f"import socket\ndef f():\n    return str({call})\n"
    assert_status(attempt_raw(raw, source), "runtime_error", "PermissionError")


def test_raw_socket_syscall_through_ctypes_is_refused(raw, listener):
    source = (
        "import ctypes\n"
        "def f():\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    return [libc.syscall(41, 2, 1, 0), ctypes.get_errno()]\n"  # socket(2) on x86_64
    )
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "ok")
    assert outcome.value == [-1, 1]  # EPERM


def test_raw_x32_abi_syscall_kills_the_child(raw):
    # The same call through the x32 ABI (nr | 0x40000000) would dodge a naive filter; libseccomp
    # treats it as a foreign architecture and the kernel kills the child.
    source = (
        "import ctypes\ndef f():\n    return ctypes.CDLL(None).syscall(0x40000000 | 41, 2, 1, 0)\n"
    )
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "crashed", "Crashed")
    assert "SIGSYS" in outcome.error["message"]


def test_raw_child_is_in_its_own_network_namespace(raw):
    # Even with the socket calls allowed, there would be nothing to reach: no /proc to list
    # interfaces, and the namespace's only interface is a loopback that is down.
    source = "import socket\ndef f():\n    return socket.if_nameindex()\n"
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "runtime_error", "PermissionError")
