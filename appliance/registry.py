"""The client registry: who may call, with which key, for which functions and secrets.

It lives in OpenBao's KV v2 engine under `appliance/clients/<keyid>`; the API reads it, the
operator's CLI writes it.

Revocation takes effect at once, in every process. The API caches what it read, but only for as
long as the *registry generation* has not changed: a random token in Redis
(`registry:generation`) that every operator write replaces after the entry is written to
OpenBao. Each lookup reads the token first (one Redis GET, which the API role may only read) and
re-reads OpenBao when it differs from the one the cached entry was read under. So the first
request after `appliance clients disable` returns, in any API process, reads the disabled entry
and is refused. The token is random rather than a counter: a lost or reset key can never make an
old entry look current again. A short TTL still bounds an entry's life, for writes made to
OpenBao directly, without the CLI, or whose token could not be renewed (the CLI then says so).

What an unauthenticated caller can make the API hold or read is bounded (issue 12, finding 10:
every new key id cost an OpenBao read and a cache entry that was never evicted). The API lists
the registered key ids (one OpenBao LIST, kept under the same generation and TTL) and reads an
entry only for a key id in that listing: a claimed key id that is not registered costs no read
and no entry, however many distinct ones arrive. The entries themselves are an LRU of at most
`max_entries` registered clients, each expiring after `cache_seconds`; since only registered key
ids get an entry, a flood of made-up ones cannot evict a real client's.

An entry is parsed with exact types (`parse_entry`), because the operator may edit it in OpenBao
by hand (red team of issue 12, item 6: `"enabled": "false"`, a string, left a client enabled, and
a string where a number belongs gave a 500). An entry that does not parse is unusable: the API
refuses its key id as it refuses an unknown one (401 `invalid_signature`), and the reason goes to
the audit log (`reason="invalid_registry_entry"`) and the API's log, never to the client.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import BadRequest, DependencyUnavailable, NotFound, Unauthorized
from .observability import REGISTRY_CACHED, REGISTRY_READS
from .secret_names import check_secret_glob, glob_allows
from .vault import VaultSession, list_kv, read_kv_if_present

#: A client's default budget of stored result bytes (about five results of the largest size,
#: 8 MiB of output sealed into about 12.6 MB); see SECURITY.md, "Redis memory".
DEFAULT_STORAGE_BYTES = 64 * 1024 * 1024
KEYID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PATH = "appliance/clients/{}"
_LOG = logging.getLogger("appliance.registry")

#: Bounds of a stored entry: list lengths, a glob's length, and each number's range.
MAX_GLOBS = 256
MAX_GLOB_LENGTH = 256
_INT_BOUNDS = {
    "rate_per_minute": (1, 10**9),
    "daily_quota": (0, 10**12),
    "storage_bytes": (0, 2**50),
}
#: The client's caps on a job's limits (`sandbox.Limits`): positive, finite numbers.
_LIMIT_NAMES = frozenset({"cpu_seconds", "wall_seconds", "memory_mb", "output_bytes"})
_MAX_LIMIT = 2**53
_FIELDS = frozenset(
    {"keyid", "public_key_pem", "allowed_functions", "allowed_secrets", "allowed_imports"}
    | {"limits", "enabled", *_INT_BOUNDS}
)


class InvalidRegistryEntry(Unauthorized):
    """Raised when a stored registry entry does not parse with exact types: its key id is
    refused as an unknown one is; the detail names the field, never its value."""

    def __init__(self, keyid: str, detail: str) -> None:
        super().__init__(
            f"registry entry {keyid}: {detail}",
            code="invalid_signature",
            reason="invalid_registry_entry",
            claimed_keyid=keyid,
        )


@dataclass(frozen=True)
class Client:
    """A registered client and its policy. Anything not allowed here is refused."""

    keyid: str
    public_key_pem: str
    allowed_functions: tuple[str, ...] = ()
    allowed_secrets: tuple[str, ...] = ()
    allowed_imports: tuple[str, ...] = ()
    limits: dict[str, Any] = field(default_factory=dict)
    rate_per_minute: int = 120
    #: Jobs per UTC day; 0 means no daily quota.
    daily_quota: int = 0
    #: Bytes of sealed results the client may hold in Redis before submissions get 429.
    storage_bytes: int = DEFAULT_STORAGE_BYTES
    enabled: bool = True

    def public_key(self) -> Ed25519PublicKey:
        """The client's Ed25519 public key."""
        return self._public_key

    # Parsed once per entry read, not once per request (issue 16): an entry is immutable, and a
    # cached one is replaced by a new object whenever the registry changes.
    @functools.cached_property
    def _public_key(self) -> Ed25519PublicKey:
        key = serialization.load_pem_public_key(self.public_key_pem.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise BadRequest("client public key is not Ed25519")
        return key

    def may_call(self, function: str) -> bool:
        """Whether a glob in the allow list matches the function name."""
        return any(fnmatch.fnmatchcase(function, glob) for glob in self.allowed_functions)

    def may_read_secret(self, name: str) -> bool:
        """Whether a glob in the allow list matches the secret name, segment by segment
        (`appliance.secret_names`); a malformed name or glob matches nothing."""
        return any(glob_allows(glob, name) for glob in self.allowed_secrets)

    def public_key_sha256(self) -> str:
        """The SHA-256 of the public key (DER), to tell keys apart in a listing."""
        return self._public_key_sha256

    @functools.cached_property
    def _public_key_sha256(self) -> str:
        der = self.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(der).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The stored form."""
        data = asdict(self)
        for name in ("allowed_functions", "allowed_secrets", "allowed_imports"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Client:
        """Rebuild from the stored form (`parse_entry` under its own key id)."""
        keyid = data.get("keyid") if isinstance(data, dict) else None
        return parse_entry(keyid if isinstance(keyid, str) else "?", data)


def parse_entry(keyid: str, untrusted_entry: object) -> Client:
    """The client stored under `keyid`, parsed with exact types; raise InvalidRegistryEntry.

    A bool must be a JSON bool, a number a JSON integer within its bounds (a limit cap: a
    positive finite number), a list a JSON list of strings; no field may be unknown (a typo
    such as `"enable": false` must not leave the default in force) and the entry's own key id
    must be the one it is stored under.
    """
    try:
        return _parse(keyid, untrusted_entry)
    except (BadRequest, TypeError, ValueError) as exc:
        raise InvalidRegistryEntry(keyid, str(exc)) from None


def _parse(keyid: str, raw: object) -> Client:
    if not isinstance(raw, dict):
        raise TypeError("not a JSON object")
    unknown = sorted(set(raw) - _FIELDS, key=str)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(_name, unknown))}")
    if raw.get("keyid") != keyid or not KEYID_PATTERN.fullmatch(keyid):
        raise ValueError("keyid is not the key id it is stored under")
    pem = raw.get("public_key_pem")
    if not isinstance(pem, str):
        raise TypeError("public_key_pem must be a string")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise TypeError("enabled must be a JSON bool")
    numbers = {name: _int(raw, name, default) for name, default in _INT_DEFAULTS.items()}
    client = Client(
        keyid,
        pem,
        _strings(raw, "allowed_functions"),
        tuple(check_secret_glob(glob) for glob in _strings(raw, "allowed_secrets")),
        _strings(raw, "allowed_imports"),
        _limits(raw.get("limits", {})),
        enabled=enabled,
        **numbers,
    )
    try:
        client.public_key()
    except (BadRequest, ValueError, TypeError):
        raise ValueError("public_key_pem is not an Ed25519 public key in PEM") from None
    return client


_INT_DEFAULTS = {"rate_per_minute": 120, "daily_quota": 0, "storage_bytes": DEFAULT_STORAGE_BYTES}


def _name(field_name: object) -> str:
    return field_name if isinstance(field_name, str) and len(field_name) <= 64 else "(odd name)"


def _int(raw: dict[str, Any], name: str, default: int) -> int:
    value = raw.get(name, default)
    low, high = _INT_BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a JSON integer in [{low}, {high}]")
    return value


def _strings(raw: dict[str, Any], name: str) -> tuple[str, ...]:
    value = raw.get(name, [])
    if not isinstance(value, list) or len(value) > MAX_GLOBS:
        raise TypeError(f"{name} must be a JSON list of at most {MAX_GLOBS} strings")
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_GLOB_LENGTH for v in value):
        raise TypeError(f"{name} must hold strings of 1 to {MAX_GLOB_LENGTH} characters")
    return tuple(value)


def _limits(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or not set(value) <= _LIMIT_NAMES:
        raise ValueError(f"limits must be a JSON object of {', '.join(sorted(_LIMIT_NAMES))}")
    for name, cap in value.items():
        number = isinstance(cap, int | float) and not isinstance(cap, bool)
        if not number or not math.isfinite(cap) or not 0 < cap <= _MAX_LIMIT:
            raise ValueError(f"limits.{name} must be a positive number of at most 2**53")
    return dict(value)


def validate_keyid(keyid: str) -> str:
    """Return the key id if well-formed, else raise BadRequest."""
    if not KEYID_PATTERN.fullmatch(keyid):
        raise BadRequest("key id: letters, digits, '.', '_' or '-', at most 64", code="bad_keyid")
    return keyid


class Generation(Protocol):
    """Where the registry generation lives: read on every lookup, renewed on every write."""

    def current(self) -> str | None:
        """The current generation, or None when none was ever set."""

    def renew(self) -> None:
        """Replace the generation with a fresh one."""


@dataclass(frozen=True)
class _Cached:
    read_at: float
    generation: str | None
    client: Client | InvalidRegistryEntry | None


@dataclass(frozen=True)
class _Listing:
    read_at: float
    generation: str | None
    keyids: frozenset[str]

    def current(self, generation: str | None, now: float, ttl: float) -> bool:
        return self.generation == generation and now - self.read_at < ttl


class Registry:
    """Reads clients from OpenBao; with a `generation`, caches the registered key ids and up to
    `max_entries` entries (least recently used first out) until the generation changes or
    `cache_seconds` pass, and renews it after every write. Without one it reads OpenBao on every
    lookup."""

    def __init__(
        self,
        session: VaultSession,
        mount: str = "kv",
        cache_seconds: float = 5.0,
        generation: Generation | None = None,
        max_entries: int = 1024,
    ) -> None:
        self.session = session
        self.mount = mount
        self.cache_seconds = cache_seconds
        self.generation = generation
        self.max_entries = max_entries
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._listing: _Listing | None = None
        self._lock = threading.Lock()
        # One listing at a time: the threads that find it stale together wait for one LIST.
        self._listing_lock = threading.Lock()

    def get(self, keyid: str) -> Client | None:
        """The enabled client with this key id, or None (unknown, malformed or disabled).

        Raises InvalidRegistryEntry when the key id's stored entry does not parse."""
        if not KEYID_PATTERN.fullmatch(keyid):
            return None
        client = self._lookup(keyid)
        if isinstance(client, InvalidRegistryEntry):
            raise client
        return client if client is not None and client.enabled else None

    def _lookup(self, keyid: str) -> Client | InvalidRegistryEntry | None:
        if self.generation is None:
            return self._read_or_invalid(keyid)
        # The generation is read before OpenBao: an entry is never filed under a generation
        # newer than what it was read after, so a write that lands in between is seen next time.
        generation = self.generation.current()
        now = time.monotonic()
        if keyid not in self._registered(generation, now):
            return None  # No OpenBao read and no cache entry for a key id nobody registered.
        with self._lock:
            hit = self._cache.get(keyid)
            fresh = now - hit.read_at < self.cache_seconds if hit is not None else False
            if hit is not None and fresh and hit.generation == generation:
                self._cache.move_to_end(keyid)
                return hit.client
        # An entry that does not parse is cached as such: it is logged once per read, not once
        # per request naming it.
        client = self._read_or_invalid(keyid)
        self._remember(keyid, _Cached(now, generation, client))
        return client

    def _read_or_invalid(self, keyid: str) -> Client | InvalidRegistryEntry | None:
        try:
            return self._read(keyid)
        except InvalidRegistryEntry as exc:
            _LOG.warning("registry entry refused: %s", exc.detail)
            return exc

    def _registered(self, generation: str | None, now: float) -> frozenset[str]:
        """The registered key ids, listed again when the generation changed or the TTL passed."""
        with self._listing_lock:
            listing = self._listing
            if listing is None or not listing.current(generation, now, self.cache_seconds):
                listing = _Listing(now, generation, frozenset(self.keyids()))
                self._listing = listing
        return listing.keyids

    def _remember(self, keyid: str, cached: _Cached) -> None:
        with self._lock:
            self._cache[keyid] = cached
            self._cache.move_to_end(keyid)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            REGISTRY_CACHED.set(len(self._cache))

    def read(self, keyid: str) -> Client:
        """The stored entry, enabled or not, straight from OpenBao (operator); NotFound if none."""
        client = self._read(validate_keyid(keyid))
        if client is None:
            raise NotFound(f"no client {keyid!r} in the registry", code="unknown_client")
        return client

    def _read(self, keyid: str) -> Client | None:
        REGISTRY_READS.labels("entry").inc()
        data = read_kv_if_present(self.session, _PATH.format(keyid), self.mount)
        return parse_entry(keyid, data) if data is not None else None

    def keyids(self) -> list[str]:
        """Every registered key id, sorted."""
        REGISTRY_READS.labels("list").inc()
        keys = list_kv(self.session, "appliance/clients", self.mount)
        return sorted(k for k in keys if KEYID_PATTERN.fullmatch(k))

    def public_key(self, keyid: str) -> Ed25519PublicKey | None:
        """The key of an enabled client (the signature verifier's resolver)."""
        client = self.get(keyid)
        return client.public_key() if client else None

    def put(self, client: Client) -> None:
        """Register or replace a client (operator only), then renew the generation so that
        every API process reads the new entry on its next lookup.

        Raises DependencyUnavailable when the generation could not be renewed: the entry is
        written, but API processes may use what they cached for up to `cache_seconds` more.
        """
        self.session.call(
            lambda c: c.secrets.kv.v2.create_or_update_secret(
                path=_PATH.format(client.keyid), secret=client.to_dict(), mount_point=self.mount
            )
        )
        with self._lock:
            self._cache.pop(client.keyid, None)
            self._listing = None
        if self.generation is not None:
            try:
                self.generation.renew()
            except DependencyUnavailable as exc:
                raise DependencyUnavailable(
                    f"{client.keyid} is written to the registry, but the registry generation "
                    "could not be renewed (Redis is unreachable): API processes may use what "
                    f"they cached for up to {self.cache_seconds:g} s more",
                    code="generation_not_renewed",
                ) from exc

    def set_enabled(self, keyid: str, enabled: bool) -> Client:
        """Disable or enable a registered client (operator); returns the new entry."""
        client = replace(self.read(keyid), enabled=enabled)
        self.put(client)
        return client


def make_client(
    keyid: str,
    public_key_pem: str,
    functions: Iterable[str],
    secrets: Iterable[str] = (),
    imports: Iterable[str] = (),
) -> Client:
    """Validate operator input into a Client; raise BadRequest."""
    validate_keyid(keyid)
    secrets = tuple(check_secret_glob(glob) for glob in secrets)
    client = Client(keyid, public_key_pem, tuple(functions), secrets, tuple(imports))
    client.public_key()
    return client
