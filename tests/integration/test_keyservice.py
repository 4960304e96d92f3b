"""OpenBao's transit engine (`appliance.vault.Transit`) held to the key-service contract that
the unit tests' stub meets (tests/unit/keyservice_contract.py)."""

from __future__ import annotations

import pytest

from appliance._stack import Bootstrap
from appliance.vault import Transit, VaultSession
from tests.unit.keyservice_contract import KeyServiceContract

pytestmark = pytest.mark.integration


class TestTransitKeyService(KeyServiceContract):
    @pytest.fixture
    def keys(self, bao_bootstrap: Bootstrap) -> Transit:
        handle = bao_bootstrap.handle
        return Transit(VaultSession(handle.addr, handle.root_token))
