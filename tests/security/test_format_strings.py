"""str.format, format_map, string.Formatter and Template: attribute access by field name."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "call",
    [
        "'{0.__class__.__mro__}'.format(1)",
        "'{x.__init__.__globals__}'.format_map({'x': f})",
        "getattr('{0.__class__}', 'form' + 'at')(1)",
        "'{0.gi_frame}'.format((x for x in []))",
    ],
)
def test_format_methods_are_denied(sb, call):
    outcome = attempt(sb, f"def f():\n    return {call}\n")
    assert_status(outcome, "denied", "PolicyViolation")


def test_unbound_str_format_is_denied(sb):
    outcome = attempt(sb, "def f():\n    m = str.format\n    return m('{0.__class__}', 1)\n")
    assert_status(outcome, "denied", "PolicyViolation")


@pytest.mark.parametrize("name", ["Formatter", "Template"])
def test_string_formatter_and_template_are_not_handed_out(sb, name):
    source = f"import string\ndef f():\n    return str(string.{name})\n"
    outcome = attempt(sb, source, imports=("string",))
    assert_status(outcome, "runtime_error", "AttributeError")


def test_builtin_format_spec_cannot_reach_attributes(sb):
    outcome = attempt(sb, "def f():\n    return format(1, '{0.__class__}')\n")
    assert_status(outcome, "runtime_error", "ValueError")


def test_fstring_with_dunder_is_rejected(sb):
    outcome = attempt(sb, "def f():\n    return f'{f.__globals__}'\n")
    assert_status(outcome, "compile_error", "CompileError")


def test_percent_formatting_reads_mappings_only(sb):
    outcome = attempt(sb, "def f():\n    return '%(a)s' % {'a': 'safe'}\n")
    assert_status(outcome, "ok")
    assert outcome.value == "safe"
