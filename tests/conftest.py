"""Hooks for every layer of the suite. The real-stack fixtures live in tests/integration/."""

from __future__ import annotations

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
