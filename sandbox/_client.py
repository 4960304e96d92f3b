"""`Sandbox`: the handle a credential-holding process uses to run code through a fork server."""

from __future__ import annotations

import _thread
import json
import os
import select
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import InvalidRequest, IsolationUnavailable, SandboxError
from ._limits import Limits
from ._outcome import Outcome, outcome_from_dict
from ._policy import Policy, _default_policy_path
from ._request import PreparedRun, frame_request, prepare
from ._server import MAX_FRAME, recv_frame, send_frame

# The fork server imports this package, and so this module: nothing here may import threading
# at import time (subprocess does). Once imported, threading's after-fork hook runs in every
# child the server's zygote forks, at a cost of about 120 page faults and half a millisecond.
if TYPE_CHECKING:
    import subprocess

_ERRORS: dict[str, type[SandboxError]] = {
    "invalid_request": InvalidRequest,
    "isolation_unavailable": IsolationUnavailable,
}
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# The fork server's whole command line: an isolated interpreter (-I: no environment variables,
# no user site) that imports only this package.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); del sys.argv[1]; "
    "from sandbox._server import main; main()"
)


class Sandbox:
    """A fork server and its policy. Start it before loading any secret; thread-safe.

    The server is a fresh interpreter (`python -I`) spawned with an empty environment and no
    inherited descriptors, so the children it forks can never see what this process holds.
    """

    #: The fork server's program and environment (only `sandbox._testing` changes them).
    _boot: str = _BOOT
    _server_env: Mapping[str, str] = {}

    def __init__(self, policy_path: Path | None = None) -> None:
        self.policy_path = Path(policy_path or _default_policy_path())
        self.policy = Policy.load(self.policy_path)
        self._lock = _thread.allocate_lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        #: The request channel of the server's next spare child, when it has handed one out.
        self._spare_fd: int | None = None
        self.layers: dict[str, str] = {}

    def start(self) -> Sandbox:
        """Spawn the fork server now (idempotent)."""
        with self._lock:
            self._ensure_started()
        return self

    def _ensure_started(self) -> socket.socket:
        if self._proc is not None and self._channel is not None and self._proc.poll() is None:
            return self._channel
        self._stop()
        import subprocess  # see the note on imports above

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", self._boot, _PROJECT_ROOT, str(self.policy_path)],
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=subprocess.DEVNULL,
                env=dict(self._server_env),
                close_fds=True,
                cwd="/",
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._proc, self._channel = proc, ours
        try:
            hello, self._spare_fd = recv_frame(ours)
        except (OSError, EOFError, ValueError):
            hello = None
        if hello is None:
            self._stop(kill=True)
            raise IsolationUnavailable("the sandbox fork server failed to start")
        self.layers = json.loads(hello)["layers"]
        return ours

    def close(self) -> None:
        """Stop the fork server."""
        with self._lock:
            self._stop()

    def _stop(self, kill: bool = False) -> None:
        """Close the channel (the server exits when it ends) and reap the server."""
        import subprocess  # see the note on imports above

        self._drop_spare()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._proc is not None:
            if kill:
                self._proc.kill()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _drop_spare(self) -> None:
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None

    def _exchange(self, frame: bytes, restart: bool = True) -> dict[str, Any]:
        """Send one frame, read the answer (and keep any spare handed with it); lock held.

        Without `restart`, a server that is no longer running is an error rather than started
        again: a new server knows nothing of a request written to the old one's spare.
        """
        if restart:
            channel = self._ensure_started()
        elif self._channel is None or self._proc is None or self._proc.poll() is not None:
            self._stop(kill=True)
            raise SandboxError("the sandbox fork server exited")
        else:
            channel = self._channel
        try:
            send_frame(channel, frame)
            answer, spare = recv_frame(channel)
        except (OSError, EOFError, ValueError) as exc:
            self._stop(kill=True)
            raise SandboxError("the sandbox fork server failed") from exc
        if answer is None:
            self._stop(kill=True)
            raise SandboxError("the sandbox fork server exited")
        if spare is not None:
            self._drop_spare()
            self._spare_fd = spare
        reply: dict[str, Any] = json.loads(answer)
        return reply

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return _raise_for(self._exchange(json.dumps(request).encode()))

    def _run(self, run: PreparedRun, request: bytes) -> dict[str, Any]:
        """Write the request straight to the spare handed out, if any; else send it in full."""
        with self._lock:
            self._ensure_started()
            spare, self._spare_fd = self._spare_fd, None
            if spare is not None and _write_request(spare, frame_request(request)):
                reply = self._exchange(
                    json.dumps({"op": "dispatched", "limits": run.limits.to_dict()}).encode(),
                    restart=False,
                )
                if reply.get("error", {}).get("code") != "spare_lost":
                    return _raise_for(reply)
            return _raise_for(self._exchange(request))

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
        run = prepare(self.policy, source, entry, list(args), dict(kwargs or {}), limits,
                      allow_imports)
        request = json.dumps(run.to_wire()).encode()
        if len(request) > MAX_FRAME:
            raise InvalidRequest(f"request is larger than {MAX_FRAME} bytes")
        return outcome_from_dict(self._run(run, request)["outcome"])

    def doctor(self) -> dict[str, str]:
        """Each isolation layer: "" when active here, else why it is missing."""
        return dict(self._call({"op": "doctor"})["layers"])

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    if "error" in reply:
        cls = _ERRORS.get(reply["error"]["code"], SandboxError)
        raise cls(reply["error"]["message"])
    return reply


def _write_request(fd: int, request: bytes) -> bool:
    """Write a whole request to a spare's request channel and close it; False if it is gone.

    A spare that died while it waited (killed from outside, say) has closed its end: the poll
    sees that before anything is written, and the request goes to the server instead.
    """
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
            return False
        data = memoryview(request)
        while data:
            data = data[os.write(fd, data):]
        return True
    except OSError:  # BrokenPipeError: it died while reading
        return False
    finally:
        os.close(fd)
