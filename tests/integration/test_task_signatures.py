"""Task messages signed by the API through transit (Ed25519 key `task-messages`) and checked by
the worker in-process against pinned public keys, with the services' own AppRoles and policies
(issue 16); and data keys cached within their bounds against the real transit engine."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from appliance._stack import Bootstrap
from appliance.errors import Forbidden, SealBroken
from appliance.jobs import (
    JOBS_KEY,
    MESSAGE_KEY,
    JobMessage,
    MessageRejected,
    open_job,
    seal_job,
    sign_message,
    verify_message,
)
from appliance.keyservice import CacheBounds, DataKeyCache, PinnedSignatures
from appliance.specs import JobSpec
from appliance.vault import Transit, VaultSession

pytestmark = pytest.mark.integration

TASK = "appliance.run_job"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def roles(bao_bootstrap: Bootstrap, tmp_path: Path) -> Iterator[dict[str, Transit]]:
    handle = bao_bootstrap.handle
    sessions = {
        role: VaultSession.from_approle(
            handle.addr, *handle.write_service_credentials(role, tmp_path / role)
        )
        for role in ("api", "worker")
    }
    yield {
        role: Transit(session, cache=DataKeyCache(CacheBounds()))
        for role, session in sessions.items()
    }
    for session in sessions.values():
        session.close()


@pytest.fixture
def root(bao_bootstrap: Bootstrap) -> Transit:
    handle = bao_bootstrap.handle
    return Transit(VaultSession(handle.addr, handle.root_token))


def signed(api: Transit, i: int = 0) -> JobMessage:
    message = JobMessage(f"t{i}", "f_1_" + "a" * 32, "alice", "{}")
    return sign_message(api, message, TASK, time.time())


def test_the_worker_checks_the_apis_signature_with_one_key_read(
    roles: dict[str, Transit],
) -> None:
    api, worker = roles["api"], roles["worker"]
    for i in range(5):
        message = signed(api, i)
        assert len(message.signature) > 80  # Ed25519, not the 32-byte HMAC of before
        verify_message(worker, message, TASK, time.time())
    assert worker.pins.fetches == 1
    with pytest.raises(MessageRejected, match="bad signature"):
        verify_message(worker, replace(signed(api), client="mallory"), TASK, time.time())


def test_the_worker_cannot_sign_and_the_api_needs_no_key_read(
    roles: dict[str, Transit],
) -> None:
    with pytest.raises(Forbidden):
        roles["worker"].sign(MESSAGE_KEY, b"a task of my own")
    with pytest.raises(Forbidden):
        roles["api"].signing_keys(MESSAGE_KEY)


def test_a_new_version_is_read_once_and_a_retired_one_refused_after_the_window(
    roles: dict[str, Transit], root: Transit
) -> None:
    api, worker = roles["api"], roles["worker"]
    clock = Clock()
    worker.pins = PinnedSignatures(worker.signing_keys, refresh_seconds=30, clock=clock)
    before = signed(api)
    verify_message(worker, before, TASK, time.time())
    version = root.rotate(MESSAGE_KEY)
    clock.now += 1
    after = [signed(api, i) for i in range(3)]
    assert all(m.signature.startswith(f"vault:v{version}:") for m in after)
    for message in after:
        verify_message(worker, message, TASK, time.time())
    assert worker.pins.fetches == 2
    root.set_min_decryption_version(MESSAGE_KEY, version)
    try:
        clock.now += 29  # within the documented window: the pinned configuration holds
        verify_message(worker, before, TASK, time.time())
        clock.now += 1
        with pytest.raises(MessageRejected, match="bad signature"):
            verify_message(worker, before, TASK, time.time())
        verify_message(worker, after[0], TASK, time.time())
        # Transit itself agrees: the old version no longer verifies there either.
        assert not transit_verifies(root, before)
        assert transit_verifies(root, after[0])
    finally:
        root.set_min_decryption_version(MESSAGE_KEY, 1)


def transit_verifies(root: Transit, message: JobMessage) -> bool:
    payload = base64.b64encode(message.signed_bytes(TASK)).decode()
    try:
        return bool(
            root.session.call(
                lambda c: c.secrets.transit.verify_signed_data(
                    name=MESSAGE_KEY, hash_input=payload, signature=message.signature
                )
            )["data"]["valid"]
        )
    except SealBroken:  # transit's 400: "signature version is disallowed by policy"
        return False


def test_cached_data_keys_seal_and_open_with_fewer_transit_calls(
    roles: dict[str, Transit],
) -> None:
    api, worker = roles["api"], roles["worker"]
    spec = JobSpec("def f(x):\n    return x\n", "f", args=[1])
    messages = [
        JobMessage(
            f"t{i}",
            f"f_{i}_" + "b" * 32,
            "alice",
            seal_job(api, spec, f"t{i}", f"f_{i}_" + "b" * 32, "alice"),
        )
        for i in range(10)
    ]
    assert all(open_job(worker, m) == spec for m in messages)
    assert api.cache is not None and worker.cache is not None
    assert (api.cache.stats.seal_misses, api.cache.stats.seal_hits) == (1, 9)
    assert (worker.cache.stats.open_misses, worker.cache.stats.open_hits) == (1, 9)
    # The worker's policy still decides: it cannot mint a jobs data key itself.
    with pytest.raises(Forbidden):
        worker.data_key(JOBS_KEY, "alice")
    # Another client's context does not open the cached key's envelope.
    with pytest.raises(SealBroken):
        open_job(worker, replace(messages[0], client="mallory"))
