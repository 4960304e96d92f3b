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
    value, state = _run("def f():\n    d = {}\n    d['a'] = [0]\n    d['a'][0] = 1\n"
                        "    del d['a'][0]\n    return d\n")
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
