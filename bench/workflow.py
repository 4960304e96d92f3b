"""A three-step workflow (submit → last result readable) beside the same three steps chained by
the client (submit, wait for the result, submit the next with it), alternately in one run.

    .venv/bin/python bench/workflow.py [--runs 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from appliance import stack  # noqa: E402
from appliance._stack import operator_token_file  # noqa: E402
from appliance.cli import SignedClient  # noqa: E402
from appliance.registry import Registry  # noqa: E402
from appliance.vault import VaultSession  # noqa: E402

INC = "def inc(x):\n    return x + 1\n"
FREE = {"redis": 0, "bao": 0, "api": 0, "flower": 0, "metrics": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait(client: SignedClient, key: str) -> Any:
    while True:
        got = client.request("GET", "/get-result", params={"key": key})
        if got.status_code == 200:
            return got.json()["result"]
        time.sleep(0.002)


def workflow_once(client: SignedClient, i: int) -> float:
    started = time.perf_counter()
    step = {"module": INC, "function": "inc"}
    resp = client.request("POST", "/v1/workflows", {"steps": [{**step, "args": [i]}, step, step]})
    assert wait(client, resp.json()["result_key"]) == i + 3
    return (time.perf_counter() - started) * 1000


def client_chain_once(client: SignedClient, i: int) -> float:
    started = time.perf_counter()
    value = i
    for _ in range(3):
        resp = client.request(
            "POST", "/v1/tasks", {"module": INC, "function": "inc", "args": [value]}
        )
        value = wait(client, resp.json()["result_key"])
    assert value == i + 3
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bench-workflow-"))
    st = stack.up(state, FREE)
    try:
        key = serialization.load_pem_private_key(
            Path(st["client"]["private_key"]).read_bytes(), password=None
        )
        client = SignedClient(st["api_url"], "local", key)  # type: ignore[arg-type]
        # The local client's default rate (120 jobs a minute) would throttle the bench.
        registry = Registry(
            VaultSession(st["vault_addr"], operator_token_file(state).read_text().strip())
        )
        local = registry.get("local")
        assert local is not None
        registry.put(replace(local, rate_per_minute=1_000_000))
        time.sleep(6)  # the API caches registry entries for 5 s
        client.request(
            "POST", "/v1/workflows", {"steps": [{"module": INC, "function": "inc", "args": [0]}]}
        )
        samples: dict[str, list[float]] = {"workflow": [], "client_chain": []}
        for i in range(ns.runs):  # alternate, so load on this noisy machine hits both alike
            samples["workflow"].append(workflow_once(client, i))
            samples["client_chain"].append(client_chain_once(client, i))
        report = {
            name: {
                "p50_ms": round(statistics.median(v), 1),
                "p99_ms": round(percentile(v, 0.99), 1),
            }
            for name, v in samples.items()
        }
        report["ratio_p50"] = round(
            report["client_chain"]["p50_ms"] / report["workflow"]["p50_ms"], 2
        )
        print(json.dumps(report, indent=2))
        if ns.json:
            ns.json.write_text(json.dumps(report, indent=2))
    finally:
        stack.down(state)


if __name__ == "__main__":
    main()
