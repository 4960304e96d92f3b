"""Huge stdout and return values, and a child that floods or garbles its reply channel."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt, attempt_raw

pytestmark = pytest.mark.timeout(60)

CAP = {"cpu_seconds": 5, "wall_seconds": 10, "output_bytes": 10_000}


@pytest.mark.parametrize(
    "body",
    [
        "while True:\n        print('x' * 1000)",
        "while True:\n        try:\n            print('y' * 100)\n"
        "        except BaseException:\n            pass",
        "print('z', end='!' * 20000)",
        "print(*['a'] * 500, sep='-' * 50)",
    ],
)
def test_stdout_flood_is_an_output_limit(sb, body):
    outcome = attempt(sb, f"def f():\n    {body}\n", limits=CAP)
    assert_status(outcome, "output_limit", "OutputLimit")
    assert len(outcome.stdout.encode()) <= 10_000
    assert outcome.usage.wall_ms < 2000


@pytest.mark.parametrize(
    "value", ["'x' * 20000", "[12345] * 5000", "{str(i): [i] * 50 for i in range(500)}"]
)
def test_huge_return_value_is_an_output_limit(sb, value):
    outcome = attempt(sb, f"def f():\n    return {value}\n", limits=CAP)
    assert_status(outcome, "output_limit", "OutputLimit")


def test_escaped_characters_count_against_the_cap(sb):
    # Control characters grow six-fold when JSON-escaped; the encoded size is what counts.
    outcome = attempt(sb, "def f():\n    return chr(1) * 2000\n", limits=CAP)
    assert_status(outcome, "output_limit", "OutputLimit")


def test_raw_flood_of_the_reply_pipe_is_an_output_limit(raw):
    source = "import os\ndef f():\n    while True:\n        os.write(3, b'x' * 65536)\n"
    assert_status(attempt_raw(raw, source, limits=CAP), "output_limit", "OutputLimit")


@pytest.mark.parametrize(
    "reply",
    [
        b"not json",
        b'{"status": "ok", "value": 1e999, "stdout": "", "error": null}',
        b'{"status": "ok", "value": NaN, "stdout": "", "error": null}',
        b'{"status": "pwned", "value": 1, "stdout": "", "error": null}',
        b'{"status": "ok", "value": 1, "stdout": "", "error": null, "degraded": []}',
        b"[" * 20000 + b"]" * 20000,
    ],
)
def test_raw_forged_reply_is_a_crash(raw, reply):
    source = f"import os\ndef f():\n    os.write(3, {reply!r})\n    os._exit(0)\n"
    assert_status(attempt_raw(raw, source, limits=CAP), "crashed", "Crashed")
