"""Deep recursion, C-stack exhaustion, and nesting in source, data and return values."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)


def test_python_recursion_is_a_runtime_error(sb):
    outcome = attempt(sb, "def f():\n    return f()\n")
    assert_status(outcome, "runtime_error", "RecursionError")


def test_mutual_recursion_swallowing_errors_still_ends(sb):
    source = (
        "def g(n):\n"
        "    try:\n"
        "        return g(n + 1)\n"
        "    except RecursionError:\n"
        "        return g(n + 1)\n"
        "def f():\n"
        "    return g(0)\n"
    )
    outcome = attempt(sb, source, limits={"cpu_seconds": 1, "wall_seconds": 5})
    assert outcome.status in ("runtime_error", "timeout"), outcome


@pytest.mark.parametrize("wrapper", ["map(abs, it)", "filter(None, it)", "zip(it)"])
def test_c_stack_exhaustion_is_a_crash(sb, wrapper):
    # Nested C iterators recurse on the C stack without Python's recursion check.
    source = (
        "def f():\n"
        "    it = iter([1])\n"
        "    n = 0\n"
        "    while n < 500000:\n"
        f"        it = {wrapper}\n"
        "        n += 1\n"
        "    return str(next(it))\n"
    )
    outcome = attempt(sb, source, limits={"cpu_seconds": 5, "wall_seconds": 10, "memory_mb": 512})
    assert_status(outcome, "crashed", "Crashed")
    assert "SIGSEGV" in outcome.error["message"]


def test_deeply_nested_return_value_is_a_runtime_error(sb):
    source = (
        "def f():\n"
        "    x = []\n"
        "    n = 0\n"
        "    while n < 150:\n"
        "        x = [x]\n"
        "        n += 1\n"
        "    return x\n"
    )
    assert_status(attempt(sb, source), "runtime_error", "TypeError")


def test_json_bomb_is_a_runtime_error(sb):
    source = "import json\ndef f():\n    return json.loads('[' * 200000 + ']' * 200000)\n"
    assert_status(attempt(sb, source, imports=("json",)), "runtime_error", "RecursionError")


@pytest.mark.parametrize(
    "expression",
    [
        "(" * 300 + "1" + ")" * 300,
        "-" * 100000 + "1",
        "+".join(["1"] * 100000),
        "[" * 5000 + "]" * 5000,
    ],
)
def test_source_nested_too_deeply_is_a_compile_error(sb, expression):
    outcome = attempt(sb, f"def f():\n    return {expression}\n")
    assert_status(outcome, "compile_error")
