"""`UnsafeMemoryKeyService` held to the key-service contract."""

from __future__ import annotations

import pytest

from appliance.keyservice import UnsafeMemoryKeyService

from .keyservice_contract import KeyServiceContract


class TestUnsafeMemoryKeyService(KeyServiceContract):
    @pytest.fixture
    def keys(self) -> UnsafeMemoryKeyService:
        return UnsafeMemoryKeyService()
