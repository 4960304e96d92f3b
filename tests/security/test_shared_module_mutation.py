"""Mutating modules and objects shared with the fork server, or with the next run."""

from __future__ import annotations

import pytest

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("source", "imports"),
    [
        ("import math\ndef f():\n    math.pi = 3\n    return 1\n", ("math",)),
        ("import math\ndef f():\n    del math.sqrt\n    return 1\n", ("math",)),
        (
            "import json\ndef f():\n    json.JSONEncoder.item_separator = ';'\n    return 1\n",
            ("json",),
        ),
        (
            "import decimal\ndef f():\n    decimal.getcontext().prec = 3\n    return 1\n",
            ("decimal",),
        ),
        ("import string\ndef f():\n    string.digits = 'x'\n    return 1\n", ("string",)),
        ("class A:\n    pass\ndef f():\n    A.x = 1\n    return 1\n", ()),
        ("def f():\n    t = (1, 2)\n    t[0] = 3\n    return 1\n", ()),
    ],
)
def test_writes_outside_plain_containers_are_denied(sb, source, imports):
    assert_status(attempt(sb, source, imports=imports), "denied", "PolicyViolation")


def test_module_state_changed_by_one_run_is_gone_in_the_next(sb):
    mutate = (
        "import hashlib\nimport decimal\n"
        "def f():\n"
        "    hashlib.algorithms_guaranteed.add('evil')\n"
        "    decimal.setcontext(decimal.Context(prec=3))\n"
        "    return 'evil' in hashlib.algorithms_guaranteed\n"
    )
    observe = (
        "import hashlib\nimport decimal\n"
        "def f():\n"
        "    return ['evil' in hashlib.algorithms_guaranteed, decimal.getcontext().prec]\n"
    )
    first = attempt(sb, mutate, imports=("hashlib", "decimal"))
    assert_status(first, "ok")
    assert first.value is True
    second = attempt(sb, observe, imports=("hashlib", "decimal"))
    assert_status(second, "ok")
    assert second.value == [False, 28]


def test_random_is_private_to_each_run_and_cannot_be_seeded(sb):
    draw = "import random\ndef f():\n    return [random.random() for i in range(4)]\n"
    first, second = attempt(sb, draw, imports=("random",)), attempt(sb, draw, imports=("random",))
    assert_status(first, "ok")
    assert first.value != second.value
    seed = "import random\ndef f():\n    random.seed(1)\n    return 1\n"
    assert_status(attempt(sb, seed, imports=("random",)), "runtime_error", "AttributeError")
