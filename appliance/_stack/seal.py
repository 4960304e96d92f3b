"""Where OpenBao's unseal key shares live: the seal of one state directory (issue 15).

Two modes, recorded as `"unseal"` in `<state>/stack.json`:

- `file`, the local development stack: 3 shares, threshold 2, all in
  `<state>/secrets/bao-unseal.json` (0600). Every `up` and `init` unseals from that file and
  generates a root token from it for the bootstrap. The split protects nothing here; it keeps the
  format and the unseal loop of a real install.
- `operator`, the VM image's default: `appliance init --shares-to RECIPIENT_FILE` splits the
  unseal key into 5 shares, threshold 3, encrypts them with age to the operator's X25519
  recipient and prints the ASCII-armored ciphertext between `BEGIN_MARK` and `END_MARK`. The
  plaintext shares are written nowhere. The printed block (age ciphertext to the operator's
  key, nothing else) is first written to `<state>/unseal-shares.age` (0600), before anything
  else can fail, so that an `init` or `up` that dies after the initialisation (an exception, a
  unit's stop timeout) does not lose the only copy: `init`, `up` and `appliance shares show`
  print it again until the operator runs `appliance shares ack`, which deletes it (red team
  M4). Then OpenBao starts sealed after every restart, and only
  `appliance unseal` opens it, with shares that the operator pipes in or names by path (a
  read-only seed disk), read once and never copied. Without the shares, no process on the host
  can unseal OpenBao or generate a root token: `init` and `up` do what the operator token
  allows, and the bootstrap runs again only inside `unseal` (when an enrolment is no longer
  live, or with `--reenrol`) and `restore`, with the shares the operator supplies.

The operator's recipient is kept in `<state>/operator-recipient` (a public key): backups are
encrypted to it, and its presence also marks operator mode should `stack.json` lose the key.
Shares given by an operator are untrusted input: `parse_shares` takes them or raises
`SharesMalformed` (nothing is submitted then).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import age
from .pki import write_file, write_private
from .procs import StackError

FILE_MODE = "file"
OPERATOR_MODE = "operator"

#: (shares, threshold) of each mode.
SPLITS = {FILE_MODE: (3, 2), OPERATOR_MODE: (5, 3)}

BEGIN_MARK = "-----BEGIN APPLIANCE UNSEAL SHARES-----"
END_MARK = "-----END APPLIANCE UNSEAL SHARES-----"

#: Shares on stdin or in a file: a few hundred bytes; more is not shares.
MAX_SHARES_INPUT = 64 * 1024
#: Shamir over GF(256): at most 255 shares; an OpenBao share is the 32-byte key plus its x.
_MAX_SHARES = 255
_MAX_SHARE_BYTES = 256


class OpenBaoSealed(StackError):
    """Raised when OpenBao is sealed and this process holds no shares to unseal it."""

    code, title = "openbao_sealed", "OpenBao is sealed"


class SharesMalformed(StackError):
    """Raised when unseal shares given by the operator do not parse (nothing was submitted)."""

    code, title = "shares_malformed", "Malformed unseal shares"


class SharesRefused(StackError):
    """Raised when OpenBao refuses the shares given (wrong ones) or they are too few."""

    code, title = "shares_refused", "Unseal shares refused"


@dataclass(frozen=True)
class Shares:
    """Unseal key shares (base64, as OpenBao takes them) and, when known, the threshold."""

    keys: tuple[str, ...] = field(repr=False)
    threshold: int | None = None

    def __repr__(self) -> str:
        return f"Shares(<{len(self.keys)} shares>, threshold={self.threshold})"

    def quorum(self) -> tuple[str, ...]:
        """The shares to submit: the first `threshold` of them when the threshold is known."""
        return self.keys[: self.threshold] if self.threshold else self.keys

    def to_json(self) -> bytes:
        """The plaintext inside the operator's encrypted block."""
        return json.dumps({"keys": list(self.keys), "threshold": self.threshold}).encode()


def config_file(state_dir: Path) -> Path:
    """`stack.json`: the stack's ports and its seal mode."""
    return state_dir / "stack.json"


def recipient_file(state_dir: Path) -> Path:
    """The operator's age recipient (public), kept for backups; marks operator mode."""
    return state_dir / "operator-recipient"


def pending_shares_file(state_dir: Path) -> Path:
    """Operator mode: the block of a new initialisation (age ciphertext to the operator's
    recipient, armored), kept until the operator acknowledges it (`forget_pending_shares`)."""
    return state_dir / "unseal-shares.age"


def pending_shares(state_dir: Path) -> str | None:
    """The block of `pending_shares_file`, or None when there is none (acknowledged, or never
    written: file mode, or an OpenBao initialised before it existed)."""
    try:
        return pending_shares_file(state_dir).read_text(encoding="ascii")
    except FileNotFoundError:
        return None


def forget_pending_shares(state_dir: Path) -> bool:
    """Delete the kept block once the operator has saved it; False when there was none."""
    try:
        pending_shares_file(state_dir).unlink()
    except FileNotFoundError:
        return False
    _sync_directory(state_dir)
    return True


def _keep_block(state_dir: Path, block: str) -> None:
    """Write the block durably and atomically: a new 0600 file (O_EXCL, never through a
    planted name) synced, then renamed in, then the directory synced. A crash leaves the
    whole block or none, never half of it."""
    path = pending_shares_file(state_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, block.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _sync_directory(state_dir)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unseal_keys_file(state_dir: Path) -> Path:
    """File mode's unseal key shares and threshold (0600)."""
    return state_dir / "secrets" / "bao-unseal.json"


def seal_mode(state_dir: Path) -> str:
    """This state's seal mode: `stack.json`'s `"unseal"`, else `operator` when the operator's
    recipient is kept (`prepare` rewrites `stack.json`), else `file`."""
    try:
        recorded = json.loads(config_file(state_dir).read_text()).get("unseal")
    except (FileNotFoundError, ValueError, AttributeError):
        recorded = None
    if recorded in SPLITS:
        return str(recorded)
    return OPERATOR_MODE if recipient_file(state_dir).is_file() else FILE_MODE


def record_mode(state_dir: Path, mode: str) -> None:
    """Write `"unseal": mode` into `stack.json`, keeping what else it holds."""
    path = config_file(state_dir)
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        config = {}
    if config.get("unseal") != mode:
        config["unseal"] = mode
        write_file(path, json.dumps(config).encode())  # atomically (see stack.prepare)


@dataclass(frozen=True)
class Seal:
    """How `openbao` initialises and unseals this state's OpenBao.

    `recipient`: operator mode's first init (the shares are encrypted to it). `supplied`: shares
    the operator gave this process (operator mode); in file mode they come from the file.
    """

    state_dir: Path
    mode: str
    recipient: str | None = None
    supplied: Shares | None = None

    @property
    def split(self) -> tuple[int, int]:
        """(shares, threshold) for a new initialisation."""
        return SPLITS[self.mode]

    def keep(self, keys: list[str], threshold: int) -> str | None:
        """Keep the shares of a new initialisation: file mode writes them to the 0600 file;
        operator mode encrypts them to the operator, writes that block to
        `pending_shares_file` first (the plaintext nowhere), then the recipient file and the
        mode, and returns the block."""
        shares = Shares(tuple(keys), threshold)
        if self.mode == FILE_MODE:
            write_private(unseal_keys_file(self.state_dir), shares.to_json() + b"\n")
            record_mode(self.state_dir, FILE_MODE)
            return None
        if self.recipient is None:
            raise StackError(
                "OpenBao is not initialised and this state is in operator mode: run "
                "`appliance init --shares-to RECIPIENT_FILE`"
            )
        block = encrypt_shares(shares, self.recipient)
        # Before anything else that may fail: from here on the only copy is on disk.
        _keep_block(self.state_dir, block)
        recipient_file(self.state_dir).write_text(self.recipient + "\n")
        record_mode(self.state_dir, OPERATOR_MODE)
        return block

    def shares(self) -> Shares | None:
        """The shares this process may submit: the file's (file mode) or the operator's."""
        if self.mode == OPERATOR_MODE:
            return self.supplied
        path = unseal_keys_file(self.state_dir)
        try:
            return parse_shares(path.read_bytes())
        except FileNotFoundError:
            raise StackError(
                f"OpenBao's storage is initialised but its unseal keys ({path}) are missing"
            ) from None


def seal_for(
    state_dir: Path, *, recipient: str | None = None, supplied: Shares | None = None
) -> Seal:
    """The seal of `state_dir`: operator mode when recorded, or when a recipient is given to
    a state that has no shares file yet."""
    mode = seal_mode(state_dir)
    if mode == OPERATOR_MODE:
        record_mode(state_dir, mode)  # Again: `prepare` rewrites `stack.json` without it.
    if recipient is not None and mode == FILE_MODE:
        if unseal_keys_file(state_dir).is_file():
            raise SharesMalformed(
                f"{state_dir} keeps its unseal shares in a file (initialised without "
                "--shares-to): the seal cannot be changed by init"
            )
        mode = OPERATOR_MODE
    return Seal(state_dir, mode, recipient, supplied)


def encrypt_shares(shares: Shares, recipient: str) -> str:
    """The block printed once: the shares' JSON, age-encrypted to `recipient`, armored."""
    armored = age.encrypt(shares.to_json(), recipient, armored=True).decode("ascii")
    return f"{BEGIN_MARK}\n{armored.strip()}\n{END_MARK}\n"


def parse_shares(raw: bytes) -> Shares:
    """Shares as the operator gives them: one base64 share per line, or the JSON object
    `{"keys": [...], "threshold": N}` of the decrypted block. Raises `SharesMalformed`."""
    if len(raw) > MAX_SHARES_INPUT:
        raise SharesMalformed(f"more than {MAX_SHARES_INPUT} bytes: not unseal shares")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SharesMalformed("unseal shares are ASCII (base64 or JSON)") from None
    if "BEGIN AGE ENCRYPTED FILE" in text or BEGIN_MARK in text:
        raise SharesMalformed(
            "this is the encrypted block: decrypt it first (`age -d -i IDENTITY_FILE`) and "
            "give the JSON inside, or one share per line"
        )
    if text.startswith("{"):
        return _parse_json(text)
    return _checked([line.strip() for line in text.splitlines() if line.strip()], None)


def _parse_json(text: str) -> Shares:
    try:
        loaded = json.loads(text)
    except ValueError:
        raise SharesMalformed("unseal shares: not valid JSON") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("keys"), list):
        raise SharesMalformed('unseal shares: expected {"keys": [...], "threshold": N}')
    keys, threshold = loaded["keys"], loaded.get("threshold")
    if not all(isinstance(key, str) for key in keys):
        raise SharesMalformed("unseal shares: every key is a base64 string")
    if threshold is not None and (type(threshold) is not int or not 1 <= threshold <= len(keys)):
        raise SharesMalformed("unseal shares: the threshold is a number from 1 to the shares")
    return _checked(keys, threshold)


def _checked(keys: list[str], threshold: int | None) -> Shares:
    if not keys:
        raise SharesMalformed("no unseal shares given")
    if len(keys) > _MAX_SHARES:
        raise SharesMalformed(f"more than {_MAX_SHARES} unseal shares")
    for number, key in enumerate(keys, 1):
        try:
            decoded = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            # Never the share itself in a message: it is key material.
            raise SharesMalformed(f"unseal share {number} is not base64") from None
        if not 2 <= len(decoded) <= _MAX_SHARE_BYTES:
            raise SharesMalformed(f"unseal share {number} has the wrong length")
    if len(set(keys)) != len(keys):
        raise SharesMalformed("the same unseal share is given twice")
    return Shares(tuple(keys), threshold)
