"""Nothing reachable from a run's globals leads to os, sys, the importer or the real builtins.

This walks the object graph the way a guard beaten into reading `__globals__`, `__closure__`,
`__defaults__` or `__dict__` would, from everything `build_globals` hands to user code, and
stops at C functions and types (their `__self__` is their module: a documented limit).
"""

from __future__ import annotations

import builtins
import dis
import importlib
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from sandbox import Policy
from sandbox._restricted import RunState, build_globals

HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement, not by C

# Builtins no sealed namespace may hold: each reaches around the guards or the file system.
DANGEROUS_BUILTINS = (
    "__import__", "breakpoint", "compile", "delattr", "dir", "eval", "exec", "globals", "input",
    "locals", "memoryview", "open", "setattr", "vars",
)  # fmt: skip
FORBIDDEN = {
    id(obj): name
    for name, obj in [
        ("builtins.__dict__", builtins.__dict__),
        ("importlib.import_module", importlib.import_module),
        ("os.system", os.system),
        ("sys.modules", sys.modules),
        *((f"builtins.{n}", getattr(builtins, n)) for n in DANGEROUS_BUILTINS),
    ]
}


class _Stop(Exception):
    pass


def _child_like_abort() -> Any:
    # Shaped like the child's: a closure whose globals (this module's) hold os and sys.
    reply = os.write

    def abort(status: str, err: dict[str, str]) -> Any:
        raise _Stop(status, reply)

    return abort


def _is_c_level(obj: Any) -> bool:
    if isinstance(obj, type):
        # ExceptionGroup is made by C as a heap type: its module says where it comes from.
        return not obj.__flags__ & HEAPTYPE or obj.__module__ == "builtins"
    return isinstance(
        obj,
        (
            types.BuiltinFunctionType,
            types.WrapperDescriptorType,
            types.MethodWrapperType,
            types.MethodDescriptorType,
            types.ClassMethodDescriptorType,
            types.GetSetDescriptorType,
            types.MemberDescriptorType,
        ),
    )


def _project_class(cls: type) -> bool:
    return cls.__module__.startswith("sandbox")


def _slot_values(obj: Any) -> Iterator[Any]:
    for cls in type(obj).__mro__:
        for slot in cls.__dict__.get("__slots__", ()):
            try:
                yield object.__getattribute__(obj, slot)
            except AttributeError:
                pass


def _function_children(obj: Any) -> Iterator[Any]:
    if isinstance(obj, types.FunctionType):
        yield obj.__globals__
        yield obj.__builtins__
        yield from (cell.cell_contents for cell in obj.__closure__ or ())
        yield obj.__defaults__
        yield obj.__kwdefaults__
        yield obj.__dict__  # __wrapped__ and anything else set on the function
    elif isinstance(obj, types.MethodType):
        yield obj.__func__
        yield obj.__self__
    elif isinstance(obj, types.CellType):
        yield obj.cell_contents


def _children(obj: Any) -> Iterator[Any]:
    if isinstance(obj, (types.FunctionType, types.MethodType, types.CellType)):
        yield from _function_children(obj)
    elif type(obj) in (dict, types.MappingProxyType):
        yield from obj.keys()
        yield from obj.values()
    elif type(obj) in (list, tuple, set, frozenset):
        yield from obj
    elif isinstance(obj, (staticmethod, classmethod)):
        yield obj.__func__
    elif isinstance(obj, property):
        yield from (obj.fget, obj.fset, obj.fdel)
    elif isinstance(obj, type):
        yield from vars(obj).values()
        yield from (base for base in obj.__mro__ if _project_class(base))
        yield type(obj)
    elif type(obj).__flags__ & HEAPTYPE:
        yield type(obj)
        yield from getattr(obj, "__dict__", {}).values()
        yield from _slot_values(obj)
        if isinstance(obj, BaseException):
            yield obj.args


def _walk(roots: list[Any], leaves: set[int]) -> tuple[dict[int, Any], list[str]]:
    """Everything reachable from `roots`, and a description of each forbidden object met."""
    seen: dict[int, Any] = {}
    problems: list[str] = []
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen[id(obj)] = obj
        if id(obj) in FORBIDDEN:
            problems.append(FORBIDDEN[id(obj)])
        elif isinstance(obj, types.ModuleType):
            problems.append(f"module {obj.__name__}")
        elif id(obj) not in leaves and not _is_c_level(obj):
            stack.extend(_children(obj))
    return seen, problems


@pytest.fixture
def run_globals() -> dict[str, Any]:
    state = RunState(100, _child_like_abort())
    return build_globals(state, sorted(Policy.load().importable))


def test_nothing_reachable_from_a_runs_globals_leads_to_the_host(run_globals):
    importer = run_globals["__builtins__"]["__import__"]
    modules = {name: importer(name) for name in sorted(Policy.load().importable)}
    leaves = {
        id(value)
        for proxy in modules.values()
        for value in object.__getattribute__(proxy, "_names").values()
    }
    seen, problems = _walk([run_globals, *modules.values()], leaves)
    assert problems == []
    from sandbox._guards import SEALED_NAMESPACE

    functions = [obj for obj in seen.values() if isinstance(obj, types.FunctionType)]
    assert len(functions) > 10
    for fn in functions:
        if id(fn) in leaves:
            continue
        assert fn.__globals__ is SEALED_NAMESPACE, fn.__qualname__
        assert fn.__builtins__ is SEALED_NAMESPACE["__builtins__"], fn.__qualname__


def test_the_child_abort_is_still_called_though_nothing_leads_to_it():
    abort = _child_like_abort()
    state = RunState(5, abort)
    seen, problems = _walk([state], set())
    assert problems == [] and id(abort) not in seen
    with pytest.raises(_Stop, match="denied"):
        state.deny("no")
    with pytest.raises(_Stop, match="output_limit"):
        RunState(1, abort).write("too long")


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _sealed_functions() -> Iterator[types.FunctionType]:
    from sandbox._guards import SEALED_NAMESPACE

    for value in SEALED_NAMESPACE.values():
        if type(value) is types.FunctionType:
            yield value
        elif isinstance(value, type):
            yield from (m for m in vars(value).values() if type(m) is types.FunctionType)


def test_every_global_the_sealed_code_reads_is_in_its_namespace():
    from sandbox._guards import SEALED_NAMESPACE as namespace

    missing = {
        (fn.__qualname__, instruction.argval)
        for fn in _sealed_functions()
        for code in _code_objects(fn.__code__)
        for instruction in dis.get_instructions(code)
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME")
        and instruction.argval not in namespace
        and instruction.argval not in namespace["__builtins__"]
    }
    assert missing == set()


def test_the_sealed_builtins_are_c_builtins_and_none_is_dangerous():
    from sandbox._guards import SEALED_NAMESPACE

    sealed = SEALED_NAMESPACE["__builtins__"]
    assert type(sealed) is dict and sealed is not builtins.__dict__
    assert all(_is_c_level(value) for value in sealed.values())
    assert not set(DANGEROUS_BUILTINS) & set(sealed)


def test_every_python_function_in_a_runs_builtins_is_sealed(run_globals):
    from sandbox._guards import SEALED_NAMESPACE

    for name, value in run_globals["__builtins__"].items():
        if isinstance(value, types.FunctionType):
            assert value.__globals__ is SEALED_NAMESPACE, name
        elif value not in (None, True, False, Ellipsis):
            assert _is_c_level(value), name
