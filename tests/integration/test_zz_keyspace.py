"""After the other integration tests have used the shared stack (this file is collected last,
by name), every key in its Redis has a prefix named in `appliance/store/_keys.py`: naming the
prefixes is not enough if code elsewhere still builds keys by hand."""

from __future__ import annotations

import pytest

from appliance.store import keys

from .conftest import Stack

pytestmark = pytest.mark.integration


def test_every_key_in_redis_has_a_named_prefix(appliance_stack: Stack) -> None:
    admin = appliance_stack.admin_redis()
    found = [k.decode(errors="replace") for k in admin.scan_iter(count=1000)]
    assert found, "the stack's Redis is empty: the scan proves nothing"
    assert sorted({k for k in found if keys.prefix_of(k) is None}) == []
    # Not only the broker's: the appliance's own records were seen too.
    assert {keys.prefix_of(k) for k in found} > {keys.BROKER}
