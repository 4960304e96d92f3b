"""Per-run overhead of the sandbox (every layer on) beside a fresh `python -I` doing the same.

A trivial function is run through `sandbox.Sandbox` (fork server, RestrictedPython, namespaces,
chroot, rlimits, uid, no_new_privs, seccomp) and through a fresh isolated interpreter
(`python -I -c`, which defines the function, calls it and prints the result), in alternating
blocks of one process run, two ways: back to back, and with 10 ms before each run (as one fork
server of the appliance's worker sees its runs: each job's OpenBao and Redis calls come between
them). Two more baselines, labelled as such, have the fresh interpreter print the result through
`json` (as the sandbox replies), and also compile the function with RestrictedPython (as the
sandbox does). The compile cost of the RestrictedPython layer is measured on its own,
in-process, and inside the sandbox (a 123-line module against the trivial one).

    .venv/bin/python bench/sandbox_overhead.py [--runs 500] [--paced-runs 500] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox import Sandbox  # noqa: E402
from sandbox._restricted import compile_module  # noqa: E402

TRIVIAL = "def f(x):\n    return x * 2\n"
# A module of about a hundred lines, for how the compile cost grows with the source.
MEDIUM = "\n".join(
    f"def helper_{i}(items, scale={i}):\n"
    f"    total = 0\n"
    f"    for item in items:\n"
    f"        total += item * scale\n"
    f"    return {{'total': total, 'n': len(items)}}\n"
    for i in range(20)
) + "\ndef f(x):\n    return helper_3([x])['total']\n"
# The strict baseline: nothing imported, nothing but the function and a print.
FRESH = TRIVIAL + "print(f(21))\n"
FRESH_JSON = TRIVIAL + "import json\nprint(json.dumps(f(21)))\n"
# The same, compiled and run with RestrictedPython's own guards (what a one-process-per-run
# design would pay at least); labelled separately, the strict baseline is FRESH.
FRESH_RESTRICTED = (
    "import json\n"
    "from RestrictedPython import compile_restricted_exec, safe_globals\n"
    f"code = compile_restricted_exec({TRIVIAL!r}).code\n"
    "namespace = dict(safe_globals)\n"
    "exec(code, namespace)\n"
    "print(json.dumps(namespace['f'](21)))\n"
)
BLOCKS = 10
PACED_GAP_S = 0.010


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 0.50),
        "p99": percentile(values, 0.99),
        "mean": statistics.fmean(values),
        "max": max(values),
        "n": len(values),
    }


def sandbox_once(box: Sandbox, child_ms: list[float]) -> float:
    started = time.perf_counter()
    outcome = box.run(TRIVIAL, "f", [21])
    elapsed = (time.perf_counter() - started) * 1000
    assert outcome.status == "ok" and outcome.value == 42, outcome
    child_ms.append(outcome.usage.wall_ms)
    return elapsed


def fresh_once(program: str = FRESH) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-I", "-c", program], capture_output=True,
                          check=True, env={}, cwd="/")
    elapsed = (time.perf_counter() - started) * 1000
    assert int(done.stdout) == 42
    return elapsed


def _proc_cpu(pid: int) -> tuple[float, float, int]:
    """(own CPU s, CPU s of reaped children, minor faults) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return ((int(fields[11]) + int(fields[12])) / tick,
            (int(fields[13]) + int(fields[14])) / tick, int(fields[7]))


def _tree(box: Sandbox) -> dict[str, int]:
    assert box._proc is not None
    server = box._proc.pid
    children = Path(f"/proc/{server}/task/{server}/children").read_text().split()
    return {"server": server, "zygote": int(children[0])} if children else {"server": server}


def cpu_per_run(box: Sandbox, runs: int, child_ms: list[float]) -> tuple[list[float], dict]:
    """Back-to-back runs, and the CPU each process of the sandbox spent per run on them."""
    tree = _tree(box)
    client0 = time.process_time()
    before = {name: _proc_cpu(pid) for name, pid in tree.items()}
    elapsed = [sandbox_once(box, child_ms) for _ in range(runs)]
    after = {name: _proc_cpu(pid) for name, pid in tree.items()}
    cpu = {"client": (time.process_time() - client0) * 1000 / runs}
    for name in tree:
        cpu[name] = (after[name][0] - before[name][0]) * 1000 / runs
        cpu[f"{name}_faults"] = (after[name][2] - before[name][2]) / runs
    if "zygote" in tree:  # the zygote reaps the children, so their CPU adds up there
        cpu["children"] = (after["zygote"][1] - before["zygote"][1]) * 1000 / runs
    cpu["total"] = sum(v for k, v in cpu.items() if not k.endswith("_faults"))
    return elapsed, cpu


def compile_cost(source: str, rounds: int) -> dict[str, float]:
    restricted, plain = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        compile_module(source)
        restricted.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        compile(source, "<module>", "exec")
        plain.append((time.perf_counter() - t) * 1000)
    return {"restricted_p50": percentile(restricted, 0.5), "plain_p50": percentile(plain, 0.5),
            "source_lines": source.count("\n") + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500, help="sandbox runs (back to back)")
    parser.add_argument("--fresh-runs", type=int, default=500, help="fresh interpreter runs")
    parser.add_argument("--fresh-json-runs", type=int, default=200,
                        help="fresh interpreter runs that print through json")
    parser.add_argument("--fresh-restricted-runs", type=int, default=200,
                        help="fresh interpreter runs that import and use RestrictedPython")
    parser.add_argument("--medium-runs", type=int, default=200,
                        help="sandbox runs of a 123-line module (compile cost in the child)")
    parser.add_argument("--paced-runs", type=int, default=500,
                        help="sandbox runs, and as many fresh interpreter runs, with 10 ms before"
                             " each, as one fork server of the appliance's worker sees them")
    parser.add_argument("--paced-restricted-runs", type=int, default=200,
                        help="fresh interpreter runs that import and use RestrictedPython, 10 ms"
                             " apart (the issue's baseline for the paced ratio)")
    parser.add_argument("--json", type=Path,
                        default=ROOT / "artifacts" / "bench" / "sandbox_overhead.json")
    ns = parser.parse_args()

    sandbox_ms: list[float] = []
    fresh_ms: list[float] = []
    fresh_json_ms: list[float] = []
    fresh_restricted_ms: list[float] = []
    medium_ms: list[float] = []
    cpu_blocks: list[dict] = []
    paced_ms: list[float] = []
    fresh_paced_ms: list[float] = []
    child_ms: list[float] = []
    paced_child_ms: list[float] = []
    fresh_restricted_paced_ms: list[float] = []
    started = time.perf_counter()
    load_before = os.getloadavg()
    with Sandbox() as box:
        missing = [layer for layer, why in box.layers.items() if why]
        assert not missing, f"layers missing on this host: {missing}"
        for _ in range(20):  # warm both paths
            sandbox_once(box, [])
        fresh_once()
        fresh_once(FRESH_JSON)
        fresh_once(FRESH_RESTRICTED)
        for block in range(BLOCKS):
            share = ns.runs // BLOCKS + (block < ns.runs % BLOCKS)
            elapsed, cpu = cpu_per_run(box, share, child_ms)
            sandbox_ms.extend(elapsed)
            cpu_blocks.append(cpu)
            fresh_share = ns.fresh_runs // BLOCKS + (block < ns.fresh_runs % BLOCKS)
            fresh_ms.extend(fresh_once() for _ in range(fresh_share))
            json_share = ns.fresh_json_runs // BLOCKS + (block < ns.fresh_json_runs % BLOCKS)
            fresh_json_ms.extend(fresh_once(FRESH_JSON) for _ in range(json_share))
            restricted_share = (ns.fresh_restricted_runs // BLOCKS
                                + (block < ns.fresh_restricted_runs % BLOCKS))
            fresh_restricted_ms.extend(
                fresh_once(FRESH_RESTRICTED) for _ in range(restricted_share))
            paced_share = ns.paced_runs // BLOCKS + (block < ns.paced_runs % BLOCKS)
            for _ in range(paced_share):
                time.sleep(PACED_GAP_S)
                paced_ms.append(sandbox_once(box, paced_child_ms))
            for _ in range(paced_share):
                time.sleep(PACED_GAP_S)
                fresh_paced_ms.append(fresh_once())
            restricted_paced_share = (ns.paced_restricted_runs // BLOCKS
                                      + (block < ns.paced_restricted_runs % BLOCKS))
            for _ in range(restricted_paced_share):
                time.sleep(PACED_GAP_S)
                fresh_restricted_paced_ms.append(fresh_once(FRESH_RESTRICTED))
        for _ in range(ns.medium_runs):
            t = time.perf_counter()
            assert box.run(MEDIUM, "f", [21]).value == 63
            medium_ms.append((time.perf_counter() - t) * 1000)

    report = {
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                 "kernel": os.uname().release},
        "sandbox_ms": summary(sandbox_ms),
        "sandbox_child_wall_ms": summary(child_ms),
        "sandbox_paced_ms": summary(paced_ms) if paced_ms else None,
        "fresh_interpreter_ms": summary(fresh_ms),
        "fresh_interpreter_paced_ms": summary(fresh_paced_ms) if fresh_paced_ms else None,
        "fresh_interpreter_json_ms": summary(fresh_json_ms) if fresh_json_ms else None,
        "fresh_interpreter_restricted_ms": (
            summary(fresh_restricted_ms) if fresh_restricted_ms else None),
        "fresh_interpreter_restricted_paced_ms": (
            summary(fresh_restricted_paced_ms) if fresh_restricted_paced_ms else None),
        "sandbox_medium_module_ms": summary(medium_ms) if medium_ms else None,
        "cpu_ms_per_run": {key: statistics.median(block[key] for block in cpu_blocks)
                           for key in cpu_blocks[0]} if cpu_blocks else None,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "compile_ms": {"trivial": compile_cost(TRIVIAL, 2000), "medium": compile_cost(MEDIUM, 300)},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    report["speedup_p50"] = report["fresh_interpreter_ms"]["p50"] / report["sandbox_ms"]["p50"]
    if paced_ms:
        report["speedup_p50_paced"] = (report["fresh_interpreter_paced_ms"]["p50"]
                                       / report["sandbox_paced_ms"]["p50"])
        report["speedup_p99_paced"] = (report["fresh_interpreter_paced_ms"]["p99"]
                                       / report["sandbox_paced_ms"]["p99"])
    if paced_ms and fresh_restricted_paced_ms:
        report["speedup_p50_paced_vs_restricted"] = (
            report["fresh_interpreter_restricted_paced_ms"]["p50"]
            / report["sandbox_paced_ms"]["p50"])

    print(f"{'':<30}{'p50 ms':>9}{'p99 ms':>9}{'runs':>7}")
    rows = [("sandbox, back to back", report["sandbox_ms"]),
            ("sandbox, 10 ms apart", report["sandbox_paced_ms"]),
            ("sandbox, 123-line module", report["sandbox_medium_module_ms"]),
            ("fresh python -I", report["fresh_interpreter_ms"]),
            ("fresh python -I, 10 ms apart", report["fresh_interpreter_paced_ms"]),
            ("fresh python -I, + json", report["fresh_interpreter_json_ms"]),
            ("fresh, + json + RPython", report["fresh_interpreter_restricted_ms"]),
            ("fresh, + json + RPython, paced", report["fresh_interpreter_restricted_paced_ms"])]
    for name, row in rows:
        if row:
            print(f"{name:<30}{row['p50']:>9.2f}{row['p99']:>9.2f}{row['n']:>7}")
    print(f"fresh / sandbox at p50: {report['speedup_p50']:.1f}x back to back"
          + (f", {report['speedup_p50_paced']:.1f}x 10 ms apart (p99: "
             f"{report['speedup_p99_paced']:.1f}x)" if paced_ms else ""))
    if report["cpu_ms_per_run"]:
        print("CPU per back-to-back run (ms): " + ", ".join(
            f"{k} {v:.2f}" for k, v in report["cpu_ms_per_run"].items()
            if not k.endswith("_faults"))
              + "; minor faults: " + ", ".join(
            f"{k[:-7]} {v:.0f}" for k, v in report["cpu_ms_per_run"].items()
            if k.endswith("_faults")))
    if "speedup_p50_paced_vs_restricted" in report:
        print("fresh python -I importing RestrictedPython / sandbox, both 10 ms apart, at p50: "
              f"{report['speedup_p50_paced_vs_restricted']:.1f}x")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    for name, cost in report["compile_ms"].items():
        print(f"compile ({name}, {cost['source_lines']} lines): RestrictedPython "
              f"{cost['restricted_p50']:.3f} ms, plain compile() {cost['plain_p50']:.3f} ms")
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {ns.json}")


if __name__ == "__main__":
    main()
