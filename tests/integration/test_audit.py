"""The audit log against a real OpenBao: checkpoints signed by the transit key `audit` through
the API service's AppRole, verified offline with the exported public key; several processes;
OpenBao down; key rotation; no plaintext in any audit file."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance._stack import Bootstrap, free_port
from appliance.audit import (
    AuditLog,
    EventType,
    TransitSigner,
    VerificationFailed,
    audit_cli,
    export_public_keys,
    key_version,
    verify_log,
)
from appliance.errors import Forbidden
from appliance.vault import Transit, VaultSession
from tests.unit.audit.helpers import paths, records
from tests.unit.audit.signer_contract import SignerContract
from tests.unit.audit.test_canary import assert_absent, canaries

pytestmark = pytest.mark.integration


def _service_signer(bao_bootstrap: Bootstrap, directory: Path, role: str = "api") -> TransitSigner:
    """A signer as a service holds it: logged in with its own AppRole (policy: sign only)."""
    role_id, wrap = bao_bootstrap.handle.write_service_credentials(role, directory)
    return TransitSigner(
        Transit(VaultSession.from_approle(bao_bootstrap.handle.addr, role_id, wrap))
    )


def _operator_keys_source(bao_bootstrap: Bootstrap) -> TransitSigner:
    """What `appliance up` exports the public keys with (root: services cannot read keys)."""
    handle = bao_bootstrap.handle
    return TransitSigner(Transit(VaultSession(handle.addr, handle.root_token)))


@pytest.fixture(scope="module")
def api_signer(bao_bootstrap: Bootstrap, tmp_path_factory: pytest.TempPathFactory) -> TransitSigner:
    return _service_signer(bao_bootstrap, tmp_path_factory.mktemp("api-creds"))


class TestTransitSigner(SignerContract):
    @pytest.fixture
    def signer(self, api_signer: TransitSigner) -> TransitSigner:
        return api_signer

    @pytest.fixture
    def public_source(self, bao_bootstrap: Bootstrap) -> TransitSigner:
        return _operator_keys_source(bao_bootstrap)


def test_the_services_cannot_read_the_key_but_can_sign(api_signer: TransitSigner) -> None:
    assert api_signer.sign(b"x").startswith("vault:v")
    with pytest.raises(Forbidden):
        api_signer.public_keys()


def _writer(
    addr: str, role_id: str, wrap: str, log: str, index: int, count: int, barrier: Any
) -> None:
    session = VaultSession.from_approle(addr, Path(role_id), Path(wrap))
    audit = AuditLog.open(
        Path(log), TransitSigner(Transit(session)), source=f"worker{index}", checkpoint_every=50
    )
    barrier.wait()
    for i in range(count):
        audit.record(
            EventType.EXECUTION_FINISHED,
            task_id=f"{index}-{i}",
            function="f",
            status="ok",
            usage={"cpu_ms": i},
        )
    audit.close()


def test_four_worker_processes_signing_through_openbao(
    bao_bootstrap: Bootstrap, tmp_path: Path
) -> None:
    log = tmp_path / "audit" / "audit.jsonl"
    keys = export_public_keys(_operator_keys_source(bao_bootstrap), paths(log).public_keys)
    AuditLog.open(log).close()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    workers = []
    for n in range(4):
        creds = tmp_path / f"creds{n}"
        creds.mkdir()
        role_id, wrap = bao_bootstrap.handle.write_service_credentials("worker", creds)
        workers.append(
            context.Process(
                target=_writer,
                args=(
                    bao_bootstrap.handle.addr,
                    str(role_id),
                    str(wrap),
                    str(log),
                    n,
                    250,
                    barrier,
                ),
            )
        )
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(90)
        assert worker.exitcode == 0
    entries = records(log)
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert sum(e["type"] == "execution.finished" for e in entries) == 1000
    report = verify_log(log, keys)
    # Every entry is covered by a signed checkpoint: that is exact. How many checkpoints cover
    # them is not: one is due after 50 entries but written when its process next holds the
    # lock, so on a loaded machine fewer, larger ones are normal (19 was seen, not 20).
    assert report.unsigned == 0 and report.checkpoints >= 1
    result = CliRunner().invoke(audit_cli, ["verify", "--log", str(log)])
    assert result.exit_code == 0 and "chain intact" in result.stdout


def test_openbao_down_costs_no_entry(
    bao_bootstrap: Bootstrap, api_signer: TransitSigner, tmp_path: Path
) -> None:
    log_path = tmp_path / "audit" / "audit.jsonl"
    keys = export_public_keys(_operator_keys_source(bao_bootstrap), paths(log_path).public_keys)
    unreachable = TransitSigner(
        Transit(VaultSession(f"http://127.0.0.1:{free_port()}", "t", timeout=1))
    )
    log = AuditLog.open(log_path, unreachable, checkpoint_every=5)
    started = time.monotonic()
    for i in range(20):
        log.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=f"t{i}")
    assert time.monotonic() - started < 5  # one failed attempt, then backoff: no stall
    failed = [e for e in records(log_path) if e["type"] == "checkpoint.failed"]
    assert len(failed) == 1 and failed[0]["code"] == "dependency_unavailable"
    # OpenBao is back. Anchors are left out: this session's OpenBao anchors other logs too.
    log._signer, log._anchors = api_signer, None
    log.close()  # the final checkpoint signs everything pending
    report = verify_log(log_path, keys)
    assert report.unsigned == 0 and report.entries == 22


class _KeysUpTo:
    """The public keys as exported before a rotation: versions up to `version` only."""

    def __init__(self, source: TransitSigner, version: int) -> None:
        self.source, self.version = source, version

    def public_keys(self) -> dict[str, str]:
        return {v: k for v, k in self.source.public_keys().items() if int(v) <= self.version}


def test_rotating_the_audit_key_needs_a_new_export(
    bao_bootstrap: Bootstrap, tmp_path: Path, api_signer: TransitSigner
) -> None:
    log_path = tmp_path / "audit" / "audit.jsonl"
    operator = _operator_keys_source(bao_bootstrap)
    before = key_version(api_signer.sign(b"probe"))
    stale = export_public_keys(_KeysUpTo(operator, before), tmp_path / "stale.json")
    log = AuditLog.open(log_path, api_signer, checkpoint_every=5)
    for i in range(5):
        log.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=f"a{i}")
    bao_bootstrap.handle.client().secrets.transit.rotate_key("audit", mount_point="transit")
    log.record(EventType.KEY_ROTATED, key_name="audit", key_version=before + 1, actor="operator")
    for i in range(5):
        log.record(EventType.TASK_REJECTED, code="bad_envelope", task_id=f"b{i}")
    log.close()
    with pytest.raises(VerificationFailed, match="export them again") as info:
        verify_log(log_path, stale)
    assert info.value.kind == "forged" and info.value.seq == 12
    report = verify_log(log_path, export_public_keys(operator, paths(log_path).public_keys))
    assert set(report.key_fingerprints) == {before, before + 1} and report.unsigned == 0


def test_no_plaintext_with_the_real_signer(api_signer: TransitSigner, tmp_path: Path) -> None:
    marks = canaries()
    source = f"def f(x):\n    return '{marks['source']}' + x\n"
    log = AuditLog.open(tmp_path / "audit" / "audit.jsonl", api_signer, checkpoint_every=2)
    log.record(
        EventType.SUBMISSION_ACCEPTED,
        client="alice",
        function="f",
        task_id="t",
        result_key="f_1_ab",
        module_source=source,
        args=[marks["arg"]],
        kwargs={"k": marks["kwarg"]},
    )
    log.record(
        EventType.EXECUTION_FINISHED,
        task_id="t",
        status="ok",
        module_source=source,
        result=marks["result"] + marks["secret"],
    )
    log.record(
        EventType.RESULT_READ,
        client="alice",
        result_key="f_1_ab",
        status="succeeded",
        result=marks["result"],
    )
    log.close()
    assert_absent(tmp_path / "audit", marks)
