"""The parent side: fork an isolated child, enforce the wall clock, measure, parse the reply.

The process that runs this must never have held a credential: it is either the `sandbox run`
CLI or the fork server, a fresh interpreter spawned with an empty environment.
"""

from __future__ import annotations

import gc
import json
import os
import select
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _child, _isolation, _restricted
from ._errors import IsolationUnavailable
from ._outcome import STATUSES, Outcome, Usage, error
from ._policy import LAYERS, Policy
from ._request import PreparedRun

#: Deepest nesting accepted in a reply's value.
MAX_VALUE_DEPTH = 100
_REPLY_OVERHEAD = 64 * 1024


def _check_depth(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_VALUE_DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_reply(untrusted_output: bytes) -> dict[str, Any] | None:
    """Parse the child's reply as untrusted JSON; None when it is not a well-formed outcome."""
    try:
        reply = json.loads(untrusted_output, parse_constant=_reject_constant)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    if not isinstance(reply, dict) or set(reply) != {"status", "value", "stdout", "error"}:
        return None
    if reply["status"] not in STATUSES or not isinstance(reply["stdout"], str):
        return None
    err = reply["error"]
    if reply["status"] == "ok":
        if err is not None:
            return None
    elif not (
        isinstance(err, dict)
        and set(err) == {"type", "message"}
        and all(isinstance(v, str) for v in err.values())
    ):
        return None
    return reply


@dataclass
class _Child:
    pid: int
    reply: bytearray = field(default_factory=bytearray)
    overflowed: bool = False
    timed_out: bool = False


class Supervisor:
    """Runs prepared requests in isolated children. One per credential-free process."""

    #: What the isolated child runs; only `sandbox._testing` swaps it, for the OS-layer tests.
    executor: _child.Executor = staticmethod(_child.execute)

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        _restricted.preload(sorted(policy.importable))
        self._seccomp_program: bytes | None
        try:
            self._seccomp_program = _isolation.export_seccomp_program(
                _isolation.build_seccomp_filter()
            )
        except Exception:  # noqa: BLE001 - reported by the child as a missing layer
            self._seccomp_program = None
        self._netns_fd: int | None = None
        if os.geteuid() == 0:
            try:
                self._netns_fd = _isolation.create_netns()
            except OSError:
                pass  # Each child then tries to make its own, and the probe reports the result.
        self._tmp_root = Path(tempfile.mkdtemp(prefix="sandbox-"))
        os.chmod(self._tmp_root, 0o711)
        self._skip: frozenset[str] = frozenset()
        self.layers = self.probe()
        missing = {layer for layer, why in self.layers.items() if why}
        self.unavailable = sorted(layer for layer in missing if not policy.may_skip(layer))
        self._skip = frozenset(missing - set(self.unavailable))
        # Everything loaded so far lives as long as this process: keep the collector from ever
        # walking it, so a collection in a child does not copy those pages (copy-on-write).
        gc.freeze()

    def close(self) -> None:
        """Remove the private working directories' parent; release the network namespace."""
        shutil.rmtree(self._tmp_root, ignore_errors=True)
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None

    def run(self, run: PreparedRun) -> Outcome:
        """Run one request; raise IsolationUnavailable if a required layer is missing."""
        if self.unavailable:
            raise IsolationUnavailable(
                "required isolation layers missing on this host: "
                + ", ".join(f"{layer} ({self.layers[layer]})" for layer in self.unavailable)
            )
        outcome, _ = self._fork(run, probe=False)
        assert outcome is not None
        return outcome

    def probe(self) -> dict[str, str]:
        """Apply every layer in a child and report each as "" (active) or why it is missing."""
        run = PreparedRun(source="", entry="probe")
        _, report = self._fork(run, probe=True)
        assert report is not None
        try:
            _restricted.compile_module("x = (1).__class__")
            report["restricted_python"] = "compile layer accepted a dunder attribute"
        except _restricted.CompileRejected:
            report["restricted_python"] = ""
        return {layer: report.get(layer, "not checked") for layer in LAYERS}

    def _fork(
        self, run: PreparedRun, probe: bool
    ) -> tuple[Outcome | None, dict[str, str] | None]:
        # A fresh, empty root for the child. Owned by this process's user (root on a host with
        # the full set of layers), not by the run's uid, and read-only to everyone: the child can
        # list it but neither write it nor chmod it, even if the seccomp layer were missing.
        workdir = tempfile.mkdtemp(dir=self._tmp_root, prefix="run-")
        os.chmod(workdir, 0o555)
        setup = _isolation.ChildSetup(
            self.policy,
            run.limits,
            workdir,
            self._seccomp_program,
            baseline_as=_isolation.address_space_bytes(),
            netns_fd=self._netns_fd,
            skip=frozenset() if probe else self._skip,
        )
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        started = time.monotonic()
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child never returns
                try:
                    os.close(read_fd)
                    _child.main(run, setup, write_fd, probe, self.executor)
                finally:
                    os._exit(70)
            os.close(write_fd)
            child = _Child(pid)
            if probe:
                return None, self._collect_probe(child, read_fd)
            status, rusage = self._supervise(child, read_fd, run, started)
            wall_ms = int((time.monotonic() - started) * 1000)
            return self._outcome(child, status, rusage, wall_ms, run, setup), None
        finally:
            os.close(read_fd)
            shutil.rmtree(workdir, ignore_errors=True)

    def _supervise(
        self, child: _Child, read_fd: int, run: PreparedRun, started: float
    ) -> tuple[int, Any]:
        cap = 2 * run.limits.output_bytes * 6 + _REPLY_OVERHEAD
        deadline = started + run.limits.wall_seconds
        pidfd = os.pidfd_open(child.pid)
        try:
            poller = select.poll()
            poller.register(read_fd, select.POLLIN)
            poller.register(pidfd, select.POLLIN)
            pipe_open, exited = True, False
            while pipe_open or not exited:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    child.timed_out = True
                    break
                for fd, _ in poller.poll(max(1, int(remaining * 1000))):
                    if fd == pidfd:
                        exited = True
                        poller.unregister(pidfd)
                    elif fd == read_fd:
                        chunk = os.read(read_fd, 1 << 16)
                        if not chunk:
                            pipe_open = False
                            poller.unregister(read_fd)
                        elif len(child.reply) + len(chunk) > cap:
                            child.overflowed = True
                            pipe_open = False
                            poller.unregister(read_fd)
                        else:
                            child.reply += chunk
                if child.overflowed:
                    break
            if child.timed_out or child.overflowed:
                _kill_group(child.pid)
            _, status, rusage = os.wait4(child.pid, 0)
            return status, rusage
        finally:
            os.close(pidfd)

    def _outcome(
        self, child: _Child, status: int, rusage: Any, wall_ms: int, run: PreparedRun,
        setup: _isolation.ChildSetup,
    ) -> Outcome:
        usage = Usage(
            cpu_ms=int((rusage.ru_utime + rusage.ru_stime) * 1000),
            wall_ms=wall_ms,
            max_rss_kb=int(rusage.ru_maxrss),
        )
        degraded = tuple(sorted(self._skip))
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == _child.EXIT_ISOLATION_FAILED:
            raise IsolationUnavailable(_isolation_reason(bytes(child.reply)))
        if child.timed_out:
            return Outcome("timeout", error=error("Timeout", "wall-clock limit reached"),
                           usage=usage, degraded=degraded)
        if child.overflowed:
            return Outcome("output_limit", error=error("OutputLimit", "reply exceeded its cap"),
                           usage=usage, degraded=degraded)
        if os.WIFSIGNALED(status):
            return self._signalled(os.WTERMSIG(status), usage, run, degraded)
        reply = parse_reply(bytes(child.reply))
        if reply is None or os.WEXITSTATUS(status) != 0:
            return Outcome("crashed", error=error("Crashed", "the child gave no valid reply"),
                           usage=usage, degraded=degraded)
        value = reply["value"]
        if reply["status"] == "ok" and not _check_depth(value):
            return Outcome("runtime_error", stdout=reply["stdout"], usage=usage,
                           error=error("TypeError", "return value nests too deeply"),
                           degraded=degraded)
        return Outcome(reply["status"], value=value if reply["status"] == "ok" else None,
                       stdout=reply["stdout"], error=reply["error"], usage=usage,
                       degraded=degraded)

    def _signalled(
        self, sig: int, usage: Usage, run: PreparedRun, degraded: tuple[str, ...]
    ) -> Outcome:
        if sig == signal.SIGXCPU or (
            sig == signal.SIGKILL and usage.cpu_ms >= run.limits.cpu_seconds * 1000
        ):
            return Outcome("timeout", error=error("Timeout", "CPU time limit reached"),
                           usage=usage, degraded=degraded)
        if sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) and (
            usage.max_rss_kb >= run.limits.memory_mb * 1024 * 0.9
        ):
            return Outcome("memory_limit", error=error("MemoryError", "memory limit reached"),
                           usage=usage, degraded=degraded)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return Outcome("crashed", error=error("Crashed", f"the child died by signal {name}"),
                       usage=usage, degraded=degraded)

    def _collect_probe(self, child: _Child, read_fd: int) -> dict[str, str]:
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], 0.5)
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                data += chunk
        try:
            report = {"probe": None}
            parsed = json.loads(data or b"{}")
            if "layer" in parsed:
                raise IsolationUnavailable(f"{parsed['layer']}: {parsed.get('reason')}")
            report = parsed
            layers: dict[str, str] = dict(report["probe"])
            layers.update(_proc_checks(child.pid, layers))
            return layers
        finally:
            _kill_group(child.pid)
            os.waitpid(child.pid, 0)


def _proc_checks(pid: int, layers: dict[str, str]) -> dict[str, str]:
    """Check from outside what the child cannot read once chrooted: namespaces, NNP, seccomp."""
    out: dict[str, str] = {}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if layers.get("no_new_privs") == "":
            out["no_new_privs"] = "" if fields.get("NoNewPrivs", "").strip() == "1" else "not set"
        if layers.get("seccomp") == "":
            out["seccomp"] = "" if fields.get("Seccomp", "").strip() == "2" else "no filter"
        if layers.get("netns") == "":
            mine = os.readlink("/proc/self/ns/net")
            theirs = os.readlink(f"/proc/{pid}/ns/net")
            out["netns"] = "" if mine != theirs else "shares the host's network namespace"
    except OSError as exc:
        out.setdefault("netns", f"cannot inspect child: {exc}")
    return out


def _isolation_reason(untrusted: bytes) -> str:
    try:
        body = json.loads(untrusted)
        return f"isolation layer {body['layer']} unavailable: {body['reason']}"[:500]
    except (ValueError, KeyError, TypeError):
        return "an isolation layer is unavailable"


def _kill_group(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except ProcessLookupError:
            pass
