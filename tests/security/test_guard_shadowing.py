"""Rebinding RestrictedPython's guard names (_getattr_, _write_, ...) to unguarded objects."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "source",
    [
        # positional-only and keyword-only parameters with guard names and defaults
        "def f(_getattr_=None, /):\n    return 1\n",
        "def f(*, _write_=None):\n    return 1\n",
        "def f(**_getitem_):\n    return 1\n",
        "def f():\n    g = lambda _getattr_=None: 1\n    return g()\n",
        # walrus, global, plain assignment, deletion
        "def f():\n    (_getattr_ := getattr)\n    return 1\n",
        "def f():\n    global _getattr_\n    _getattr_ = None\n    return 1\n",
        "def f():\n    del _write_\n    return 1\n",
        # loop and comprehension targets, with-targets and exception names
        "def f():\n    for _getiter_ in [iter]:\n        pass\n    return 1\n",
        "def f():\n    return [_getattr_ for _getattr_ in [getattr]]\n",
        "def f():\n    try:\n        1 / 0\n"
        "    except ZeroDivisionError as _getattr_:\n        return 1\n",
        # import aliases, class and function names
        "import math as _getattr_\ndef f():\n    return 1\n",
        "class _write_:\n    pass\ndef f():\n    return 1\n",
        "def _print_():\n    return 1\ndef f():\n    return 1\n",
        # match captures: the statement itself is refused
        "def f(x):\n    match x:\n        case _getattr_:\n            return 1\n",
        "def f():\n    match 1:\n        case int(real=r):\n            return r\n",
        # nonlocal rebinding
        "def f():\n    x = 1\n    def g():\n        nonlocal x\n        x = 2\n    return x\n",
    ],
)
def test_binding_a_guard_name_is_rejected_at_compile_time(sb, source):
    assert_status(attempt(sb, source, 1), "compile_error", "CompileError")


def test_keyword_argument_named_like_a_guard_binds_nothing(sb):
    source = "def g(**kw):\n    return sorted(kw)\ndef f():\n    return g(_getattr_=1)\n"
    outcome = attempt(sb, source)
    # The keyword only lands in g's own dict; the guards in f and g are untouched.
    assert_status(outcome, "ok")
    assert outcome.value == ["_getattr_"]
