"""Authorization of one task against the sandbox policy and the signing client's own policy.

Default deny: each check raises, and a task becomes a job spec only after all of them passed.
The order is part of the contract (which refusal a request that breaks two rules gets): the
function name, the secret names, the function, the limits, the imports, the secrets.
"""

from __future__ import annotations

from typing import Any

import sandbox

from ..errors import BadRequest, Forbidden
from ..registry import Client
from ..secret_names import check_secret_name
from ..specs import JobSpec
from ._schemas import TaskIn


def authorize(policy: sandbox.Policy, client: Client, task: TaskIn) -> JobSpec:
    """Check the task against the sandbox policy and the client's; return the job spec."""
    if not sandbox.ENTRY_PATTERN.fullmatch(task.function):
        raise BadRequest("function must be a plain function name", code="invalid_function")
    # Secret names become OpenBao paths: a malformed one is refused before any policy check.
    for name in task.secrets:
        check_secret_name(name)
    if not client.may_call(task.function):
        raise Forbidden(f"client may not call {task.function!r}", code="function_not_allowed")
    limits = _limits(policy, client, task.limits)
    imports = _imports(policy, client, task.imports)
    refused = [s for s in task.secrets if not client.may_read_secret(s)]
    if refused:
        raise Forbidden(f"client may not read secret {refused[0]!r}", code="secret_not_allowed")
    return JobSpec(
        module=task.module,
        function=task.function,
        args=task.args,
        kwargs=task.kwargs,
        limits=limits.to_dict(),
        imports=list(imports),
        secrets=list(task.secrets),
        # The worker checks the names against these again before it reads a secret.
        secret_globs=list(client.allowed_secrets) if task.secrets else [],
        owner_key_sha256=client.public_key_sha256(),
    )


def _limits(policy: sandbox.Policy, client: Client, requested: dict[str, Any]) -> sandbox.Limits:
    """The limits the job runs with: the request within the policy's and the client's caps."""
    try:
        limits = policy.limits(requested)
    except sandbox.LimitNotAllowed as exc:
        raise Forbidden(str(exc), code="limits_not_allowed") from exc
    except sandbox.InvalidRequest as exc:
        raise BadRequest(str(exc), code="invalid_limits") from exc
    for name, cap in (client.limits or {}).items():
        if getattr(limits, name, 0) > cap:
            raise Forbidden(
                f"limit {name} above the client's maximum {cap}", code="limits_not_allowed"
            )
    return limits


def _imports(policy: sandbox.Policy, client: Client, requested: list[str]) -> tuple[str, ...]:
    """The imports the job may use: allowed by the policy and by the client."""
    try:
        imports = tuple(policy.check_imports(requested))
    except sandbox.ImportNotAllowed as exc:
        raise Forbidden(str(exc), code="import_not_allowed") from exc
    refused = [m for m in imports if m not in client.allowed_imports]
    if refused:
        raise Forbidden(f"client may not import {', '.join(refused)}", code="import_not_allowed")
    return imports
