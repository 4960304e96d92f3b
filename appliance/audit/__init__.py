"""The tamper-evident audit log (docs/CONTRACT.md §4).

Services open one `AuditLog` per process and record every security-relevant event through it::

    log = AuditLog.open(settings.audit_log, TransitSigner(transit), source="api")
    log.record(EventType.SUBMISSION_ACCEPTED, client=keyid, function=fn, task_id=tid,
               result_key=key, module_source=source, args=args, kwargs=kwargs)

Entries are JSON Lines chained by SHA-256 and checkpointed (Merkle root and chain head, signed by
the OpenBao transit key `audit`, and anchored in a create-only OpenBao KV path that no writer can
rewrite: `AnchorStore`); `verify_log` checks a log offline with the exported public
keys, and the `audit` click group provides `appliance audit verify` and `appliance audit show`.
Design and operator guide: docs/audit.md.
"""

from ._anchors import (
    ANCHOR_PATH,
    Anchor,
    AnchorConflict,
    AnchorStore,
    UnsafeMemoryAnchorStore,
    VaultAnchorStore,
)
from ._cli import audit as audit_cli
from ._errors import (
    AuditError,
    AuditFieldError,
    AuditLogCorrupt,
    AuditUnavailable,
    PublicKeyError,
    VerificationFailed,
)
from ._events import FIELDS, RULES, AuditEvent, EventType, make_event
from ._format import AuditPaths, CheckpointBody, canonical, entry_hash, merkle_root
from ._show import Filters, parse_since, select
from ._signing import (
    PublicKeys,
    PublicKeySource,
    Signer,
    TransitSigner,
    UnsafeInMemorySigner,
    export_public_keys,
    key_version,
    load_public_keys,
)
from ._sink import AuditSink, UnsafeMemoryAuditSink
from ._verify import (
    DEFAULT_MAX_UNSIGNED_ENTRIES,
    DEFAULT_MAX_UNSIGNED_SECONDS,
    VerifyReport,
    verify_log,
)
from ._writer import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_INTERVAL,
    AuditLog,
    AuditRecord,
)

__all__ = [
    "ANCHOR_PATH",
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_CHECKPOINT_INTERVAL",
    "DEFAULT_MAX_UNSIGNED_ENTRIES",
    "DEFAULT_MAX_UNSIGNED_SECONDS",
    "FIELDS",
    "RULES",
    "Anchor",
    "AnchorConflict",
    "AnchorStore",
    "AuditError",
    "AuditEvent",
    "AuditFieldError",
    "AuditLog",
    "AuditLogCorrupt",
    "AuditPaths",
    "AuditRecord",
    "AuditSink",
    "AuditUnavailable",
    "CheckpointBody",
    "EventType",
    "Filters",
    "PublicKeyError",
    "PublicKeySource",
    "PublicKeys",
    "Signer",
    "TransitSigner",
    "UnsafeInMemorySigner",
    "UnsafeMemoryAnchorStore",
    "UnsafeMemoryAuditSink",
    "VaultAnchorStore",
    "VerificationFailed",
    "VerifyReport",
    "audit_cli",
    "canonical",
    "entry_hash",
    "export_public_keys",
    "key_version",
    "load_public_keys",
    "make_event",
    "merkle_root",
    "parse_since",
    "select",
    "verify_log",
]
