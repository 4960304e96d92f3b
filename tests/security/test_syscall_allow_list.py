"""The seccomp filter is an allow list: a system call on no list reaches no kernel code.

Calls newer than any table (fchmodat2, the *xattrat family, file_setattr, open_tree_attr) and
older ones nobody listed get ENOSYS, so that glibc falls back where it can. Calls allowed only
with some arguments (fcntl, ioctl, prctl is not allowed at all) refuse the rest. RestrictedPython
is off here (`attempt_raw`).
"""

from __future__ import annotations

import errno
import platform

import pytest

from .conftest import assert_status, attempt_raw

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 syscall numbers"),
]

# x86_64 numbers: each newer than libseccomp 2.5.4's table, or never on any list.
UNLISTED = {
    "modify_ldt": 154,
    "fchmodat2": 452,
    "map_shadow_stack": 453,
    "mseal": 462,
    "setxattrat": 463,
    "removexattrat": 466,
    "open_tree_attr": 467,
    "file_setattr": 469,
    "a number no kernel has yet": 600,
    "pipe2": 293,
    "dup": 32,
    "sysinfo": 99,
}

RAW_SYSCALLS = """
import ctypes
def f(calls):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    answers = {}
    for name, number in calls.items():
        ctypes.set_errno(0)
        result = libc.syscall(number, 0, 0, 0, 0, 0)
        answers[name] = [result, ctypes.get_errno()]
    return answers
"""


def test_calls_on_no_list_get_enosys_and_do_nothing(raw):
    outcome = attempt_raw(raw, RAW_SYSCALLS, UNLISTED)
    assert_status(outcome, "ok")
    for name, (result, err) in outcome.value.items():
        assert result == -1, name
        # Named refusals (modify_ldt, sysinfo: host RAM, uptime, process count) say EPERM.
        expected = errno.EPERM if name in ("modify_ldt", "sysinfo") else errno.ENOSYS
        assert err == expected, (name, err)


FCNTL_AND_IOCTL = """
import ctypes
def f():
    libc = ctypes.CDLL(None, use_errno=True)
    answers = {}
    for name, cmd in (("F_SETOWN", 8), ("F_SETSIG", 10), ("F_SETOWN_EX", 15),
                      ("F_SETLEASE", 1024), ("F_NOTIFY", 1026), ("F_SETFL", 4),
                      ("F_SETPIPE_SZ", 1031), ("F_GETFL", 3)):
        ctypes.set_errno(0)
        answers[name] = [libc.fcntl(3, cmd, 0), ctypes.get_errno()]
    for name, req in (("TIOCSTI", 0x5412), ("FIONBIO", 0x5421), ("TCGETS", 0x5401)):
        buf = ctypes.create_string_buffer(64)
        ctypes.set_errno(0)
        answers[name] = [libc.ioctl(0, req, buf), ctypes.get_errno()]
    ctypes.set_errno(0)
    answers["prctl"] = [libc.prctl(15, b"x", 0, 0, 0), ctypes.get_errno()]  # PR_SET_NAME
    return answers
"""


def test_fcntl_ioctl_and_prctl_allow_only_harmless_commands(raw):
    outcome = attempt_raw(raw, FCNTL_AND_IOCTL)
    assert_status(outcome, "ok")
    answers = outcome.value
    for name in (
        "F_SETOWN",
        "F_SETSIG",
        "F_SETOWN_EX",
        "F_SETLEASE",
        "F_NOTIFY",
        "F_SETFL",
        "F_SETPIPE_SZ",
        "TIOCSTI",
        "FIONBIO",
        "prctl",
    ):
        assert answers[name][0] == -1 and answers[name][1] in (errno.ENOSYS, errno.EPERM), name
    assert answers["F_GETFL"][0] >= 0  # allowed: reading its own descriptor's flags
    assert answers["TCGETS"] == [-1, errno.ENOTTY]  # allowed: reaches the kernel, not a tty


def test_the_allow_list_is_small_and_reported(sb):
    detail = sb.details["seccomp"]
    assert detail.startswith("allow list of ")
    allowed = int(detail.split()[3])
    assert 40 <= allowed <= 90, detail
    assert "ENOSYS" in detail and "kernel" in detail and "API level" in detail
