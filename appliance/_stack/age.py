"""age encryption (X25519 recipients), the one seam to `pyrage`: the operator-held unseal shares
and the backups are encrypted to an operator's age recipient (`age1...`) and decrypted with the
identity (`AGE-SECRET-KEY-1...`) the operator supplies; neither identity nor plaintext is kept.

Foreign errors are translated here (`AgeError`), so callers never see pyrage's exceptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pyrage
from pyrage import x25519

from .procs import StackError

#: What an age X25519 recipient and identity look like (Bech32, checked by pyrage too).
RECIPIENT_PREFIX = "age1"
IDENTITY_PREFIX = "AGE-SECRET-KEY-1"

#: A recipient or identity file is a few lines; anything bigger is not one.
_MAX_KEY_FILE = 64 * 1024


class AgeError(StackError):
    """Raised when a recipient or identity does not parse, or age cannot encrypt or decrypt."""

    code, title = "age_error", "age encryption error"


def read_recipient(path: Path) -> str:
    """The one X25519 recipient in `path` (comments and blank lines skipped), checked."""
    (line,) = _key_lines(path, "recipient", RECIPIENT_PREFIX)
    try:
        x25519.Recipient.from_str(line)
    except pyrage.RecipientError as exc:
        raise AgeError(f"{path}: not an age X25519 recipient ({exc})") from None
    return line


def encrypt(plaintext: bytes, recipient: str, *, armored: bool = False) -> bytes:
    """`plaintext` encrypted to `recipient` (ASCII-armored when asked)."""
    try:
        sealed = pyrage.encrypt(plaintext, [x25519.Recipient.from_str(recipient)], armored=armored)
    except (pyrage.RecipientError, pyrage.EncryptError) as exc:
        raise AgeError(f"age could not encrypt: {exc}") from None
    return bytes(sealed)


def encrypt_stream(source: BinaryIO, target: BinaryIO, recipient: str) -> None:
    """Encrypt `source` to `recipient` into `target` (binary age format), streaming."""
    try:
        pyrage.encrypt_io(source, target, [x25519.Recipient.from_str(recipient)])
    except (pyrage.RecipientError, pyrage.EncryptError) as exc:
        raise AgeError(f"age could not encrypt: {exc}") from None


def decrypt_stream(source: BinaryIO, target: BinaryIO, identity_file: Path) -> None:
    """Decrypt `source` into `target` with the identity in `identity_file` (never copied)."""
    identities = [_identity(line, identity_file) for line in _identity_lines(identity_file)]
    try:
        pyrage.decrypt_io(source, target, identities)
    except pyrage.DecryptError as exc:
        raise AgeError(
            f"age could not decrypt with the identity in {identity_file}: {exc}"
        ) from None


def _identity_lines(path: Path) -> list[str]:
    return _key_lines(path, "identity", IDENTITY_PREFIX, many=True)


def _identity(line: str, path: Path) -> object:
    try:
        return x25519.Identity.from_str(line)
    except pyrage.IdentityError:
        # Never the line itself in the message: it is a private key.
        raise AgeError(f"{path}: not an age X25519 identity") from None


def _key_lines(path: Path, what: str, prefix: str, *, many: bool = False) -> list[str]:
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise AgeError(f"cannot read the age {what} file {path}: {exc.strerror}") from None
    if len(raw) > _MAX_KEY_FILE:
        raise AgeError(f"{path} is too big to be an age {what} file")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise AgeError(f"{path} is not an age {what} file (not ASCII)") from None
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    if not lines or any(not line.upper().startswith(prefix.upper()) for line in lines):
        raise AgeError(f"{path} is not an age X25519 {what} file ({prefix}... lines)")
    if not many and len(lines) != 1:
        raise AgeError(f"{path} holds {len(lines)} {what}s; give a file with exactly one")
    return lines
