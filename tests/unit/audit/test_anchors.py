"""The anchor-store contract against the in-memory stub (the same suite runs against OpenBao in
tests/integration/test_audit_anchors.py)."""

from __future__ import annotations

import pytest

from appliance.audit import UnsafeMemoryAnchorStore

from .anchor_contract import AnchorStoreContract


class TestMemoryAnchorStore(AnchorStoreContract):
    @pytest.fixture
    def store(self) -> UnsafeMemoryAnchorStore:
        return UnsafeMemoryAnchorStore()
