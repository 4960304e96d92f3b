"""Every reply is untrusted: nothing a child writes may stop its fork server, or pass for an
isolation failure.

Over-size is `output_limit`, any parse failure is `crashed`, and an isolation failure is
believed only when the child's set-up reported it before user code could run.
"""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt, attempt_raw

pytestmark = pytest.mark.timeout(120)

BIG = {"cpu_seconds": 10, "wall_seconds": 30, "memory_mb": 512, "output_bytes": 8 * 1024 * 1024}


def test_printing_control_characters_up_to_the_cap_keeps_the_server(sb):
    # No escape needed: 8 MB of chr(1) is 48 MB once JSON-escaped, past the 32 MiB frame.
    outcome = attempt(sb, "def f():\n    print(chr(1) * 8000000)\n    return 1\n", limits=BIG)
    assert_status(outcome, "output_limit", "OutputLimit")
    assert attempt(sb, "def f():\n    return 'alive'\n").value == "alive"


def test_a_forged_isolation_failure_is_a_crash(raw):
    source = (
        "import os\n"
        "def f():\n"
        "    os.write(3, b'{\"layer\": \"seccomp\", \"reason\": \"forged by the run\"}')\n"
        "    os._exit(71)\n"
    )
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "crashed", "Crashed")
    assert "forged" not in str(outcome.error)


def test_deeply_nested_json_with_the_isolation_exit_code_is_a_crash(raw):
    source = (
        "import os\n"
        "def f():\n"
        "    os.write(3, b'[' * 200000 + b']' * 200000)\n"
        "    os._exit(71)\n"
    )
    assert_status(attempt_raw(raw, source), "crashed", "Crashed")
    assert attempt_raw(raw, "def f():\n    return 'alive'\n").value == "alive"


def test_a_forged_reply_past_the_output_cap_is_an_output_limit(raw):
    source = (
        "import os, json\n"
        "def f():\n"
        "    body = json.dumps({'status': 'ok', 'value': 'x' * 300000, 'stdout': 'y' * 300000,\n"
        "                       'error': None})\n"
        "    os.write(3, body.encode())\n"
        "    os.close(3)\n"
        "    os._exit(0)\n"
    )
    limits = {"cpu_seconds": 1, "wall_seconds": 3, "memory_mb": 64, "output_bytes": 100000}
    assert_status(attempt_raw(raw, source, limits=limits), "output_limit", "OutputLimit")


@pytest.mark.parametrize("garbage", [
    "b'\\\\xff\\\\xfe' * 1000", "b'{\"status\": \"ok\"' * 1000", "b'1e999'",
    "b'{\"status\": \"ok\", \"value\": NaN, \"stdout\": \"\", \"error\": null}'",
])
def test_garbage_replies_are_crashes(raw, garbage):
    source = f"import os\ndef f():\n    os.write(3, {garbage})\n    os._exit(0)\n"
    assert_status(attempt_raw(raw, source), "crashed", "Crashed")


def test_a_forged_error_is_cut_to_the_contract_lengths(raw):
    source = (
        "import os, json\n"
        "def f():\n"
        "    body = json.dumps({'status': 'runtime_error', 'value': None, 'stdout': '',\n"
        "                       'error': {'type': 'T' * 5000, 'message': 'm' * 100000}})\n"
        "    os.write(3, body.encode())\n"
        "    os.close(3)\n"
        "    os._exit(0)\n"
    )
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "runtime_error")
    assert outcome.error is not None
    assert len(outcome.error["type"]) <= 100 and len(outcome.error["message"]) <= 2000
