"""The compile layer in-process: guards, read-only modules, the run's bookkeeping."""

from __future__ import annotations

import pytest

from sandbox import Policy
from sandbox._restricted import (
    PolicyViolation,
    ReadOnlyModule,
    RunState,
    build_globals,
    compile_module,
    module_proxy,
    public_names,
)


def _run(source: str, imports: tuple[str, ...] = ()) -> tuple[object, RunState]:
    state = RunState(100)
    namespace = build_globals(state, imports)
    exec(compile_module(source), namespace)
    return namespace["f"](), state


def test_run_state_keeps_the_first_denial_and_caps_output():
    state = RunState(5)
    assert isinstance(state.deny("first"), PolicyViolation)
    state.deny("second")
    assert state.denial == "first"
    state.write("abc")
    state.write("def")
    assert state.stdout() == "abc" and state.output_exceeded


def test_run_state_with_abort_ends_at_the_first_violation():
    calls = []

    class Stop(Exception):
        pass

    def abort(status, err):
        calls.append((status, err["type"]))
        raise Stop

    state = RunState(3, abort)
    with pytest.raises(Stop):
        state.write("toolong")
    with pytest.raises(Stop):
        state.deny("no")
    assert calls == [("output_limit", "OutputLimit"), ("denied", "PolicyViolation")]


def test_writes_to_plain_containers_are_allowed():
    value, state = _run(
        "def f():\n    d = {}\n    d['a'] = [0]\n    d['a'][0] = 1\n"
        "    del d['a'][0]\n    return d\n"
    )
    assert value == {"a": []} and state.denial is None


@pytest.mark.parametrize(
    "body",
    ["m.pi = 1", "del m.pi", "m['x'] = 1", "(1, 2)[0] = 3", "'abc'[0] = 'x'"],
)
def test_other_writes_are_denied(body):
    with pytest.raises(PolicyViolation):
        _run(f"import math as m\ndef f():\n    {body}\n", ("math",))


def test_module_proxy_is_read_only_and_names_only_public_api():
    proxy = module_proxy("json")
    assert isinstance(proxy, ReadOnlyModule)
    assert sorted(dir(proxy)) == sorted(public_names("json"))
    with pytest.raises(AttributeError):
        proxy.dumps = None
    with pytest.raises(AttributeError):
        proxy.decoder  # noqa: B018 - a submodule is not handed out


def test_random_proxy_is_fresh_and_unseedable():
    first, second = module_proxy("random"), module_proxy("random")
    assert first.random() != second.random()
    for name in ("seed", "setstate", "getstate"):
        assert name not in dir(first)


def test_every_importable_module_can_be_proxied():
    for name in Policy.load().importable:
        assert dir(module_proxy(name)), name


# ---- Type confusion: objects whose class (or metaclass) lies to the guard that checks them ----


class _LyingMeta(type):
    """A metaclass whose classes claim to equal every other class."""

    def __eq__(cls, other):
        return True

    __hash__ = type.__hash__


class _LyingStr(str):
    """A str that says it starts with nothing, equals everything and encodes to nothing."""

    def startswith(self, *args):
        return False

    def __eq__(self, other):
        return True

    __hash__ = str.__hash__

    def encode(self, *args):
        return b""

    def __len__(self):
        return 0

    def join(self, parts):
        return _LyingStr("LIE")


def _guards(state: RunState, imports: tuple[str, ...] = ()) -> dict[str, object]:
    namespace = build_globals(state, imports)
    return {**namespace, **namespace["__builtins__"]}  # type: ignore[dict-item]


def test_write_guard_compares_types_by_identity_not_by_a_metaclass_eq():
    state = RunState(100)
    write = _guards(state)["_write_"]
    for base in (dict, list):
        liar = _LyingMeta("Liar", (base,), {})()
        assert type(liar) == dict  # noqa: E721 - the comparison the old guard made
        refused = write(liar)
        assert refused is not liar
        with pytest.raises(PolicyViolation):
            refused["key"] = 1
    assert write(d := {}) is d and write(items := []) is items


def test_getattr_checks_an_exact_copy_of_a_lying_name():
    state = RunState(100)
    guards = _guards(state)
    with pytest.raises(PolicyViolation):
        guards["getattr"](guards["getattr"], _LyingStr("__globals__"))
    assert guards["getattr"]("abc", _LyingStr("upper"))() == "ABC"
    with pytest.raises(TypeError):
        guards["getattr"](1, 5)


@pytest.mark.parametrize(
    "call",
    [
        lambda imp: imp(_LyingStr("math")),
        lambda imp: imp("math", None, None, (_LyingStr("pi"),), 0),
        lambda imp: imp("math", None, None, [_LyingStr("pi")], 0),
    ],
)
def test_import_refuses_anything_but_exact_names(call):
    state = RunState(100)
    with pytest.raises(PolicyViolation):
        call(_guards(state, ("math",))["__import__"])
    assert state.denial is not None


def test_inplace_operator_must_be_an_exact_str():
    state = RunState(100)
    inplacevar = _guards(state)["_inplacevar_"]
    assert inplacevar("+=", 1, 2) == 3
    with pytest.raises(PolicyViolation):
        inplacevar(_LyingStr("+="), 1, 2)


def test_run_state_counts_the_real_size_of_a_lying_str():
    state = RunState(10)
    state.write(_LyingStr("x" * 100))
    assert state.output_exceeded and state.stdout() == ""
    state = RunState(10)
    state.write(_LyingStr("abc"))
    assert [type(part) for part in state.stdout_parts] == [str] and state.stdout() == "abc"


def test_printer_builds_text_from_exact_copies():
    class Shown:
        def __str__(self):
            return _LyingStr("shown")

    state = RunState(1000)
    printer = _guards(state)["_print_"](None)
    printer._call_print("a", Shown(), sep=_LyingStr("-"), end=_LyingStr("!"))
    printer._call_print("b", flush=True, file=None)
    assert state.stdout() == "a-shown!b\n" and printer() == state.stdout()
    with pytest.raises(TypeError):
        printer._call_print("c", sep=1)
    with pytest.raises(TypeError):
        printer._call_print("c", **{_LyingStr("sep"): "-"})
    with pytest.raises(PolicyViolation):
        printer._call_print("c", file=[])
