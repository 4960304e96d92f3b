"""The compile layer: RestrictedPython with the full guard set, and the globals user code sees.

This keeps most attempts from reaching the OS layer. It is not trusted to hold alone: everything
here runs inside an already-isolated child.
"""

from __future__ import annotations

import operator
import os
import random
import types
from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from types import MappingProxyType
from typing import Any, NoReturn

from RestrictedPython.compile import compile_restricted_exec
from RestrictedPython.Guards import (
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safe_builtins,
)
from RestrictedPython.Limits import limited_builtins

MODULE_FILENAME = "<module>"

# Attributes that reach frames, code objects or attribute-by-name formatting; any name starting
# with "_" is refused as well. These close the generator/coroutine/traceback frame walks and the
# str.format family of escapes even when a name is built at run time.
BLOCKED_ATTRIBUTES = frozenset(
    {
        "gi_frame", "gi_code", "gi_yieldfrom", "gi_running", "gi_suspended",
        "cr_frame", "cr_code", "cr_await", "cr_running", "cr_origin", "cr_suspended",
        "ag_frame", "ag_code", "ag_await", "ag_running",
        "tb_frame", "tb_next", "tb_lasti", "tb_lineno",
        "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "f_trace", "f_lasti",
        "co_code", "co_consts", "co_names", "mro", "format", "format_map", "with_traceback",
    }
)

# Builtins that leak addresses or reach around the guards are left out of the safe set.
_EXCLUDED_BUILTINS = frozenset({"id", "setattr", "delattr", "_getattr_"})
_EXTRA_BUILTINS: dict[str, Any] = {
    name: getattr(__import__("builtins"), name)
    for name in (
        "dict", "list", "tuple", "set", "frozenset", "sorted", "reversed", "enumerate", "zip",
        "map", "filter", "sum", "min", "max", "any", "all", "next", "iter", "bytes", "format",
        "ExceptionGroup", "BaseExceptionGroup", "StopAsyncIteration", "RecursionError",
    )
}
# Built once: each run gets a copy, with its own guarded getattr, hasattr and import added.
_BASE_BUILTINS: dict[str, Any] = {
    **{k: v for k, v in safe_builtins.items() if k not in _EXCLUDED_BUILTINS},
    **limited_builtins,
    **_EXTRA_BUILTINS,
}
# The only objects user code may assign into (items, slices, del): its own plain containers.
_WRITABLE_TYPES = (dict, list)
_INPLACE_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow,
    "<<=": operator.ilshift, ">>=": operator.irshift, "&=": operator.iand,
    "^=": operator.ixor, "|=": operator.ior, "@=": operator.imatmul,
}
# Names each importable module exposes beyond its public ones, or instead of them.
_STRING_CONSTANTS = (
    "ascii_letters", "ascii_lowercase", "ascii_uppercase", "digits", "hexdigits", "octdigits",
    "punctuation", "printable", "whitespace",
)


class PolicyViolation(Exception):
    """Raised in user code when it tries something the policy forbids at run time."""


class CompileRejected(Exception):
    """Raised when RestrictedPython rejects the source (syntax or a forbidden construct)."""


#: Ends the run at once with a status and an error (never returns); see `RunState`.
Abort = Callable[[str, dict[str, str]], NoReturn]


class RunState:
    """Per-run bookkeeping the outcome is derived from, whatever user code catches.

    With `abort` (the child passes one), the first denial and the first write past the output
    cap end the run on the spot: user code that swallows every exception in a loop cannot turn
    a denial into a success or a flood of output into a timeout. Without it (in-process use),
    both are recorded and the run goes on.
    """

    def __init__(self, output_cap: int, abort: Abort | None = None) -> None:
        self.output_cap = output_cap
        self.stdout_parts: list[str] = []
        self.stdout_bytes = 0
        self.output_exceeded = False
        self.denial: str | None = None
        self._abort = abort

    def deny(self, message: str) -> PolicyViolation:
        """Record a denial (the first one is kept) and return the exception to raise."""
        if self.denial is None:
            self.denial = message
            if self._abort is not None:
                self._abort("denied", {"type": "PolicyViolation", "message": message[:2000]})
        return PolicyViolation(message)

    def write(self, text: str) -> None:
        """Append printed text, keeping at most `output_cap` bytes."""
        if self.output_exceeded:
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if self.stdout_bytes + size > self.output_cap:
            self.output_exceeded = True
            if self._abort is not None:
                self._abort(
                    "output_limit", {"type": "OutputLimit", "message": "stdout exceeded its cap"}
                )
            return
        self.stdout_parts.append(text)
        self.stdout_bytes += size

    def stdout(self) -> str:
        """Everything printed so far."""
        return "".join(self.stdout_parts)


class _WriteRefused:
    """What `_write_` hands back for an object user code may not modify: every write is denied.

    RestrictedPython rewrites `obj.attr = v`, `obj[k] = v` and their `del` forms to go through
    `_write_(obj)`; module proxies, host classes and instances, and frozen values land here.
    """

    __slots__ = ("_kind", "_state")
    _kind: str
    _state: RunState

    def __init__(self, obj: Any, state: RunState) -> None:
        kind = "module" if isinstance(obj, ReadOnlyModule) else type(obj).__name__
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_state", state)

    def _refuse(self, what: str) -> PolicyViolation:
        return self._state.deny(f"{what} on a {self._kind!r} object is not allowed")

    def __setattr__(self, name: str, value: Any) -> None:
        raise self._refuse(f"assignment to attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        raise self._refuse(f"deletion of attribute {name!r}")

    def __setitem__(self, key: Any, value: Any) -> None:
        raise self._refuse("item assignment")

    def __delitem__(self, key: Any) -> None:
        raise self._refuse("item deletion")


class ReadOnlyModule:
    """A module handed to user code: its public names only, frozen."""

    __slots__ = ("_label", "_names")

    def __init__(self, label: str, names: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_label", label)
        object.__setattr__(self, "_names", MappingProxyType(dict(names)))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._names[name]
        except KeyError:
            raise AttributeError(f"module {self._label!r} has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"module {self._label!r} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"module {self._label!r} is read-only")

    def __dir__(self) -> Iterable[str]:
        return sorted(self._names)

    def __repr__(self) -> str:
        return f"<module {self._label!r} (sandboxed)>"


def preload(modules: Iterable[str]) -> None:
    """Import the importable modules in the parent, so children never touch the file system."""
    for name in modules:
        import_module(name)


def module_proxy(name: str) -> ReadOnlyModule:
    """The object user code gets for `import name`: never the host's shared module."""
    if name == "random":
        # A fresh generator per child: a shared one would hand every run the same sequence
        # (forked state) and let one run's seed() steer another's.
        rng = random.Random(int.from_bytes(os.urandom(16), "big"))  # noqa: S311 - user-facing
        names = {n: getattr(rng, n) for n in dir(rng) if not n.startswith("_") and callable(
            getattr(rng, n))}
        names.pop("seed", None)
        names.pop("setstate", None)
        names.pop("getstate", None)
        return ReadOnlyModule(name, names)
    return ReadOnlyModule(name, public_names(name))


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
    """The globals of the user module: curated builtins and every RestrictedPython guard."""
    modules = {name: module_proxy(name) for name in allowed_imports}

    def guarded_getattr(obj: Any, name: Any, *default: Any) -> Any:
        if not isinstance(name, str):
            raise TypeError("attribute name must be a string")
        if name.startswith("_") or name in BLOCKED_ATTRIBUTES:
            raise state.deny(f"access to attribute {name!r} is not allowed")
        return getattr(obj, name, *default)

    def guarded_hasattr(obj: Any, name: Any) -> bool:
        try:
            guarded_getattr(obj, name)
        except AttributeError:
            return False
        return True

    def guarded_import(
        name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
    ) -> Any:
        if level != 0 or name not in modules:
            raise state.deny(f"import of {name!r} is not allowed")
        return modules[name]

    def guarded_getitem(obj: Any, key: Any) -> Any:
        return obj[key]

    def inplacevar(op: str, target: Any, value: Any) -> Any:
        try:
            fn = _INPLACE_OPS[op]
        except KeyError:
            raise state.deny(f"in-place operator {op!r} is not allowed") from None
        return fn(target, value)

    def apply(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def guarded_write(obj: Any) -> Any:
        if type(obj) in _WRITABLE_TYPES:
            return obj
        return _WriteRefused(obj, state)

    class Printer:
        """RestrictedPython's print target: collects into the capped run buffer."""

        def __init__(self, _getattr: Any = None) -> None:
            pass

        def __call__(self) -> str:
            return state.stdout()

        def _call_print(self, *objects: Any, **kwargs: Any) -> None:
            if kwargs.get("file") is not None:
                raise state.deny("print to a file is not allowed")
            sep = kwargs.get("sep", " ")
            end = kwargs.get("end", "\n")
            if sep is None:
                sep = " "
            if end is None:
                end = "\n"
            if not isinstance(sep, str) or not isinstance(end, str):
                raise TypeError("sep and end must be strings")
            state.write(sep.join(str(o) for o in objects) + end)

    builtins = dict(_BASE_BUILTINS)
    builtins.update(
        {
            "__import__": guarded_import,
            "getattr": guarded_getattr,
            "hasattr": guarded_hasattr,
        }
    )
    return {
        "__builtins__": builtins,
        "__name__": "sandbox_module",
        "__metaclass__": type,
        "_getattr_": guarded_getattr,
        "_getitem_": guarded_getitem,
        "_getiter_": iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_write_": guarded_write,
        "_inplacevar_": inplacevar,
        "_apply_": apply,
        "_print_": Printer,
    }
