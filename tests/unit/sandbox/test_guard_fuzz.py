"""Hypothesis: hostile subclasses of str, int, tuple, dict and list against every guard and builtin.

Each generated class overrides a random set of dunders and ordinary methods, each answering with
a hostile value (a dunder name, a lying str, a wrong type) or raising; its metaclass may claim to
equal every class and its `__class__` may lie. Instances go through the guards and the builtins a
run gets, in-process. Every call must raise or behave as the plain type would, and nothing that
comes out may be a frame, a code object, a module, a function's globals, the real builtins, or
the value of a dunder attribute of anything the run can reach.
"""

from __future__ import annotations

import builtins
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox import _restricted
from sandbox._restricted import BLOCKED_ATTRIBUTES, ReadOnlyModule, RunState, build_globals

pytestmark = pytest.mark.timeout(120)

CAP = 200
IMPORTS = ("math", "json", "random")
DUNDER_NAMES = (
    "__globals__", "__class__", "__base__", "__subclasses__", "__builtins__", "__code__",
    "__closure__", "__dict__", "__self__", "__func__", "__defaults__", "__mro__",
)  # fmt: skip
HOSTILE_STRINGS = (*DUNDER_NAMES, "gi_frame", "f_globals", "mro", "os", "math", "sep", "end",
                   "file", "+=", "upper", "")  # fmt: skip


class LiarStr(str):
    """Says it starts with nothing, equals everything, and is empty."""

    def startswith(self, *args: Any) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__

    def __len__(self) -> int:
        return 0

    def encode(self, *args: Any) -> bytes:
        return b""


class LyingMeta(type):
    """Its classes claim to equal every other class."""

    def __eq__(cls, other: object) -> bool:
        return True

    __hash__ = type.__hash__


class Raise:
    """A behaviour: the overridden method raises this exception type."""

    def __init__(self, kind: type[Exception]) -> None:
        self.kind = kind


METHODS: dict[type, tuple[str, ...]] = {
    str: ("startswith", "endswith", "lower", "upper", "join", "encode", "split", "strip",
          "replace", "format", "__str__", "__repr__", "__format__", "__add__", "__radd__",
          "__mul__", "__mod__"),
    int: ("bit_length", "to_bytes", "__index__", "__int__", "__add__", "__radd__", "__str__",
          "__repr__", "__format__", "__bool__", "__neg__", "__abs__"),
    tuple: ("count", "index", "__iter__", "__len__", "__getitem__", "__add__", "__str__"),
    dict: ("keys", "values", "items", "get", "copy", "__iter__", "__len__", "__getitem__",
           "__contains__", "__str__"),
    list: ("append", "copy", "index", "__iter__", "__len__", "__getitem__", "__contains__",
           "__add__", "__iadd__", "__str__", "__reversed__"),
}  # fmt: skip
COMMON_METHODS = ("__eq__", "__ne__", "__lt__", "__gt__", "__hash__")
SEEDS: dict[type, st.SearchStrategy[Any]] = {
    str: st.sampled_from(HOSTILE_STRINGS),
    int: st.integers(-3, 3),
    tuple: st.sampled_from(HOSTILE_STRINGS).map(lambda s: (s, s)),
    dict: st.sampled_from(HOSTILE_STRINGS).map(lambda s: {s: s, "sep": s}),
    list: st.sampled_from(HOSTILE_STRINGS).map(lambda s: [s, s]),
}
behaviours = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from(HOSTILE_STRINGS).map(LiarStr),
    st.sampled_from([True, False, 0, -1, 3, 10**6, b"", None, 1.5]),
    st.sampled_from([AttributeError, TypeError, ValueError, KeyError]).map(Raise),
)


def _method(behaviour: Any) -> Callable[..., Any]:
    if isinstance(behaviour, Raise):
        kind = behaviour.kind

        def raising(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise kind("hostile")

        return raising

    def answering(self: Any, *args: Any, **kwargs: Any) -> Any:
        return behaviour

    return answering


@st.composite
def hostile_objects(draw: st.DrawFn) -> Any:
    base = draw(st.sampled_from(sorted(METHODS, key=lambda t: t.__name__)))
    names = draw(st.lists(st.sampled_from(METHODS[base] + COMMON_METHODS), unique=True, max_size=6))
    namespace: dict[str, Any] = {name: _method(draw(behaviours)) for name in names}
    if draw(st.booleans()):
        claimed = draw(st.sampled_from([str, int, dict, list, ReadOnlyModule]))
        namespace["__class__"] = property(lambda self: claimed)
    meta = LyingMeta if draw(st.booleans()) else type
    cls = meta(f"Hostile{base.__name__.title()}", (base,), namespace)
    return cls(draw(SEEDS[base]))


def _materialize(value: Any) -> Any:
    """Turn lazy results (map, zip, iterators) into lists, so what they yield is checked too."""
    if type(value).__module__ == "builtins" and isinstance(value, Iterator):
        return list(value)
    return value


class World:
    """One run's globals and everything a leak could hand back, by identity."""

    def __init__(self) -> None:
        self.state = RunState(CAP)
        self.namespace = build_globals(self.state, IMPORTS)
        self.builtins = self.namespace["__builtins__"]
        proxy = self.builtins["__import__"]("math")
        self.targets = [
            *(v for v in self.namespace.values() if callable(v)),
            *(v for k, v in self.builtins.items() if k in ("getattr", "hasattr", "__import__")),
            proxy, self.state, 1, "text", (1,), [1], {"k": 1},
        ]  # fmt: skip
        self.forbidden: dict[int, str] = {
            id(self.namespace): "the run's globals",
            id(builtins.__dict__): "the real builtins",
            id(vars(_restricted)): "a module's globals",
        }
        guards = sys.modules.get("sandbox._guards")
        if guards is not None:
            sealed = guards.SEALED_NAMESPACE
            self.forbidden[id(vars(guards))] = "a module's globals"
            self.forbidden[id(sealed)] = "the guards' globals"
            self.forbidden[id(sealed["__builtins__"])] = "the guards' builtins"
        self.keep = [self.namespace]
        for target in self.targets:
            for dunder in DUNDER_NAMES:
                value = getattr(target, dunder, None)
                if value is not None and type(value) not in (str, int, bool, tuple):
                    self.keep.append(value)
                    self.forbidden.setdefault(id(value), f"{dunder} of {type(target).__name__}")

    def check(self, value: Any, depth: int = 0) -> None:
        """Fail if `value`, or anything in it, is something a run must never get."""
        if id(value) in self.forbidden:
            pytest.fail(f"handed out {self.forbidden[id(value)]}")
        # By the real type, never by isinstance (a hostile `__class__` may claim anything) or by
        # == on types (a hostile metaclass may say yes).
        bad = (types.FrameType, types.CodeType, types.TracebackType, types.ModuleType)
        assert not any(_derives(value, kind) for kind in bad), type(value).__name__
        if depth < 3:
            # Read containers through the builtin types' own methods: a subclass may lie.
            for kind, items in ((list, list.__iter__), (tuple, tuple.__iter__),
                                (set, set.__iter__), (frozenset, frozenset.__iter__),
                                (dict, dict.values)):  # fmt: skip
                if _derives(value, kind):
                    for item in items(value):
                        self.check(item, depth + 1)

    def check_state(self) -> None:
        parts = self.state.stdout_parts
        assert all(type(part) is str for part in parts)
        size = sum(len(str.encode(part, "utf-8", "surrogatepass")) for part in parts)
        assert size == self.state.stdout_bytes <= CAP


def _derives(value: Any, kind: type) -> bool:
    return any(base is kind for base in type(value).__mro__)


def _exact(value: Any) -> str | None:
    return str.__str__(value) if _derives(value, str) else None


def _plain_print(objects: tuple[Any, ...], sep: Any, end: Any) -> str:
    """What print writes, computed from exact copies (the plain-type behaviour)."""
    return str.__str__(sep).join(str.__str__(str(o)) for o in objects) + str.__str__(end)


def _guard_calls(w: World, a: Any, b: Any) -> Iterator[tuple[str, Callable[[], Any]]]:
    ns, bi = w.namespace, w.builtins
    for i, target in enumerate(w.targets):
        yield f"getattr#{i}", lambda t=target: ns["_getattr_"](t, a)
        yield f"getattr-default#{i}", lambda t=target: bi["getattr"](t, a, None)
        yield f"hasattr#{i}", lambda t=target: bi["hasattr"](t, a)
    yield "getitem", lambda: ns["_getitem_"](a, b)
    yield "getitem-target", lambda: ns["_getitem_"]({"k": 1}, a)
    yield "import", lambda: bi["__import__"](a)
    yield "import-fromlist", lambda: bi["__import__"]("math", None, None, a, 0)
    yield "import-level", lambda: bi["__import__"]("math", None, None, None, a)
    yield "inplace-op", lambda: ns["_inplacevar_"](a, 1, 2)
    yield "inplace-values", lambda: ns["_inplacevar_"]("+=", a, b)
    yield "unpack", lambda: ns["_unpack_sequence_"](a, {"min_len": 2, "childs": []}, iter)
    yield (
        "iter-unpack",
        lambda: list(ns["_iter_unpack_sequence_"]([a, b], {"min_len": 1, "childs": []}, iter)),
    )


def _builtin_calls(w: World, a: Any, b: Any) -> Iterator[tuple[str, Callable[[], Any]]]:
    bi = w.builtins
    for name in ("str", "repr", "int", "len", "bool", "hash", "abs", "list", "tuple", "dict",
                 "set", "frozenset", "sorted", "reversed", "iter", "enumerate", "any", "all",
                 "sum", "min", "max", "format", "bytes", "range"):  # fmt: skip
        yield name, lambda fn=bi[name]: fn(a)
    yield "format-spec", lambda: bi["format"](a, b)
    yield "format-int", lambda: bi["format"](1, a)
    yield "sorted-key", lambda: bi["sorted"]([a, b], key=lambda item: b)
    yield "min-key", lambda: bi["min"]([a, b], key=lambda item: a)
    yield "max-key", lambda: bi["max"](a, b, key=lambda item: item)
    yield "sum-start", lambda: bi["sum"]([a], b)
    yield "zip", lambda: bi["zip"](a, b)
    yield "map", lambda: bi["map"](lambda x: x, a)
    yield "filter", lambda: bi["filter"](None, a)
    yield "next", lambda: bi["next"](bi["iter"](a))
    yield "range2", lambda: bi["range"](a, b)
    yield "join", lambda: "".join(a)
    yield "isinstance", lambda: bi["isinstance"](a, bi["str"])


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(a=hostile_objects(), b=hostile_objects())
def test_hostile_subclasses_get_nothing_from_guards_or_builtins(a, b):
    w = World()
    for _label, call in [*_guard_calls(w, a, b), *_builtin_calls(w, a, b)]:
        try:
            result = _materialize(call())
        except Exception:  # noqa: BLE001 - refused, or the hostile method raised: both fine
            continue
        w.check(result)
    w.check_state()

    # The guards that decide something must have decided it on the exact value.
    name = _exact(a)
    getattr_ = w.builtins["getattr"]
    try:
        getattr_("text", a)
    except AttributeError:
        pass
    except Exception:  # noqa: BLE001
        assert name is None or name.startswith("_") or name in BLOCKED_ATTRIBUTES, name
    else:
        assert name is not None and not name.startswith("_"), name
        assert name not in BLOCKED_ATTRIBUTES, name
    for obj in (a, b):
        if w.namespace["_write_"](obj) is obj:  # subclasses are never written to
            pytest.fail(f"_write_ let a {type(obj).__name__} be written to")
    with pytest.raises(Exception):  # noqa: B017 - a denial or a TypeError, never a module
        w.builtins["__import__"](a)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects=st.lists(hostile_objects(), max_size=3), sep=hostile_objects(),
       end=hostile_objects())  # fmt: skip
def test_print_writes_what_plain_strings_would_and_never_past_the_cap(objects, sep, end):
    w = World()
    printer = w.namespace["_print_"](None)
    try:
        expected: str | None = _plain_print(tuple(objects), sep, end)
    except Exception:  # noqa: BLE001 - a non-str sep or end, or a raising __str__
        expected = None
    before = w.state.stdout()
    try:
        printer._call_print(*objects, sep=sep, end=end)
    except Exception:  # noqa: BLE001
        assert expected is None
    else:
        assert expected is not None
        written = w.state.stdout()[len(before) :]
        limit_hit = len(expected.encode("utf-8", "surrogatepass")) > CAP
        assert written == ("" if limit_hit else expected)
        assert w.state.output_exceeded == limit_hit
    w.check_state()
