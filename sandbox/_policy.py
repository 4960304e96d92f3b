"""The sandbox policy: which modules may be allowed, limit defaults and maxima, isolation layers."""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ImportNotAllowed, InvalidRequest, PolicyError
from ._limits import Limits

#: Every isolation layer the runner knows, in the order the child applies them.
LAYERS: tuple[str, ...] = (
    "restricted_python",
    "session",
    "fds",
    "environment",
    "pidns",
    "utsns",
    "ipcns",
    "netns",
    "memory_cgroup",
    "workdir",
    "rlimits",
    "uid",
    "no_new_privs",
    "seccomp",
)


def _default_policy_path() -> Path:
    env = os.environ.get("SANDBOX_POLICY")
    if env:
        return Path(env)
    # A source checkout (or an editable install, whose installed copy may be stale) first.
    checkout = Path(__file__).resolve().parents[1] / "policies" / "sandbox.json"
    if checkout.is_file():
        return checkout
    # Installed from the wheel: `policies/` ships as the data package `appliance_policies`.
    try:
        installed = importlib.resources.files("appliance_policies") / "sandbox.json"
    except ModuleNotFoundError:
        installed = None
    if isinstance(installed, Path) and installed.is_file():
        return installed
    raise PolicyError("no sandbox policy found: set SANDBOX_POLICY to the policy file")


def _names(raw: Any, what: str) -> frozenset[str]:
    # A JSON object (name -> why) or a list of names; anything else is an error.
    if not isinstance(raw, dict | list | tuple) or not all(isinstance(n, str) for n in raw):
        raise ValueError(f"{what} must be a list of names or an object keyed by name")
    return frozenset(raw)


def _id(raw: Any, what: str) -> int:
    # Never root (the child would keep every privilege) and never -1 (setresuid's "unchanged").
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 < raw < 2**32 - 1:
        raise ValueError(f"{what} must be an unprivileged id, 1 to {2**32 - 2}")
    return raw


@dataclass(frozen=True)
class Policy:
    """A loaded policy. Anything not explicitly importable is refused (default deny)."""

    importable: frozenset[str]
    never: frozenset[str]
    defaults: Limits
    maxima: Limits
    required_layers: frozenset[str]
    degraded_layers: frozenset[str]
    uid: int
    gid: int

    @classmethod
    def load(cls, path: Path | None = None) -> Policy:
        """Load and validate a policy file (the bundled one by default); raises PolicyError."""
        path = path or _default_policy_path()
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise PolicyError(f"cannot read sandbox policy {path}: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> Policy:
        """Validate a policy given as a JSON object; raises PolicyError."""
        if not isinstance(raw, dict):
            raise PolicyError("malformed sandbox policy: not a JSON object")
        try:
            importable = _names(raw["importable"], "importable")
            never = _names(raw["never"], "never")
            limits = raw["limits"]
            defaults = Limits.from_mapping(limits["defaults"])
            maxima = Limits.from_mapping(limits["maxima"])
            iso = raw["isolation"]
            required = _names(iso["required_layers"], "required_layers")
            degraded = _names(iso.get("degraded_layers", ()), "degraded_layers")
            uid, gid = _id(iso["uid"], "uid"), _id(iso["gid"], "gid")
        except (KeyError, TypeError, ValueError, InvalidRequest) as exc:
            raise PolicyError(f"malformed sandbox policy: {exc}") from exc
        if importable & never:
            raise PolicyError(f"modules both importable and never: {sorted(importable & never)}")
        unknown = (required | degraded) - set(LAYERS)
        if unknown:
            raise PolicyError(f"unknown isolation layers: {sorted(unknown)}")
        if "restricted_python" in degraded:
            raise PolicyError("the restricted_python layer cannot be degraded")
        try:
            defaults.check_within(maxima)
        except InvalidRequest as exc:
            raise PolicyError(f"malformed sandbox policy: default {exc}") from exc
        return cls(importable, never, defaults, maxima, required, degraded, uid, gid)

    def check_imports(self, modules: Iterable[str]) -> tuple[str, ...]:
        """Return the modules if each one may be allowed; raise ImportNotAllowed naming the rest."""
        wanted = tuple(dict.fromkeys(modules))
        never = [m for m in wanted if m in self.never or m.split(".")[0] in self.never]
        if never:
            raise ImportNotAllowed(never, never=True)
        unlisted = [m for m in wanted if m not in self.importable]
        if unlisted:
            raise ImportNotAllowed(unlisted, never=False)
        return wanted

    def limits(self, raw: dict[str, Any] | None) -> Limits:
        """Validate requested limits against this policy (defaults fill gaps, maxima cap)."""
        limits = Limits.from_mapping(raw or {}, defaults=self.defaults)
        limits.check_within(self.maxima)
        return limits

    def may_skip(self, layer: str) -> bool:
        """Whether the operator configured this layer as allowed to be missing."""
        return layer in self.degraded_layers or layer not in self.required_layers
