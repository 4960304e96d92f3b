"""The layers of `appliance/`, enforced: no import cycle between its units, no import from a
lower layer to a higher one, and each external system reached from its one seam.

A unit is a top-level module (`appliance.jobs`) or a package (`appliance.store`); imports inside
a package are its own business. Like tests/unit/sandbox/test_import_arrow.py, this reads the
source (ast), so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import appliance

PACKAGE = Path(appliance.__file__).resolve().parent

#: Lower numbers are lower layers: a unit imports only units of its own layer or below.
LAYERS = {
    # Foundations: no service, no I/O of their own.
    "errors": 0,
    "secret_names": 0,
    "envelope": 0,
    "settings": 1,
    "observability": 1,
    "keyservice": 1,
    "results": 1,
    "specs": 1,
    # Adapters, one per external system, and the rules over them.
    "vault": 2,
    "store": 2,
    "signatures": 2,
    "audit": 3,
    "jobs": 3,
    "registry": 3,
    "queue": 4,
    "workflows": 4,
    "services": 4,
    # Services.
    "api": 5,
    "worker": 5,
    "flower": 5,
    # Operating the stack.
    "_stack": 6,
    "stack": 7,
    "maintenance": 7,
    "identities": 7,
    "cli": 8,
}

#: The only units that may import each external client library.
SEAMS = {
    "redis": {"store", "_stack", "stack"},
    "hvac": {"vault", "_stack"},
    "celery": {"queue", "worker", "flower"},
    "kombu": {"queue", "worker", "flower"},
}


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """Absolute dotted names of what the file imports."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    package = ["appliance", *rel.parts[:-1]]
    if rel.name == "__init__":
        package = ["appliance", *rel.parts[:-1]]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""])
            base = base.rstrip(".")
            found.add(base)
            if base == "appliance" or base == ".".join(package[:1]):
                found.update(f"appliance.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, dict[str, set[str]]]:
    """unit -> imported unit -> files that import it (appliance units only)."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        if unit == "__init__":
            continue
        edges = graph.setdefault(unit, {})
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "appliance" or len(parts) < 2 or parts[1] == unit:
                continue
            if parts[1] == "__version__":
                continue
            edges.setdefault(parts[1], set()).add(str(path.relative_to(PACKAGE)))
    return graph


def test_every_unit_has_a_layer() -> None:
    assert set(_graph()) == set(LAYERS)


def test_no_import_goes_up_a_layer() -> None:
    upward = {
        f"{unit} -> {target}": sorted(files)
        for unit, edges in _graph().items()
        for target, files in edges.items()
        if LAYERS[target] > LAYERS[unit]
    }
    assert upward == {}


def test_no_import_cycle_between_units() -> None:
    graph = {unit: set(edges) for unit, edges in _graph().items()}
    cycles: list[list[str]] = []

    def visit(unit: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(unit, ())):
            if nxt in path:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif len(path) < len(graph):
                visit(nxt, [*path, nxt])

    for unit in sorted(graph):
        visit(unit, [unit])
    assert cycles == []


def test_each_external_system_is_reached_from_its_seam() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in _imports(path):
            allowed = SEAMS.get(name.split(".")[0])
            if allowed is not None and _unit(path) not in allowed:
                offenders.setdefault(str(path.relative_to(PACKAGE)), []).append(name)
    assert offenders == {}


def test_the_api_and_the_worker_do_not_import_each_other() -> None:
    graph = _graph()
    assert "worker" not in graph["api"] and "api" not in graph["worker"]
