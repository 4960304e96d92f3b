"""Hooks for every layer of the suite. The real-stack fixtures live in tests/integration/."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent

#: Where a warning fails the test: every unit and security test. The integration layer is not
#: yet checked with warnings as errors (then `filterwarnings = error` in pyproject.toml instead
#: of this hook).
_WARNINGS_ARE_ERRORS = (
    "tests/security/",
    "tests/unit/sandbox/",
    "tests/unit/api/",
    "tests/unit/audit/",
    "tests/unit/store/",
    "tests/unit/worker/",
    "tests/unit/test_",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        where = item.path.resolve().relative_to(_ROOT).as_posix()
        if where.startswith(_WARNINGS_ARE_ERRORS):
            item.add_marker(pytest.mark.filterwarnings("error"))
            # An object another test leaked (a sandbox client's pipe) may be collected while
            # this one runs: its unraisable warning is not this test's, so it stays a warning.
            item.add_marker(
                pytest.mark.filterwarnings("default::pytest.PytestUnraisableExceptionWarning")
            )


def pytest_configure(config: pytest.Config) -> None:
    """Temporary directories of this run's own, under /tmp, not under the shared
    /tmp/pytest-of-USER: the stacks' services run as users of their own (issue 12, finding
    23) and must cross these directories to their state, and every pytest run makes
    /tmp/pytest-of-USER private again (0700) when it starts, under a run already going."""
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="appliance-tests-")
        config.stash[_OWN_BASETEMP] = Path(config.option.basetemp)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that passed leaves nothing in /tmp; a failed one keeps its files to look at."""
    own = session.config.stash.get(_OWN_BASETEMP, None)
    if own is not None and exitstatus == 0:
        shutil.rmtree(own, ignore_errors=True)


_OWN_BASETEMP = pytest.StashKey[Path]()
