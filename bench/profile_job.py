"""Where a job's time goes: OpenBao requests and Redis commands per job, and a sampling profile
of the API and the worker while they run a burst.

    .venv/bin/python bench/profile_job.py [--jobs 200] [--burst 300] [--threads 8]
        [--py-spy PATH] [--out DIR] [--env NAME=VALUE ...]

Starts a stack on free ports (like `end_to_end.py`), lifts the local client's limits, then:

1. runs `--jobs` jobs one at a time (a signed submit, then the result polled every 2 ms) and
   counts, between the first and the last, OpenBao's requests by path (its file audit device:
   one `response` line per request) and Redis's commands by name (`INFO commandstats`, as the
   stack's `admin`: every user's commands, Celery's broker traffic included);
2. with `--py-spy`, records the API's and the worker's main processes with py-spy (`--native`
   off, `--idle` off: CPU only; and a second, wall-clock recording with `--idle`) during a burst
   of `--burst` jobs from `--threads` threads, and prints each one's top frames.

`--env NAME=VALUE` lines go to the stack's `appliance.env` before it starts (for example
`APPLIANCE_DATA_KEY_MAX_AGE_SECONDS=0` turns the data-key cache off).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from end_to_end import FREE, Appliance, burst, lift_limits  # noqa: E402

from appliance import stack  # noqa: E402
from appliance._stack import audit_log_path  # noqa: E402


def bao_requests(log: Path, start: int) -> collections.Counter[str]:
    """OpenBao requests by operation and path in the audit log after byte `start`."""
    counts: collections.Counter[str] = collections.Counter()
    with log.open("rb") as f:
        f.seek(start)
        for line in f:
            entry = json.loads(line)
            if entry.get("type") != "response":
                continue
            req = entry.get("request", {})
            counts[f"{req.get('operation')} {req.get('path')}"] += 1
    return counts


def redis_admin(st: dict[str, Any]) -> redis.Redis:
    r = st["redis"]
    return redis.Redis(
        host="127.0.0.1",
        port=r["port"],
        username="admin",
        password=Path(r["password_file"]).read_text().strip(),
        ssl=True,
        ssl_ca_certs=r["tls"]["ca"],
        ssl_certfile=r["tls"]["cert"],
        ssl_keyfile=r["tls"]["key"],
    )


def commandstats(admin: redis.Redis) -> dict[str, int]:
    stats = admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def per_job(before: dict[str, int], after: dict[str, int], jobs: int) -> dict[str, float]:
    return {
        k: round((after.get(k, 0) - before.get(k, 0)) / jobs, 2)
        for k in sorted(after)
        if after.get(k, 0) != before.get(k, 0)
    }


def record(py_spy: str, pid: int, out: Path, seconds: int, idle: bool) -> subprocess.Popen[bytes]:
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--format", "raw"]
    argv += ["--rate", "250", "--output", str(out), "--nonblocking"]
    if idle:
        argv.append("--idle")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: The frame a process's request or job work runs under: samples outside it (idle threads,
#: Celery's consumer, timers) are left out of the shares.
ANCHORS = {"api": "WorkerThread.run (anyio/", "worker": "_run_job (appliance/worker/app.py"}
#: Frames worth naming: the appliance's own, and the libraries a job's time goes to.
SHOWN = ("appliance/", "sandbox/", "hvac/", "redis/client.py", "redis/connection.py", "ssl.py")


def top_frames(raw: Path, anchor: str, n: int = 30) -> dict[str, Any]:
    """Inclusive share of the anchored samples per function (each frame counted once per
    stack), for the appliance's frames and the libraries of `SHOWN`; and the busiest leaves."""
    totals: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    samples = anchored = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        weight = int(count)
        samples += weight
        if anchor not in stack_text:
            continue
        anchored += weight
        frames = stack_text.split(";")
        leaves[frames[-1]] += weight
        for frame in set(frames):
            if any(part in frame for part in SHOWN):
                totals[frame] += weight
    if not anchored:
        return {"samples": samples, "anchored": 0}
    return {
        "samples": samples,
        "anchored": anchored,
        "inclusive_pct": [(f, round(100 * c / anchored, 1)) for f, c in totals.most_common(n)],
        "leaf_pct": [(f, round(100 * c / anchored, 1)) for f, c in leaves.most_common(12)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--py-spy", help="path of the py-spy binary")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/profile"))
    parser.add_argument("--env", action="append", default=[])
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    if ns.env:
        (state / "appliance.env").write_text("".join(f"{line}\n" for line in ns.env))
    st = stack.up(state, FREE)
    try:
        ours = Appliance(st, 0)
        lift_limits(state, st, ours)
        admin = redis_admin(st)
        log = audit_log_path(state)
        for i in range(20):
            ours.once(i)
        start, before = log.stat().st_size, commandstats(admin)
        for i in range(ns.jobs):
            ours.once(i)
        time.sleep(0.5)  # let the audit device flush its last lines
        after = commandstats(admin)
        bao = bao_requests(log, start)
        report: dict[str, Any] = {
            "jobs": ns.jobs,
            "openbao_per_job": {k: round(v / ns.jobs, 2) for k, v in bao.most_common()},
            "openbao_total_per_job": round(sum(bao.values()) / ns.jobs, 2),
            "redis_commands_per_job": per_job(before, after, ns.jobs),
        }
        report["redis_total_per_job"] = round(sum(report["redis_commands_per_job"].values()), 2)
        if ns.py_spy:
            services = stack.status(state)["services"]
            pids = {"api": services["api"]["pid"], "worker": services["worker"]["pid"]}
            for idle in (False, True):
                seconds = max(5, ns.burst // 15)
                tag = "wall" if idle else "cpu"
                spies = {
                    name: record(ns.py_spy, pid, ns.out / f"{name}-{tag}.txt", seconds, idle)
                    for name, pid in pids.items()
                }
                done = time.monotonic() + seconds
                while time.monotonic() < done:
                    burst(ours.submit, lambda key, i: ours.result(key, i), ns.burst, ns.threads)
                for spy in spies.values():
                    spy.wait(60)
                report[f"profile_{tag}"] = {
                    name: top_frames(ns.out / f"{name}-{tag}.txt", ANCHORS[name]) for name in pids
                }
        print(json.dumps(report, indent=2))
        (ns.out / "report.json").write_text(json.dumps(report, indent=2))
    finally:
        stack.down(state)


if __name__ == "__main__":
    main()
