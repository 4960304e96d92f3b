"""The typed job contract: what the API seals into a job (`JobSpec`) and what the worker seals
as its result (`ResultBody`), beside `appliance.jobs.JobMessage`, which carries them.

Both are frozen. `to_json` gives the exact dict that is sealed (the wire format is unchanged
from the dicts these replace); `from_json` reads one back from a sealed envelope, which only the
appliance can make, so it fills absent optional fields with their defaults instead of refusing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class LaterStep:
    """A step after this one, as the API signed it: its task id and result key."""

    task_id: str
    result_key: str


@dataclass(frozen=True)
class WorkflowPlace:
    """Where a job sits in a workflow: step `step` (from 0) of `steps`, workflow `id`.

    The API binds the chain at submission (issue 12, finding 3): `next_sha256` is the digest of
    the next step's signed message (`JobMessage.digest`), and `later` names every later step.
    Both are sealed into this step's job, so only this step's signed message vouches for what
    follows it; nothing read from Redis is taken for a step of this workflow unless it matches.
    """

    id: str
    step: int
    steps: int
    next_sha256: str = ""
    later: tuple[LaterStep, ...] = ()

    @property
    def has_next(self) -> bool:
        return self.step + 1 < self.steps

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "step": self.step,
            "steps": self.steps,
            "next_sha256": self.next_sha256,
            "later": [[s.task_id, s.result_key] for s in self.later],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> WorkflowPlace:
        # A job sealed before the chain was bound has neither field: it reads as an empty chain,
        # which the worker refuses to advance (`bad_workflow`).
        return cls(
            str(raw["id"]),
            int(raw["step"]),
            int(raw["steps"]),
            str(raw.get("next_sha256", "")),
            tuple(LaterStep(str(t), str(k)) for t, k in raw.get("later", [])),
        )


@dataclass(frozen=True)
class JobSpec:
    """One authorized job: the module, the call, its limits, imports and secrets."""

    module: str
    function: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    #: The client's secret globs, sealed in so the worker checks the names again.
    secret_globs: list[str] = field(default_factory=list)
    workflow: WorkflowPlace | None = None
    #: The SHA-256 of the client's public key when the job was accepted: the result is sealed
    #: to it, so a key that replaces it later cannot read the result (`jobs.seal_result`).
    owner_key_sha256: str = ""
    #: The transit keys' generation when the job was accepted (`registry:keys`, renewed by
    #: `appliance keys rotate`): a worker that sees a new one drops the data keys it cached.
    keys_generation: str = ""

    def to_json(self) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "module": self.module,
            "function": self.function,
            "args": self.args,
            "kwargs": self.kwargs,
            "limits": self.limits,
            "imports": self.imports,
            "secrets": self.secrets,
            "secret_globs": self.secret_globs,
        }
        if self.workflow is not None:
            raw["workflow"] = self.workflow.to_json()
        if self.owner_key_sha256:
            raw["owner_key_sha256"] = self.owner_key_sha256
        if self.keys_generation:
            raw["keys_generation"] = self.keys_generation
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobSpec:
        workflow = raw.get("workflow")
        return cls(
            module=str(raw["module"]),
            function=str(raw["function"]),
            args=list(raw.get("args", [])),
            kwargs=dict(raw.get("kwargs", {})),
            limits=dict(raw.get("limits", {})),
            imports=list(raw.get("imports", [])),
            secrets=list(raw.get("secrets", [])),
            secret_globs=list(raw.get("secret_globs", [])),
            workflow=WorkflowPlace.from_json(workflow) if workflow else None,
            owner_key_sha256=str(raw.get("owner_key_sha256", "")),
            keys_generation=str(raw.get("keys_generation", "")),
        )

    def at(self, place: WorkflowPlace) -> JobSpec:
        """This job as a step of a workflow."""
        return replace(self, workflow=place)

    def with_carried(self, value: Any) -> JobSpec:
        """This job with the previous step's value as its first positional argument."""
        return replace(self, args=[value, *self.args])


@dataclass(frozen=True)
class ResultBody:
    """What a client reads: the value on success, an error (`code`, `type`, `message`) else."""

    status: str  # "succeeded", "failed" or "skipped"
    result: Any = None
    error: dict[str, Any] | None = None
    stdout: str = ""
    usage: dict[str, Any] | None = None

    @classmethod
    def failure(cls, code: str, message: str, error_type: str = "JobError") -> ResultBody:
        """A job that ended before or instead of running."""
        return cls("failed", error={"code": code, "type": error_type, "message": message})

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def code(self) -> str:
        """The error code, or "ok"."""
        return str(self.error["code"]) if self.error else "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "result": self.result,
            "error": self.error,
            "stdout": self.stdout,
            "usage": self.usage,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ResultBody:
        return cls(
            status=str(raw["status"]),
            result=raw.get("result"),
            error=raw.get("error"),
            stdout=str(raw.get("stdout", "")),
            usage=raw.get("usage"),
        )
