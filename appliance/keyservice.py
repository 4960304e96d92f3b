"""The key service: what the appliance asks of OpenBao's transit engine for jobs and results.

`KeyService` is the protocol the envelope code (`appliance.jobs`) needs: data keys derived per
client, their unwrapping, an HMAC that only the appliance can make, and Ed25519 signatures that
only the API can make and any worker can check. `appliance.vault.Transit` is the real one;
`UnsafeMemoryKeyService` is the stub for unit tests, held to the same contract suite
(`tests/unit/test_keyservice_contract.py`, and `tests/integration/test_keyservice.py` against
OpenBao).

Two recipes sit on top of the protocol (issue 16: one OpenBao round trip per use was most of a
job's cost):

* `DataKeyCache`, modelled on the AWS Encryption SDK's caching cryptographic materials manager.
  A data key minted for one (transit key, client) seals further messages of that client until
  it reaches its maximum age, number of messages or number of bytes, and a key unwrapped once
  opens further envelopes wrapped under it until its maximum age. The plaintext key is held in a
  `bytearray` inside the cache only (the seal and the open happen under the cache's lock, so no
  caller ever holds it) and is overwritten with zeros when it is evicted.
* `PinnedSignatures`: Ed25519 signatures of a transit key checked in this process, against the
  public half of each key version, fetched once and pinned. A version below the key's minimum
  (retired by `appliance keys rotate --min-decryption-version`) is refused once the key's
  configuration has been read again: at most `refresh_seconds` after the retirement.
"""

from __future__ import annotations

import base64
import hashlib
import hmac as _hmac
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .envelope import Envelope, open_envelope, seal
from .errors import SealBroken

log = logging.getLogger("appliance.keys")


class KeyService(Protocol):
    """Data keys and MACs under named keys, each derived for a context (the client), and Ed25519
    signatures made by the key service and checked in-process."""

    def data_key(self, key_name: str, context: str) -> tuple[bytes, str]:
        """A fresh data key and the same key wrapped (`vault:vN:…`) for `context`."""
        ...

    def unwrap_key(self, key_name: str, wrapped: str, context: str) -> bytes:
        """The data key inside `wrapped`; SealBroken under another name or context."""
        ...

    def hmac(self, key_name: str, message: bytes) -> str:
        """An HMAC of `message` (`vault:vN:…`)."""
        ...

    def verify_hmac(self, key_name: str, message: bytes, mac: str) -> bool:
        """Whether `mac` is this service's HMAC of `message` under `key_name`."""
        ...

    def sign(self, key_name: str, message: bytes) -> str:
        """An Ed25519 signature of `message` (`vault:vN:…`)."""
        ...

    def generation(self) -> str:
        """The transit keys' generation as the operator last renewed it (a token that changes
        with every `appliance keys rotate`), or "" where this process does not read it."""
        ...

    def verify_signature(self, key_name: str, message: bytes, signature: str) -> None:
        """Return if `signature` is this service's signature of `message` under a version of
        `key_name` that is not retired; raise SealBroken otherwise."""
        ...


@runtime_checkable
class EnvelopeKeys(Protocol):
    """A key service that seals and opens envelopes itself (through a `DataKeyCache`)."""

    def seal_envelope(self, key_name: str, context: str, plaintext: bytes, aad: bytes) -> Envelope:
        """`plaintext` sealed under a data key of `key_name` for `context`, bound to `aad`."""
        ...

    def open_envelope(self, key_name: str, context: str, envelope: Envelope, aad: bytes) -> bytes:
        """The plaintext of `envelope`; SealBroken if it does not open."""
        ...


def seal_under(
    keys: KeyService, key_name: str, context: str, plaintext: bytes, aad: bytes
) -> Envelope:
    """Seal through the key service's cache when it has one, else under a fresh data key."""
    if isinstance(keys, EnvelopeKeys):
        return keys.seal_envelope(key_name, context, plaintext, aad)
    return seal_cached(keys, None, key_name, context, plaintext, aad)


def open_under(
    keys: KeyService, key_name: str, context: str, envelope: Envelope, aad: bytes
) -> bytes:
    """Open through the key service's cache when it has one, else by unwrapping the data key."""
    if isinstance(keys, EnvelopeKeys):
        return keys.open_envelope(key_name, context, envelope, aad)
    return open_cached(keys, None, key_name, context, envelope, aad)


def seal_cached(
    keys: KeyService,
    cache: DataKeyCache | None,
    key_name: str,
    context: str,
    plaintext: bytes,
    aad: bytes,
) -> Envelope:
    """`plaintext` sealed under `cache`'s data key of `key_name` for `context` (made by `keys`
    when due), or under a fresh one from `keys` without a cache. What every `EnvelopeKeys`
    does."""
    if cache is None:
        key, wrapped = keys.data_key(key_name, context)
        return seal(key, wrapped, plaintext, aad)
    return cache.seal(key_name, context, plaintext, aad, lambda: keys.data_key(key_name, context))


def open_cached(
    keys: KeyService,
    cache: DataKeyCache | None,
    key_name: str,
    context: str,
    envelope: Envelope,
    aad: bytes,
) -> bytes:
    """The plaintext of `envelope`, its data key from `cache` or unwrapped by `keys`."""

    def unwrap() -> bytes:
        return keys.unwrap_key(key_name, envelope.wrapped_key, context)

    if cache is None:
        return open_envelope(unwrap(), envelope, aad)
    return cache.open(key_name, context, envelope, aad, unwrap)


# -- The data-key cache -------------------------------------------------------------------------

#: The transit keys' generation the current job or request runs under (`keys_generation`).
_GENERATION: ContextVar[str | None] = ContextVar("appliance_keys_generation", default=None)
#: Generations a cache remembers having seen (only a new one clears it).
_SEEN_GENERATIONS = 64


@contextmanager
def keys_generation(token: str | None) -> Iterator[None]:
    """Seal and open within this block under the transit keys' generation `token`: a cache that
    sees a generation for the first time drops (and wipes) every key it holds first, so that a
    rotation or retirement by `appliance keys rotate` (which renews the generation afterwards)
    takes effect from the next job or request on. None: no generation known (no check)."""
    reset = _GENERATION.set(token)
    try:
        yield
    finally:
        _GENERATION.reset(reset)


@dataclass(frozen=True)
class CacheBounds:
    """How long and how much one data key may be used (`APPLIANCE_DATA_KEY_*` settings).

    A bound of 0 (any of the first three) turns caching off: every seal gets a fresh key and
    every open an OpenBao call, as before issue 16.
    """

    #: Seconds a data key seals, and an unwrapped key opens, after it was minted or unwrapped.
    max_age_seconds: float = 60.0
    #: Messages one data key seals (AES-GCM with random 96-bit nonces is safe far beyond this).
    max_messages: int = 1000
    #: Plaintext bytes one data key seals; a larger message gets a key of its own.
    max_bytes: int = 64 * 2**20
    #: Keys held at once, for sealing and for opening each (least recently used evicted first).
    max_keys: int = 512

    @property
    def enabled(self) -> bool:
        """Whether any key is cached at all."""
        return self.max_age_seconds > 0 and self.max_messages > 0 and self.max_bytes > 0


def wipe(key: bytearray) -> None:
    """Overwrite a plaintext key in place."""
    key[:] = bytes(len(key))


@dataclass
class _SealingKey:
    key: bytearray
    wrapped: str
    created: float
    messages: int = 0
    bytes: int = 0


@dataclass
class _OpeningKey:
    key: bytearray
    created: float


@dataclass
class CacheStats:
    """Counters for benchmarks and tests: OpenBao calls made and avoided."""

    seal_hits: int = 0
    seal_misses: int = 0
    open_hits: int = 0
    open_misses: int = 0
    evicted: int = 0


class DataKeyCache:
    """Data keys per (transit key, context) for sealing, and unwrapped keys for opening.

    Thread-safe. OpenBao is called outside the lock; every use of a plaintext key (AES-GCM of
    one message) happens under it, so eviction never wipes a key in use.
    """

    def __init__(self, bounds: CacheBounds, clock: Callable[[], float] = time.monotonic) -> None:
        self.bounds = bounds
        self._clock = clock
        self._lock = threading.Lock()
        self._sealing: OrderedDict[tuple[str, str], _SealingKey] = OrderedDict()
        self._opening: OrderedDict[tuple[str, str, str], _OpeningKey] = OrderedDict()
        self._generations: OrderedDict[str, None] = OrderedDict()
        self.stats = CacheStats()

    def _observe_generation(self) -> None:
        """Clear the cache on the first sight of a generation (under the lock). A job queued
        before the latest rotation carries an older generation, already seen: it clears
        nothing, and the keys cached since are of the newest versions anyway."""
        generation = _GENERATION.get()
        if generation is None or generation in self._generations:
            return
        self._generations[generation] = None
        while len(self._generations) > _SEEN_GENERATIONS:
            self._generations.popitem(last=False)
        self._clear_locked()

    def seal(
        self,
        key_name: str,
        context: str,
        plaintext: bytes,
        aad: bytes,
        mint: Callable[[], tuple[bytes, str]],
    ) -> Envelope:
        """Seal under the cached data key of (key_name, context) while it is within its
        bounds, else under one `mint()` makes (and cache that one)."""
        size = len(plaintext)
        slot = (key_name, context)
        with self._lock:
            self._observe_generation()
            entry = self._sealing.get(slot)
            if entry is not None:
                if self._may_seal(entry, size):
                    self.stats.seal_hits += 1
                    self._sealing.move_to_end(slot)
                    return self._seal_with(entry, plaintext, aad, size)
                self._evict_sealing(slot)
        key, wrapped = mint()
        with self._lock:
            self.stats.seal_misses += 1
            entry = _SealingKey(bytearray(key), wrapped, self._clock())
            if not self.bounds.enabled or size > self.bounds.max_bytes:
                try:
                    return self._seal_with(entry, plaintext, aad, size)
                finally:
                    wipe(entry.key)
            if slot in self._sealing:  # Another thread minted one meanwhile: keep the newest.
                self._evict_sealing(slot)
            self._sealing[slot] = entry
            while len(self._sealing) > self.bounds.max_keys:
                self._evict_sealing(next(iter(self._sealing)))
            return self._seal_with(entry, plaintext, aad, size)

    def open(
        self,
        key_name: str,
        context: str,
        envelope: Envelope,
        aad: bytes,
        unwrap: Callable[[], bytes],
    ) -> bytes:
        """Open with the cached plaintext of `envelope.wrapped_key` under (key_name, context),
        else with the key `unwrap()` returns (cached for its maximum age). Only OpenBao says
        which key a wrapped key holds for a context: the cache answers only what it said."""
        slot = (key_name, context, envelope.wrapped_key)
        with self._lock:
            self._observe_generation()
            entry = self._opening.get(slot)
            if entry is not None:
                if self._clock() - entry.created < self.bounds.max_age_seconds:
                    self.stats.open_hits += 1
                    self._opening.move_to_end(slot)
                    return open_envelope(entry.key, envelope, aad)
                self._evict_opening(slot)
        key = bytearray(unwrap())
        with self._lock:
            self.stats.open_misses += 1
            if not self.bounds.enabled:
                try:
                    return open_envelope(key, envelope, aad)
                finally:
                    wipe(key)
            if slot in self._opening:
                self._evict_opening(slot)
            self._opening[slot] = _OpeningKey(key, self._clock())
            while len(self._opening) > self.bounds.max_keys:
                self._evict_opening(next(iter(self._opening)))
            return open_envelope(key, envelope, aad)

    def clear(self) -> None:
        """Evict (and wipe) every key."""
        with self._lock:
            self._clear_locked()

    def _clear_locked(self) -> None:
        while self._sealing:
            self._evict_sealing(next(iter(self._sealing)))
        while self._opening:
            self._evict_opening(next(iter(self._opening)))

    def held(self) -> int:
        """How many plaintext keys the cache holds now."""
        with self._lock:
            return len(self._sealing) + len(self._opening)

    def _may_seal(self, entry: _SealingKey, size: int) -> bool:
        b = self.bounds
        return (
            self._clock() - entry.created < b.max_age_seconds
            and entry.messages < b.max_messages
            and entry.bytes + size <= b.max_bytes
        )

    @staticmethod
    def _seal_with(entry: _SealingKey, plaintext: bytes, aad: bytes, size: int) -> Envelope:
        entry.messages += 1
        entry.bytes += size
        return seal(entry.key, entry.wrapped, plaintext, aad)

    def _evict_sealing(self, slot: tuple[str, str]) -> None:
        wipe(self._sealing.pop(slot).key)
        self.stats.evicted += 1

    def _evict_opening(self, slot: tuple[str, str, str]) -> None:
        wipe(self._opening.pop(slot).key)
        self.stats.evicted += 1


# -- Pinned signature verification --------------------------------------------------------------


@dataclass(frozen=True)
class SigningKeyRing:
    """What the key service says of a signing key: raw Ed25519 public keys by version, and the
    lowest version it still accepts (`min_decryption_version`)."""

    public_keys: dict[int, bytes]
    min_version: int


def parse_versioned(signature: str) -> tuple[int, bytes]:
    """(version, raw bytes) of a `vault:vN:<base64>` signature; SealBroken when malformed."""
    try:
        prefix, version, raw = signature.split(":", 2)
        if prefix != "vault" or not version.startswith("v") or not version[1:].isdigit():
            raise ValueError("not vault:vN:")
        return int(version[1:]), base64.b64decode(raw, validate=True)
    except ValueError as exc:
        raise SealBroken("malformed signature") from exc


@dataclass
class _Pins:
    keys: dict[int, Ed25519PublicKey] = field(default_factory=dict)
    min_version: int = 1
    checked: float = float("-inf")


class PinnedSignatures:
    """Check Ed25519 signatures of transit keys in-process, the public keys pinned per version.

    `fetch(key_name)` reads the key's public halves and minimum version from the key service.
    It is called on the first signature of a key, on the first signature of a version not seen
    yet (at most once per `unknown_interval` seconds, so forged versions cannot make a worker
    hammer OpenBao), and to re-read the minimum version at most `refresh_seconds` after the last
    read. A version's public key, once pinned, is never replaced by a later read.
    """

    def __init__(
        self,
        fetch: Callable[[str], SigningKeyRing],
        refresh_seconds: float = 30.0,
        unknown_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._fetch = fetch
        self.refresh_seconds = refresh_seconds
        self.unknown_interval = unknown_interval
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._pins: dict[str, _Pins] = {}
        self.fetches = 0

    def verify(self, key_name: str, message: bytes, signature: str) -> None:
        """Return if `signature` verifies under a pinned, not retired, version of `key_name`;
        raise SealBroken otherwise (no detail: the caller refuses the message)."""
        version, raw = parse_versioned(signature)
        public = self._public_key(key_name, version)
        try:
            public.verify(raw, message)
        except InvalidSignature as exc:
            raise SealBroken("signature does not verify") from exc

    def _public_key(self, key_name: str, version: int) -> Ed25519PublicKey:
        # A version newer than the last read (a rotation since) is read at once, or, when the
        # last read is under `unknown_interval` old, once that interval has passed: a genuine
        # new version is never refused for coming too soon, and forged ones cost one read per
        # interval, each caller waiting at most that long.
        for attempt in range(2):
            wait = 0.0
            with self._lock:
                pins = self._pins.setdefault(key_name, _Pins())
                now = self._clock()
                since = now - pins.checked
                unknown = version not in pins.keys and version >= pins.min_version
                if since >= self.refresh_seconds or (unknown and since >= self.unknown_interval):
                    self._refresh(key_name, pins, now)
                elif unknown and attempt == 0:
                    wait = self.unknown_interval - since
                if not wait:
                    if version < pins.min_version:
                        raise SealBroken(f"key version {version} is retired")
                    public = pins.keys.get(version)
            if wait:
                self._sleep(wait)
                continue
            if public is None:
                raise SealBroken(f"no key version {version}")
            return public
        raise SealBroken(f"no key version {version}")  # pragma: no cover - the loop returns

    def _refresh(self, key_name: str, pins: _Pins, now: float) -> None:
        ring = self._fetch(key_name)
        self.fetches += 1
        pins.checked = now
        pins.min_version = ring.min_version
        for version, raw in ring.public_keys.items():
            pinned = pins.keys.get(version)
            if pinned is None:
                pins.keys[version] = Ed25519PublicKey.from_public_bytes(raw)
            elif pinned.public_bytes_raw() != raw:
                log.warning(
                    "key %s version %d changed its public key: kept the pinned one",
                    key_name,
                    version,
                )


# -- The in-memory stub -------------------------------------------------------------------------


class UnsafeMemoryKeyService:
    """A `KeyService` with its root key in process memory: for unit tests only (no audit, and
    anyone holding the object holds every key). Signing keys rotate and retire like transit's
    (`rotate_signing_key`, `retire_below`)."""

    def __init__(
        self,
        cache: DataKeyCache | None = None,
        pins: PinnedSignatures | None = None,
    ) -> None:
        self._root = os.urandom(32)
        self._signing: dict[str, list[Ed25519PrivateKey]] = {}
        self._min_version: dict[str, int] = {}
        self.cache = cache
        self.pins = pins or PinnedSignatures(self.signing_keys)
        self.calls = 0
        #: What `generation()` answers (a test renews it as `appliance keys rotate` would).
        self.keys_generation = ""

    def _derive(self, purpose: str, key_name: str, context: str = "") -> bytes:
        return hashlib.sha256(self._root + f"{purpose}|{key_name}|{context}".encode()).digest()

    def data_key(self, key_name: str, context: str) -> tuple[bytes, str]:
        self.calls += 1
        key, nonce = os.urandom(32), os.urandom(12)
        kek = AESGCM(self._derive("wrap", key_name, context))
        wrapped = nonce + kek.encrypt(nonce, key, None)
        return key, "vault:v1:" + base64.b64encode(wrapped).decode()

    def unwrap_key(self, key_name: str, wrapped: str, context: str) -> bytes:
        self.calls += 1
        try:
            raw = base64.b64decode(wrapped.removeprefix("vault:v1:"), validate=True)
            kek = AESGCM(self._derive("wrap", key_name, context))
            return kek.decrypt(raw[:12], raw[12:], None)
        except Exception as exc:  # noqa: BLE001 - any failure to open is the one error
            raise SealBroken("the data key does not open under this key and context") from exc

    def hmac(self, key_name: str, message: bytes) -> str:
        mac = _hmac.new(self._derive("hmac", key_name), message, hashlib.sha256).digest()
        return "vault:v1:" + base64.b64encode(mac).decode()

    def verify_hmac(self, key_name: str, message: bytes, mac: str) -> bool:
        return _hmac.compare_digest(self.hmac(key_name, message), mac)

    def sign(self, key_name: str, message: bytes) -> str:
        versions = self._signing.setdefault(key_name, [Ed25519PrivateKey.generate()])
        signature = versions[-1].sign(message)
        return f"vault:v{len(versions)}:" + base64.b64encode(signature).decode()

    def verify_signature(self, key_name: str, message: bytes, signature: str) -> None:
        self.pins.verify(key_name, message, signature)

    def generation(self) -> str:
        return self.keys_generation

    def signing_keys(self, key_name: str) -> SigningKeyRing:
        """The public halves by version, and the minimum version (what transit's key read
        returns)."""
        versions = self._signing.setdefault(key_name, [Ed25519PrivateKey.generate()])
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        return SigningKeyRing(
            {i + 1: k.public_key().public_bytes(*raw) for i, k in enumerate(versions)},
            self._min_version.get(key_name, 1),
        )

    def rotate_signing_key(self, key_name: str) -> int:
        """Add a version; new signatures use it. Returns the new version."""
        versions = self._signing.setdefault(key_name, [Ed25519PrivateKey.generate()])
        versions.append(Ed25519PrivateKey.generate())
        return len(versions)

    def retire_below(self, key_name: str, version: int) -> None:
        """Refuse signatures of versions below `version` (transit's min_decryption_version)."""
        self._min_version[key_name] = version

    def seal_envelope(self, key_name: str, context: str, plaintext: bytes, aad: bytes) -> Envelope:
        return seal_cached(self, self.cache, key_name, context, plaintext, aad)

    def open_envelope(self, key_name: str, context: str, envelope: Envelope, aad: bytes) -> bytes:
        return open_cached(self, self.cache, key_name, context, envelope, aad)
