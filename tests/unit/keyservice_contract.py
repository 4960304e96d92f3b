"""The contract every key service must meet: run against `UnsafeMemoryKeyService` (unit tests,
tests/unit/test_keyservice.py) and against OpenBao's transit engine
(tests/integration/test_keyservice.py).

A subclass provides one fixture: `keys` (a `KeyService` with the transit keys `jobs` and
`task-signing` of the stack's bootstrap).
"""

from __future__ import annotations

import pytest

from appliance.errors import SealBroken
from appliance.keyservice import KeyService


class KeyServiceContract:
    """The tests; not collected by itself (its name does not start with `Test`)."""

    def test_a_data_key_unwraps_under_its_name_and_context(self, keys: KeyService) -> None:
        key, wrapped = keys.data_key("jobs", "alice")
        assert len(key) == 32 and wrapped.startswith("vault:v")
        assert key.hex() not in wrapped
        assert keys.unwrap_key("jobs", wrapped, "alice") == key

    def test_a_data_key_does_not_unwrap_for_another_client(self, keys: KeyService) -> None:
        _, wrapped = keys.data_key("jobs", "alice")
        with pytest.raises(SealBroken):
            keys.unwrap_key("jobs", wrapped, "mallory")

    def test_two_data_keys_differ(self, keys: KeyService) -> None:
        assert keys.data_key("jobs", "alice")[0] != keys.data_key("jobs", "alice")[0]

    def test_an_hmac_verifies_only_its_own_message(self, keys: KeyService) -> None:
        mac = keys.hmac("task-signing", b"message")
        assert mac.startswith("vault:v")
        assert keys.verify_hmac("task-signing", b"message", mac)
        assert not keys.verify_hmac("task-signing", b"messagE", mac)
