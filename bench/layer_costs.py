"""What each isolation layer added this round costs, measured on its own and side by side.

1. Namespaces: a child born in its own PID, UTS and IPC namespaces (`fork_child`, a raw clone)
   against a plain os.fork(), each child exiting at once and reaped: the whole life of a spare
   less its layers. Off the caller's critical path (spares are made ahead), but CPU all the same.
2. Memory cgroup: what the fork server does per run: make the cgroup with the spare, set the
   run's limit when the request is handed over (on the critical path), remove it after.
3. Seccomp: installing the allow-list program in a child, and its size in BPF instructions.
4. CPU-time enforcement: one read of a child's CPU clock (done once per wake-up of the
   supervisor while a run lasts, and once at hand-over).
5. The whole sandbox, runs 10 ms apart and back to back, in alternating blocks: as it is, and
   with one new layer switched off at a time (a bench-only fork server that patches itself at
   boot and degrades that layer in its policy), and optionally (`--baseline-tree PATH`, a
   checkout of an earlier commit) that tree's sandbox.

    sudo .venv/bin/python bench/layer_costs.py [--rounds 300] [--baseline-tree /tmp/old]
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox import Policy, Sandbox, _isolation, _seccomp  # noqa: E402  # noqa: E402
from sandbox._cgroup import MemoryCgroup  # noqa: E402
from sandbox._client import _BOOT  # noqa: E402
from sandbox._framing import read_frame, write_frame  # noqa: E402
from sandbox._request import prepare  # noqa: E402
from sandbox._supervisor import _cpu_seconds  # noqa: E402

TRIVIAL = "def f(x):\n    return x * 2\n"
BLOCKS = 10
PACED_GAP_S = 0.010


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": pct(values, 0.5),
        "p99": pct(values, 0.99),
        "mean": statistics.fmean(values),
        "n": len(values),
    }


def _fork_and_reap(fork: object) -> float:
    started = time.perf_counter()
    pid = fork()  # type: ignore[operator]
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return (time.perf_counter() - started) * 1000


def namespaces(rounds: int) -> dict[str, dict[str, float]]:
    plain: list[float] = []
    isolated: list[float] = []
    for block in range(BLOCKS):
        share = rounds // BLOCKS + (block < rounds % BLOCKS)
        plain.extend(_fork_and_reap(os.fork) for _ in range(share))
        isolated.extend(_fork_and_reap(_isolation.fork_child) for _ in range(share))
    return {
        "os.fork + exit + reap": summary(plain),
        "fork_child (PID, UTS, IPC namespaces) + exit + reap": summary(isolated),
    }


def memory_cgroup(rounds: int) -> dict[str, object]:
    handle = MemoryCgroup.find(os.getpid(), Policy.load().maxima.memory_mb)
    if not handle.available:
        return {"backend": handle.describe()}
    make, limit, remove = [], [], []
    try:
        for _ in range(rounds):
            t = time.perf_counter()
            path = handle.new_run()
            make.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            handle.limit_run(path, 64 << 20)
            limit.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            handle.remove(path)
            remove.append((time.perf_counter() - t) * 1000)
    finally:
        handle.close()
    return {
        "backend": handle.describe(),
        "make (with the spare)": summary(make),
        "limit (at hand-over: critical path)": summary(limit),
        "remove (after the reap)": summary(remove),
    }


def seccomp(rounds: int) -> dict[str, object]:
    program, info = _seccomp.export_program()
    prog = _seccomp.Program(program, info, _isolation._libc_prctl)
    read_fd, write_fd = os.pipe()
    installs: list[float] = []
    for _ in range(rounds):
        pid = os.fork()
        if pid == 0:
            _isolation._prctl(_isolation.PR_SET_NO_NEW_PRIVS, 1)
            t = time.perf_counter()
            prog.install()
            os.write(write_fd, str((time.perf_counter() - t) * 1000).encode().ljust(32))
            os._exit(0)
        installs.append(float(os.read(read_fd, 32)))
        os.waitpid(pid, 0)
    os.close(read_fd)
    os.close(write_fd)
    return {
        "allowed": info.allowed,
        "denied_by_name": info.denied,
        "bpf_instructions": len(program) // 8,
        "install_ms": summary(installs),
    }


def cpu_clock(rounds: int) -> dict[str, float]:
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    try:
        reads = []
        for _ in range(rounds):
            t = time.perf_counter()
            _cpu_seconds(pid)
            reads.append((time.perf_counter() - t) * 1000)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return summary(reads)


class _TreeServer:
    """The fork server of another checkout, driven by its own boot (argv) and frame protocol."""

    BOOT = (
        "import sys; sys.path.insert(0, sys.argv[1]); del sys.argv[1]; "
        "from sandbox._server import main; main()"
    )

    def __init__(self, tree: Path) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-c",
                self.BOOT,
                str(tree),
                str(tree / "policies" / "sandbox.json"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={},
            cwd="/",
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        hello = read_frame(self.proc.stdout.fileno())
        assert hello is not None and json.loads(hello)["ready"]
        self.request = json.dumps(prepare(Policy.load(), TRIVIAL, "f", [21]).to_wire()).encode()

    def run(self) -> None:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        write_frame(self.proc.stdin.fileno(), self.request)
        answer = json.loads(read_frame(self.proc.stdout.fileno()) or b"{}")
        assert answer["outcome"]["value"] == 42, answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


# Bench-only fork servers, each with one new layer off: the patch runs in the server at boot.
_ABLATIONS = {
    "without the memory cgroup": (
        ["memory_cgroup"],
        "import sandbox._cgroup as c\n"
        "c.MemoryCgroup.find = classmethod(lambda cls, *a: cls('', None, 'off for the bench'))\n",
    ),
    "without PID/UTS/IPC namespaces": (
        ["pidns", "utsns", "ipcns"],
        "import sandbox._isolation as i\ni._SYS_CLONE = None\n",
    ),
    # The supervisor stops reading the child's CPU clock while it runs (usage is still read
    # once the reply is whole, as before this round).
    "without CPU-time enforcement": (
        [],
        "import sandbox._supervisor as s, types\n"
        "s._usage_if_alive = types.FunctionType(s._usage_if_alive.__code__,\n"
        "    {**vars(s), '_cpu_seconds': s._cpu_seconds})\n"
        "s._cpu_seconds = lambda pid: None\n",
    ),
}


def _ablated(name: str, tmp: Path) -> Sandbox:
    degraded, patch = _ABLATIONS[name]
    raw = json.loads((ROOT / "policies" / "sandbox.json").read_text())
    iso = raw["isolation"]
    iso["required_layers"] = [x for x in iso["required_layers"] if x not in degraded]
    iso["degraded_layers"] = degraded
    policy = tmp / f"policy-{len(name)}.json"
    policy.write_text(json.dumps(raw))

    class Ablated(Sandbox):
        _boot = _BOOT + patch + "from sandbox._server import main; main(policy)"

    return Ablated(policy)


def _sandbox_call(box: Sandbox) -> Callable[[], None]:
    def run() -> None:
        assert box.run(TRIVIAL, "f", [21]).value == 42

    return run


def _timed(call: Callable[[], None], count: int, gap: float) -> list[float]:
    times = []
    for _ in range(count):
        if gap:
            time.sleep(gap)
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000)
    return times


def _alternate(targets: dict[str, Callable[[], None]], runs: int) -> dict[str, list[float]]:
    """Every target, 10 ms apart and back to back, in alternating blocks."""
    times: dict[str, list[float]] = {}
    for _ in range(20):
        for call in targets.values():
            call()
    for block in range(BLOCKS):
        share = runs // BLOCKS + (block < runs % BLOCKS)
        for gap, mode in ((PACED_GAP_S, "10 ms apart"), (0.0, "back to back")):
            for label, call in targets.items():
                times.setdefault(f"{label}, {mode}", []).extend(_timed(call, share, gap))
    return times


def side_by_side(tree: Path | None, runs: int) -> dict[str, dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="layer-costs-"))
    boxes = {"this tree": Sandbox().start()}
    for name in _ABLATIONS:
        boxes[f"this tree {name}"] = _ablated(name, tmp).start()
    targets = {label: _sandbox_call(box) for label, box in boxes.items()}
    old = _TreeServer(tree) if tree else None
    if old is not None:
        targets["baseline tree"] = old.run
    try:
        times = _alternate(targets, runs)
    finally:
        for box in boxes.values():
            box.close()
        if old is not None:
            old.close()
    return {label: summary(values) for label, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--baseline-tree", type=Path, help="a checkout to compare with")
    parser.add_argument("--runs", type=int, default=500, help="side-by-side runs per mode")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "artifacts" / "bench" / "layer_costs.json"
    )
    ns = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the layers measured need it")
    load = os.getloadavg()
    report: dict[str, object] = {
        "kernel": os.uname().release,
        "namespaces_ms": namespaces(ns.rounds),
        "memory_cgroup_ms": memory_cgroup(ns.rounds),
        "seccomp": seccomp(min(ns.rounds, 200)),
        "cpu_clock_read_ms": cpu_clock(ns.rounds * 10),
    }
    report["side_by_side_ms"] = side_by_side(ns.baseline_tree, ns.runs)
    report["load_average"] = {"before": load, "after": os.getloadavg()}
    print(json.dumps({k: v for k, v in report.items() if k != "side_by_side_ms"}, indent=2))
    print(f"{'':<58}{'p50 ms':>8}{'p99 ms':>8}")
    for label, row in report["side_by_side_ms"].items():  # type: ignore[attr-defined]
        print(f"{label:<58}{row['p50']:>8.2f}{row['p99']:>8.2f}")
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
