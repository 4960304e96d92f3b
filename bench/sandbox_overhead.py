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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox import Sandbox  # noqa: E402
from sandbox._restricted import compile_module  # noqa: E402

TRIVIAL = "def f(x):\n    return x * 2\n"
# A module of about a hundred lines, for how the compile cost grows with the source.
MEDIUM = (
    "\n".join(
        f"def helper_{i}(items, scale={i}):\n"
        f"    total = 0\n"
        f"    for item in items:\n"
        f"        total += item * scale\n"
        f"    return {{'total': total, 'n': len(items)}}\n"
        for i in range(20)
    )
    + "\ndef f(x):\n    return helper_3([x])['total']\n"
)
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
    done = subprocess.run(
        [sys.executable, "-I", "-c", program], capture_output=True, check=True, env={}, cwd="/"
    )
    elapsed = (time.perf_counter() - started) * 1000
    assert int(done.stdout) == 42
    return elapsed


def _proc_cpu(pid: int) -> tuple[float, float, int]:
    """(own CPU s, CPU s of reaped children, minor faults) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (
        (int(fields[11]) + int(fields[12])) / tick,
        (int(fields[13]) + int(fields[14])) / tick,
        int(fields[7]),
    )


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
    return {
        "restricted_p50": percentile(restricted, 0.5),
        "plain_p50": percentile(plain, 0.5),
        "source_lines": source.count("\n") + 1,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, what in (
        ("--runs", 500, "sandbox runs (back to back)"),
        ("--fresh-runs", 500, "fresh interpreter runs"),
        ("--fresh-json-runs", 200, "fresh interpreter runs that print through json"),
        ("--fresh-restricted-runs", 200, "fresh runs that import and use RestrictedPython"),
        ("--medium-runs", 200, "sandbox runs of a 123-line module (compile cost in the child)"),
        (
            "--paced-runs",
            500,
            "sandbox runs, and as many fresh interpreter runs, with 10 ms "
            "before each, as one fork server of the appliance's worker sees them",
        ),
        (
            "--paced-restricted-runs",
            200,
            "fresh runs that import and use RestrictedPython, "
            "10 ms apart (the baseline of the paced ratio)",
        ),
    ):
        parser.add_argument(flag, type=int, default=default, help=what)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "artifacts" / "bench" / "sandbox_overhead.json"
    )
    return parser


def _share(total: int, block: int) -> int:
    return total // BLOCKS + (block < total % BLOCKS)


def _paced(call: Callable[[], float], count: int) -> list[float]:
    values = []
    for _ in range(count):
        time.sleep(PACED_GAP_S)
        values.append(call())
    return values


def _measure(ns: argparse.Namespace, box: Sandbox) -> dict[str, list]:
    """Every regime, in alternating blocks; the raw figures of each."""
    m: dict[str, list] = {
        name: []
        for name in (
            "sandbox",
            "fresh",
            "fresh_json",
            "fresh_restricted",
            "medium",
            "cpu_blocks",
            "paced",
            "fresh_paced",
            "child",
            "paced_child",
            "fresh_restricted_paced",
        )
    }
    for _ in range(20):  # warm both paths
        sandbox_once(box, [])
    for program in (FRESH, FRESH_JSON, FRESH_RESTRICTED):
        fresh_once(program)
    for block in range(BLOCKS):
        elapsed, cpu = cpu_per_run(box, _share(ns.runs, block), m["child"])
        m["sandbox"].extend(elapsed)
        m["cpu_blocks"].append(cpu)
        for key, program, total in (
            ("fresh", FRESH, ns.fresh_runs),
            ("fresh_json", FRESH_JSON, ns.fresh_json_runs),
            ("fresh_restricted", FRESH_RESTRICTED, ns.fresh_restricted_runs),
        ):
            m[key].extend(fresh_once(program) for _ in range(_share(total, block)))
        paced = _share(ns.paced_runs, block)
        m["paced"].extend(_paced(lambda: sandbox_once(box, m["paced_child"]), paced))
        m["fresh_paced"].extend(_paced(fresh_once, paced))
        m["fresh_restricted_paced"].extend(
            _paced(lambda: fresh_once(FRESH_RESTRICTED), _share(ns.paced_restricted_runs, block))
        )
    for _ in range(ns.medium_runs):
        t = time.perf_counter()
        assert box.run(MEDIUM, "f", [21]).value == 63
        m["medium"].append((time.perf_counter() - t) * 1000)
    return m


def _summaries(m: dict[str, list]) -> dict[str, Any]:
    def opt(key: str) -> dict[str, float] | None:
        return summary(m[key]) if m[key] else None

    report: dict[str, Any] = {
        "sandbox_ms": summary(m["sandbox"]),
        "sandbox_child_wall_ms": summary(m["child"]),
        "sandbox_paced_ms": opt("paced"),
        "fresh_interpreter_ms": summary(m["fresh"]),
        "fresh_interpreter_paced_ms": opt("fresh_paced"),
        "fresh_interpreter_json_ms": opt("fresh_json"),
        "fresh_interpreter_restricted_ms": opt("fresh_restricted"),
        "fresh_interpreter_restricted_paced_ms": opt("fresh_restricted_paced"),
        "sandbox_medium_module_ms": opt("medium"),
        "cpu_ms_per_run": {
            key: statistics.median(block[key] for block in m["cpu_blocks"])
            for key in m["cpu_blocks"][0]
        }
        if m["cpu_blocks"]
        else None,
    }
    report["speedup_p50"] = report["fresh_interpreter_ms"]["p50"] / report["sandbox_ms"]["p50"]
    paced = report["sandbox_paced_ms"]
    if paced:
        report["speedup_p50_paced"] = report["fresh_interpreter_paced_ms"]["p50"] / paced["p50"]
        report["speedup_p99_paced"] = report["fresh_interpreter_paced_ms"]["p99"] / paced["p99"]
        if report["fresh_interpreter_restricted_paced_ms"]:
            report["speedup_p50_paced_vs_restricted"] = (
                report["fresh_interpreter_restricted_paced_ms"]["p50"] / paced["p50"]
            )
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"{'':<30}{'p50 ms':>9}{'p99 ms':>9}{'runs':>7}")
    for name, key in (
        ("sandbox, back to back", "sandbox_ms"),
        ("sandbox, 10 ms apart", "sandbox_paced_ms"),
        ("sandbox, 123-line module", "sandbox_medium_module_ms"),
        ("fresh python -I", "fresh_interpreter_ms"),
        ("fresh python -I, 10 ms apart", "fresh_interpreter_paced_ms"),
        ("fresh python -I, + json", "fresh_interpreter_json_ms"),
        ("fresh, + json + RPython", "fresh_interpreter_restricted_ms"),
        ("fresh, + json + RPython, paced", "fresh_interpreter_restricted_paced_ms"),
    ):
        row = report[key]
        if row:
            print(f"{name:<30}{row['p50']:>9.2f}{row['p99']:>9.2f}{row['n']:>7}")
    print(f"fresh / sandbox at p50: {report['speedup_p50']:.1f}x back to back")
    if "speedup_p50_paced" in report:
        print(
            f"fresh / sandbox, 10 ms apart: {report['speedup_p50_paced']:.1f}x at p50, "
            f"{report['speedup_p99_paced']:.1f}x at p99"
        )
    if "speedup_p50_paced_vs_restricted" in report:
        print(
            "fresh python -I importing RestrictedPython / sandbox, both 10 ms apart, at p50: "
            f"{report['speedup_p50_paced_vs_restricted']:.1f}x"
        )
    cpu = report["cpu_ms_per_run"] or {}
    print(
        "CPU per back-to-back run (ms): "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if not k.endswith("_faults"))
        + "; minor faults: "
        + ", ".join(f"{k[:-7]} {v:.0f}" for k, v in cpu.items() if k.endswith("_faults"))
    )
    load = report["load_average"]
    print(f"load average before {load['before'][0]:.2f}, after {load['after'][0]:.2f}")
    for name, cost in report["compile_ms"].items():
        print(
            f"compile ({name}, {cost['source_lines']} lines): RestrictedPython "
            f"{cost['restricted_p50']:.3f} ms, plain compile() {cost['plain_p50']:.3f} ms"
        )


def main() -> None:
    ns = _parser().parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()
    with Sandbox() as box:
        missing = [layer for layer, why in box.layers.items() if why]
        assert not missing, f"layers missing on this host: {missing}"
        measured = _measure(ns, box)
    report = {
        "host": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "kernel": os.uname().release,
        },
        **_summaries(measured),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "compile_ms": {"trivial": compile_cost(TRIVIAL, 2000), "medium": compile_cost(MEDIUM, 300)},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    _print(report)
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {ns.json}")


if __name__ == "__main__":
    main()
