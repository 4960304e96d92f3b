"""The worker: `execute` runs one signed job over the collaborators in a `Runtime`.

The Celery app lives in the entry module `appliance.worker.app` only, so importing this package
builds no Celery app and reads no environment.
"""

from ._execute import InFlight, Runtime, execute, owner, redact, result_body, secrets_refused

__all__ = ["InFlight", "Runtime", "execute", "owner", "redact", "result_body", "secrets_refused"]
