"""`sandbox run` and `sandbox doctor`: exit 0 with an outcome, 2 for usage, 3 when not isolated.

Both go through a fork server (`Sandbox`), never a supervisor in this process: this process was
started with the caller's environment and command line on its initial stack, and a child forked
from it would carry them (`os.environ.clear()` leaves the strings there). The fork server is a
fresh interpreter with an empty environment and no host path on its stack.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from ._client import Sandbox
from ._errors import InvalidRequest, IsolationUnavailable, PolicyError, SandboxError
from ._policy import Policy
from ._request import prepare

EXIT_USAGE = 2
EXIT_NO_ISOLATION = 3
#: The CLI's unsafe test hook (`--unsafe-raw-code`) works only with this set, as for
#: `sandbox._testing` itself.
UNSAFE_TESTING_ENV = "SANDBOX_UNSAFE_TESTING"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"sandbox: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sandbox", description="Run untrusted Python functions in isolation.")
    parser.add_argument("--policy", type=Path, help="policy file (default: the bundled one)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run one function and print its outcome as JSON")
    run.add_argument("--source", required=True, help="module source file, or - for stdin")
    run.add_argument("--entry", required=True, help="name of the function to call")
    run.add_argument("--args", default="[]", help="positional arguments as a JSON list")
    run.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    run.add_argument("--limits", default="{}", help="limits as a JSON object")
    run.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="MODULE",
        help="allow importing MODULE (must be importable in the policy)",
    )
    # UNSAFE, test-only and undocumented: run the source as plain Python (no RestrictedPython)
    # behind every OS layer, to prove that this path's OS layers hold on their own.
    run.add_argument("--unsafe-raw-code", action="store_true", help=argparse.SUPPRESS)
    doctor = sub.add_parser("doctor", help="report which isolation layers are active here")
    doctor.add_argument("--json", action="store_true", help="print a JSON object")
    return parser


def _json_arg(parser: argparse.ArgumentParser, name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        parser.error(f"--{name} is not valid JSON: {exc}")


def _read_source(parser: argparse.ArgumentParser, where: str) -> str:
    try:
        if where == "-":
            return sys.stdin.read()
        return Path(where).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"cannot read --source {where}: {exc}")


def _open_sandbox(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> Sandbox:
    policy_path = ns.policy
    if getattr(ns, "unsafe_raw_code", False):
        if os.environ.get(UNSAFE_TESTING_ENV) != "1":
            parser.error(f"--unsafe-raw-code is for the test suite only ({UNSAFE_TESTING_ENV}=1)")
        from ._testing import UnsafeRawCodeRun

        return UnsafeRawCodeRun(policy_path)
    return Sandbox(policy_path)


def _run(parser: argparse.ArgumentParser, ns: argparse.Namespace, policy: Policy) -> int:
    request = prepare(
        policy,
        _read_source(parser, ns.source),
        ns.entry,
        _json_arg(parser, "args", ns.args),
        _json_arg(parser, "kwargs", ns.kwargs),
        _json_arg(parser, "limits", ns.limits),
        ns.allow_import,
    )
    with _open_sandbox(parser, ns) as box:
        outcome = box.run(
            request.source,
            request.entry,
            request.args,
            request.kwargs,
            request.limits,
            request.imports,
        )
    print(json.dumps(outcome.to_dict()))
    return 0


def _doctor(parser: argparse.ArgumentParser, ns: argparse.Namespace, policy: Policy) -> int:
    with _open_sandbox(parser, ns) as box:
        layers = box.doctor()
        details = box.details
    missing_required = [
        layer for layer, why in layers.items() if why and layer in policy.required_layers
    ]
    if ns.json:
        print(
            json.dumps(
                {
                    "ok": not missing_required,
                    "layers": {
                        layer: {
                            "active": not why,
                            "required": layer in policy.required_layers,
                            "detail": why or details.get(layer, ""),
                        }
                        for layer, why in layers.items()
                    },
                }
            )
        )
    else:
        for layer, why in layers.items():
            state = "active" if not why else "MISSING"
            need = "required" if layer in policy.required_layers else "optional"
            print(f"{layer:<18} {state:<8} {need:<9} {why or details.get(layer, '')}".rstrip())
    return 1 if missing_required else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sandbox` command."""
    parser = _parser()
    ns = parser.parse_args(argv)
    try:
        policy = Policy.load(ns.policy)
        if ns.command == "doctor":
            return _doctor(parser, ns, policy)
        return _run(parser, ns, policy)
    except (InvalidRequest, PolicyError) as exc:
        print(f"sandbox: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except IsolationUnavailable as exc:
        print(f"sandbox: cannot isolate here, nothing was run: {exc}", file=sys.stderr)
        return EXIT_NO_ISOLATION
    except SandboxError as exc:
        print(f"sandbox: the sandbox failed: {exc}", file=sys.stderr)
        return EXIT_NO_ISOLATION


if __name__ == "__main__":
    sys.exit(main())
