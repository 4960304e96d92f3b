"""Every error code of the appliance is declared once, in `appliance.errors.CODES`: each class's
`code` and each `code="..."` at a raise site is one of them, and each declared code is used."""

from __future__ import annotations

import ast
from pathlib import Path

import appliance
from appliance.errors import CODES

PACKAGE = Path(appliance.__file__).resolve().parent


def _used_codes() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(), filename=where)):
            literals: list[ast.expr] = []
            # `reason=` names a finer code for the audit log than the client is told.
            if isinstance(node, ast.keyword) and node.arg in ("code", "reason"):
                literals = [node.value]
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple | ast.Name):
                target = node.targets[0]
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                literals = [
                    v
                    for n, v in zip(names, values, strict=False)
                    if isinstance(n, ast.Name) and n.id == "code"
                ]
            for lit in literals:
                if isinstance(lit, ast.Constant) and isinstance(lit.value, str):
                    used.setdefault(lit.value, set()).add(where)
    return used


def test_every_code_used_is_declared() -> None:
    undeclared = {code: sorted(w) for code, w in _used_codes().items() if code not in CODES}
    assert undeclared == {}


def test_every_declared_code_is_used() -> None:
    assert sorted(set(CODES) - set(_used_codes())) == []


def test_codes_are_snake_case() -> None:
    assert all(code.replace("_", "").isalnum() and code.islower() for code in CODES)
