"""The one seam to OpenBao (Vault API): AppRole login, token renewal, transit and KV calls.

hvac and requests exceptions are translated here into `DependencyUnavailable` (OpenBao down) or
`SealBroken` (a decryption refused); nothing else in the appliance imports hvac.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from .envelope import Envelope
from .errors import DependencyUnavailable, Forbidden, NotFound, SealBroken
from .keyservice import DataKeyCache, PinnedSignatures, SigningKeyRing, open_cached, seal_cached
from .secret_names import check_secret_name

T = TypeVar("T")
#: Below this many seconds a renewed token is about to hit its max TTL: log in again instead.
_MIN_USEFUL_TTL = 120


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EnrolmentLost(DependencyUnavailable):
    """Raised when OpenBao refuses a service's secret_id (used elsewhere, destroyed or expired).

    The service cannot log in again until it is enrolled anew (`appliance up`).
    """

    code, title = "enrolment_lost", "Service enrolment lost"


def successor_file(wrap_file: Path) -> Path:
    """Where a service keeps its next secret_id: beside the bootstrap's wrapped one."""
    return wrap_file.with_name(wrap_file.name.removesuffix(".wrap"))


def _read_successor(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise EnrolmentLost(
            f"no secret_id to log in with: neither the bootstrap's wrapped one nor {path}"
        ) from None


def _write_private_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, 0600 from its first byte, never half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class VaultSession:
    """A logged-in OpenBao client for one service, renewing its token before it expires."""

    def __init__(self, addr: str, token: str | None = None, *, timeout: float = 5.0) -> None:
        self.addr = addr
        self._timeout = timeout
        self._lock = threading.Lock()
        self._client = hvac.Client(url=addr, token=token, timeout=timeout)
        self._login: Callable[[], None] | None = None
        self._renew_at = float("inf")

    @classmethod
    def from_approle(
        cls, addr: str, role_id_file: Path, wrap_file: Path, secret_id_file: Path | None = None
    ) -> VaultSession:
        """Log in with the service's AppRole, and keep its successor secret_id for the next login.

        The secret_id comes from `wrap_file` when the bootstrap left one there (a response-wrapped
        token, unwrapped here once and deleted), else from `secret_id_file`, where each login
        leaves the next one: secret_ids are single-use and expire, so a restarted service logs
        in again without the bootstrap, and a stolen copy, once used, locks the service out
        (`EnrolmentLost`) instead of sharing its identity unnoticed. See SECURITY.md, "Service
        identities".
        """
        session = cls(addr)
        successor = secret_id_file or successor_file(wrap_file)
        role_id = role_id_file.read_text().strip()
        holder = {"secret_id": session._first_secret_id(wrap_file, successor)}

        def login() -> None:
            auth = session._approle_login(role_id, holder["secret_id"])
            session._client.token = auth["client_token"]
            session._schedule(auth["lease_duration"])
            holder["secret_id"] = session._rotate(auth["metadata"]["role_name"], successor)

        session._login = login
        login()
        return session

    def _first_secret_id(self, wrap_file: Path, successor: Path) -> str:
        try:
            wrapping_token = wrap_file.read_text().strip()
        except FileNotFoundError:
            return _read_successor(successor)
        # The wrapping token is single-use: remove it from disk as soon as it is read.
        wrap_file.unlink(missing_ok=True)
        # Unwrapping authenticates with the wrapping token itself.
        self._client.token = wrapping_token
        try:
            secret_id = str(self._call(lambda: self._client.sys.unwrap()["data"]["secret_id"]))
        except (SealBroken, Forbidden) as exc:
            # Someone unwrapped it first (or it expired): the enrolment was intercepted.
            raise EnrolmentLost(
                f"the wrapped secret_id in {wrap_file} was already unwrapped or has expired"
            ) from exc
        finally:
            self._client.token = None
        return secret_id

    def _approle_login(self, role_id: str, secret_id: str) -> dict[str, Any]:
        try:
            auth: dict[str, Any] = self._call(
                lambda: self._client.auth.approle.login(role_id=role_id, secret_id=secret_id)
            )["auth"]
        except SealBroken as exc:
            raise EnrolmentLost(
                "OpenBao refused this service's secret_id: it was used elsewhere, destroyed by "
                "the operator, or expired"
            ) from exc
        return auth

    def _rotate(self, role: str, successor: Path) -> str:
        """Mint this role's next secret_id (single-use, expiring) and keep it in `successor`."""
        metadata = json.dumps({"host": socket.gethostname(), "pid": str(os.getpid())})
        secret_id = str(
            self._call(
                lambda: self._client.adapter.post(
                    f"/v1/auth/approle/role/{role}/secret-id", json={"metadata": metadata}
                )
            )["data"]["secret_id"]
        )
        _write_private_atomically(successor, secret_id.encode() + b"\n")
        return secret_id

    @classmethod
    def enrol(
        cls, addr: str, enrolment_file: Path, role_id_file: Path, secret_id_file: Path
    ) -> str:
        """Enrol a replica with an enrolment credential (issue 14: `appliance serve worker`).

        Logs in with the credential in `enrolment_file` (JSON: `role_id`, `secret_id`, `enrols`,
        `enrols_role_id`; read, never changed: it may sit on a read-only mount), mints one
        secret_id of the enrolled role with this host and pid as metadata, keeps it in
        `secret_id_file` (0600) with the role's role_id in `role_id_file`, and revokes the
        enrolment token. Returns the enrolled role. `EnrolmentLost` when OpenBao refuses the
        credential (destroyed by the operator, used up or expired): run `appliance init`.
        """
        try:
            credential = json.loads(enrolment_file.read_text())
            role_id, secret_id = str(credential["role_id"]), str(credential["secret_id"])
            role, role_role_id = str(credential["enrols"]), str(credential["enrols_role_id"])
        except FileNotFoundError:
            raise EnrolmentLost(f"no enrolment credential in {enrolment_file}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise EnrolmentLost(
                f"the enrolment credential in {enrolment_file} is malformed"
            ) from exc
        session = cls(addr)
        session._client.token = session._approle_login(role_id, secret_id)["client_token"]
        try:
            session._rotate(role, secret_id_file)
        finally:
            session.close()
        _write_private_atomically(role_id_file, role_role_id.encode() + b"\n")
        return role

    @classmethod
    def from_token_file(cls, addr: str, token_file: Path) -> VaultSession:
        """An operator's session from a token file (CLI only)."""
        return cls(addr, token_file.read_text().strip())

    def _schedule(self, ttl: int) -> None:
        self._renew_at = time.monotonic() + max(1.0, ttl * 0.5)

    def _maybe_renew(self) -> None:
        if time.monotonic() < self._renew_at:
            return
        with self._lock:
            if time.monotonic() < self._renew_at:
                return
            try:
                auth = self._client.auth.token.renew_self()["auth"]
                self._schedule(auth["lease_duration"])
                capped = auth["lease_duration"] < _MIN_USEFUL_TTL
            except (hvac.exceptions.VaultError, requests.RequestException):
                capped = True
            if capped:
                # Renewal reached the token's max TTL (or failed): log in again.
                if self._login is None:
                    raise DependencyUnavailable("the OpenBao token can no longer be renewed")
                self._login()

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except hvac.exceptions.Forbidden as exc:
            raise Forbidden("OpenBao refused the operation", code="vault_forbidden") from exc
        except hvac.exceptions.InvalidPath as exc:
            raise NotFound("no such path in OpenBao", code="vault_not_found") from exc
        except hvac.exceptions.InvalidRequest as exc:
            raise SealBroken("OpenBao rejected the request") from exc
        except (
            hvac.exceptions.VaultDown,
            hvac.exceptions.InternalServerError,
            hvac.exceptions.BadGateway,
            requests.RequestException,
        ) as exc:
            raise DependencyUnavailable("OpenBao is unreachable") from exc
        except hvac.exceptions.VaultError as exc:
            # Any other answer (token refused, rate limited, not initialised, unexpected): the
            # service cannot use OpenBao now. Never a raw hvac error, which would be a 500.
            raise DependencyUnavailable("OpenBao cannot serve the request") from exc

    def call(self, fn: Callable[[hvac.Client], T]) -> T:
        """Run `fn(client)` with a fresh token, translating hvac errors."""
        self._call(self._maybe_renew)
        return self._call(lambda: fn(self._client))

    def close(self) -> None:
        """Revoke this session's token and forget how to log in again (for one-shot readers)."""
        self._login = None
        self._renew_at = float("inf")
        self._call(lambda: self._client.auth.token.revoke_self())
        self._client.token = None

    def healthy(self) -> bool:
        """Whether OpenBao answers and is unsealed."""
        try:
            return bool(self._client.sys.is_initialized()) and not self._client.sys.is_sealed()
        except (hvac.exceptions.VaultError, requests.RequestException):
            return False


def read_secrets(session: VaultSession, names: list[str], mount: str = "kv") -> dict[str, Any]:
    """Task secrets from KV v2 (`appliance/secrets/<name>`), read by the worker at job start.

    Every name is checked before any path is built (BadRequest `invalid_secret_name`): the API
    refuses malformed names already, and this keeps a dot segment out of the path whoever calls.
    """
    for name in names:
        check_secret_name(name)
    values: dict[str, Any] = {}
    for name in names:
        values[name] = read_kv(session, f"appliance/secrets/{name}", mount)
    return values


def read_kv(session: VaultSession, path: str, mount: str = "kv") -> dict[str, Any]:
    """The fields of the current version of one KV v2 secret; NotFound when there is none."""
    found = _read_kv(session, path, mount, absent_is_none=False)
    if found is None:  # Not reached: absence raised NotFound inside the call.
        raise NotFound("no such path in OpenBao", code="vault_not_found")
    return found


def read_kv_if_present(
    session: VaultSession, path: str, mount: str = "kv"
) -> dict[str, Any] | None:
    """Like `read_kv`, but None when the secret does not exist. A missing KV mount (OpenBao
    just unsealed, or misconfigured) is DependencyUnavailable, not an absent secret."""
    return _read_kv(session, path, mount, absent_is_none=True)


def _read_kv(
    session: VaultSession, path: str, mount: str, *, absent_is_none: bool
) -> dict[str, Any] | None:
    def read(client: hvac.Client) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, raise_on_deleted_version=True
            )["data"]["data"]
        except hvac.exceptions.InvalidPath as exc:
            if not absent_is_none:
                raise  # NotFound, through VaultSession's translation
            if exc.errors:  # "no handler for route": the mount is not there.
                raise DependencyUnavailable("the KV store is not available") from exc
            return None
        return data

    return session.call(read)


def list_kv(session: VaultSession, path: str, mount: str = "kv") -> list[str]:
    """The names under a KV v2 folder (sub-folders end in `/`); [] when there is none."""

    def list_keys(client: hvac.Client) -> list[str]:
        try:
            keys = client.secrets.kv.v2.list_secrets(path=path, mount_point=mount)["data"]["keys"]
        except hvac.exceptions.InvalidPath:
            return []
        return [str(k) for k in keys]

    return session.call(list_keys)


#: Flower's basic-auth credential (KV v2 under `kv/`): made once by the stack's bootstrap
#: (`appliance/_stack/openbao.py`), read by the Flower launcher (`policies/flower.hcl` grants
#: exactly this path) and by the operator (`appliance flower-credentials`).
FLOWER_CREDENTIAL_PATH = "appliance/flower"


@dataclass(frozen=True)
class FlowerCredential:
    """Flower's basic-auth login; the password never appears in a repr."""

    username: str
    password: str = field(repr=False)


def read_flower_credential(session: VaultSession, mount: str = "kv") -> FlowerCredential:
    """Flower's login from KV v2 (the Flower launcher with its AppRole, or the operator)."""
    data = read_kv(session, FLOWER_CREDENTIAL_PATH, mount)
    return FlowerCredential(str(data["username"]), str(data["password"]))


class Transit:
    """Envelope keys from the transit engine: data keys derived per context, cached within
    `cache`'s bounds when given (`DataKeyCache`); Ed25519 signatures made by transit and
    checked in this process against pinned public keys (`PinnedSignatures`)."""

    def __init__(
        self,
        session: VaultSession,
        mount: str = "transit",
        cache: DataKeyCache | None = None,
        signing_refresh_seconds: float = 30.0,
        generation: Callable[[], str | None] | None = None,
    ) -> None:
        self.session = session
        self.mount = mount
        self.cache = cache
        self.pins = PinnedSignatures(self.signing_keys, refresh_seconds=signing_refresh_seconds)
        self._generation = generation

    def generation(self) -> str:
        """The transit keys' generation (`registry:keys` in Redis, read by the API each time);
        "" in a process given no reader (a worker takes it from the sealed job)."""
        return (self._generation() or "") if self._generation is not None else ""

    def seal_envelope(self, key_name: str, context: str, plaintext: bytes, aad: bytes) -> Envelope:
        """`plaintext` sealed under a (cached) data key of `key_name` for `context`."""
        return seal_cached(self, self.cache, key_name, context, plaintext, aad)

    def open_envelope(self, key_name: str, context: str, envelope: Envelope, aad: bytes) -> bytes:
        """The plaintext of `envelope`, its data key unwrapped by transit (or the cache)."""
        return open_cached(self, self.cache, key_name, context, envelope, aad)

    def verify_signature(self, key_name: str, message: bytes, signature: str) -> None:
        """Return if `signature` is transit's Ed25519 signature of `message` under a version of
        `key_name` that is not retired; raise SealBroken otherwise. Checked here, against the
        version's public key read once from transit and pinned."""
        self.pins.verify(key_name, message, signature)

    def signing_keys(self, key_name: str) -> SigningKeyRing:
        """An Ed25519 key's public halves by version and its minimum accepted version."""
        data = self.session.call(
            lambda c: c.secrets.transit.read_key(name=key_name, mount_point=self.mount)
        )["data"]
        try:
            if data["type"] != "ed25519":
                raise ValueError(f"transit key {key_name} is not an ed25519 key")
            return SigningKeyRing(
                {
                    int(v): base64.b64decode(meta["public_key"], validate=True)
                    for v, meta in data["keys"].items()
                },
                int(data["min_decryption_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SealBroken(f"transit key {key_name} has no usable public keys") from exc

    def data_key(self, key_name: str, context: str) -> tuple[bytes, str]:
        """A fresh 256-bit data key: (plaintext key, wrapped key `vault:vN:…`)."""
        data = self.session.call(
            lambda c: c.secrets.transit.generate_data_key(
                name=key_name,
                key_type="plaintext",
                context=_b64(context),
                bits=256,
                mount_point=self.mount,
            )
        )["data"]
        return base64.b64decode(data["plaintext"]), str(data["ciphertext"])

    def unwrap_key(self, key_name: str, wrapped: str, context: str) -> bytes:
        """The plaintext of a wrapped data key; SealBroken if the context or key is wrong."""
        data = self.session.call(
            lambda c: c.secrets.transit.decrypt_data(
                name=key_name, ciphertext=wrapped, context=_b64(context), mount_point=self.mount
            )
        )["data"]
        return base64.b64decode(data["plaintext"])

    def hmac(self, key_name: str, message: bytes) -> str:
        """An HMAC of `message` under a transit key (`vault:vN:…`)."""
        data = self.session.call(
            lambda c: c.secrets.transit.generate_hmac(
                name=key_name,
                hash_input=base64.b64encode(message).decode(),
                algorithm="sha2-256",
                mount_point=self.mount,
            )
        )["data"]
        return str(data["hmac"])

    def verify_hmac(self, key_name: str, message: bytes, mac: str) -> bool:
        """Whether `mac` is a valid HMAC of `message` under the transit key."""
        data = self.session.call(
            lambda c: c.secrets.transit.verify_signed_data(
                name=key_name,
                hash_input=base64.b64encode(message).decode(),
                hmac=mac,
                hash_algorithm="sha2-256",
                mount_point=self.mount,
            )
        )["data"]
        return bool(data["valid"])

    def sign(self, key_name: str, message: bytes) -> str:
        """An Ed25519 signature of `message` (`vault:vN:…`): one OpenBao call."""
        data = self.session.call(
            lambda c: c.secrets.transit.sign_data(
                name=key_name,
                hash_input=base64.b64encode(message).decode(),
                mount_point=self.mount,
            )
        )["data"]
        return str(data["signature"])

    def rotate(self, key_name: str) -> int:
        """Rotate a key (operator); returns the new latest version."""
        self.session.call(
            lambda c: c.secrets.transit.rotate_key(name=key_name, mount_point=self.mount)
        )
        data = self.session.call(
            lambda c: c.secrets.transit.read_key(name=key_name, mount_point=self.mount)
        )["data"]
        return int(data["latest_version"])

    def set_min_decryption_version(self, key_name: str, version: int) -> None:
        """Refuse to decrypt anything wrapped under an older version (operator)."""
        self.session.call(
            lambda c: c.secrets.transit.update_key_configuration(
                name=key_name, min_decryption_version=version, mount_point=self.mount
            )
        )

    def public_keys(self, key_name: str) -> dict[str, Any]:
        """The key's public keys by version (for offline verification)."""
        data = self.session.call(
            lambda c: c.secrets.transit.read_key(name=key_name, mount_point=self.mount)
        )["data"]
        return {str(v): meta.get("public_key") for v, meta in data["keys"].items()}
