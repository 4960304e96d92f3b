"""Building or reaching code objects: the way to run bytecode that never went through the guards."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "source",
    [
        "def f():\n    return (lambda: 0).__code__\n",
        "def f():\n    c = f.__code__\n    return c.replace(co_code=b'')\n",
        "def f():\n    return eval('1 + 1')\n",
        "def f():\n    exec('x = 1')\n    return 1\n",
    ],
)
def test_code_object_access_is_rejected_at_compile_time(sb, source):
    assert_status(attempt(sb, source), "compile_error", "CompileError")


@pytest.mark.parametrize("name", ["compile", "type", "memoryview", "input", "open"])
def test_code_building_builtins_are_absent(sb, name):
    outcome = attempt(sb, f"def f():\n    return str({name})\n")
    assert_status(outcome, "runtime_error", "NameError")


@pytest.mark.parametrize("module", ["types", "marshal", "ast", "dis", "codeop", "pickle"])
def test_code_building_modules_are_denied(sb, module):
    outcome = attempt(sb, f"def f():\n    import {module}\n    return 1\n")
    assert_status(outcome, "denied", "PolicyViolation")


def test_generator_code_object_by_name_is_denied(sb):
    source = "def f():\n    g = (i for i in [1])\n    return str(getattr(g, 'gi_code'))\n"
    assert_status(attempt(sb, source), "denied", "PolicyViolation")
