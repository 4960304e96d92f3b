"""Dunder and attribute traversal: spelled in the source, built at run time, Unicode-normalized."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "expression",
    [
        "(1).__class__",
        "(1).__class__.__base__.__subclasses__()",
        "f.__globals__",
        "str.__dict__",
        "[].__class__.__mro__",
        # NFKC folds these fullwidth letters to "__class__" before RestrictedPython sees them.
        "(1).__\uff43\uff4c\uff41\uff53\uff53__",
        # ...and this one to "gi_frame", a restricted name.
        "(x for x in []).\uff47\uff49_frame",
    ],
)
def test_attribute_spelled_in_source_is_rejected_at_compile_time(sb, expression):
    outcome = attempt(sb, f"def f():\n    return {expression}\n")
    assert_status(outcome, "compile_error", "CompileError")


@pytest.mark.parametrize(
    "name_expression",
    [
        "'__cla' + 'ss__'",
        "''.join(['_', '_', 'class', '_', '_'])",
        "chr(95) * 2 + 'globals' + chr(95) * 2",
        "'mro'",
        "'gi_' + 'frame'",
        "'__subclasses__'",
    ],
)
def test_attribute_name_built_at_run_time_is_denied(sb, name_expression):
    outcome = attempt(sb, f"def f():\n    return getattr(int, {name_expression})\n")
    assert_status(outcome, "denied", "PolicyViolation")


def test_getattr_with_default_is_still_denied(sb):
    outcome = attempt(sb, "def f():\n    return getattr(1, '__class__', None)\n")
    assert_status(outcome, "denied", "PolicyViolation")


def test_hasattr_probe_is_denied(sb):
    outcome = attempt(sb, "def f():\n    return hasattr(1, '__' + 'class__')\n")
    assert_status(outcome, "denied", "PolicyViolation")


def test_denial_swallowed_in_a_loop_still_ends_as_denied(sb):
    source = (
        "def f():\n"
        "    while True:\n"
        "        try:\n"
        "            getattr(1, '__class__')\n"
        "        except BaseException:\n"
        "            pass\n"
    )
    outcome = attempt(sb, source)
    assert_status(outcome, "denied", "PolicyViolation")
    assert outcome.usage.wall_ms < 1000  # ended at the first denial, not by the clock


def test_unnormalized_fullwidth_name_at_run_time_finds_nothing(sb):
    # getattr does not NFKC-normalize: the fullwidth name is a different, missing attribute.
    outcome = attempt(sb, "def f():\n    return getattr(1, '\\uff3f\\uff3fclass\\uff3f\\uff3f')\n")
    assert_status(outcome, "runtime_error", "AttributeError")


def test_introspection_builtins_are_absent(sb):
    for name in ("type", "vars", "dir", "globals", "locals", "object", "super", "id", "setattr"):
        outcome = attempt(sb, f"def f():\n    return str({name})\n")
        assert_status(outcome, "runtime_error", "NameError")
