"""What one run leaves behind for the next: live objects, module state, the fork server's memory.

Each child is a copy of a process made before any request was received (the zygote), so even
raw code that walks every frame and every live object finds nothing of an earlier run.
"""

from __future__ import annotations

import secrets

import pytest

from .conftest import assert_status, attempt_raw

pytestmark = pytest.mark.timeout(60)

SCAN = (
    "import gc, sys\n"
    "def f(token):\n"
    "    needle = 'residue' + '_marker_' + token\n"
    "    hits = []\n"
    "    def look(value, where):\n"
    "        if isinstance(value, bytes | bytearray):\n"
    "            value = bytes(value).decode('latin-1')\n"
    "        if isinstance(value, str) and value is not needle and needle in value:\n"
    "            hits.append(where)\n"
    "    for frame in sys._current_frames().values():\n"
    "        while frame is not None:\n"
    "            if frame.f_code is not f.__code__:\n"
    "                for value in list(frame.f_locals.values()):\n"
    "                    look(value, frame.f_code.co_name)\n"
    "            frame = frame.f_back\n"
    "    for obj in gc.get_objects():\n"
    "        if isinstance(obj, dict):\n"
    "            values = list(obj.values())\n"
    "        elif isinstance(obj, list | tuple):\n"
    "            values = list(obj)\n"
    "        else:\n"
    "            values = list(getattr(obj, '__dict__', {}).values())\n"
    "        for value in values:\n"
    "            look(value, type(obj).__name__)\n"
    "    return hits\n"
)


def test_raw_child_finds_nothing_of_an_earlier_run(raw):
    token = secrets.token_hex(8)
    earlier = f"# residue_marker_{token}\ndef f(secret):\n    return len(secret)\n"
    assert_status(attempt_raw(raw, earlier, f"residue_marker_{token} argument"), "ok")
    outcome = attempt_raw(raw, SCAN, token)
    assert_status(outcome, "ok")
    assert outcome.value == []


def test_raw_scan_does_find_its_own_request(raw):
    # The scan works: the request it is running is in its own memory.
    token = secrets.token_hex(8)
    source = SCAN + f"# residue_marker_{token}\n"
    outcome = attempt_raw(raw, source, token)
    assert_status(outcome, "ok")
    assert outcome.value
