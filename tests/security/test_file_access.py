"""Reading and writing files: the host's secrets, the parent's files, anything on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import assert_status, attempt, attempt_raw

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A file of the parent's, readable by anyone on the host."""
    path = tmp_path / "parent-secret.txt"
    path.write_text("parent-secret-contents")
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    return path


def test_restricted_code_has_no_open(sb):
    assert_status(
        attempt(sb, "def f():\n    return open('/etc/passwd').read()\n"),
        "runtime_error",
        "NameError",
    )


def test_raw_write_to_host_tmp_is_refused_and_creates_nothing(raw, tmp_path):
    target = tmp_path / "written-by-child"
    source = "def f(path):\n    with open(path, 'w') as fh:\n        fh.write('x')\n"
    assert_status(attempt_raw(raw, source, str(target)), "runtime_error", "PermissionError")
    assert not target.exists()
    assert_status(
        attempt_raw(raw, source, "/tmp/sandbox-escape-marker"), "runtime_error", "PermissionError"
    )
    assert not Path("/tmp/sandbox-escape-marker").exists()


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("os.open('/new', os.O_CREAT | os.O_WRONLY)", "PermissionError"),
        ("os.open('/', os.O_RDWR)", "PermissionError"),
        ("os.mkdir('/d')", "PermissionError"),
        ("os.symlink('/', '/l')", "PermissionError"),
        ("os.chmod('/', 0o777)", "PermissionError"),
        ("os.chroot('/')", "PermissionError"),
    ],
)
def test_raw_file_system_writes_are_refused(raw, call, error):
    source = f"import os\ndef f():\n    return {call}\n"
    assert_status(attempt_raw(raw, source), "runtime_error", error)


@pytest.mark.parametrize(
    "path",
    [
        "/etc/shadow",
        "/etc/passwd",
        "/proc/self/environ",
        "/proc/1/root/etc/shadow",
        "/../../etc/shadow",
    ],
)
def test_raw_host_files_do_not_exist_in_the_child(raw, path):
    source = "def f(path):\n    return open(path).read()\n"
    assert_status(attempt_raw(raw, source, path), "runtime_error", "FileNotFoundError")


def test_raw_parents_files_are_out_of_reach(raw, secret_file):
    source = "def f(path):\n    return open(path).read()\n"
    outcome = attempt_raw(raw, source, str(secret_file))
    assert_status(outcome, "runtime_error", "FileNotFoundError")
    assert "parent-secret-contents" not in str(outcome.to_dict())


def test_raw_child_root_is_empty_and_no_descriptor_leads_out(raw):
    source = (
        "import os\n"
        "def f():\n"
        "    open_fds = []\n"
        "    for fd in range(64):\n"
        "        try:\n"
        "            os.fstat(fd)\n"
        "            open_fds.append(fd)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return {'root': os.listdir('/'), 'up': os.listdir('/../..'), 'fds': open_fds,\n"
        "            'cwd': os.getcwd()}\n"
    )
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "ok")
    # 0-2 are /dev/null and 3 is the reply pipe: no directory descriptor to fchdir out of.
    assert outcome.value == {"root": [], "up": [], "fds": [0, 1, 2, 3], "cwd": "/"}
