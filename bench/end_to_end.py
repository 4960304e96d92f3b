"""End-to-end latency of a trivial signed task (submit → result readable) beside a bare Celery
`delay().get()` of the same function on the same Redis, measured alternately in one run.

    .venv/bin/python bench/end_to_end.py [--runs 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from appliance import stack  # noqa: E402
from appliance.cli import SignedClient  # noqa: E402

ADD = "def add(a, b):\n    return a + b\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def appliance_once(client: SignedClient, i: int) -> float:
    started = time.perf_counter()
    resp = client.request("POST", "/v1/tasks", {"module": ADD, "function": "add", "args": [i, 1]})
    key = resp.json()["result_key"]
    while True:
        got = client.request("GET", "/get-result", params={"key": key})
        if got.status_code == 200:
            assert got.json()["result"] == i + 1
            return (time.perf_counter() - started) * 1000
        time.sleep(0.002)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    st = stack.up(state, {"redis": 0, "bao": 0, "api": 0, "flower": 0})
    r = st["redis"]
    password = Path(r["password_file"]).read_text().strip()
    env = dict(
        os.environ,
        BENCH_BROKER_URL=f"rediss://admin:{password}@127.0.0.1:{r['port']}/1",
        BENCH_CA=r["tls"]["ca"],
        BENCH_CERT=r["tls"]["cert"],
        BENCH_KEY=r["tls"]["key"],
    )
    os.environ.update(env)
    bench_dir = str(Path(__file__).resolve().parent)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "_bare_celery",
            "worker",
            "--pool",
            "threads",
            "-c",
            "2",
            "-Q",
            "bare",
            "--without-mingle",
            "--without-gossip",
            "-l",
            "WARNING",
        ],
        cwd=bench_dir,
        env=dict(env, PYTHONPATH=bench_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sys.path.insert(0, bench_dir)
    import _bare_celery  # noqa: PLC0415

    try:
        key = serialization.load_pem_private_key(
            Path(st["client"]["private_key"]).read_bytes(), password=None
        )
        client = SignedClient(st["api_url"], st["client"]["key_id"], key)  # type: ignore[arg-type]
        for i in range(10):  # warm both paths
            appliance_once(client, i)
            _bare_celery.add.delay(i, 1).get(timeout=30)
        ours, bare = [], []
        for i in range(ns.runs):
            ours.append(appliance_once(client, i))
            t = time.perf_counter()
            assert _bare_celery.add.delay(i, 1).get(timeout=30) == i + 1
            bare.append((time.perf_counter() - t) * 1000)
        report = {
            "runs": ns.runs,
            "appliance_ms": {
                "p50": percentile(ours, 0.5),
                "p99": percentile(ours, 0.99),
                "mean": statistics.fmean(ours),
            },
            "bare_celery_ms": {
                "p50": percentile(bare, 0.5),
                "p99": percentile(bare, 0.99),
                "mean": statistics.fmean(bare),
            },
        }
        report["ratio_p50"] = report["appliance_ms"]["p50"] / report["bare_celery_ms"]["p50"]
        report["ratio_p99"] = report["appliance_ms"]["p99"] / report["bare_celery_ms"]["p99"]
        print(f"{'':<14}{'p50 ms':>10}{'p99 ms':>10}")
        for name in ("appliance_ms", "bare_celery_ms"):
            print(f"{name:<14}{report[name]['p50']:>10.2f}{report[name]['p99']:>10.2f}")
        print(f"ratio p50 {report['ratio_p50']:.2f}x  p99 {report['ratio_p99']:.2f}x")
        if ns.json:
            ns.json.write_text(json.dumps(report, indent=2))
    finally:
        worker.terminate()
        worker.wait(10)
        stack.down(state)


if __name__ == "__main__":
    main()
