"""Type confusion: user subclasses of str whose methods lie to the guards that check them.

RestrictedPython lets user classes derive from builtins and define any ordinary method
(`startswith`, `join`, `lower`, ...) plus `__init__`, `__contains__` and the comparisons. A
guard that asks such an object about itself (`name.startswith("_")`, `sep.join(...)`) lets it
decide the check. The first test is the escape an outside review found: a `str` whose
`startswith` always says no read the guard's own `__globals__`, and with them the real `os`.
"""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)

LIAR = "class S(str):\n    def startswith(self, *args):\n        return False\n{extra}"

# Further methods the liar overrides, to check the guard asks none of them either. (`__eq__`
# is left out: defining it makes instances unhashable, which the old guard tripped over.)
EXTRA_METHODS = {
    "plain": "",
    "lower": "    def lower(self):\n        return 'safe'\n",
    "strip": "    def strip(self, *args):\n        return 'safe'\n",
    "encode": "    def encode(self, *args):\n        return b'safe'\n",
    "contains": "    def __contains__(self, item):\n        return False\n",
    "ordering": "    def __lt__(self, other):\n        return True\n",
    "not_equal": "    def __ne__(self, other):\n        return True\n",
    "init": "    def __init__(self, *args):\n        self\n",
}


def test_the_reported_escape_through_the_guards_globals_is_denied(sb):
    source = LIAR.format(extra="") + (
        "def f():\n    g = getattr(getattr, S('__globals__'))\n    return str(g['os'])\n"
    )
    outcome = attempt(sb, source)
    assert_status(outcome, "denied", "PolicyViolation")
    assert "__globals__" in outcome.error["message"]


@pytest.mark.parametrize("extra", EXTRA_METHODS.values(), ids=EXTRA_METHODS.keys())
def test_lying_str_subclass_as_getattr_name_is_denied(sb, extra):
    source = LIAR.format(extra=extra) + (
        "def f():\n    return str(getattr(getattr, S('__globals__')))\n"
    )
    assert_status(attempt(sb, source), "denied", "PolicyViolation")


@pytest.mark.parametrize("extra", EXTRA_METHODS.values(), ids=EXTRA_METHODS.keys())
def test_lying_str_subclass_as_hasattr_name_is_denied(sb, extra):
    source = LIAR.format(extra=extra) + (
        "def f():\n    return hasattr(getattr, S('__globals__'))\n"
    )
    assert_status(attempt(sb, source), "denied", "PolicyViolation")


def test_lying_names_cannot_climb_to_object_subclasses(sb):
    source = LIAR.format(extra="") + (
        "def f():\n"
        "    cls = getattr(getattr(1, S('__class__')), S('__base__'))\n"
        "    return len(getattr(cls, S('__subclasses__'))())\n"
    )
    assert_status(attempt(sb, source), "denied", "PolicyViolation")


@pytest.mark.parametrize(
    "laundered",
    [
        "sorted([S('__globals__')])[0]",
        "sorted([S('a'), S('__globals__')], key=lambda s: K())[0]",
        "max([S('a'), S('__globals__')], key=lambda s: K())",
        "min(S('a'), S('__globals__'), key=lambda s: K())",
        "next(iter(dict(name=S('__globals__')).values()))",
        "list(map(lambda s: s, [S('__globals__')]))[0]",
        "list(zip([S('__globals__')]))[0][0]",
        "list(filter(None, [S('__globals__')]))[0]",
        "list(enumerate([S('__globals__')]))[0][1]",
    ],
)
def test_a_liar_passed_through_a_builtin_is_still_denied(sb, laundered):
    # Builtins hand the very same object back (key functions returning objects whose
    # comparisons lie change only which one): the guard must not trust what comes out either.
    source = LIAR.format(extra="") + (
        "class K:\n"
        "    def __lt__(self, other):\n"
        "        return True\n"
        "    def __gt__(self, other):\n"
        "        return True\n"
        "def f():\n"
        f"    name = {laundered}\n"
        "    return str(getattr(getattr, name)['os'])\n"
    )
    assert_status(attempt(sb, source), "denied", "PolicyViolation")


CAP = {"cpu_seconds": 5, "wall_seconds": 10, "output_bytes": 1_000}

LYING_SEP = (
    "class Sep(str):\n"
    "    def join(self, parts):\n"
    "        return {joined}\n"
    "    def encode(self, *args):\n"
    "        return b''\n"
)


@pytest.mark.parametrize("joined", ["'LIE'", "'x' * 100000", "str(parts)"])
def test_print_with_a_lying_sep_prints_what_a_plain_sep_would(sb, joined):
    # The printer used to call the separator's own join (handing it a generator made inside
    # the guard): whatever it returned was printed instead.
    source = LYING_SEP.format(joined=joined) + (
        "def f():\n"
        "    print('a', 'b', sep=Sep('-'))\n"
        "    print('c', **{'sep': Sep('+'), 'end': Sep('!')})\n"
        "    return printed\n"
    )
    outcome = attempt(sb, source, limits=CAP)
    assert_status(outcome, "ok")
    assert outcome.value == outcome.stdout == "a-b\nc!"
