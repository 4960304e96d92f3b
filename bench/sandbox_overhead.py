"""Per-run overhead of the sandbox (every layer on) beside a fresh `python -I` doing the same.

A trivial function is run through `sandbox.Sandbox` (fork server, RestrictedPython, namespaces,
chroot, rlimits, uid, no_new_privs, seccomp) back to back, and through a fresh isolated
interpreter (`python -I -c`), in alternating blocks of one process run. The compile cost of the
RestrictedPython layer is measured on its own, in-process.

    .venv/bin/python bench/sandbox_overhead.py [--runs 500] [--fresh-runs 100] [--json PATH]
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
FRESH = TRIVIAL + "import json\nprint(json.dumps(f(21)))\n"
BLOCKS = 5
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


def fresh_once() -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-I", "-c", FRESH], capture_output=True, check=True,
                          env={}, cwd="/")
    elapsed = (time.perf_counter() - started) * 1000
    assert json.loads(done.stdout) == 42
    return elapsed


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
    parser.add_argument("--fresh-runs", type=int, default=100, help="fresh interpreter runs")
    parser.add_argument("--paced-runs", type=int, default=200,
                        help="sandbox runs with 10 ms between them, as a busy worker sees them")
    parser.add_argument("--json", type=Path,
                        default=ROOT / "artifacts" / "bench" / "sandbox_overhead.json")
    ns = parser.parse_args()

    sandbox_ms: list[float] = []
    fresh_ms: list[float] = []
    paced_ms: list[float] = []
    child_ms: list[float] = []
    paced_child_ms: list[float] = []
    started = time.perf_counter()
    with Sandbox() as box:
        missing = [layer for layer, why in box.layers.items() if why]
        assert not missing, f"layers missing on this host: {missing}"
        for _ in range(20):  # warm both paths
            sandbox_once(box, [])
        fresh_once()
        for block in range(BLOCKS):
            share = ns.runs // BLOCKS + (block < ns.runs % BLOCKS)
            sandbox_ms.extend(sandbox_once(box, child_ms) for _ in range(share))
            fresh_share = ns.fresh_runs // BLOCKS + (block < ns.fresh_runs % BLOCKS)
            fresh_ms.extend(fresh_once() for _ in range(fresh_share))
        for _ in range(ns.paced_runs):
            time.sleep(PACED_GAP_S)
            paced_ms.append(sandbox_once(box, paced_child_ms))

    report = {
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                 "kernel": os.uname().release},
        "sandbox_ms": summary(sandbox_ms),
        "sandbox_child_wall_ms": summary(child_ms),
        "sandbox_paced_ms": summary(paced_ms) if paced_ms else None,
        "fresh_interpreter_ms": summary(fresh_ms),
        "compile_ms": {"trivial": compile_cost(TRIVIAL, 2000), "medium": compile_cost(MEDIUM, 300)},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    report["speedup_p50"] = report["fresh_interpreter_ms"]["p50"] / report["sandbox_ms"]["p50"]

    print(f"{'':<28}{'p50 ms':>9}{'p99 ms':>9}{'runs':>7}")
    rows = [("sandbox, back to back", report["sandbox_ms"]),
            ("sandbox, 10 ms apart", report["sandbox_paced_ms"]),
            ("fresh python -I", report["fresh_interpreter_ms"])]
    for name, row in rows:
        if row:
            print(f"{name:<28}{row['p50']:>9.2f}{row['p99']:>9.2f}{row['n']:>7}")
    print(f"fresh / sandbox at p50: {report['speedup_p50']:.1f}x")
    for name, cost in report["compile_ms"].items():
        print(f"compile ({name}, {cost['source_lines']} lines): RestrictedPython "
              f"{cost['restricted_p50']:.3f} ms, plain compile() {cost['plain_p50']:.3f} ms")
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {ns.json}")


if __name__ == "__main__":
    main()
