"""Who chooses a request's source (red team of issue 12, item 3): the API's server reads
X-Forwarded-For only from the proxies of `APPLIANCE_API_TRUSTED_PROXIES`, none by default.
The real-stack check: tests/integration/test_unauthenticated.py (spoofed X-Forwarded-For)."""

from __future__ import annotations

import pytest
import uvicorn
from pydantic import ValidationError
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from appliance.api import __main__ as served
from appliance.settings import Settings


def _config(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> uvicorn.Config:
    built: list[uvicorn.Config] = []
    monkeypatch.setattr(served, "get_settings", lambda: settings)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: built.append(self.config))
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")  # uvicorn's own variable: not ours to heed
    served.main(["--port", "0"])
    [config] = built
    config.load()
    return config


def test_by_default_no_proxy_header_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(monkeypatch, Settings())
    assert config.proxy_headers is False
    assert not isinstance(config.loaded_app, ProxyHeadersMiddleware)


def test_only_the_listed_proxies_are_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(monkeypatch, Settings(api_trusted_proxies="10.0.0.1, 192.168.0.0/16"))
    assert config.proxy_headers is True
    assert config.forwarded_allow_ips == ["10.0.0.1", "192.168.0.0/16"]
    assert isinstance(config.loaded_app, ProxyHeadersMiddleware)


@pytest.mark.parametrize("value", ["*", "proxy.example", "10.0.0.1/33"])
def test_a_trusted_proxy_is_an_address_or_a_network(value: str) -> None:
    with pytest.raises(ValidationError):
        Settings(api_trusted_proxies=value)
