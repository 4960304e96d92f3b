"""Task-message signatures checked in the worker against pinned public keys (issue 16): forged
signatures refused, a new key version fetched once, a retired version refused once the key's
configuration has been read again (at most `refresh_seconds` after the retirement), and a
forged version number costing at most one fetch per `unknown_interval`."""

from __future__ import annotations

import base64
import time
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.errors import SealBroken
from appliance.jobs import MESSAGE_KEY, JobMessage, MessageRejected, sign_message, verify_message
from appliance.keyservice import PinnedSignatures, SigningKeyRing, UnsafeMemoryKeyService

KEY = MESSAGE_KEY


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.now += seconds


class Counted:
    """The stub's key read, counted: what a worker would ask transit."""

    def __init__(self, keys: UnsafeMemoryKeyService) -> None:
        self.keys = keys
        self.reads = 0

    def __call__(self, key_name: str) -> SigningKeyRing:
        self.reads += 1
        return self.keys.signing_keys(key_name)


def setup(refresh: float = 30.0) -> tuple[UnsafeMemoryKeyService, Counted, Clock]:
    api = UnsafeMemoryKeyService()
    clock = Clock()
    fetch = Counted(api)
    api.pins = PinnedSignatures(fetch, refresh_seconds=refresh, clock=clock, sleep=clock.sleep)
    return api, fetch, clock


def test_a_signature_verifies_and_the_key_is_read_once() -> None:
    keys, fetch, clock = setup()
    for i in range(5):
        keys.verify_signature(KEY, b"m%d" % i, keys.sign(KEY, b"m%d" % i))
        clock.now += 1
    assert fetch.reads == 1


@pytest.mark.parametrize(
    "forge",
    [
        lambda sig: sig[:-4] + ("AAA=" if not sig.endswith("AAA=") else "BBB="),
        lambda sig: "vault:v1:" + base64.b64encode(bytes(64)).decode(),
        lambda sig: sig.replace("vault:v1:", "vault:v9:"),
        lambda sig: "vault:v1:not base64!",
        lambda sig: "v1:" + sig,
        lambda sig: "",
    ],
)
def test_a_forged_or_malformed_signature_is_refused(forge: object) -> None:
    keys, _, _ = setup()
    signature = keys.sign(KEY, b"message")
    with pytest.raises(SealBroken):
        keys.verify_signature(KEY, b"message", forge(signature))  # type: ignore[operator]


def test_another_services_key_is_refused() -> None:
    keys, _, _ = setup()
    other = UnsafeMemoryKeyService()
    with pytest.raises(SealBroken):
        keys.verify_signature(KEY, b"message", other.sign(KEY, b"message"))


def test_a_signature_of_another_message_is_refused() -> None:
    keys, _, _ = setup()
    with pytest.raises(SealBroken):
        keys.verify_signature(KEY, b"messagE", keys.sign(KEY, b"message"))


def test_an_unknown_version_is_fetched_once_then_pinned() -> None:
    keys, fetch, clock = setup()
    first = keys.sign(KEY, b"a")
    keys.verify_signature(KEY, b"a", first)
    assert keys.rotate_signing_key(KEY) == 2
    clock.now += 2
    for i in range(5):
        signature = keys.sign(KEY, b"b%d" % i)
        assert signature.startswith("vault:v2:")
        keys.verify_signature(KEY, b"b%d" % i, signature)
    assert fetch.reads == 2
    # Version 1's signatures still verify (not retired), without a read.
    keys.verify_signature(KEY, b"a", first)
    assert fetch.reads == 2


def test_forged_versions_cost_at_most_one_read_per_interval() -> None:
    keys, fetch, clock = setup()
    keys.verify_signature(KEY, b"a", keys.sign(KEY, b"a"))
    started = clock.now
    forged = "vault:v77:" + base64.b64encode(bytes(64)).decode()
    for _ in range(20):
        with pytest.raises(SealBroken, match="no key version 77"):
            keys.verify_signature(KEY, b"a", forged)
    # Each forged call waited for the interval instead of reading at once.
    assert fetch.reads - 1 <= clock.now - started
    assert clock.slept == pytest.approx(20.0)


def test_a_new_version_right_after_a_read_is_waited_for_not_refused() -> None:
    keys, fetch, clock = setup()
    keys.verify_signature(KEY, b"a", keys.sign(KEY, b"a"))
    keys.rotate_signing_key(KEY)
    clock.now += 0.25  # a rotation, and its first message, a quarter of a second later
    keys.verify_signature(KEY, b"b", keys.sign(KEY, b"b"))
    assert (fetch.reads, clock.slept) == (2, pytest.approx(0.75))


def test_a_retired_version_is_refused_after_the_refresh_window() -> None:
    keys, fetch, clock = setup(refresh=30)
    old = keys.sign(KEY, b"queued")
    keys.verify_signature(KEY, b"queued", old)
    keys.rotate_signing_key(KEY)
    keys.retire_below(KEY, 2)
    # Within the window the pinned configuration still accepts version 1: the documented delay.
    clock.now += 29
    keys.verify_signature(KEY, b"queued", old)
    clock.now += 1
    with pytest.raises(SealBroken, match="retired"):
        keys.verify_signature(KEY, b"queued", old)
    keys.verify_signature(KEY, b"new", keys.sign(KEY, b"new"))
    assert fetch.reads == 2


def test_a_retired_version_is_refused_at_once_when_a_newer_version_is_first_seen() -> None:
    keys, _, clock = setup(refresh=30)
    old = keys.sign(KEY, b"queued")
    keys.verify_signature(KEY, b"queued", old)
    keys.rotate_signing_key(KEY)
    keys.retire_below(KEY, 2)
    keys.verify_signature(KEY, b"new", keys.sign(KEY, b"new"))  # v2 unknown: read again
    with pytest.raises(SealBroken, match="retired"):
        keys.verify_signature(KEY, b"queued", old)


def test_a_pinned_public_key_is_not_replaced_by_a_later_read() -> None:
    keys, _, clock = setup(refresh=30)
    keys.verify_signature(KEY, b"a", keys.sign(KEY, b"a"))
    keys._signing[KEY] = [Ed25519PrivateKey.generate()]  # another key now claims version 1
    clock.now += 31  # the configuration is read again, naming that key for version 1
    impostor = keys.sign(KEY, b"forged")
    assert impostor.startswith("vault:v1:")
    with pytest.raises(SealBroken):
        keys.verify_signature(KEY, b"forged", impostor)


def test_verify_message_checks_the_ed25519_signature_locally() -> None:
    keys, fetch, _ = setup()
    message = JobMessage("t1", "f_1_" + "a" * 32, "alice", "{}")
    signed = sign_message(keys, message, "appliance.run_job", time.time())
    verify_message(keys, signed, "appliance.run_job", time.time())
    with pytest.raises(MessageRejected, match="bad signature"):
        verify_message(keys, replace(signed, client="mallory"), "appliance.run_job", time.time())
    with pytest.raises(MessageRejected, match="bad signature"):
        verify_message(keys, signed, "appliance.other_task", time.time())
    assert fetch.reads == 1


def test_verify_message_still_accepts_a_task_signing_hmac_of_before_issue_16() -> None:
    keys, _, _ = setup()
    message = JobMessage("t1", "f_1_" + "a" * 32, "alice", "{}", "n" * 32, int(time.time()) + 60)
    legacy = replace(
        message, signature=keys.hmac("task-signing", message.signed_bytes("appliance.run_job"))
    )
    verify_message(keys, legacy, "appliance.run_job", time.time())
    with pytest.raises(MessageRejected):
        verify_message(keys, replace(legacy, nonce="m" * 32), "appliance.run_job", time.time())
