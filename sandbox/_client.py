"""`Sandbox`: the handle a credential-holding process uses to run code through a fork server."""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ._errors import (
    InvalidRequest,
    IsolationUnavailable,
    LimitNotAllowed,
    SandboxError,
    ZygoteLost,
)
from ._framing import MAX_FRAME, read_frame, write_frame
from ._launcher import LaunchedServer, Launcher
from ._limits import Limits
from ._outcome import Outcome, outcome_from_dict
from ._policy import Policy, _default_policy_path
from ._request import prepare

# The fork server imports this package, and so this module: nothing here may import threading
# at import time (subprocess does). Once imported, threading's after-fork hook runs in every
# child the server's zygote forks, at a cost of about 120 page faults and half a millisecond.
if TYPE_CHECKING:
    import subprocess

    _Server = subprocess.Popen[bytes] | LaunchedServer

_ERRORS: dict[str, type[SandboxError]] = {
    "invalid_request": InvalidRequest,
    "import_not_allowed": InvalidRequest,
    "limit_not_allowed": LimitNotAllowed,
    "isolation_unavailable": IsolationUnavailable,
    "zygote_lost": ZygoteLost,
}
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# The fork server's whole command line: an isolated interpreter (-I: no environment variables,
# no user site) that imports only this package. It names no host path: where the package is and
# which policy to load come as the first line on stdin (read byte by byte, so that nothing of
# the first request is read ahead), as "ROOT NUL POLICY NEWLINE".
_BOOT = """import os, sys
line = b""
while not line.endswith(b"\\n"):
    byte = os.read(0, 1)
    if not byte:
        raise SystemExit(1)
    line += byte
root, policy = line[:-1].decode().split("\\0")
sys.path.insert(0, root)
del line, byte, root
"""
_BOOT_MAIN = "from sandbox._server import main; main(policy)"


def _pipes(proc: _Server) -> tuple[IO[bytes], IO[bytes]]:
    """The fork server's stdin and stdout (always pipes: see `_ensure_started`)."""
    if proc.stdin is None or proc.stdout is None:
        raise SandboxError("the sandbox fork server has no protocol pipes")
    return proc.stdin, proc.stdout


def _stop(proc: _Server, kill: bool) -> None:
    """Stop (or reap) a fork server and close this side of its pipes."""
    if kill and proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


class Sandbox:
    """A fork server and its policy. Start it before loading any secret; thread-safe.

    The server is a fresh interpreter (`python -I`) spawned with an empty environment and no
    inherited descriptors, so the children it forks can never see what this process holds.
    """

    #: The fork server's program and environment (only `sandbox._testing` changes them).
    _boot: str = _BOOT + _BOOT_MAIN
    _server_env: Mapping[str, str] = {}

    def __init__(self, policy_path: Path | None = None, launcher: Launcher | None = None) -> None:
        self.policy_path = Path(policy_path or _default_policy_path())
        self.policy = Policy.load(self.policy_path)
        self._lock = _thread.allocate_lock()
        self._proc: _Server | None = None
        #: Where fork servers come from when this process has dropped its privileges.
        self._launcher = launcher
        self.layers: dict[str, str] = {}
        #: What the fork server says of its filter and memory backend (see `doctor`).
        self.details: dict[str, str] = {}

    def start(self) -> Sandbox:
        """Spawn the fork server now (idempotent)."""
        with self._lock:
            self._ensure_started()
        return self

    @classmethod
    def launcher(cls, policy_path: Path | None = None, max_servers: int = 16) -> Launcher:
        """A launcher of this class's fork servers (start it before dropping privileges)."""
        policy = str(Path(policy_path or _default_policy_path()))
        return Launcher.start(_PROJECT_ROOT, policy, cls._boot, cls._server_env, max_servers)

    def _ensure_started(self) -> _Server:
        if self._proc is not None:
            if self._proc.poll() is None:
                return self._proc
            _stop(self._proc, kill=False)  # it died between calls: reaped, pipes closed
            self._proc = None
        proc = self._spawn()
        stdin, stdout = _pipes(proc)
        try:
            if not isinstance(proc, LaunchedServer):  # the launcher told it already
                write_all = stdin.fileno()
                boot = f"{_PROJECT_ROOT}\0{self.policy_path}\n".encode()
                while boot:
                    boot = boot[os.write(write_all, boot) :]
            hello = read_frame(stdout.fileno())
        except (OSError, EOFError, ValueError):
            hello = None
        if hello is None:
            _stop(proc, kill=True)
            raise IsolationUnavailable("the sandbox fork server failed to start")
        greeting = json.loads(hello)
        self.layers = greeting["layers"]
        self.details = greeting.get("details", {})
        self._proc = proc
        return proc

    def _spawn(self) -> _Server:
        if self._launcher is not None:
            return self._launcher.spawn()
        import subprocess  # see the note on imports above

        return subprocess.Popen(
            [sys.executable, "-I", "-c", self._boot],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(self._server_env),
            close_fds=True,
            cwd="/",
        )

    def close(self) -> None:
        """Stop the fork server."""
        import subprocess  # see the note on imports above

        with self._lock:
            if self._proc is not None:
                _pipes(self._proc)[0].close()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                _stop(self._proc, kill=True)
                self._proc = None

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(request).encode()
        if len(body) > MAX_FRAME:
            raise InvalidRequest(f"request is larger than {MAX_FRAME} bytes")
        try:
            return self._call_once(body)
        except ZygoteLost:
            # The server ran nothing and has exited: a fresh one serves the request instead.
            with self._lock:
                self._reap_exited()
            return self._call_once(body)

    def _reap_exited(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(Exception):  # it is stopped below either way
                self._proc.wait(timeout=5)
            _stop(self._proc, kill=True)
            self._proc = None

    def _call_once(self, body: bytes) -> dict[str, Any]:
        with self._lock:
            proc = self._ensure_started()
            stdin, stdout = _pipes(proc)
            try:
                write_frame(stdin.fileno(), body)
                frame = read_frame(stdout.fileno())
            except (OSError, EOFError, ValueError) as exc:
                _stop(proc, kill=True)
                self._proc = None
                raise SandboxError("the sandbox fork server failed") from exc
            except BaseException:
                # Interrupted half-way (KeyboardInterrupt, say): this server's answer would be
                # read as the next call's, so it is stopped, and its children with it.
                _stop(proc, kill=True)
                self._proc = None
                raise
            if frame is None:
                _stop(proc, kill=False)
                self._proc = None
                raise SandboxError("the sandbox fork server exited")
        reply: dict[str, Any] = json.loads(frame)
        if "error" in reply:
            cls = _ERRORS.get(reply["error"]["code"], SandboxError)
            raise cls(reply["error"]["message"])
        return reply

    def run(
        self,
        source: str,
        entry: str,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        limits: Mapping[str, Any] | Limits | None = None,
        allow_imports: Iterable[str] = (),
    ) -> Outcome:
        """Run `entry(*args, **kwargs)` from `source` in an isolated child; return its outcome.

        Raises InvalidRequest (and runs nothing) for a bad request, IsolationUnavailable when a
        required layer is missing on this host.
        """
        run = prepare(
            self.policy, source, entry, list(args), dict(kwargs or {}), limits, allow_imports
        )
        return outcome_from_dict(self._call(run.to_wire())["outcome"])

    def doctor(self) -> dict[str, str]:
        """Each isolation layer: "" when active here, else why it is missing."""
        answer = self._call({"op": "doctor"})
        self.details = dict(answer.get("details", {}))
        return dict(answer["layers"])

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
