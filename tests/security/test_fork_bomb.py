"""Fork bombs: every route to a second process, in a loop that ignores errors."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt_raw

pytestmark = pytest.mark.timeout(60)

BOMB = (
    "import os\n"
    "def f():\n"
    "    made = 0\n"
    "    for _ in range(2000):\n"
    "        try:\n"
    "            if {call} == 0:\n"
    "                os._exit(0)\n"
    "            made += 1\n"
    "        except OSError:\n"
    "            pass\n"
    "    return made\n"
)


@pytest.mark.parametrize("call", ["os.fork()", "os.posix_spawn('/x', ['x'], {})"])
def test_raw_fork_bomb_makes_no_process(raw, call):
    outcome = attempt_raw(raw, BOMB.format(call=call))
    assert_status(outcome, "ok")
    assert outcome.value == 0


def test_raw_thread_bomb_makes_no_thread(raw):
    # clone is refused outright, so not even a thread can start.
    source = (
        "import _thread\n"
        "def f():\n"
        "    try:\n"
        "        _thread.start_new_thread(lambda: None, ())\n"
        "    except RuntimeError as exc:\n"
        "        return str(exc)\n"
    )
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "ok")
    assert outcome.value == "can't start new thread"


def test_raw_nproc_limit_is_zero(raw):
    source = "import resource\ndef f():\n    return resource.getrlimit(resource.RLIMIT_NPROC)\n"
    outcome = attempt_raw(raw, source)
    assert_status(outcome, "ok")
    assert outcome.value == [0, 0]
