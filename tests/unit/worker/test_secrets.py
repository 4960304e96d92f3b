"""The worker checks secret names again before it builds an OpenBao path: a job that reached it
with a malformed name, or one outside the client's globs, reads nothing."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.errors import BadRequest
from appliance.vault import read_secrets
from appliance.worker import secrets_refused


class NoSession:
    """A session that must not be used."""

    def call(self, fn: Any) -> Any:
        raise AssertionError("OpenBao was called")


@pytest.mark.parametrize("names", [["team-a/../team-b/token"], ["db", "team-a//x"], ["../x"]])
def test_read_secrets_refuses_a_malformed_name_before_reading_anything(names: list[str]) -> None:
    with pytest.raises(BadRequest) as exc:
        read_secrets(NoSession(), names)  # type: ignore[arg-type]
    assert exc.value.code == "invalid_secret_name"


@pytest.mark.parametrize(
    ("names", "globs", "refused"),
    [
        (["team-a/token"], ["team-a/*"], False),
        (["team-a/x/token"], ["team-a/**"], False),
        (["team-a/../team-b/token"], ["team-a/*"], True),
        (["team-a/x/token"], ["team-a/*"], True),
        (["team-b/token"], ["team-a/*"], True),
        (["db"], [], True),  # a job sealed without globs (an older API, or a bug) reads nothing
        (["db"], [None, 3], True),
        ([3], ["*"], True),
    ],
)
def test_secrets_refused(names: list[Any], globs: list[Any], refused: bool) -> None:
    assert (secrets_refused(names, globs) is not None) is refused
