"""Every reply is untrusted: nothing a child writes may stop its fork server, or pass for an
isolation failure.

Over-size is `output_limit`, any parse failure is `crashed`, and an isolation failure is
believed only when the child's set-up reported it before user code could run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import assert_status, attempt, attempt_raw

pytestmark = pytest.mark.timeout(120)

BIG = {"cpu_seconds": 10, "wall_seconds": 30, "memory_mb": 512, "output_bytes": 8 * 1024 * 1024}


def _forging(reply: str, prelude: str = "") -> str:
    """Raw code that writes the reply `reply` (a Python expression) itself, then exits 0."""
    return (
        "import os, json\n"
        "from sandbox._reply import encode\n"
        "def f():\n" + (f"    {prelude}\n" if prelude else "") + f"    os.write(3, {reply})\n"
        "    os.close(3)\n"
        "    os._exit(0)\n"
    )


SMALL_CAP = {"cpu_seconds": 1, "wall_seconds": 3, "memory_mb": 64, "output_bytes": 100000}


def test_printing_control_characters_up_to_the_cap_keeps_the_server(sb):
    # No escape needed: 8 MB of chr(1) is 48 MB once JSON-escaped, past the 32 MiB frame.
    outcome = attempt(sb, "def f():\n    print(chr(1) * 8000000)\n    return 1\n", limits=BIG)
    assert_status(outcome, "output_limit", "OutputLimit")
    assert attempt(sb, "def f():\n    return 'alive'\n").value == "alive"


def test_a_forged_isolation_failure_is_a_crash(raw):
    source = (
        "import os\n"
        "def f():\n"
        '    os.write(3, b\'{"layer": "seccomp", "reason": "forged by the run"}\')\n'
        "    os._exit(71)\n"
    )
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "crashed", "Crashed")
    assert "forged" not in str(outcome.error)


def test_deeply_nested_json_with_the_isolation_exit_code_is_a_crash(raw):
    source = (
        "import os\ndef f():\n    os.write(3, b'[' * 200000 + b']' * 200000)\n    os._exit(71)\n"
    )
    assert_status(attempt_raw(raw, source), "crashed", "Crashed")
    assert attempt_raw(raw, "def f():\n    return 'alive'\n").value == "alive"


def test_a_forged_reply_past_the_output_cap_is_an_output_limit(raw):
    source = _forging("encode('ok', None, json.dumps('x' * 300000), 'y' * 300000)")
    assert_status(attempt_raw(raw, source, limits=SMALL_CAP), "output_limit", "OutputLimit")


@pytest.mark.parametrize(
    "garbage",
    [
        "b'\\\\xff\\\\xfe' * 1000",
        'b\'{"status": "ok"\' * 1000',
        "b'1e999'",
        'b\'{"status": "ok", "value": NaN, "stdout": "", "error": null}\'',
    ],
)
def test_garbage_replies_are_crashes(raw, garbage):
    source = f"import os\ndef f():\n    os.write(3, {garbage})\n    os._exit(0)\n"
    assert_status(attempt_raw(raw, source), "crashed", "Crashed")


def test_a_forged_error_is_cut_to_the_contract_lengths(raw):
    source = _forging(
        "encode('runtime_error', error, '', '')",
        prelude="error = {'type': 'T' * 5000, 'message': 'm' * 50000}",
    )
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "runtime_error")
    assert outcome.error is not None
    assert len(outcome.error["type"]) <= 100 and len(outcome.error["message"]) <= 2000


def _peak_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


# The smallest JSON values cost the parser about twenty times their size in memory: a reply
# made of them, written straight to the channel, once cost the fork server 4.9 GB and 53 s of
# CPU for a run that used 31 ms (2026-12 red team). The reply's parts are now capped, and the
# value's containers counted, before anything is parsed.
TINY_CONTAINERS = """
import os, json
from sandbox._reply import encode
def f(count):
    value = "[" + "[]," * count + "[]]"
    os.write(3, encode("ok", None, value, ""))
    os.close(3)
    os._exit(0)
"""


def test_a_reply_of_millions_of_tiny_values_costs_the_server_nothing(raw):
    server = raw._proc.pid
    before = _peak_kb(server)
    outcome = attempt_raw(raw, TINY_CONTAINERS, 2_000_000, limits=BIG)
    assert_status(outcome, "output_limit", "OutputLimit")
    assert _peak_kb(server) - before < 64 * 1024  # the 6 MB of reply, not gigabytes of lists
    assert attempt_raw(raw, "def f():\n    return 'alive'\n").value == "alive"


def test_a_stdout_flood_in_a_forged_reply_is_capped_before_parsing(raw):
    source = _forging("encode('ok', None, '1', '[],' * 400000)")
    assert_status(attempt_raw(raw, source, limits=SMALL_CAP), "output_limit", "OutputLimit")
