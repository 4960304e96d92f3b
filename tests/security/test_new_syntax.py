"""Newer syntax that a sandbox written against an older grammar might let through."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "source",
    [
        # try/except* (3.11): ExceptionGroup handling
        "def f():\n    try:\n        raise ValueError(1)\n    except* ValueError:\n"
        "        return 1\n",
        # structural pattern matching, including mapping and class patterns
        "def f():\n    match {'a': 1}:\n        case {'a': v}:\n            return v\n",
        # async def, await, async for and async with
        "async def g():\n    return 1\ndef f():\n    return str(g())\n",
        "async def g(it):\n    async for x in it:\n        pass\ndef f():\n    return 1\n",
        # annotated assignment can hide an expression in the annotation
        "def f():\n    x: (1).__class__ = 1\n    return x\n",
    ],
)
def test_unreviewed_syntax_is_rejected(sb, source):
    assert_status(attempt(sb, source), "compile_error", "CompileError")


def test_exception_groups_without_except_star_stay_inside_the_guards(sb):
    source = (
        "def f():\n"
        "    try:\n"
        "        raise ExceptionGroup('g', [ValueError('a'), TypeError('b')])\n"
        "    except ExceptionGroup as eg:\n"
        "        return sorted(str(e) for e in eg.exceptions)\n"
    )
    outcome = attempt(sb, source)
    assert_status(outcome, "ok")
    assert outcome.value == ["a", "b"]


def test_walrus_on_an_ordinary_name_still_works(sb):
    outcome = attempt(sb, "def f():\n    return [y for x in [1, 2] if (y := x * 2)]\n")
    assert_status(outcome, "ok")
    assert outcome.value == [2, 4]
