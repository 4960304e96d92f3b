"""Task secret names and the globs a client's policy allows them by.

A secret name becomes a path in OpenBao (`kv/data/appliance/secrets/<name>`), so it is checked
before anything is matched or read: `/`-separated segments over `[A-Za-z0-9._-]`, none empty,
`.` or `..`. Such a name needs no escaping in a URL and no dot segment can be removed from it
on the way (the HTTP layer of hvac and OpenBao both do), so the path that is read is exactly the
name that was authorised. A name like `team-a/../team-b/token` is refused, never normalised.

Globs match segment by segment: within a segment `*`, `?` and `[...]` are `fnmatch`'s, and they
never match a `/`, so `team-a/*` allows `team-a/token` but not `team-a/x/token`. A segment that is
exactly `**` matches one or more whole segments (`team-a/**` allows everything below `team-a`,
never `team-a` itself, and `**` alone allows every name).
"""

from __future__ import annotations

import fnmatch
import re
from functools import cache

from .errors import BadRequest

#: The longest name or glob, in characters, and the most `/`-separated segments in one.
MAX_LENGTH = 256
MAX_SEGMENTS = 16

_NAME_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_GLOB_SEGMENT = re.compile(r"[A-Za-z0-9._*?\[\]!-]+")
_DOT_SEGMENTS = frozenset({".", ".."})


def check_secret_name(untrusted_name: object) -> str:
    """Return the name if it is a well-formed secret name, else raise BadRequest."""
    if not isinstance(untrusted_name, str):
        raise BadRequest("a secret name must be a string", code="invalid_secret_name")
    segments = untrusted_name.split("/")
    if (
        len(untrusted_name) > MAX_LENGTH
        or len(segments) > MAX_SEGMENTS
        or not all(_NAME_SEGMENT.fullmatch(s) and s not in _DOT_SEGMENTS for s in segments)
    ):
        raise BadRequest(
            f"secret name {untrusted_name[:80]!r} is invalid: '/'-separated segments of letters, "
            f"digits, '.', '_' or '-', none empty, '.' or '..', at most {MAX_SEGMENTS} segments "
            f"and {MAX_LENGTH} characters",
            code="invalid_secret_name",
        )
    return untrusted_name


def check_secret_glob(glob: object) -> str:
    """Return the glob if it is well-formed (segments of the name alphabet plus `*`, `?`, `[`,
    `]` and `!`, or exactly `**`), else raise BadRequest."""
    if not isinstance(glob, str):
        raise BadRequest("a secret glob must be a string", code="invalid_secret_glob")
    segments = glob.split("/")
    if (
        len(glob) > MAX_LENGTH
        or len(segments) > MAX_SEGMENTS
        or not all(_valid_glob_segment(s) for s in segments)
    ):
        raise BadRequest(
            f"secret glob {glob[:80]!r} is invalid: '/'-separated segments of letters, digits, "
            "'.', '_', '-' and the wildcards '*', '?', '[...]', or a whole segment '**'; none "
            f"empty, '.' or '..', at most {MAX_SEGMENTS} segments and {MAX_LENGTH} characters",
            code="invalid_secret_glob",
        )
    return glob


def glob_allows(glob: str, name: str) -> bool:
    """Whether `glob` allows the secret `name`, segment by segment. A malformed glob or name
    allows nothing."""
    try:
        check_secret_glob(glob)
        check_secret_name(name)
    except BadRequest:
        return False
    return _match(tuple(glob.split("/")), tuple(name.split("/")))


def _valid_glob_segment(segment: str) -> bool:
    if segment == "**":
        return True
    return (
        bool(_GLOB_SEGMENT.fullmatch(segment))
        and segment not in _DOT_SEGMENTS
        and "**" not in segment
    )


def _match(globs: tuple[str, ...], names: tuple[str, ...]) -> bool:
    @cache
    def match(g: int, n: int) -> bool:
        if g == len(globs):
            return n == len(names)
        if globs[g] == "**":
            # One or more whole segments, then the rest of the glob.
            return any(match(g + 1, rest) for rest in range(n + 1, len(names) + 1))
        return n < len(names) and fnmatch.fnmatchcase(names[n], globs[g]) and match(g + 1, n + 1)

    return match(0, 0)
