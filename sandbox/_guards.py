"""Everything user code can reach at run time: the guards, the print target, module proxies.

Two rules hold for every function and class here.

**Exact types decide, never a user's method.** User classes may derive from `str`, `int`,
`tuple`, `dict` and `list` and override any ordinary method (`startswith`, `join`, `encode`,
...), `__init__`, `__contains__` and the comparisons. So a guard never asks an object it was
handed anything whose answer decides a check: a value a check depends on is first made an exact
builtin (`_exact_str` copies a `str` subclass through str's own C code, calling none of the
subclass's methods), or refused when its `type()` is not exactly the one expected. Types are
compared with `is`; `isinstance` is never used on user objects (it consults a user
`__class__`), and `==` never on types (a metaclass may define it).

**Nothing to steal.** `_seal` rebuilds every function and method defined here with globals
holding only the names the code uses, each safe to hand out, and a `__builtins__` of the few
builtins it calls. A guard beaten into reading `__globals__`, `__builtins__`, `__closure__` or
`__defaults__` finds no `os`, `sys`, importer or real builtins there, nor through anything
reachable from them: RunState's methods are rebuilt too, and the child's abort callback (a
closure over the child's module, which holds `os`) is kept as the comparison function of a C key
wrapper (`functools.cmp_to_key`), which no attribute leads back to.

What this cannot close, cheaply or at all: C functions and types keep their module in
`__self__` (`len.__self__` is the builtins module, `cmp_to_key.__self__` is `_functools`); the
functions an allowed module's proxy hands out keep that module's globals; the sealed namespace
holds `type`, `object` and the real `getattr`, the primitives the guards are made of; and a
guard beaten into arbitrary attribute reads also wins through `object.__subclasses__()` or a
frame's `f_back`. The compile layer is not trusted to hold alone: the OS layer is built to.
"""

from __future__ import annotations

import builtins
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cmp_to_key
from types import MappingProxyType
from typing import Any, NoReturn

# Attributes that reach frames, code objects or attribute-by-name formatting; any name starting
# with "_" is refused as well. These close the generator/coroutine/traceback frame walks and the
# str.format family of escapes even when a name is built at run time.
# fmt: off
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
# fmt: on

#: `range()` refuses to make more elements than this (RestrictedPython's historical limit).
RANGE_LIMIT = 1000

#: Ends the run at once with a status and an error (never returns); see `RunState`.
Abort = Callable[[str, dict[str, str]], NoReturn]

# type's own `__name__` getter: a metaclass cannot override it, unlike `type(obj).__name__`.
_TYPE_NAME = type.__dict__["__name__"]


class PolicyViolation(Exception):
    """Raised in user code when it tries something the policy forbids at run time."""


def _exact_str(value: Any) -> str:
    """The same characters as an exact `str`, copied by str's own code; TypeError for a non-str.

    `str.__str__` is str's C slot: for a subclass it copies the characters and calls none of
    the subclass's methods, so `startswith`, `encode`, `__eq__` and the rest cannot lie about
    the copy.
    """
    if type(value) is str:
        return value
    return str.__str__(value)


def _type_name(obj: Any) -> str:
    """The name of `obj`'s type, read without asking the type or its metaclass."""
    return _exact_str(_TYPE_NAME.__get__(type(obj)))


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
        # The guards hold this object, and the child's abort is a closure over the child's
        # module (os, sys, the reply pipe). As the comparison function of a C key wrapper it can
        # still be called (see `_end`) but no attribute of anything here leads back to it.
        self._end_key: Callable[[Any], Any] | None = None if abort is None else cmp_to_key(abort)

    def _end(self, status: str, err: dict[str, str]) -> None:
        key = self._end_key
        if key is not None:
            # Comparing two keys calls abort(status, err), which never returns in the child.
            key(status) < key(err)  # noqa: B015 - the comparison is the call

    def deny(self, message: str) -> PolicyViolation:
        """Record a denial (the first one is kept) and return the exception to raise."""
        message = _exact_str(message)
        if self.denial is None:
            self.denial = message
            self._end("denied", {"type": "PolicyViolation", "message": message[:2000]})
        return PolicyViolation(message)

    def write(self, text: str) -> None:
        """Append printed text, keeping at most `output_cap` bytes.

        The size is that of an exact copy: a str subclass's `encode` or `__len__` cannot lie.
        """
        text = _exact_str(text)
        if self.output_exceeded:
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if self.stdout_bytes + size > self.output_cap:
            self.output_exceeded = True
            self._end("output_limit", {"type": "OutputLimit", "message": "stdout exceeded its cap"})
            return
        self.stdout_parts.append(text)
        self.stdout_bytes += size

    def stdout(self) -> str:
        """Everything printed so far."""
        return "".join(self.stdout_parts)


class ReadOnlyModule:
    """A module handed to user code: its public names only, frozen."""

    __slots__ = ("_label", "_names")
    _label: str
    _names: Mapping[str, Any]

    def __init__(self, label: str, names: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_label", label)
        object.__setattr__(self, "_names", MappingProxyType(dict(names)))

    def __getattr__(self, name: str) -> Any:
        if type(name) is str:
            try:
                return self._names[name]
            except KeyError:
                pass
        raise AttributeError(f"module {self._label!r} has no attribute {_exact_str(name)!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"module {self._label!r} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"module {self._label!r} is read-only")

    def __dir__(self) -> Iterable[str]:
        return sorted(self._names)

    def __repr__(self) -> str:
        return f"<module {self._label!r} (sandboxed)>"


class _WriteRefused:
    """What `_write_` hands back for an object user code may not modify: every write is denied.

    RestrictedPython rewrites `obj.attr = v`, `obj[k] = v` and their `del` forms to go through
    `_write_(obj)`; module proxies, host classes and instances, and frozen values land here.
    """

    __slots__ = ("_kind", "_state")
    _kind: str
    _state: RunState

    def __init__(self, obj: Any, state: RunState) -> None:
        kind = "module" if type(obj) is ReadOnlyModule else _type_name(obj)
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_state", state)

    def _refuse(self, what: str) -> PolicyViolation:
        return self._state.deny(f"{what} on a {self._kind!r} object is not allowed")

    def __setattr__(self, name: str, value: Any) -> None:
        raise self._refuse(f"assignment to attribute {_exact_str(name)!r}")

    def __delattr__(self, name: str) -> None:
        raise self._refuse(f"deletion of attribute {_exact_str(name)!r}")

    def __setitem__(self, key: Any, value: Any) -> None:
        raise self._refuse("item assignment")

    def __delitem__(self, key: Any) -> None:
        raise self._refuse("item deletion")


def _print_text(value: Any, what: str, default: str) -> str:
    if value is None:
        return default
    if type(value) is str:
        return value
    try:
        return str.__str__(value)
    except TypeError:
        raise TypeError(f"{what} must be None or a string, not {_type_name(value)}") from None


class Printer:
    """RestrictedPython's print target for one run: collects into the capped run buffer.

    The text is built by str's own code from exact copies: a `sep` whose `join` lies, an `end`
    or a `__str__` result that is a str subclass, cannot change what is written or its size.
    """

    __slots__ = ("_state",)

    def __init__(self, state: RunState) -> None:
        self._state = state

    def __call__(self) -> str:
        return self._state.stdout()

    def _call_print(self, *objects: Any, **options: Any) -> None:
        # `options` is always a fresh, exact dict; its keys are exact-checked before any lookup.
        sep, end = " ", "\n"
        for key, value in options.items():
            if type(key) is not str:
                raise TypeError("keywords must be strings")
            if key == "sep":
                sep = _print_text(value, "sep", " ")
            elif key == "end":
                end = _print_text(value, "end", "\n")
            elif key == "file":
                if value is not None:
                    raise self._state.deny("print to a file is not allowed")
            elif key != "flush":
                raise TypeError(f"print() got an unexpected keyword argument {key!r}")
        self._state.write(sep.join([_exact_str(str(o)) for o in objects]) + end)


def guarded_getitem(obj: Any, key: Any) -> Any:
    """`obj[key]` (RestrictedPython's `_getitem_`): reads are not restricted."""
    return obj[key]


def apply(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` (RestrictedPython's `_apply_`)."""
    return fn(*args, **kwargs)


def guarded_unpack_sequence(it: Any, spec: dict[str, Any], _getiter_: Any) -> list[Any]:
    """RestrictedPython's `_unpack_sequence_`: every nested unpacking goes through `_getiter_`.

    `spec` is built by the compiler (RestrictedPython's `gen_unpack_spec`), never by user code.
    """
    ret = list(_getiter_(it))
    if len(ret) < spec["min_len"]:
        return ret
    for idx, child_spec in spec["childs"]:
        ret[idx] = guarded_unpack_sequence(ret[idx], child_spec, _getiter_)
    return ret


def guarded_iter_unpack_sequence(
    it: Any, spec: dict[str, Any], _getiter_: Any
) -> Iterator[list[Any]]:
    """RestrictedPython's `_iter_unpack_sequence_`: `for a, b in it` unpacks each item guarded."""
    for ob in _getiter_(it):
        yield guarded_unpack_sequence(ob, spec, _getiter_)


def limited_range(*args: Any) -> range:
    """`range()` of at most `RANGE_LIMIT` elements.

    The bounds are taken by `range` itself, which stores exact ints, so the size is computed
    from values no user method can change.
    """
    numbers = range(*args)
    try:
        size = len(numbers)
    except OverflowError:
        size = RANGE_LIMIT
    if size >= RANGE_LIMIT:
        raise ValueError(
            f"To be created range() object would be to large, in RestrictedPython we only "
            f"allow {RANGE_LIMIT} elements in a range."
        )
    return numbers


# In-place operators as plain Python, so the guard holds no function of the `operator` module
# (whose `__self__` would be that module, with attrgetter and methodcaller in it).
def _iadd(a: Any, b: Any) -> Any:
    a += b
    return a


def _isub(a: Any, b: Any) -> Any:
    a -= b
    return a


def _imul(a: Any, b: Any) -> Any:
    a *= b
    return a


def _itruediv(a: Any, b: Any) -> Any:
    a /= b
    return a


def _ifloordiv(a: Any, b: Any) -> Any:
    a //= b
    return a


def _imod(a: Any, b: Any) -> Any:
    a %= b
    return a


def _ipow(a: Any, b: Any) -> Any:
    a **= b
    return a


def _ilshift(a: Any, b: Any) -> Any:
    a <<= b
    return a


def _irshift(a: Any, b: Any) -> Any:
    a >>= b
    return a


def _iand(a: Any, b: Any) -> Any:
    a &= b
    return a


def _ixor(a: Any, b: Any) -> Any:
    a ^= b
    return a


def _ior(a: Any, b: Any) -> Any:
    a |= b
    return a


def _imatmul(a: Any, b: Any) -> Any:
    a @= b
    return a


_INPLACE_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": _iadd,
    "-=": _isub,
    "*=": _imul,
    "/=": _itruediv,
    "//=": _ifloordiv,
    "%=": _imod,
    "**=": _ipow,
    "<<=": _ilshift,
    ">>=": _irshift,
    "&=": _iand,
    "^=": _ixor,
    "|=": _ior,
    "@=": _imatmul,
}

#: The guards of one run, in the order `make_guards` returns them.
RunGuards = tuple[
    Callable[..., Any],  # getattr and _getattr_
    Callable[[Any, Any], bool],  # hasattr
    Callable[..., Any],  # __import__
    Callable[[Any], Any],  # _write_
    Callable[[str, Any, Any], Any],  # _inplacevar_
    Callable[..., Printer],  # _print_
]


def _getattr_guard(state: RunState) -> Callable[..., Any]:
    """`getattr` for user code: no `_` name, no blocked attribute, names as exact strs."""

    def guarded_getattr(obj: Any, name: Any, *default: Any) -> Any:
        if type(name) is not str:
            try:
                name = str.__str__(name)
            except TypeError:
                raise TypeError("attribute name must be a string") from None
        if name.startswith("_") or name in BLOCKED_ATTRIBUTES:
            raise state.deny(f"access to attribute {name!r} is not allowed")
        return getattr(obj, name, *default)

    return guarded_getattr


def _import_guard(
    state: RunState, modules: Mapping[str, ReadOnlyModule]
) -> Callable[..., ReadOnlyModule]:
    """`__import__` for user code: only the run's allowed modules, by their exact names."""

    def guarded_import(
        name: Any, globals: Any = None, locals: Any = None, fromlist: Any = (), level: Any = 0
    ) -> ReadOnlyModule:
        # The compiler passes a literal name, level and fromlist; anything else is refused, and
        # a name is looked up only once it is known to be an exact str.
        if type(name) is not str:
            raise state.deny("import of a name that is not a str is not allowed")
        if (
            type(level) is not int
            or level != 0
            or not (fromlist is None or type(fromlist) is tuple)
            or name not in modules
        ):
            raise state.deny(f"import of {name!r} is not allowed")
        for item in fromlist or ():
            if type(item) is not str:
                raise state.deny(f"import from {name!r} of a name that is not a str")
        return modules[name]

    return guarded_import


def make_guards(state: RunState, modules: Mapping[str, ReadOnlyModule]) -> RunGuards:
    """The guards that record into `state`: getattr, hasattr, __import__, _write_, ...

    Closures made here get this function's (sealed) globals.
    """

    guarded_getattr = _getattr_guard(state)

    def guarded_hasattr(obj: Any, name: Any) -> bool:
        try:
            guarded_getattr(obj, name)
        except AttributeError:
            return False
        return True

    guarded_import = _import_guard(state, modules)

    def guarded_write(obj: Any) -> Any:
        kind = type(obj)
        if kind is dict or kind is list:
            return obj
        return _WriteRefused(obj, state)

    def inplacevar(op: Any, target: Any, value: Any) -> Any:
        fn = _INPLACE_OPS.get(op) if type(op) is str else None
        if fn is None:
            raise state.deny("in-place operator is not allowed")
        return fn(target, value)

    printer = Printer(state)

    def print_target(_getattr: Any = None) -> Printer:
        return printer

    return guarded_getattr, guarded_hasattr, guarded_import, guarded_write, inplacevar, print_target


# ---- Sealing --------------------------------------------------------------------------------

# The builtins the code above calls, and nothing else.
_SEALED_BUILTINS = (
    "AttributeError", "KeyError", "OverflowError", "TypeError", "ValueError", "dict", "getattr",
    "int", "len", "list", "object", "range", "sorted", "str", "tuple", "type",
)  # fmt: skip
# Every name the code above reads as a global: functions are rebuilt, the rest shared as is.
_SEALED_NAMES = (
    "BLOCKED_ATTRIBUTES", "RANGE_LIMIT", "MappingProxyType", "PolicyViolation", "Printer",
    "ReadOnlyModule", "RunState", "_INPLACE_OPS", "_TYPE_NAME", "_WriteRefused",
    "_exact_str", "_getattr_guard", "_import_guard", "_print_text", "_type_name", "apply",
    "cmp_to_key", "guarded_getitem", "guarded_iter_unpack_sequence", "guarded_unpack_sequence",
    "limited_range", "make_guards",
    *(fn.__name__ for fn in _INPLACE_OPS.values()),
)  # fmt: skip


def _rebuilt(fn: types.FunctionType, namespace: dict[str, Any]) -> types.FunctionType:
    if fn.__closure__ is not None:
        raise RuntimeError(f"{fn.__qualname__} closes over a variable; it cannot be sealed")
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    return new


def _seal() -> dict[str, Any]:
    """The sealed namespace; every function and method above is rebuilt to use it."""
    here = globals()
    namespace: dict[str, Any] = {
        "__name__": __name__,
        "__builtins__": {name: getattr(builtins, name) for name in _SEALED_BUILTINS},
    }
    for name in _SEALED_NAMES:
        value = here[name]
        if type(value) is types.FunctionType:
            value = _rebuilt(value, namespace)
        elif type(value) is type:
            for attr, member in list(vars(value).items()):
                if type(member) is types.FunctionType:
                    setattr(value, attr, _rebuilt(member, namespace))
        namespace[name] = value
    for op, fn in list(_INPLACE_OPS.items()):
        _INPLACE_OPS[op] = namespace[fn.__name__]
    # What other modules import from here is the sealed version.
    here.update({name: namespace[name] for name in _SEALED_NAMES})
    return namespace


SEALED_NAMESPACE = _seal()
