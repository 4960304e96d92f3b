"""Every exception the appliance can meet from redis, hvac (OpenBao) and kombu (the broker)
becomes an `ApplianceError` at its one seam, so no foreign exception reaches a handler (the
API would answer 500, which the contract allows only as 503)."""

from __future__ import annotations

import inspect
from typing import Any

import hvac.exceptions
import kombu.exceptions
import pytest
import redis.exceptions
import requests

from appliance.errors import ApplianceError, DependencyUnavailable
from appliance.jobs import JobMessage
from appliance.queue import publish
from appliance.settings import Settings
from appliance.store import redis_unavailable
from appliance.vault import VaultSession


def _subclasses(module: Any, base: type[BaseException]) -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, base) and cls.__module__.startswith(module.__name__.split(".")[0])
    ]


REDIS = _subclasses(redis.exceptions, redis.exceptions.RedisError)
HVAC = _subclasses(hvac.exceptions, hvac.exceptions.VaultError)
KOMBU = _subclasses(kombu.exceptions, kombu.exceptions.KombuError)


def test_the_lists_are_not_empty() -> None:
    assert len(REDIS) > 10 and len(HVAC) > 10 and len(KOMBU) > 10


@pytest.mark.parametrize("cls", REDIS, ids=lambda c: c.__name__)
def test_redis(cls: type[BaseException]) -> None:
    # Cluster redirections parse their message ("slot host:port").
    error = cls("1 127.0.0.1:1")
    with pytest.raises(DependencyUnavailable), redis_unavailable():
        raise error


@pytest.mark.parametrize(
    "cls", [*HVAC, requests.ConnectionError, requests.Timeout], ids=lambda c: c.__name__
)
def test_hvac(cls: type[BaseException]) -> None:
    session = VaultSession("http://127.0.0.1:9", "token")

    def fail() -> None:
        raise cls("x")

    with pytest.raises(ApplianceError):
        session._call(fail)


class _Broker:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def send_task(self, *args: Any, **kwargs: Any) -> None:
        raise self.error


@pytest.mark.parametrize("cls", [*KOMBU, OSError, ConnectionRefusedError], ids=lambda c: c.__name__)
def test_kombu(cls: type[BaseException]) -> None:
    message = JobMessage("t", "f_1_" + "0" * 32, "alice", "sealed")
    try:
        error = cls("x")
    except TypeError:
        error = cls()
    with pytest.raises(DependencyUnavailable):
        publish(_Broker(error), Settings(), message)  # type: ignore[arg-type]
