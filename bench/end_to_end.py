"""The whole appliance beside two baselines, on the same machine, alternated in one run.

    .venv/bin/python bench/end_to_end.py [--runs 200] [--burst 300] [--threads 8]
        [--rss-jobs 10000] [--rss-max-seconds 900] [--wait-seconds 0] [--env NAME=VALUE]
        [--json out.json]

Three modes, each running the trivial `add(a, b)`:

* **appliance**: a stack started by `appliance up` on free ports (state in a temporary
  directory); a signed `POST /v1/tasks`, then `GET /get-result` polled every 2 ms until 200 (or,
  with `--wait-seconds N`, long-polled with `wait=N`, and polled again on a 202).
* **celery+sandbox**: a bare Celery app (JSON, `--pool threads -c 2`, on a Redis of its own)
  whose task runs `add` through this project's `sandbox.Sandbox`, and nothing else of the
  appliance (`bench/_bare_celery.py`).
* **bare Celery**: the same app and Redis, the task calling `add` directly.

Measured:

* **latency** (`--runs`): one job at a time, the three modes alternated job by job;
* **burst throughput** (`--burst` submissions from `--threads` client threads, from the first
  submission until every result is readable), the three modes alternated, twice each;
* **memory**: the API's and the worker's RSS (the main process of each) once the appliance has
  run 1,000 jobs and once it has run `--rss-jobs` (bursts of the same size; skipped below 1,000;
  stopped at `--rss-max-seconds`, and the report says how far it got).

The report prints the ratios against the issue's targets (issue 16): p50 ≤ 1.5× celery+sandbox
and ≤ 3× bare Celery, p99 ≤ 2× celery+sandbox, throughput ≥ 70 % of celery+sandbox, and RSS
after `--rss-jobs` within 10 % of RSS after 1,000.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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

ADD = "def add(a, b):\n    return a + b\n"
FREE = {"redis": 0, "bao": 0, "api": 0, "flower": 0, "metrics": 0}
BENCH_DIR = Path(__file__).resolve().parent
MODES = ("appliance", "celery+sandbox", "bare_celery")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class Appliance:
    """Signed submissions and result reads against the stack's API."""

    def __init__(self, st: dict[str, Any], wait_seconds: int) -> None:
        self.key = serialization.load_pem_private_key(
            Path(st["client"]["private_key"]).read_bytes(), password=None
        )
        self.url, self.keyid = st["api_url"], st["client"]["key_id"]
        self.wait_seconds = wait_seconds
        self.local = threading.local()
        self.jobs = 0
        self._count = threading.Lock()

    def client(self) -> SignedClient:
        if not hasattr(self.local, "client"):
            self.local.client = SignedClient(self.url, self.keyid, self.key)  # type: ignore[arg-type]
        return self.local.client  # type: ignore[no-any-return]

    def submit(self, i: int) -> str:
        resp = self.client().request(
            "POST", "/v1/tasks", {"module": ADD, "function": "add", "args": [i, 1]}
        )
        if resp.status_code != 202:
            raise RuntimeError(f"submit: {resp.status_code} {resp.text}")
        with self._count:
            self.jobs += 1
        return str(resp.json()["result_key"])

    def result(self, key: str, i: int) -> None:
        params = {"key": key}
        if self.wait_seconds:
            params["wait"] = str(self.wait_seconds)
        while True:
            got = self.client().request("GET", "/get-result", params=params)
            if got.status_code == 200:
                if got.json()["result"] != i + 1:
                    raise RuntimeError(f"wrong result: {got.json()}")
                return
            if got.status_code != 202:
                raise RuntimeError(f"get-result: {got.status_code} {got.text}")
            if not self.wait_seconds:
                time.sleep(0.002)

    def once(self, i: int) -> None:
        self.result(self.submit(i), i)


def celery_mode(task: Any) -> tuple[Callable[[int], Any], Callable[[Any, int], None]]:
    def submit(i: int) -> Any:
        return task.delay(i, 1)

    def result(async_result: Any, i: int) -> None:
        if async_result.get(timeout=60) != i + 1:
            raise RuntimeError("wrong result")

    return submit, result


def timed_once(submit: Callable[[int], Any], result: Callable[[Any, int], None], i: int) -> float:
    started = time.perf_counter()
    result(submit(i), i)
    return (time.perf_counter() - started) * 1000


def burst(
    submit: Callable[[int], Any], result: Callable[[Any, int], None], n: int, threads: int
) -> float:
    """`n` submissions from `threads` threads, then every result read (by the same threads):
    jobs per second from the first submission until the last result was readable."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        handles = list(pool.map(submit, range(n)))
        list(pool.map(lambda pair: result(*pair), zip(handles, range(n), strict=True)))
    return n / (time.perf_counter() - started)


def start_baselines(state: Path) -> tuple[list[subprocess.Popen[bytes]], Any]:
    redis_port = free_port()
    redis_dir = state / "bench-redis"
    redis_dir.mkdir()
    procs = [
        subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(redis_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    url = f"redis://127.0.0.1:{redis_port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", redis_port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    os.environ["BENCH_BROKER_URL"] = url
    for queue, sandboxed in (("bare", "0"), ("sandboxed", "1")):
        procs.append(
            subprocess.Popen(
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
                    queue,
                    "-n",
                    f"{queue}@%h",
                    "--without-mingle",
                    "--without-gossip",
                    "-l",
                    "WARNING",
                ],
                cwd=BENCH_DIR,
                env=dict(os.environ, PYTHONPATH=str(BENCH_DIR), BENCH_SANDBOXED=sandboxed),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    sys.path.insert(0, str(BENCH_DIR))
    import _bare_celery  # noqa: PLC0415

    _bare_celery.add.apply_async((0, 1), queue="bare").get(timeout=60)
    _bare_celery.sandboxed_add.apply_async((0, 1), queue="sandboxed").get(timeout=60)
    return procs, _bare_celery


def lift_limits(state: Path, st: dict[str, Any], ours: Appliance) -> None:
    """The local client's default rate (120 jobs a minute) and storage budget would throttle
    the bench: lift both, and wait until the API applies them (its registry cache)."""
    registry = Registry(
        VaultSession(st["vault_addr"], operator_token_file(state).read_text().strip())
    )
    local = registry.get(st["client"]["key_id"])
    assert local is not None
    registry.put(replace(local, rate_per_minute=10_000_000, storage_bytes=1 << 34))
    deadline = time.monotonic() + 30
    while True:
        try:
            burst(ours.submit, lambda key, i: ours.result(key, i), 150, 8)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.5), 2),
        "p99": round(percentile(values, 0.99), 2),
        "mean": round(statistics.fmean(values), 2),
    }


def measure_rss(
    ours: Appliance, pids: dict[str, int], target: int, burst_size: int, threads: int, limit: float
) -> dict[str, Any]:
    """RSS of the API and the worker once 1,000 and `target` appliance jobs have run."""
    started = time.monotonic()
    marks: dict[str, Any] = {}
    for mark in sorted({1000, target}) if target >= 1000 else ():
        while ours.jobs < mark:
            if time.monotonic() - started > limit:
                marks["stopped_at_jobs"] = ours.jobs
                return marks
            n = min(burst_size, mark - ours.jobs)
            burst(ours.submit, lambda key, i: ours.result(key, i), n, threads)
        marks[str(mark)] = {name: rss_kb(pid) for name, pid in pids.items()}
    return marks


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--bursts", type=int, default=2, help="bursts per mode")
    parser.add_argument("--rss-jobs", type=int, default=1000)
    parser.add_argument("--rss-max-seconds", type=float, default=900)
    parser.add_argument("--wait-seconds", type=int, default=0, help="long-poll wait= (0: poll)")
    parser.add_argument("--keep", action="store_true", help="leave the stack up (for profiling)")
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for the stack's appliance.env"
    )
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def measure(
    ns: argparse.Namespace, modes: dict[str, Any]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Latency job by job, then bursts, the modes alternated: machine noise hits all alike."""
    for i in range(20):  # warm every path
        for submit, result in modes.values():
            timed_once(submit, result, i)
    latency: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(ns.runs):
        for name in MODES:
            latency[name].append(timed_once(*modes[name], i))
    throughput: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(ns.bursts):
        for name in MODES:
            throughput[name].append(burst(*modes[name], ns.burst, ns.threads))
    return latency, throughput


def main() -> None:
    ns = parse_args()
    load_start = loadavg()
    state = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    if ns.env:  # read by every service at start (e.g. APPLIANCE_DATA_KEY_MAX_AGE_SECONDS=0)
        (state / "appliance.env").write_text("".join(f"{line}\n" for line in ns.env))
    st = stack.up(state, FREE)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ours = Appliance(st, ns.wait_seconds)
        lift_limits(state, st, ours)
        procs, bare_app = start_baselines(state)
        modes = {
            "appliance": (ours.submit, lambda key, i: ours.result(key, i)),
            "celery+sandbox": celery_mode(_routed(bare_app.sandboxed_add, "sandboxed")),
            "bare_celery": celery_mode(_routed(bare_app.add, "bare")),
        }
        latency, throughput = measure(ns, modes)
        services = stack.status(state)["services"]
        pids = {"api": services["api"]["pid"], "worker": services["worker"]["pid"]}
        rss = measure_rss(ours, pids, ns.rss_jobs, ns.burst, ns.threads, ns.rss_max_seconds)
        report: dict[str, Any] = {
            "runs": ns.runs,
            "burst": ns.burst,
            "threads": ns.threads,
            "wait_seconds": ns.wait_seconds,
            "latency_ms": {name: summary(v) for name, v in latency.items()},
            "throughput_jobs_per_s": {
                name: round(statistics.median(v), 1) for name, v in throughput.items()
            },
            "throughput_runs": {name: [round(x, 1) for x in v] for name, v in throughput.items()},
            "rss_kb": rss,
            "loadavg": {"start": load_start, "end": loadavg()},
            "cpus": os.cpu_count(),
            "env": ns.env,
        }
        report["targets"] = targets(report, ns.rss_jobs)
        print_report(report)
        if ns.json:
            ns.json.parent.mkdir(parents=True, exist_ok=True)
            ns.json.write_text(json.dumps(report, indent=2))
        if ns.keep:
            print(f"stack left up under {state}; press Enter to stop it")
            input()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        stack.down(state)


def _routed(task: Any, queue: str) -> Any:
    """`task` with `delay` sent to `queue` (each baseline has a worker of its own)."""

    class Routed:
        @staticmethod
        def delay(*args: Any) -> Any:
            return task.apply_async(args, queue=queue)

    return Routed


def targets(report: dict[str, Any], rss_jobs: int) -> dict[str, Any]:
    lat, thr = report["latency_ms"], report["throughput_jobs_per_s"]
    ours, boxed, bare = lat["appliance"], lat["celery+sandbox"], lat["bare_celery"]
    out: dict[str, Any] = {
        "p50_vs_sandbox": [round(ours["p50"] / boxed["p50"], 2), 1.5],
        "p50_vs_bare": [round(ours["p50"] / bare["p50"], 2), 3.0],
        "p99_vs_sandbox": [round(ours["p99"] / boxed["p99"], 2), 2.0],
        "throughput_share_of_sandbox": [round(thr["appliance"] / thr["celery+sandbox"], 2), 0.7],
    }
    rss = report["rss_kb"]
    if "1000" in rss and str(rss_jobs) in rss and rss_jobs > 1000:
        for name in ("api", "worker"):
            growth = rss[str(rss_jobs)][name] / rss["1000"][name]
            out[f"rss_{name}_{rss_jobs}_vs_1000"] = [round(growth, 3), 1.1]
    return out


def print_report(report: dict[str, Any]) -> None:
    print(f"load average {report['loadavg']['start']} -> {report['loadavg']['end']}")
    print(f"{'':<16}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'jobs/s':>9}")
    for name in MODES:
        row = report["latency_ms"][name]
        jobs = report["throughput_jobs_per_s"][name]
        print(f"{name:<16}{row['p50']:>9.2f}{row['p99']:>9.2f}{row['mean']:>9.2f}{jobs:>9.1f}")
    print(f"RSS (kB): {json.dumps(report['rss_kb'])}")
    for name, (value, target) in report["targets"].items():
        ok = value >= target if name.startswith("throughput") else value <= target
        print(f"{name:<32}{value:>8}  target {target:<5} {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
