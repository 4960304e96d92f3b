"""Generator, coroutine and traceback frame walks: the route to f_globals and real builtins."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "expression",
    [
        "(x for x in [1]).gi_frame.f_back.f_globals",
        "(x for x in [1]).gi_code",
        "e.__traceback__.tb_frame.f_globals",
        "f'{(x for x in [1]).gi_frame}'",
    ],
)
def test_frame_attribute_in_source_is_rejected(sb, expression):
    source = f"def f():\n    e = ValueError()\n    return str({expression})\n"
    outcome = attempt(sb, source)
    assert_status(outcome, "compile_error", "CompileError")


@pytest.mark.parametrize(
    "attribute", ["gi_frame", "gi_code", "gi_yieldfrom", "f_back", "tb_frame", "cr_frame"]
)
def test_frame_attribute_by_name_is_denied(sb, attribute):
    source = "def gen():\n    yield 1\ndef f(name):\n    return str(getattr(gen(), name))\n"
    outcome = attempt(sb, source, attribute)
    assert_status(outcome, "denied", "PolicyViolation")


def test_exception_with_traceback_is_denied(sb):
    source = (
        "def f():\n"
        "    try:\n"
        "        1 / 0\n"
        "    except ZeroDivisionError as e:\n"
        "        return str(getattr(e, 'with_traceback'))\n"
    )
    assert_status(attempt(sb, source), "denied", "PolicyViolation")


def test_coroutines_and_async_generators_are_rejected(sb):
    source = "async def g():\n    yield 1\ndef f():\n    return str(g().ag_frame)\n"
    assert_status(attempt(sb, source), "compile_error", "CompileError")


def test_generator_send_and_throw_stay_inside_the_guards(sb):
    source = (
        "def gen():\n"
        "    try:\n"
        "        yield 1\n"
        "    except ValueError as e:\n"
        "        yield str(e)\n"
        "def f():\n"
        "    g = gen()\n"
        "    next(g)\n"
        "    return g.throw(ValueError('inside'))\n"
    )
    outcome = attempt(sb, source)
    assert_status(outcome, "ok")
    assert outcome.value == "inside"
