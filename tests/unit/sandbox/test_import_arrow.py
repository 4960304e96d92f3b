"""The one-way arrow: `sandbox/` is a library on its own and never imports `appliance/`."""

from __future__ import annotations

import ast
from pathlib import Path

import sandbox

PACKAGE = Path(sandbox.__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.add(node.module)
            elif node.level > 1:
                found.add("..")  # reaching above the package
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", ""))
            in {"__import__", "import_module"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value))
    return found


def test_sandbox_never_imports_appliance():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            name
            for name in _imported_modules(path)
            if name == ".." or name.split(".")[0] == "appliance"
        )
        for path in files
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_sandbox_names_no_appliance_module_even_as_text():
    for path in PACKAGE.rglob("*.py"):
        assert "import appliance" not in path.read_text(), path
        assert "from appliance" not in path.read_text(), path
