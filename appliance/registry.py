"""The client registry: who may call, with which key, for which functions and secrets.

It lives in OpenBao's KV v2 engine under `appliance/clients/<keyid>`; the API reads it (cached
briefly), the operator's CLI writes it.
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import hvac.exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import BadRequest, DependencyUnavailable
from .secret_names import check_secret_glob, glob_allows
from .vault import VaultSession

KEYID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PATH = "appliance/clients/{}"


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
    enabled: bool = True

    def public_key(self) -> Ed25519PublicKey:
        """The client's Ed25519 public key."""
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

    def to_dict(self) -> dict[str, Any]:
        """The stored form."""
        data = asdict(self)
        for name in ("allowed_functions", "allowed_secrets", "allowed_imports"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Client:
        """Rebuild from the stored form."""
        return cls(
            keyid=data["keyid"],
            public_key_pem=data["public_key_pem"],
            allowed_functions=tuple(data.get("allowed_functions", ())),
            allowed_secrets=tuple(data.get("allowed_secrets", ())),
            allowed_imports=tuple(data.get("allowed_imports", ())),
            limits=dict(data.get("limits", {})),
            rate_per_minute=int(data.get("rate_per_minute", 120)),
            daily_quota=int(data.get("daily_quota", 0)),
            enabled=bool(data.get("enabled", True)),
        )


def validate_keyid(keyid: str) -> str:
    """Return the key id if well-formed, else raise BadRequest."""
    if not KEYID_PATTERN.fullmatch(keyid):
        raise BadRequest("key id: letters, digits, '.', '_' or '-', at most 64", code="bad_keyid")
    return keyid


class Registry:
    """Reads clients from OpenBao, caching each for a few seconds."""

    def __init__(self, session: VaultSession, mount: str = "kv", cache_seconds: float = 5.0):
        self.session = session
        self.mount = mount
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Client | None]] = {}
        self._lock = threading.Lock()

    def get(self, keyid: str) -> Client | None:
        """The enabled client with this key id, or None."""
        if not KEYID_PATTERN.fullmatch(keyid):
            return None
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(keyid)
        if hit and now - hit[0] < self.cache_seconds:
            return hit[1]
        client = self._read(keyid)
        with self._lock:
            self._cache[keyid] = (now, client)
        return client if client is None or client.enabled else None

    def _read(self, keyid: str) -> Client | None:
        def read(c: Any) -> dict[str, Any] | None:
            try:
                return c.secrets.kv.v2.read_secret_version(  # type: ignore[no-any-return]
                    path=_PATH.format(keyid), mount_point=self.mount, raise_on_deleted_version=True
                )["data"]["data"]
            except hvac.exceptions.InvalidPath as exc:
                if exc.errors:
                    # "no handler for route": the KV mount is not there (yet): OpenBao is just
                    # unsealed, or misconfigured. Not "unknown client", which is an empty 404.
                    raise DependencyUnavailable("the client registry is not available") from exc
                return None

        data = self.session.call(read)
        return Client.from_dict(data) if data else None

    def public_key(self, keyid: str) -> Ed25519PublicKey | None:
        """The key of an enabled client (the signature verifier's resolver)."""
        client = self.get(keyid)
        return client.public_key() if client else None

    def put(self, client: Client) -> None:
        """Register or replace a client (operator only)."""
        self.session.call(
            lambda c: c.secrets.kv.v2.create_or_update_secret(
                path=_PATH.format(client.keyid), secret=client.to_dict(), mount_point=self.mount
            )
        )
        with self._lock:
            self._cache.pop(client.keyid, None)


def make_client(keyid: str, public_key_pem: str, functions: Iterable[str],
                secrets: Iterable[str] = (), imports: Iterable[str] = ()) -> Client:
    """Validate operator input into a Client; raise BadRequest."""
    validate_keyid(keyid)
    secrets = tuple(check_secret_glob(glob) for glob in secrets)
    client = Client(keyid, public_key_pem, tuple(functions), secrets, tuple(imports))
    client.public_key()
    return client
