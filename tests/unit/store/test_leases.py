"""RedisLease against a stub OpenBao session (time injected): renewal, replacement before the end,
replacement of a revoked lease, and OpenBao down; and the relay's first-command filter."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from appliance._stack.redis_relay import Refused, logs_in_as_relayed_user, read_command
from appliance.errors import DependencyUnavailable, SealBroken
from appliance.store import ProcessRedisLease, RedisLease, install


class StubOpenBao:
    """`database/creds` and `sys/leases/renew` of a stub OpenBao, as a VaultSession's `call`."""

    def __init__(self, ttl: int = 300, max_ttl: int = 3600) -> None:
        self.ttl, self.max_ttl = ttl, max_ttl
        self.issued = 0
        self.revoked: set[str] = set()
        self.down = False
        self.now = 0.0
        self.started: dict[str, float] = {}
        self.adapter = self

    def call(self, fn: Any) -> Any:
        if self.down:
            raise DependencyUnavailable("OpenBao is unreachable")
        return fn(self)

    def get(self, url: str) -> dict[str, Any]:
        assert url == "/v1/database/creds/worker"
        self.issued += 1
        lease_id = f"database/creds/worker/{self.issued}"
        self.started[lease_id] = self.now
        return {
            "lease_id": lease_id,
            "lease_duration": self.ttl,
            "data": {"username": f"V_WORKER_{self.issued}", "password": f"pw{self.issued}"},
        }

    def put(self, url: str, json: dict[str, str]) -> dict[str, Any]:
        assert url == "/v1/sys/leases/renew"
        lease_id = json["lease_id"]
        if lease_id in self.revoked:
            raise SealBroken("lease not found")
        left = self.started[lease_id] + self.max_ttl - self.now
        return {"lease_id": lease_id, "lease_duration": int(min(self.ttl, left))}


@pytest.fixture
def bao() -> StubOpenBao:
    return StubOpenBao()


def _lease(bao: StubOpenBao) -> RedisLease:
    return RedisLease(bao, "worker", clock=lambda: bao.now)  # type: ignore[arg-type]


def test_first_connection_takes_a_lease_and_later_ones_renew_it(bao: StubOpenBao) -> None:
    lease = _lease(bao)
    assert lease.get_credentials() == ("V_WORKER_1", "pw1")
    bao.now = 100
    assert lease.get_credentials() == ("V_WORKER_1", "pw1")
    assert bao.issued == 1


def test_a_revoked_lease_is_replaced_at_the_next_connection(bao: StubOpenBao) -> None:
    lease = _lease(bao)
    replaced: list[str] = []
    lease.on_replace(lambda: replaced.append("pool"))
    lease.get_credentials()
    bao.revoked.add("database/creds/worker/1")
    assert lease.get_credentials() == ("V_WORKER_2", "pw2")
    assert replaced == ["pool"]


def test_a_lease_near_its_max_ttl_is_replaced_before_it_ends(bao: StubOpenBao) -> None:
    lease = _lease(bao)
    lease.get_credentials()
    bao.now = bao.max_ttl - 60  # Renewal would give 60 s, less than a third of 300 s.
    assert lease.get_credentials() == ("V_WORKER_2", "pw2")


def test_openbao_down_keeps_the_held_lease(bao: StubOpenBao) -> None:
    lease = _lease(bao)
    lease.get_credentials()
    bao.down = True
    assert lease.get_credentials() == ("V_WORKER_1", "pw1")


def test_no_lease_and_openbao_down_is_a_connection_error_for_redis_py(bao: StubOpenBao) -> None:
    bao.down = True
    with pytest.raises(redis.ConnectionError):
        _lease(bao).get_credentials()


def test_process_lease_is_what_kombu_instantiates(bao: StubOpenBao) -> None:
    install(_lease(bao))
    assert ProcessRedisLease().get_credentials() == ("V_WORKER_1", "pw1")


def _command(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def _read(raw: bytes) -> list[bytes]:
    async def run() -> list[bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        items, consumed = await read_command(reader)
        assert raw.startswith(consumed)
        return items

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("words", "relayed"),
    [
        ((b"AUTH", b"vault", b"pw"), True),
        ((b"auth", b"vault", b"pw"), True),
        # HELLO's success reply is not `+OK`: one accepted form keeps the relay's check exact.
        ((b"HELLO", b"3", b"AUTH", b"vault", b"pw"), False),
        ((b"AUTH", b"vault", b"pw", b"extra"), False),
        ((b"AUTH", b"admin", b"pw"), False),
        ((b"AUTH", b"pw"), False),  # The `default` user.
        ((b"HELLO", b"3", b"AUTH", b"admin", b"vault"), False),
        ((b"HELLO", b"3"), False),
        ((b"PING",), False),
    ],
)
def test_relay_forwards_only_a_login_as_vault(words: tuple[bytes, ...], relayed: bool) -> None:
    assert logs_in_as_relayed_user(_read(_command(*words))) is relayed


@given(st.binary(max_size=300))
def test_relay_first_command_parser_never_crashes(raw: bytes) -> None:
    try:
        items = _read(raw)
    except (Refused, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return
    logs_in_as_relayed_user(items)
