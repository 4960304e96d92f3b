"""The compile layer: RestrictedPython with the full guard set, and the globals user code sees.

This keeps most attempts from reaching the OS layer. It is not trusted to hold alone: everything
here runs inside an already-isolated child. The guards themselves, and every other Python object
user code can reach, live in `_guards`, sealed away from this module's globals (which hold `os`
and the importer); see that module for the rules they follow.
"""

from __future__ import annotations

import builtins as _builtins
import os
import random
import types
from collections.abc import Iterable
from importlib import import_module
from typing import Any

from RestrictedPython.compile import compile_restricted_exec
from RestrictedPython.Guards import safe_builtins

from ._guards import (
    BLOCKED_ATTRIBUTES,
    Abort,
    PolicyViolation,
    ReadOnlyModule,
    RunState,
    apply,
    guarded_getitem,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    limited_range,
    make_guards,
)

__all__ = [
    "BLOCKED_ATTRIBUTES",
    "MODULE_FILENAME",
    "Abort",
    "CompileRejected",
    "PolicyViolation",
    "ReadOnlyModule",
    "RunState",
    "build_globals",
    "compile_module",
    "module_proxy",
    "preload",
    "public_names",
]

MODULE_FILENAME = "<module>"

# Builtins that leak addresses or reach around the guards are left out of the safe set.
_EXCLUDED_BUILTINS = frozenset({"id", "setattr", "delattr", "_getattr_"})
_EXTRA_BUILTINS: dict[str, Any] = {
    name: getattr(_builtins, name)
    for name in (
        "dict", "list", "tuple", "set", "frozenset", "sorted", "reversed", "enumerate", "zip",
        "map", "filter", "sum", "min", "max", "any", "all", "next", "iter", "bytes", "format",
        "ExceptionGroup", "BaseExceptionGroup", "StopAsyncIteration", "RecursionError",
    )
}  # fmt: skip
# Built once: each run gets a copy, with its own guarded getattr, hasattr and import added.
# Every value is a C builtin or type, except `range` (RestrictedPython's limited_range, whose
# module globals hold `typing` and so `sys`, is replaced by the sealed one).
_BASE_BUILTINS: dict[str, Any] = {
    **{k: v for k, v in safe_builtins.items() if k not in _EXCLUDED_BUILTINS},
    "range": limited_range,
    **_EXTRA_BUILTINS,
}
# Names each importable module exposes beyond its public ones, or instead of them.
_STRING_CONSTANTS = (
    "ascii_letters", "ascii_lowercase", "ascii_uppercase", "digits", "hexdigits", "octdigits",
    "punctuation", "printable", "whitespace",
)  # fmt: skip
# The public methods of a Random instance, found once (the instance is per run).
_RANDOM_METHODS = tuple(
    name
    for name in dir(random.Random)
    if not name.startswith("_")
    and callable(getattr(random.Random, name))
    and name not in ("seed", "setstate", "getstate")
)
# Proxies of every importable module but random, made once: they are read-only, so runs in one
# process may share them (and forked children inherit the ones `preload` made).
_PROXIES: dict[str, ReadOnlyModule] = {}


class CompileRejected(Exception):
    """Raised when RestrictedPython rejects the source (syntax or a forbidden construct)."""


def preload(modules: Iterable[str]) -> None:
    """Import the importable modules in the parent, so children never touch the file system.

    Their proxies are made here too, once, for every child to inherit (random's is per run).
    """
    for name in modules:
        import_module(name)
        if name != "random":
            module_proxy(name)


def module_proxy(name: str) -> ReadOnlyModule:
    """The object user code gets for `import name`: never the host's shared module."""
    if name == "random":
        # A fresh generator per child: a shared one would hand every run the same sequence
        # (forked state) and let one run's seed() steer another's.
        rng = random.Random(int.from_bytes(os.urandom(16), "big"))  # noqa: S311 - user-facing
        return ReadOnlyModule(name, {n: getattr(rng, n) for n in _RANDOM_METHODS})
    proxy = _PROXIES.get(name)
    if proxy is None:
        proxy = _PROXIES[name] = ReadOnlyModule(name, public_names(name))
    return proxy


def public_names(name: str) -> dict[str, Any]:
    """The names an importable module hands out: its own public API, never what it imported.

    A module's `__all__` is its public API; without one (C modules), every name not starting
    with "_". Either way submodules are left out. This matters: `statistics` imports
    `functools.reduce` and `operator.mul`, `base64` has `main()` that reads files, and
    `functools` and `operator` are modules the policy never allows.
    """
    module = import_module(name)
    if name == "string":
        return {n: getattr(module, n) for n in _STRING_CONSTANTS}
    listed = getattr(module, "__all__", None)
    candidates = (
        {n: getattr(module, n) for n in listed if hasattr(module, n)}
        if listed is not None
        else vars(module)
    )
    return {
        n: v
        for n, v in candidates.items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
    }


def compile_module(raw_source: str) -> types.CodeType:
    """Compile untrusted source under RestrictedPython; raise CompileRejected with the reasons."""
    result = compile_restricted_exec(raw_source, filename=MODULE_FILENAME)
    if result.errors or result.code is None:
        raise CompileRejected("; ".join(result.errors) or "source rejected")
    return result.code


def build_globals(state: RunState, allowed_imports: Iterable[str]) -> dict[str, Any]:
    """The globals of the user module: curated builtins and every RestrictedPython guard.

    Every Python function and object in it comes from `_guards` (sealed: see there); the rest
    are C builtins and types.
    """
    modules = {name: module_proxy(name) for name in allowed_imports}
    getattr_, hasattr_, import_, write, inplacevar, print_ = make_guards(state, modules)
    builtins = _BASE_BUILTINS.copy()
    builtins["__import__"] = import_
    builtins["getattr"] = getattr_
    builtins["hasattr"] = hasattr_
    return {
        "__builtins__": builtins,
        "__name__": "sandbox_module",
        "__metaclass__": type,
        "_getattr_": getattr_,
        "_getitem_": guarded_getitem,
        "_getiter_": iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_write_": write,
        "_inplacevar_": inplacevar,
        "_apply_": apply,
        "_print_": print_,
    }
