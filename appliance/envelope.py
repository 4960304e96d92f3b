"""Opaque, versioned envelopes: AES-256-GCM under a data key that OpenBao's transit engine wraps.

The stored form carries the format version, the wrapped data key (`vault:vN:…`, ciphertext) and
the sealed bytes. The additional data binds each envelope to where it may be opened (the result
key and the client), so a ciphertext moved to another key or client fails to open.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import SealBroken

FORMAT_VERSION = 1
_NONCE_BYTES = 12


@dataclass(frozen=True)
class Envelope:
    """A sealed payload: version, wrapped data key, nonce and ciphertext."""

    wrapped_key: str
    nonce: bytes
    ciphertext: bytes
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """The stored form (JSON; every field is ciphertext or metadata)."""
        return json.dumps(
            {
                "v": self.version,
                "kid": self.wrapped_key,
                "n": base64.b64encode(self.nonce).decode(),
                "ct": base64.b64encode(self.ciphertext).decode(),
            }
        )

    @classmethod
    def from_json(cls, untrusted: str | bytes) -> Envelope:
        """Parse a stored envelope; raise SealBroken on any malformation."""
        try:
            raw: dict[str, Any] = json.loads(untrusted)
            if raw["v"] != FORMAT_VERSION or not isinstance(raw["kid"], str):
                raise ValueError("unknown envelope version")
            return cls(
                raw["kid"],
                base64.b64decode(raw["n"], validate=True),
                base64.b64decode(raw["ct"], validate=True),
                raw["v"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise SealBroken("malformed envelope") from exc


def seal(data_key: bytes | bytearray, wrapped_key: str, plaintext: bytes, aad: bytes) -> Envelope:
    """Encrypt `plaintext` under `data_key`, bound to `aad`. The AES-GCM context (OpenSSL's copy
    of the key) lives for this call only; OpenSSL clears it when it is freed."""
    nonce = os.urandom(_NONCE_BYTES)
    return Envelope(wrapped_key, nonce, AESGCM(data_key).encrypt(nonce, plaintext, aad))


def open_envelope(data_key: bytes | bytearray, envelope: Envelope, aad: bytes) -> bytes:
    """Decrypt and authenticate; raise SealBroken if the key, the data or the binding is wrong."""
    try:
        return AESGCM(data_key).decrypt(envelope.nonce, envelope.ciphertext, aad)
    except (InvalidTag, ValueError) as exc:
        raise SealBroken("envelope does not open") from exc
