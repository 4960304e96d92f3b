"""Memory bombs: one huge allocation, steady growth, and the same from raw code."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt, attempt_raw

pytestmark = pytest.mark.timeout(60)

LIMITS = {"cpu_seconds": 5, "wall_seconds": 10, "memory_mb": 32}


@pytest.mark.parametrize(
    "body",
    [
        "return len('a' * (10 ** 10))",
        "return len(bytes(10 ** 10))",
        "x = []\n    while True:\n        x.append([0] * 100000)",
        "x = 'a'\n    while True:\n        x = x + x",
        "return len([0, 1, 2] * (10 ** 9))",
    ],
)
def test_memory_bomb_hits_the_memory_limit(sb, body):
    outcome = attempt(sb, f"def f():\n    {body}\n", limits=LIMITS)
    assert_status(outcome, "memory_limit", "MemoryError")
    assert outcome.usage.max_rss_kb < 64 * 1024 + 32 * 1024  # bounded near the cap


def test_raw_mmap_bomb_hits_the_memory_limit(raw):
    source = "import mmap\ndef f():\n    return len(mmap.mmap(-1, 1 << 32))\n"
    assert_status(attempt_raw(raw, source, limits=LIMITS), "runtime_error", "OSError")


def test_raw_allocation_bomb_hits_the_memory_limit(raw):
    source = "def f():\n    return len(bytearray(1 << 31))\n"
    assert_status(attempt_raw(raw, source, limits=LIMITS), "memory_limit", "MemoryError")
