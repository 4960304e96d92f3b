"""A validated run request: what the parent hands the child."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import InvalidRequest
from ._limits import Limits
from ._policy import Policy

ENTRY_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}")
MAX_SOURCE_BYTES = 1024 * 1024
#: Deepest nesting accepted in arguments (the same bound the parent puts on a returned value).
MAX_ARGUMENT_DEPTH = 100


@dataclass(frozen=True)
class PreparedRun:
    """A run that passed validation against a policy; nothing in it is trusted code."""

    source: str
    entry: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    imports: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The request as JSON, for the fork server."""
        return {
            "source": self.source,
            "entry": self.entry,
            "args": self.args,
            "kwargs": self.kwargs,
            "limits": self.limits.to_dict(),
            "imports": list(self.imports),
        }


def prepare(
    policy: Policy,
    raw_source: Any,
    entry: Any,
    args: Any = (),
    kwargs: Any = None,
    limits: Mapping[str, Any] | Limits | None = None,
    allow_imports: Iterable[str] = (),
) -> PreparedRun:
    """Validate an untrusted request against the policy; raise InvalidRequest and run nothing."""
    if not isinstance(raw_source, str):
        raise InvalidRequest("source must be a string")
    if len(raw_source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        raise InvalidRequest(f"source is larger than {MAX_SOURCE_BYTES} bytes")
    if not isinstance(entry, str) or not ENTRY_PATTERN.fullmatch(entry):
        raise InvalidRequest(
            "entry must be a function name: a letter, then letters, digits or underscores"
        )
    if isinstance(args, tuple):
        args = list(args)
    if not isinstance(args, list):
        raise InvalidRequest("args must be a JSON list")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not all(
        isinstance(k, str) and ENTRY_PATTERN.fullmatch(k) for k in kwargs
    ):
        raise InvalidRequest("kwargs must be a JSON object whose keys are parameter names")
    _check_json("args", args)
    _check_json("kwargs", kwargs)
    if isinstance(limits, Limits):
        checked = limits
        checked.check_within(policy.maxima)
    elif limits is None or isinstance(limits, Mapping):
        checked = policy.limits(dict(limits or {}))
    else:
        raise InvalidRequest("limits must be a JSON object")
    modules = (
        list(allow_imports)
        if isinstance(allow_imports, Iterable) and not isinstance(allow_imports, str | bytes)
        else None
    )
    if modules is None or not all(isinstance(m, str) for m in modules):
        raise InvalidRequest("imports must be a list of module names")
    imports = policy.check_imports(modules)
    return PreparedRun(raw_source, entry, list(args), dict(kwargs), checked, imports)


def _check_json(name: str, value: Any) -> None:
    """Raise InvalidRequest unless `value` is plain, finite JSON no deeper than the reply may be."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_ARGUMENT_DEPTH:
            raise InvalidRequest(f"{name} nests deeper than {MAX_ARGUMENT_DEPTH} levels")
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                raise InvalidRequest(f"{name} has an object key that is not a string")
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidRequest(f"{name} holds {item}, which is not JSON")
        elif item is not None and not isinstance(item, bool | int | str):
            raise InvalidRequest(f"{name} holds a {type(item).__name__}, which is not JSON")


def from_wire(policy: Policy, wire: Mapping[str, Any]) -> PreparedRun:
    """Re-validate a request received by the fork server."""
    if not isinstance(wire, Mapping):
        raise InvalidRequest("request must be a JSON object")
    return prepare(
        policy,
        wire.get("source"),
        wire.get("entry"),
        wire.get("args", []),
        wire.get("kwargs", {}),
        wire.get("limits", {}),
        wire.get("imports", []),
    )
