"""Cost of the per-task cryptography against a real OpenBao: envelope encryption with transit data
keys and the signed task message, each step timed on its own, beside a local AES-256-GCM seal.

    .venv/bin/python bench/crypto_cost.py [--runs 500] [--json out.json]

OpenBao is started the way the test fixtures start it (persistent raft storage in a temporary
state directory, a free loopback port, bootstrapped from policies/*.hcl). The API's and the
worker's steps run with their own AppRole sessions, so each call is checked against the real
policies, as in production. One "task" is the six calls of a job's life, in order:

    API     seal_job        transit/datakey/plaintext/jobs   + AES-GCM encrypt
    API     sign_message    transit/hmac/task-signing
    worker  verify_message  transit/verify/task-signing
    worker  open_job        transit/decrypt/jobs             + AES-GCM decrypt
    worker  seal_result     transit/datakey/plaintext/results + AES-GCM encrypt
    API     open_result     transit/decrypt/results          + AES-GCM decrypt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance._stack import bootstrap, free_port, start_openbao, stop_openbao  # noqa: E402
from appliance.envelope import Envelope, open_envelope, seal  # noqa: E402
from appliance.jobs import (  # noqa: E402
    JobMessage,
    open_job,
    open_result,
    seal_job,
    seal_result,
    sign_message,
    verify_message,
)
from appliance.specs import JobSpec, ResultBody
from appliance.vault import Transit, VaultSession  # noqa: E402

TASK = "appliance.run_job"
CLIENT = "bench"
SPEC = JobSpec("def add(a, b):\n    return a + b\n", "add", args=[2, 40])
BODY = ResultBody("succeeded", 42, usage={"cpu_ms": 1, "wall_ms": 2, "max_rss_kb": 12000})
STEPS = ("seal_job", "sign_message", "verify_message", "open_job", "seal_result", "open_result")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - started) * 1000


def one_task(api: Transit, worker: Transit, i: int) -> dict[str, float]:
    """The six steps of one job, each timed; checks that every step really worked."""
    task_id, result_key = f"t{i}", f"add_{i}_{os.urandom(16).hex()}"
    ms: dict[str, float] = {}
    sealed, ms["seal_job"] = timed(lambda: seal_job(api, SPEC, task_id, result_key, CLIENT))
    message = JobMessage(task_id, result_key, CLIENT, sealed)
    message, ms["sign_message"] = timed(lambda: sign_message(api, message, TASK, time.time()))
    _, ms["verify_message"] = timed(lambda: verify_message(worker, message, TASK, time.time()))
    spec, ms["open_job"] = timed(lambda: open_job(worker, message))
    assert spec == SPEC
    stored, ms["seal_result"] = timed(lambda: seal_result(worker, BODY, result_key, CLIENT))
    body, ms["open_result"] = timed(lambda: open_result(api, stored, result_key, CLIENT))
    assert body == BODY
    ms["task"] = sum(ms[s] for s in STEPS)
    return ms


def local_seal_and_open(i: int) -> dict[str, float]:
    """The same AES-256-GCM envelope with a local random key: no OpenBao round trip."""
    key = os.urandom(32)
    aad = f"result|k{i}|{CLIENT}".encode()
    plaintext = json.dumps(BODY).encode()
    sealed, seal_ms = timed(lambda: seal(key, "local:v1:none", plaintext, aad).to_json())
    opened, open_ms = timed(lambda: open_envelope(key, Envelope.from_json(sealed), aad))
    assert opened == plaintext
    return {"local_seal": seal_ms, "local_open": open_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bench-crypto-"))
    bao = start_openbao(state, free_port())
    try:
        bootstrap(bao)
        creds = state / "creds"
        creds.mkdir(mode=0o700)
        sessions = {
            role: VaultSession.from_approle(bao.addr, *bao.write_service_credentials(role, creds))
            for role in ("api", "worker")
        }
        bao.revoke_root()
        api, worker = Transit(sessions["api"]), Transit(sessions["worker"])
        for i in range(ns.warmup):
            one_task(api, worker, -i - 1)
            local_seal_and_open(i)
        samples: dict[str, list[float]] = {}
        # Alternate the kinds of work, so that all see the same machine noise. The token
        # lookup is the floor of any OpenBao call (HTTP on loopback, token check, no crypto).
        for i in range(ns.runs):
            _, floor = timed(lambda: sessions["api"].call(lambda c: c.auth.token.lookup_self()))
            rows = {**one_task(api, worker, i), **local_seal_and_open(i), "bao_roundtrip": floor}
            for name, value in rows.items():
                samples.setdefault(name, []).append(value)
    finally:
        stop_openbao(state)
    report = {
        name: {
            "p50_ms": round(statistics.median(v), 3),
            "p99_ms": round(percentile(v, 0.99), 3),
            "mean_ms": round(statistics.fmean(v), 3),
            "runs": len(v),
        }
        for name, v in samples.items()
    }
    print(f"{'step':<16}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}   runs {ns.runs}")
    for name, row in report.items():
        print(f"{name:<16}{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}{row['mean_ms']:>10.3f}")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
