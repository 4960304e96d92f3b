"""The key service: what the appliance asks of OpenBao's transit engine for jobs and results.

`KeyService` is the protocol the envelope code (`appliance.jobs`) needs: data keys derived per
client, their unwrapping, and an HMAC that only the appliance can make. `appliance.vault.Transit`
is the real one; `UnsafeMemoryKeyService` is the stub for unit tests, held to the same contract
suite (`tests/unit/test_keyservice_contract.py`, and `tests/integration/test_keyservice.py`
against OpenBao).
"""

from __future__ import annotations

import base64
import hashlib
import hmac as _hmac
import os
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import SealBroken


class KeyService(Protocol):
    """Data keys and MACs under named keys, each derived for a context (the client)."""

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


class UnsafeMemoryKeyService:
    """A `KeyService` with its root key in process memory: for unit tests only (no rotation,
    no audit, and anyone holding the object holds every key)."""

    def __init__(self) -> None:
        self._root = os.urandom(32)

    def _derive(self, purpose: str, key_name: str, context: str = "") -> bytes:
        return hashlib.sha256(self._root + f"{purpose}|{key_name}|{context}".encode()).digest()

    def data_key(self, key_name: str, context: str) -> tuple[bytes, str]:
        key, nonce = os.urandom(32), os.urandom(12)
        kek = AESGCM(self._derive("wrap", key_name, context))
        wrapped = nonce + kek.encrypt(nonce, key, None)
        return key, "vault:v1:" + base64.b64encode(wrapped).decode()

    def unwrap_key(self, key_name: str, wrapped: str, context: str) -> bytes:
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
