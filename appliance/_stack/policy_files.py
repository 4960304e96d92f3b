"""Where the packaged policy files are: `policies/` in a source checkout, `appliance_policies`
once installed from a wheel (pyproject.toml force-includes `policies/` under that name).

A wheel installed into an image has no checkout beside it, so every reader of a policy file
(the OpenBao bootstrap, the Redis ACL, the sandbox) asks here instead of walking up from its own
source file (issue 14: a non-editable install could not start).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

#: The name the wheel gives the `policies/` directory (a namespace package of data files).
PACKAGE = "appliance_policies"
#: A file every copy of the policies holds: how a candidate directory is recognised.
_MARKER = "redis-acl.json"


def policies_dir() -> Path:
    """The directory of the policy files: the checkout's `policies/` when the code runs from a
    checkout (also an editable install, whose installed copy may be stale), else the installed
    `appliance_policies`. A directory that does not exist when there is neither: the first
    reader then fails naming it."""
    checkout = Path(__file__).resolve().parents[2] / "policies"
    if (checkout / _MARKER).is_file():
        return checkout
    installed = _installed()
    return installed if installed is not None else checkout


def _installed() -> Path | None:
    try:
        marker = importlib.resources.files(PACKAGE) / _MARKER
    except ModuleNotFoundError:
        return None
    # A namespace package may span several directories: the first that holds the files wins.
    if isinstance(marker, Path) and marker.is_file():
        return marker.parent
    return None
