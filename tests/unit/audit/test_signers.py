"""The signer contract against the in-memory stub (the same suite runs against OpenBao in
tests/integration/test_audit.py)."""

from __future__ import annotations

import pytest

from appliance.audit import UnsafeInMemorySigner

from .signer_contract import SignerContract


class TestInMemorySigner(SignerContract):
    @pytest.fixture
    def signer(self) -> UnsafeInMemorySigner:
        return UnsafeInMemorySigner()

    @pytest.fixture
    def public_source(self, signer: UnsafeInMemorySigner) -> UnsafeInMemorySigner:
        return signer
