"""Import bypasses: __import__, importlib, sys.modules, builtins, submodules, re-exports."""

from __future__ import annotations

import pytest

import sandbox
from sandbox import Policy
from sandbox._restricted import public_names

from .conftest import assert_status, attempt

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "statement",
    [
        "import os",
        "import sys",
        "import importlib",
        "from os import path",
        "import os.path",
        "from importlib import import_module",
        "import math",  # importable, but not allowed for this run
        "from . import x",  # relative: the guard refuses any level but 0
    ],
)
def test_import_not_allowed_for_the_run_is_denied(sb, statement):
    outcome = attempt(sb, f"def f():\n    {statement}\n    return 1\n")
    assert_status(outcome, "denied", "PolicyViolation")


@pytest.mark.parametrize(
    "source",
    [
        "def f():\n    return __import__('os')\n",
        "def f():\n    return __builtins__\n",
        "def f():\n    return __loader__\n",
        "def f():\n    return __spec__\n",
        "def f():\n    import builtins\n    return 1\n",
        "from os import *\ndef f():\n    return 1\n",
    ],
)
def test_import_machinery_names_are_rejected_at_compile_time(sb, source):
    assert_status(attempt(sb, source), "compile_error", "CompileError")


def test_submodule_of_an_allowed_module_is_not_reachable(sb):
    outcome = attempt(
        sb, "import json\ndef f():\n    return str(json.decoder)\n", imports=("json",)
    )
    assert_status(outcome, "runtime_error", "AttributeError")


def test_allowed_module_is_a_read_only_proxy_not_the_host_module(sb):
    source = "import json\ndef f():\n    return repr(json)\n"
    outcome = attempt(sb, source, imports=("json",))
    assert_status(outcome, "ok")
    assert outcome.value == "<module 'json' (sandboxed)>"


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("statistics", "reduce"),  # functools.reduce: functools is never allowed
        ("statistics", "mul"),  # operator.mul: operator is never allowed
        ("base64", "main"),  # reads files named on the server's command line
        ("datetime", "datetime_CAPI"),  # a raw C capsule
    ],
)
def test_names_an_allowed_module_only_imported_are_not_handed_out(sb, module, name):
    source = f"import {module}\ndef f():\n    return str({module}.{name})\n"
    outcome = attempt(sb, source, imports=(module,))
    assert_status(outcome, "runtime_error", "AttributeError")


def test_no_proxy_hands_out_anything_from_a_never_module():
    policy = Policy.load()
    for module in policy.importable:
        for name, value in public_names(module).items():
            owner = str(getattr(value, "__module__", "") or "").lstrip("_").split(".")[0]
            assert owner not in policy.never, f"{module}.{name} comes from {owner}"


@pytest.mark.parametrize("module", ["os", "importlib", "builtins", "sys", "ctypes", "os.path"])
def test_allowing_a_never_module_is_refused_before_anything_runs(sb, module):
    with pytest.raises(sandbox.ImportNotAllowed, match=module.split(".")[0]):
        sb.run("def f():\n    return 1\n", "f", allow_imports=[module])


def test_allowing_an_unlisted_module_is_refused(sb):
    with pytest.raises(sandbox.ImportNotAllowed, match="csv"):
        sb.run("def f():\n    return 1\n", "f", allow_imports=["csv"])
