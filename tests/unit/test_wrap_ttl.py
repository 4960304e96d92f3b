"""The bootstrap's wrapping TTL: 120 s by default, APPLIANCE_ENROLMENT_WRAP_TTL where services
start slowly (the VM image sets 1800), and a bad value refused before anything is enrolled."""

from __future__ import annotations

import pytest

from appliance._stack import StackError
from appliance._stack.openbao import wrap_ttl


def test_default_is_two_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPLIANCE_ENROLMENT_WRAP_TTL", raising=False)
    assert wrap_ttl() == "120s"


def test_the_vm_image_sets_half_an_hour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_ENROLMENT_WRAP_TTL", "1800")
    assert wrap_ttl() == "1800s"


@pytest.mark.parametrize("raw", ["0", "29", "86401", "10m", "-5", "1e3", " 60s"])
def test_a_bad_value_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("APPLIANCE_ENROLMENT_WRAP_TTL", raw)
    with pytest.raises(StackError, match="APPLIANCE_ENROLMENT_WRAP_TTL"):
        wrap_ttl()
