"""OpenBao stopped and restarted under load (issue 4): on its own stack, a stream of signed
submissions runs while OpenBao is stopped and brought back by `appliance up` (unsealed from the
state's key shares). Submissions during the outage get 503 with Retry-After and queue nothing;
every accepted task produces its result; the API and the worker are not restarted: their AppRole
tokens survive in OpenBao's persistent storage.

The stack runs with the data-key cache off (`APPLIANCE_DATA_KEY_MAX_AGE_SECONDS=0` in its
`appliance.env`, read by the API and the worker): every job then asks OpenBao for its data keys,
as before issue 16, so jobs in flight do meet the outage and the worker's retries prove it. With
the cache on they would ride through it on keys cached before OpenBao stopped."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import hvac
import pytest

from appliance import stack
from appliance._stack import generate_root_token, stop_openbao
from appliance.vault import Transit

from .conftest import FREE_PORTS, Stack, submit

pytestmark = pytest.mark.integration

# A steady stream of small jobs, some of them queued or running when OpenBao stops.
DOUBLE = (
    "def double(i):\n"
    "    n = 0\n"
    "    for _ in range(400):\n"
    "        for _ in range(500):\n"
    "            n += 1\n"
    "    return i * 2\n"
)
# About a second of work (7.5 million guarded additions), submitted just before OpenBao stops:
# whatever the machine's speed, the worker meets the outage with it (opening or sealing) and
# must retry rather than drop it.
SLOW = (
    "def slow():\n"
    "    n = 0\n"
    "    for _ in range(500):\n"
    "        for _ in range(500):\n"
    "            for _ in range(30):\n"
    "                n += 1\n"
    "    return n\n"
)


#: The services' tuning: no data key cached, so that every job calls OpenBao.
NO_KEY_CACHE = "APPLIANCE_DATA_KEY_MAX_AGE_SECONDS=0\n"


@pytest.fixture(scope="module")
def restart_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("vault-restart")
    (state / "appliance.env").write_text(NO_KEY_CACHE)
    try:
        yield Stack(state, stack.up(state, FREE_PORTS))
    finally:
        stack.down(state)


@dataclass
class Stream:
    """What a submitting thread saw: accepted tasks (key -> argument) and refusals."""

    accepted: dict[str, int] = field(default_factory=dict)
    accepted_at: list[float] = field(default_factory=list)
    refused: list[tuple[float, int, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, st: Stack) -> None:
        client = st.client()
        i = 0
        while not self.stop.is_set():
            i += 1
            resp = submit(client, DOUBLE, "double", args=[i])
            if resp.status_code == 202:
                self.accepted[resp.json()["result_key"]] = i
                self.accepted_at.append(time.monotonic())
            else:
                self.refused.append(
                    (
                        time.monotonic(),
                        resp.status_code,
                        resp.headers.get("Retry-After") or resp.text,
                    )
                )
            time.sleep(0.05)


def _service_pids(st: Stack) -> dict[str, int | None]:
    services = stack.status(st.state)["services"]
    return {name: services[name]["pid"] for name in ("api", "worker")}


def test_openbao_restart_under_load_loses_nothing(restart_stack: Stack) -> None:
    """Jobs in flight meet the outage and are retried, none is lost. The stack's data-key cache
    is off (`NO_KEY_CACHE`), so every job calls OpenBao: with cached keys, jobs would run through
    the outage without a retry and the last assertion would prove nothing about it."""
    pids = _service_pids(restart_stack)
    stream = Stream()
    submitter = threading.Thread(target=stream.run, args=(restart_stack,), daemon=True)
    submitter.start()
    try:
        _wait_until(lambda: len(stream.accepted) >= 10, 60, "no submissions accepted")
        slow = submit(restart_stack.client(), SLOW, "slow")
        assert slow.status_code == 202, slow.text
        time.sleep(0.3)  # picked up and opened by the worker, not yet sealed
        down_at = time.monotonic()
        assert stop_openbao(restart_stack.state)
        _wait_until(
            lambda: any(t > down_at for t, _, _ in stream.refused),
            30,
            "no submission was refused while OpenBao was down",
        )
        time.sleep(2)

        restarted_at = time.monotonic()
        stack.up(restart_stack.state)  # Starts and unseals OpenBao; the services keep running.
        _wait_until(
            lambda: any(t > restarted_at for t in stream.accepted_at),
            60,
            "no submission accepted after the restart",
        )
        recovery = min(t for t in stream.accepted_at if t > restarted_at) - restarted_at
        time.sleep(1)
    finally:
        stream.stop.set()
        submitter.join(30)

    outage = [(code, retry) for t, code, retry in stream.refused if t > down_at]
    assert outage and all(code == 503 and retry and int(retry) > 0 for code, retry in outage), (
        sorted(set(outage), key=str)
    )
    assert [r for r in stream.refused if r[0] <= down_at] == []
    client = restart_stack.client()
    for key, i in stream.accepted.items():
        resp = restart_stack.wait_result(client, key, timeout=120)
        assert resp.status_code == 200, (key, resp.text)
        body = resp.json()
        assert (body["status"], body["result"]) == ("succeeded", 2 * i), body
    body = restart_stack.wait_result(client, slow.json()["result_key"], timeout=120).json()
    assert (body["status"], body["result"]) == ("succeeded", 7_500_000), body
    # Nobody logged in again from scratch: the same API and worker processes serve on.
    assert _service_pids(restart_stack) == pids
    worker_log = (restart_stack.state / "run" / "worker" / "worker.log").read_text()
    retries = worker_log.count("Retry in")
    assert retries > 0  # Jobs did meet the outage, and were retried rather than dropped.
    print(
        f"\naccepted {len(stream.accepted)}, refused during the outage {len(outage)}, "
        f"worker retries {retries}, first acceptance {recovery:.2f} s after `up` began"
    )


def test_restart_keeps_identities_and_leaves_no_root_token(restart_stack: Stack) -> None:
    """After `up` the bootstrap's root token is revoked: no token with the root policy is left
    but the ones generated on purpose (which need the operator token and the unseal keys)."""
    addr = restart_stack.status["vault_addr"]
    root = hvac.Client(url=addr, token=generate_root_token(addr, restart_stack.state))
    try:
        accessors = root.list("auth/token/accessors")["data"]["keys"]
        roots = [
            a for a in accessors if "root" in root.auth.token.lookup_accessor(a)["data"]["policies"]
        ]
        assert len(roots) == 1  # Only the one just generated for this test.
    finally:
        root.auth.token.revoke_self()
    assert not (restart_stack.state / "secrets" / "bao-root.token").exists()
    assert "-dev" not in (restart_stack.state / "bao" / "config.hcl").read_text()


def test_down_and_up_keeps_clients_and_keys(restart_stack: Stack) -> None:
    """A whole `down` + `up`: OpenBao comes back from its storage (registry, key versions), the
    services log in afresh with new wrapped secret_ids, and a client registered before runs."""
    private = restart_stack.add_client("kept", ("double",))
    operator = Transit(restart_stack.registry().session)
    version = operator.rotate("jobs")
    stack.down(restart_stack.state)
    restart_stack.status = stack.up(restart_stack.state)
    assert Transit(restart_stack.registry().session).rotate("jobs") == version + 1
    client = restart_stack.client("kept", private)
    accepted = submit(client, DOUBLE, "double", args=[21])
    assert accepted.status_code == 202, accepted.text
    resp = restart_stack.wait_result(client, accepted.json()["result_key"], timeout=60)
    assert resp.status_code == 200 and resp.json()["result"] == 42, resp.text


def _wait_until(predicate: object, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(message)
