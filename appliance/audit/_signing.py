"""Who signs checkpoints, and how anyone checks them offline.

The audit key is an Ed25519 key in OpenBao's transit engine (`transit/keys/audit`): services may
only ask OpenBao to sign with it; its public half is exported once by the operator (services
cannot read key metadata) to `audit-pubkeys.json`, so that `appliance audit verify` needs only
that file and `cryptography`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._anchors import VaultAnchorStore
from ._errors import PublicKeyError

DEFAULT_KEY_NAME = "audit"
_SIGNATURE = re.compile(r"vault:v(?P<version>[1-9][0-9]{0,8}):(?P<b64>[A-Za-z0-9+/]+={0,2})")


@runtime_checkable
class Signer(Protocol):
    """Signs checkpoint messages with an Ed25519 key; the answer is `vault:vN:<base64>`."""

    def sign(self, message: bytes) -> str:
        """An Ed25519 signature of `message`, prefixed by the key version that made it."""
        ...


class _TransitLike(Protocol):
    def sign(self, key_name: str, message: bytes) -> str: ...

    def public_keys(self, key_name: str) -> dict[str, Any]: ...


class TransitSigner:
    """A `Signer` backed by OpenBao's transit engine (`appliance.vault.Transit`).

    The private key never leaves OpenBao; the API and worker policies allow only
    `transit/sign/audit`.
    """

    def __init__(self, transit: _TransitLike, key_name: str = DEFAULT_KEY_NAME) -> None:
        self.transit = transit
        self.key_name = key_name

    def sign(self, message: bytes) -> str:
        """Ask OpenBao to sign `message` with the audit key."""
        return self.transit.sign(self.key_name, message)

    def public_keys(self) -> dict[str, str]:
        """The key's public keys by version (needs read on `transit/keys/audit`: the operator)."""
        return {str(v): str(k) for v, k in self.transit.public_keys(self.key_name).items() if k}

    @property
    def anchors(self) -> VaultAnchorStore | None:
        """Where the checkpoints this signer signs are anchored: the same OpenBao, same login."""
        session = getattr(self.transit, "session", None)
        return VaultAnchorStore(session) if session is not None else None


class UnsafeInMemorySigner:
    """A `Signer` whose private key lives in this process: for tests only, never in a service."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None, version: int = 1) -> None:
        self._key = private_key or Ed25519PrivateKey.generate()
        self.version = version

    @classmethod
    def from_seed(cls, seed: bytes, version: int = 1) -> UnsafeInMemorySigner:
        """A signer from a 32-byte seed (lets several test processes share one key)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed), version)

    def sign(self, message: bytes) -> str:
        """Sign `message` in process, in the transit engine's format."""
        raw = self._key.sign(message)
        return f"vault:v{self.version}:{base64.b64encode(raw).decode()}"

    def public_keys(self) -> dict[str, str]:
        """This key's public half under its version."""
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {str(self.version): base64.b64encode(raw).decode()}


def key_version(signature: str) -> int:
    """The key version of a `vault:vN:…` signature (ValueError if it is not one)."""
    match = _SIGNATURE.fullmatch(signature)
    if match is None:
        raise ValueError("not a vault:vN:<base64> signature")
    return int(match["version"])


@dataclass(frozen=True)
class PublicKeys:
    """The audit key's public keys by version, as exported from OpenBao."""

    key_name: str
    keys: Mapping[int, Ed25519PublicKey]

    def fingerprint(self, version: int) -> str:
        """SHA-256 of the raw public key, hex: compare it with a copy kept off this host."""
        raw = self.keys[version].public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return hashlib.sha256(raw).hexdigest()

    def check(self, message: bytes, signature: str) -> None:
        """Raise ValueError unless `signature` is a valid signature of `message` by a known key."""
        match = _SIGNATURE.fullmatch(signature)
        if match is None:
            raise ValueError("the signature is not in the vault:vN:<base64> format")
        version = int(match["version"])
        if version not in self.keys:
            raise ValueError(
                f"signed with {self.key_name} key version {version}, which is not among the "
                f"exported public keys (versions {sorted(self.keys)}); export them again"
            )
        try:
            self.keys[version].verify(base64.b64decode(match["b64"], validate=True), message)
        except (InvalidSignature, binascii.Error):
            raise ValueError(
                f"the signature does not verify with {self.key_name} key version {version}"
            ) from None


class PublicKeySource(Protocol):
    """Anything that can list the audit key's public keys by version (base64 raw Ed25519)."""

    def public_keys(self) -> Mapping[str, str]:
        """Public keys by version."""
        ...


def export_public_keys(
    source: PublicKeySource, path: Path, key_name: str = DEFAULT_KEY_NAME
) -> PublicKeys:
    """Write the audit key's public keys to `path` (JSON) and return them.

    `source` is a `TransitSigner` over a `Transit` logged in as the operator or root (services
    cannot read key metadata). Run it after `appliance up` bootstraps OpenBao and after every
    rotation of the audit key: a checkpoint signed by a version missing from the file fails.
    """
    versions = source.public_keys()
    document = {
        "key_name": key_name,
        "type": "ed25519",
        "keys": {str(v): str(k) for v, k in sorted(versions.items(), key=lambda i: int(i[0])) if k},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)
    return parse_public_keys(document)


def load_public_keys(path: Path) -> PublicKeys:
    """The public keys exported to `path`; PublicKeyError when missing or malformed."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise PublicKeyError(f"no public keys file at {path}") from None
    except (OSError, ValueError) as exc:
        raise PublicKeyError(f"cannot read the public keys file {path}: {exc}") from exc
    return parse_public_keys(document)


def parse_public_keys(document: Any) -> PublicKeys:
    """`PublicKeys` from the exported JSON document; PublicKeyError when malformed."""
    try:
        if document.get("type", "ed25519") != "ed25519":
            raise ValueError("only ed25519 keys are supported")
        keys = {
            int(version): Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))
            for version, b64 in document["keys"].items()
        }
        return PublicKeys(str(document.get("key_name", DEFAULT_KEY_NAME)), keys)
    except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise PublicKeyError(f"malformed public keys document: {exc}") from exc
