"""The API built by `create_app` over stubs: no Redis, OpenBao or Celery. Requests go through
`httpx.ASGITransport`, signed like a real client's; time is the harness's clock."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import sandbox
from appliance.api import Services, create_app
from appliance.audit import UnsafeMemoryAuditSink
from appliance.jobs import JobMessage
from appliance.keyservice import UnsafeMemoryKeyService
from appliance.registry import Client
from appliance.settings import Settings
from appliance.store import (
    UnsafeMemoryIdempotency,
    UnsafeMemoryRateLimiter,
    UnsafeMemoryResultStore,
)

NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Registry:
    """Clients by key id; a disabled one is unknown, as in `appliance.registry.Registry`."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}

    def get(self, keyid: str) -> Client | None:
        client = self.clients.get(keyid)
        return client if client is not None and client.enabled else None


class Nonces:
    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def claim(self, keyid: str, nonce: str, ttl_seconds: int) -> bool:
        if (keyid, nonce) in self.seen:
            return False
        self.seen.add((keyid, nonce))
        return True


class Vault:
    up = True

    def healthy(self) -> bool:
        return self.up


class Harness:
    """One API over fresh stubs, and a signing client `alice`."""

    def __init__(self, settings: Settings | None = None, **alice: Any) -> None:
        self.clock = Clock()
        self.store = UnsafeMemoryResultStore(ttl_seconds=300, clock=self.clock)
        self.keys = UnsafeMemoryKeyService()
        self.audit = UnsafeMemoryAuditSink()
        self.registry = Registry()
        self.published: list[JobMessage] = []
        self.vault = Vault()
        self.idempotency = UnsafeMemoryIdempotency(self.clock)
        self.services = Services(
            settings=settings or Settings(),
            registry=self.registry,  # type: ignore[arg-type]
            transit=self.keys,  # type: ignore[arg-type]
            store=self.store,
            nonces=Nonces(),  # type: ignore[arg-type]
            publish=lambda message, request_id: self.published.append(message),
            vault=self.vault,  # type: ignore[arg-type]
            policy=sandbox.Policy.load(),
            audit=self.audit,
            limiter=UnsafeMemoryRateLimiter(self.clock),
            idempotency=self.idempotency,
            clock=self.clock,
        )
        self.app = create_app(lambda: self.services)
        # ASGITransport runs no lifespan: the services are installed as the lifespan would.
        self.app.state.services = self.services
        self.alice_key = self.add_client("alice", **{"allowed_functions": ("*",), **alice})

    def add_client(self, keyid: str, **policy: Any) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        pem = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        self.registry.clients[keyid] = Client(keyid, pem, **policy)
        return key

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        keyid: str = "alice",
        key: Ed25519PrivateKey | None = None,
        params: dict[str, str] | None = None,
        nonce: str | None = None,
        signed_at: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """A request signed by `keyid` (alice by default), at the harness's time (or at
        `signed_at`), with extra `headers` (an Idempotency-Key is covered by the signature)."""
        from appliance.signatures import sign_request

        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                content = json.dumps(body).encode() if body is not None else None
                extra = dict(headers or {})
                if content is not None:
                    extra["content-type"] = "application/json"
                req = http.build_request(
                    method, path, content=content, headers=extra, params=params
                )
                when = self.clock() if signed_at is None else signed_at
                created = datetime.datetime.fromtimestamp(when, datetime.UTC)
                sign_request(
                    req, keyid, key or self.alice_key, content, created=created, nonce=nonce
                )
                return await http.send(req)

        return asyncio.run(send())

    def get(self, path: str) -> httpx.Response:
        """An unsigned request."""

        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                return await http.get(path)

        return asyncio.run(send())

    def submit(self, **task: Any) -> httpx.Response:
        body = {"module": "def f(x=1):\n    return x\n", "function": "f", **task}
        return self.request("POST", "/v1/tasks", body)
