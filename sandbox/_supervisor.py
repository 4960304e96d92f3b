"""The parent side: fork an isolated child, enforce the wall clock, measure, parse the reply.

The process that runs this must never have held a credential: it is either the `sandbox run`
CLI or the fork server, a fresh interpreter spawned with an empty environment.
"""

from __future__ import annotations

import collections
import gc
import json
import math
import os
import select
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _child, _isolation, _reply, _restricted, _seccomp, _zygote
from ._cgroup import MemoryCgroup, owner_gone
from ._errors import IsolationUnavailable, ZygoteLost
from ._framing import write_frame
from ._outcome import Outcome, Status, Usage, error
from ._policy import LAYERS, Policy
from ._request import PreparedRun

#: Children kept forked and isolated ahead of their request (see `Supervisor.prepare_next`).
#: Two, so that back-to-back runs find one whose set-up finished during the previous run.
SPARE_CHILDREN = 2
#: Runs of the warm-up request in this process before any child is forked (see __init__).
WARM_UP_ROUNDS = 20


@dataclass
class _Child:
    """A forked child that has isolated itself (or is doing so) and waits for one request."""

    #: None until the zygote has answered (see `Supervisor._resolve`).
    pid: int | None
    reply_fd: int
    request_fd: int | None
    workdir: str
    skip: frozenset[str]
    #: The zygote that forked it and reaps it, or None for a child of this process.
    zygote: _zygote.Zygote | None = None
    #: Its memory cgroup (see `_cgroup`), or None where there is no backend.
    cgroup: str | None = None
    reply: bytearray = field(default_factory=bytearray)
    overflowed: bool = False
    timed_out: bool = False
    #: Killed by this process for its CPU time (`_supervise`), not by the kernel.
    cpu_exceeded: bool = False
    #: CPU seconds the child had used when its request was handed over (its warm-up).
    cpu_at_dispatch: float = 0.0

    def known_pid(self) -> int:
        """Its pid, once the zygote has answered for it (see `Supervisor._resolve`)."""
        if self.pid is None:
            raise RuntimeError("the child's pid is not known yet")
        return self.pid

    reaped: bool = False
    #: Killed after a whole reply, its usage read while it lived; reaped without waiting.
    finished_alive: bool = False


class _Watch:
    """One run's watch over its child: the reply read, the wall clock and the CPU time held."""

    def __init__(
        self, child: _Child, cap: int, deadline: float, cpu_limit: float, pidfd: int
    ) -> None:
        self.child = child
        self.cap = cap
        self.deadline = deadline
        self.cpu_limit = cpu_limit
        self.pidfd = pidfd
        self.poller = select.poll()
        self.poller.register(child.reply_fd, select.POLLIN)
        self.poller.register(pidfd, select.POLLIN)
        self.pipe_open = True
        self.exited = False
        #: The child closed its reply channel while alive (see `_child._deliver`).
        self.closed_alive = False

    def until_done(self) -> _zygote.Usage | None:
        """Watch until the child is done or over a limit; its usage if it finished alive."""
        child = self.child
        while self.pipe_open or not self.exited:
            timeout = self._time_left()
            if timeout is None:
                return None
            for fd, _ in self.poller.poll(max(1, math.ceil(timeout * 1000))):
                if fd == self.pidfd:
                    self.exited = True
                    self.poller.unregister(self.pidfd)
                else:
                    usage = self._read()
                    if usage is not None:
                        child.finished_alive = True
                        return usage
            if child.overflowed:
                return None
        return None

    def _time_left(self) -> float | None:
        """Seconds until the next limit could be reached; None (and the flag set) once it is."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.child.timed_out = True
            return None
        cpu_used = None if self.exited else _cpu_seconds(self.child.known_pid())
        if cpu_used is not None:
            if cpu_used >= self.cpu_limit:
                self.child.cpu_exceeded = True
                return None
            remaining = min(remaining, self.cpu_limit - cpu_used)
        return remaining

    def _read(self) -> _zygote.Usage | None:
        child = self.child
        chunk = os.read(child.reply_fd, 1 << 16)
        if not chunk:
            self.pipe_open = False
            self.poller.unregister(child.reply_fd)
            if not self.exited:
                # The child closed its reply channel and waits to be killed (see
                # `_child._deliver`), or it is exiting: either way it has nothing more to say.
                # Its usage is read while it still lives; if that fails, it is reaped and wait4
                # tells instead.
                pid = child.known_pid()
                usage = _usage_if_alive(pid)
                _kill_group(pid)
                self.closed_alive = True
                return usage
        elif len(child.reply) + len(chunk) > self.cap:
            child.overflowed = True
            self.pipe_open = False
            self.poller.unregister(child.reply_fd)
        else:
            child.reply += chunk
        return None


class Supervisor:
    """Runs prepared requests in isolated children. One per credential-free process.

    Used as is (the `sandbox run` CLI), `run()` forks a child for each request. The fork server
    also calls `prepare_next()` once it has answered: a zygote (see `_zygote.py`) then forks
    spare children that isolate themselves before their request is known, and `run()` only
    hands one its request. Either way every layer is in place before the request arrives, and
    the run's own CPU and memory limits are applied before any of its code is compiled.
    """

    #: What the isolated child runs; only `sandbox._testing` swaps it, for the OS-layer tests.
    executor: _child.Executor = staticmethod(_child.execute)

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._spares: collections.deque[_Child] = collections.deque()
        self._finished: list[_Child] = []
        self._zygote: _zygote.Zygote | None = None
        self._awaiting_pid: collections.deque[_Child] = collections.deque()
        #: Set by the first request: from then on this process's memory holds requests, so it
        #: never forks a child or a zygote again (see `_fresh_spare`).
        self._served = False
        _restricted.preload(sorted(policy.importable))
        _isolation.prepare_parent()
        self._seccomp: _seccomp.Program | None
        try:
            program, info = _seccomp.export_program()
            self._seccomp = _seccomp.Program(program, info, _isolation._libc_prctl)
        except Exception:  # noqa: BLE001 - reported by the child as a missing layer
            self._seccomp = None
        self._parent_ns = _isolation.namespace_ids()
        self._memory = MemoryCgroup.find(os.getpid(), policy.maxima.memory_mb)
        self._netns_fd: int | None = None
        if os.geteuid() == 0:
            try:
                self._netns_fd = _isolation.create_netns()
            except OSError:
                pass  # Each child then tries to make its own, and the probe reports the result.
        _remove_stale_roots(Path(tempfile.gettempdir()))
        # Named after this process, so that whatever a killed fork server leaves is found and
        # removed by the next one (`_remove_stale_roots`).
        self._tmp_root = Path(tempfile.mkdtemp(prefix=f"sandbox-{os.getpid()}-"))
        os.chmod(self._tmp_root, 0o711)  # noqa: S103 - traversable, not listable
        self._skip: frozenset[str] = frozenset()
        self.layers = self.probe()
        missing = {layer for layer, why in self.layers.items() if why}
        self.unavailable = sorted(layer for layer in missing if not policy.may_skip(layer))
        self._skip = frozenset(missing - set(self.unavailable))
        # CPython 3.11 rewrites a function's bytecode in place while it warms up and again as it
        # specialises it. Run a child's request path here, on a constant and trusted request, so
        # that children inherit that code already specialised: otherwise each child rewrites,
        # and so copies, every page of code it runs, and runs it unspecialised.
        for _ in range(WARM_UP_ROUNDS):
            _child.warm_up()
        # Everything loaded so far lives as long as this process: keep the collector from ever
        # walking it, so that a collection in a child does not copy those pages.
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        """Stop the spares and the zygote, remove the working directories, drop the namespace."""
        self._release_finished()
        while self._spares:
            self._release(self._spares.popleft())
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None
        shutil.rmtree(self._tmp_root, ignore_errors=True)
        self._memory.close()
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None

    def run(self, run: PreparedRun) -> Outcome:
        """Run one request; raise IsolationUnavailable if a required layer is missing."""
        self._check_available()
        self._release_finished()
        child = self._take_spare() or self._fresh_spare()
        self._served = True
        try:
            started = time.monotonic()
            self._dispatch(child, run)
            status, rusage = self._supervise(child, run, started)
            wall_ms = int((time.monotonic() - started) * 1000)
            return self._outcome(child, status, rusage, wall_ms, run)
        finally:
            if child.finished_alive:
                # Already killed: reaped, and its directory removed, once the caller has the
                # outcome (by `prepare_next`, the next run or `close`).
                self._finished.append(child)
            else:
                self._release(child)

    def _release_finished(self) -> None:
        while self._finished:
            self._release(self._finished.pop())

    def prepare_next(self) -> None:
        """Have spares forked and isolated for the next runs, off the caller's critical path.

        The zygote (see `_zygote.py`) forks them while this process goes back to its caller.
        Without a zygote, run() forks its own child.
        """
        self._release_finished()
        if self.unavailable:
            return
        try:
            zygote = self._live_zygote()
            while len(self._spares) < SPARE_CHILDREN:
                self._spares.append(self._request_spare(zygote))
        except ZygoteLost:
            return  # reported by the next run(), which the caller then retries elsewhere
        except OSError:
            self._drop_zygote()  # reported by the next run()

    def _live_zygote(self) -> _zygote.Zygote:
        """The zygote, started now if none has been yet; ZygoteLost once one has been lost.

        A zygote is a copy of this process. Before the first request that copy holds nothing
        of anyone's; after it, this process has held requests, arguments and outcomes in its
        memory, and a zygote forked now would hand them to every later child. So a lost zygote
        is never replaced: the fork server is replaced instead (see `Sandbox._call`).
        """
        if self._zygote is not None and not self._zygote.alive():
            self._drop_zygote()
        if self._zygote is None:
            if self._served:
                raise ZygoteLost("the fork server lost its zygote and must be restarted")
            self._zygote = _zygote.Zygote(
                self._setup,
                self.executor,
                keep_fds=[] if self._netns_fd is None else [self._netns_fd],
            )
        return self._zygote

    def _fresh_spare(self) -> _Child:
        """A spare asked for now, when none is ready (the first run, or every spare died)."""
        try:
            child = self._request_spare(self._live_zygote())
            if self._resolve(child):
                return child
            self._release(child)
        except OSError:
            self._drop_zygote()
        raise ZygoteLost("the fork server's zygote failed and must be restarted")

    def _request_spare(self, zygote: _zygote.Zygote) -> _Child:
        workdir = self._workdir()
        cgroup = self._new_cgroup()
        reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
        request_r, request_w = os.pipe2(os.O_CLOEXEC)
        try:
            zygote.spawn(workdir, cgroup, self._skip, reply_w, request_r)
        except OSError:
            for fd in (reply_r, request_w):
                os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)
            if cgroup is not None:
                self._memory.remove(cgroup)
            raise
        finally:
            os.close(reply_w)
            os.close(request_r)
        child = _Child(None, reply_r, request_w, workdir, self._skip, zygote, cgroup)
        self._awaiting_pid.append(child)
        return child

    def _take_spare(self) -> _Child | None:
        if self._zygote is not None and not self._zygote.alive():
            self._drop_zygote()  # its spares died with it
        while self._spares:
            child = self._spares.popleft()
            if child.zygote is self._zygote and self._resolve(child) and _waiting(child):
                return child
            self._release(child)  # a spare that died waiting (killed from outside, say)
        return None

    def _resolve(self, child: _Child) -> bool:
        """Learn the pid of a spare the zygote forked; False if it never will."""
        while child.pid is None:
            if self._zygote is None or not self._awaiting_pid:
                return False
            try:
                pid = self._zygote.next_spawned()
            except OSError:
                self._drop_zygote()
                return False
            self._awaiting_pid.popleft().pid = pid
        return True

    def _drop_zygote(self) -> None:
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None
        self._awaiting_pid.clear()

    def details(self) -> dict[str, str]:
        """What `doctor` shows beside the layers: the filter and the memory backend in use."""
        return {
            "seccomp": self._seccomp.info.describe() if self._seccomp else "no filter was built",
            "memory_cgroup": self._memory.describe(),
            "pidns": "a PID namespace per child (the child is its pid 1)",
            "utsns": f"a UTS namespace per child (host name {_isolation.HOSTNAME.decode()!r})",
        }

    def probe(self) -> dict[str, str]:
        """Apply every layer in a child and report each as "" (active) or why it is missing."""
        child = self._spawn_probe()
        try:
            report = self._collect_probe(child)
        finally:
            self._release(child)
        try:
            _restricted.compile_module("x = (1).__class__")
            report["restricted_python"] = "compile layer accepted a dunder attribute"
        except _restricted.CompileRejected:
            report["restricted_python"] = ""
        return {layer: report.get(layer, "not checked") for layer in LAYERS}

    def _check_available(self) -> None:
        if self.unavailable:
            raise IsolationUnavailable(
                "required isolation layers missing on this host: "
                + ", ".join(f"{layer} ({self.layers[layer]})" for layer in self.unavailable)
            )

    def _workdir(self) -> str:
        # A fresh, empty root for the child. Owned by this process's user (root on a host with
        # the full set of layers), not by the run's uid, and read-only to everyone: the child can
        # list it but neither write it nor chmod it, even if the seccomp layer were missing.
        workdir = tempfile.mkdtemp(dir=self._tmp_root, prefix="run-")
        os.chmod(workdir, 0o555)  # noqa: S103 - read-only and empty, see above
        return workdir

    def _new_cgroup(self) -> str | None:
        return self._memory.new_run() if self._memory.available else None

    def _setup(
        self, workdir: str, cgroup: str | None, skip: frozenset[str]
    ) -> _isolation.ChildSetup:
        # Called here, or in the zygote just before it forks (then its address space is read).
        return _isolation.ChildSetup(
            self.policy,
            workdir,
            self._seccomp,
            baseline_as=_isolation.address_space_bytes(),
            parent_pid=os.getpid(),
            netns_fd=self._netns_fd,
            cgroup=cgroup,
            cgroup_reason=self._memory.reason or "no memory cgroup",
            parent_ns=self._parent_ns,
            skip=skip,
        )

    def _spawn_probe(self) -> _Child:
        """Fork the probe of `doctor` from this process itself, before any request (see
        `_live_zygote` for why nothing is forked from here once a request has been served)."""
        if self._served:
            raise ZygoteLost("the fork server no longer forks children itself")
        workdir = self._workdir()
        cgroup = self._new_cgroup()
        setup = self._setup(workdir, cgroup, frozenset())
        reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = _isolation.fork_child()
        except OSError:
            for fd in (reply_r, reply_w):
                os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)
            if cgroup is not None:
                self._memory.remove(cgroup)
            raise
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                os.close(reply_r)
                _child.main(setup, reply_w, None, self.executor)
            finally:
                os._exit(70)
        os.close(reply_w)
        return _Child(pid, reply_r, None, workdir, frozenset(), cgroup=cgroup)

    def _dispatch(self, child: _Child, run: PreparedRun) -> None:
        """Hand the child its request. A dead child (a layer failed) shows in its exit status."""
        pid = child.known_pid()
        if child.request_fd is None:
            raise RuntimeError("the child was handed a request already")
        try:
            # A run that cannot be held to its memory limit must not start: its channel closes
            # unused below, and the missing reply marks it crashed.
            if self._held_to_limit(child, run):
                child.cpu_at_dispatch = _cpu_seconds(pid) or 0.0
                write_frame(child.request_fd, json.dumps(run.to_wire()).encode())
        except BrokenPipeError:
            pass
        finally:
            os.close(child.request_fd)
            child.request_fd = None

    def _held_to_limit(self, child: _Child, run: PreparedRun) -> bool:
        """Set the run's memory limit on its cgroup; False if the cgroup refused it."""
        if child.cgroup is None:
            return True
        try:
            self._memory.limit_run(child.cgroup, run.limits.memory_mb * 1024 * 1024)
        except OSError:
            return False
        return True

    def _release(self, child: _Child) -> None:
        if child.request_fd is not None:
            os.close(child.request_fd)  # an idle child exits on its own when this closes
            child.request_fd = None
        if not child.reaped and self._resolve(child):
            _kill_group(child.known_pid())
            try:
                if child.finished_alive:
                    self._discard(child)
                else:
                    self._wait(child)
            except OSError:
                pass  # its zygote is gone, and took the child with it
        os.close(child.reply_fd)
        try:
            os.rmdir(child.workdir)
        except OSError:
            shutil.rmtree(child.workdir, ignore_errors=True)
        if child.cgroup is not None:
            self._memory.remove(child.cgroup)

    def _supervise(self, child: _Child, run: PreparedRun, started: float) -> tuple[int, Any]:
        """Read the reply until the child is done; enforce the wall clock and the CPU time.

        CPU time is enforced here to the millisecond, from the kernel's clock of the child's
        CPU time: RLIMIT_CPU counts whole seconds only, and is the backstop. A single-threaded
        child cannot use more CPU time than wall time passes, so waking when the CPU time left
        would be used up at full speed never misses the limit by more than a wake-up.
        """
        pid = child.known_pid()
        watch = _Watch(
            child,
            cap=1 + _reply.raw_cap(run.limits.output_bytes),
            deadline=started + run.limits.wall_seconds,
            cpu_limit=child.cpu_at_dispatch + run.limits.cpu_seconds,
            pidfd=os.pidfd_open(pid),
        )
        try:
            usage = watch.until_done()
            if usage is not None:
                return 0, usage
            if child.timed_out or child.overflowed or child.cpu_exceeded:
                _kill_group(pid)
            status, rusage = self._wait(child)
            if (
                watch.closed_alive
                and os.WIFSIGNALED(status)
                and os.WTERMSIG(status) == signal.SIGKILL
                and _reply.split(_body(child)) is not None
            ):
                # A whole reply, then the kill this process sent. (A child the kernel killed
                # for its CPU limit, say, never wrote one: its status stands.)
                status = 0
            return status, rusage
        finally:
            os.close(watch.pidfd)

    def _wait(self, child: _Child) -> tuple[int, Any]:
        """Reap a child that has exited or been killed: its wait status and resource usage."""
        pid = child.known_pid()
        child.reaped = True
        if child.zygote is None:
            _, status, rusage = os.wait4(pid, 0)
            return status, rusage
        if child.zygote is not self._zygote:
            raise OSError("the zygote that forked this child is gone")
        try:
            return child.zygote.reap(pid)
        except OSError:
            self._drop_zygote()  # it died, and its children with it
            raise

    def _discard(self, child: _Child) -> None:
        """Have a killed child reaped without waiting for it (its usage is already known)."""
        pid = child.known_pid()
        child.reaped = True
        if child.zygote is None:
            os.waitpid(pid, 0)
        elif child.zygote is self._zygote:
            try:
                child.zygote.discard(pid)
            except OSError:
                self._drop_zygote()
                raise

    def _outcome(
        self, child: _Child, status: int, rusage: Any, wall_ms: int, run: PreparedRun
    ) -> Outcome:
        """The outcome of a reaped child. Everything the child wrote is untrusted: any reply
        that is not a well-formed outcome within its caps is `crashed` or `output_limit`."""
        usage = Usage(
            cpu_ms=max(0, int((rusage.ru_utime + rusage.ru_stime - child.cpu_at_dispatch) * 1000)),
            wall_ms=wall_ms,
            max_rss_kb=int(rusage.ru_maxrss),
        )
        degraded = tuple(sorted(child.skip))
        marker = bytes(child.reply[:1])
        if marker == _child.ISOLATION_FAILED:
            # Written before any user code could run, by the child's own set-up.
            raise IsolationUnavailable(_isolation_reason(bytes(child.reply[1:])))

        def failed(status: Status, kind: str, message: str) -> Outcome:
            return Outcome(status, error=error(kind, message), usage=usage, degraded=degraded)

        if child.timed_out:
            return failed("timeout", "Timeout", "wall-clock limit reached")
        if child.cpu_exceeded:
            return failed("timeout", "Timeout", "CPU time limit reached")
        if child.overflowed:
            return failed("output_limit", "OutputLimit", "reply exceeded its cap")
        if (
            os.WIFSIGNALED(status)
            and os.WTERMSIG(status) == signal.SIGKILL
            and child.cgroup is not None
            and self._memory.oom_killed(child.cgroup)
        ):
            return failed("memory_limit", "MemoryError", "memory limit reached")
        if os.WIFSIGNALED(status):
            return self._signalled(os.WTERMSIG(status), usage, run, degraded)
        if marker != _child.ISOLATED or os.WEXITSTATUS(status) != 0:
            return failed("crashed", "Crashed", "the child gave no valid reply")
        return _reply_outcome(_body(child), run, usage, degraded)

    def _signalled(
        self, sig: int, usage: Usage, run: PreparedRun, degraded: tuple[str, ...]
    ) -> Outcome:
        if sig == signal.SIGXCPU or (
            sig == signal.SIGKILL and usage.cpu_ms >= run.limits.cpu_seconds * 1000
        ):
            return Outcome(
                "timeout",
                error=error("Timeout", "CPU time limit reached"),
                usage=usage,
                degraded=degraded,
            )
        if sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) and (
            usage.max_rss_kb >= run.limits.memory_mb * 1024 * 0.9
        ):
            return Outcome(
                "memory_limit",
                error=error("MemoryError", "memory limit reached"),
                usage=usage,
                degraded=degraded,
            )
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return Outcome(
            "crashed",
            error=error("Crashed", f"the child died by signal {name}"),
            usage=usage,
            degraded=degraded,
        )

    def _collect_probe(self, child: _Child) -> dict[str, str]:
        """Read the probe's report; the caller kills and reaps the probe afterwards."""
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready, _, _ = select.select([child.reply_fd], [], [], 0.5)
            if ready:
                chunk = os.read(child.reply_fd, 65536)
                if not chunk:
                    break
                data += chunk
        try:
            parsed = json.loads(data or b"{}")
            layers: dict[str, str] = dict(parsed["probe"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IsolationUnavailable("the isolation probe gave no valid report") from exc
        # Read while the probe is still alive (it waits two seconds before exiting).
        layers.update(_proc_checks(child.known_pid(), layers, child.cgroup))
        return layers


def _proc_checks(pid: int, layers: dict[str, str], cgroup: str | None) -> dict[str, str]:
    """Check from outside what the child cannot read once chrooted: namespaces, NNP, seccomp,
    its memory cgroup."""
    out: dict[str, str] = {}
    try:
        out.update(_namespace_checks(pid, layers))
        if layers.get("memory_cgroup") == "":
            memberships = Path(f"/proc/{pid}/cgroup").read_text()
            name = os.path.basename(cgroup or "") or "?"
            if not any(line.endswith("/" + name) for line in memberships.splitlines()):
                out["memory_cgroup"] = "the child is not in its run's cgroup"
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if layers.get("no_new_privs") == "":
            out["no_new_privs"] = "" if fields.get("NoNewPrivs", "").strip() == "1" else "not set"
        if layers.get("seccomp") == "":
            out["seccomp"] = "" if fields.get("Seccomp", "").strip() == "2" else "no filter"
    except OSError as exc:
        out.setdefault("netns", f"cannot inspect child: {exc}")
    return out


_NAMESPACES = (("pidns", "pid"), ("utsns", "uts"), ("ipcns", "ipc"), ("netns", "net"))


def _namespace_checks(pid: int, layers: dict[str, str]) -> dict[str, str]:
    """A second look, from outside, at the namespaces the child checked itself (`_isolation`:
    each layer compares its namespace with the parent's). Reading a non-dumpable child's
    namespace of another uid needs CAP_SYS_PTRACE: without it (a worker container with five
    capabilities) the child's own check stands."""
    out: dict[str, str] = {}
    for layer, kind in _NAMESPACES:
        if layers.get(layer) != "":
            continue
        try:
            theirs = os.readlink(f"/proc/{pid}/ns/{kind}")
        except PermissionError:
            continue
        if os.readlink(f"/proc/self/ns/{kind}") == theirs:
            out[layer] = f"shares the host's {'network' if kind == 'net' else kind} namespace"
    return out


def _waiting(child: _Child) -> bool:
    """Whether a spare still holds the read end of its request pipe (that is, still lives)."""
    if child.request_fd is None:
        return False
    poller = select.poll()
    poller.register(child.request_fd, select.POLLOUT)
    return not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _reply_outcome(
    untrusted: memoryview, run: PreparedRun, usage: Usage, degraded: tuple[str, ...]
) -> Outcome:
    """The outcome a whole reply describes, once each part is checked (see `_reply.decode`)."""
    try:
        reply = _reply.decode(untrusted, run.limits.output_bytes)
    except _reply.ReplyTooLarge:
        return Outcome(
            "output_limit",
            error=error("OutputLimit", "reply exceeded its cap"),
            usage=usage,
            degraded=degraded,
        )
    if reply is None:
        return Outcome(
            "crashed",
            error=error("Crashed", "the child gave no valid reply"),
            usage=usage,
            degraded=degraded,
        )
    value = reply["value"]
    if reply["status"] == "ok" and not _reply.check_depth(value):
        return Outcome(
            "runtime_error",
            stdout=reply["stdout"],
            usage=usage,
            error=error("TypeError", "return value nests too deeply"),
            degraded=degraded,
        )
    err = reply["error"]
    return Outcome(
        reply["status"],
        value=value if reply["status"] == "ok" else None,
        stdout=reply["stdout"],
        usage=usage,
        degraded=degraded,
        error=None if err is None else error(err["type"], err["message"]),
    )


def _body(child: _Child) -> memoryview:
    """The reply after the child's isolation marker."""
    return memoryview(child.reply)[1:]


def _cpu_seconds(pid: int) -> float | None:
    """The CPU time a live child has used, from the kernel; None once it cannot be read."""
    try:
        # The process's CPU clock (Linux's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)): unlike
        # /proc/<pid>/schedstat it includes the slice the process is running right now.
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        return None


def _usage_if_alive(pid: int) -> _zygote.Usage | None:
    """CPU time and peak memory of a child that has not exited; None once it is exiting.

    Both come from the kernel's own accounting (the figures wait4 would report, less the
    teardown), never from the child. The peak resident size is gone once the process has
    released its memory, which an exiting process does before its descriptors are closed: so a
    child whose channel reached its end and whose peak can still be read closed the channel
    itself and is still alive.
    """
    try:
        with open(f"/proc/{pid}/status", "rb", buffering=0) as f:
            status = f.read()
        start = status.index(b"\nVmHWM:") + 7
        peak_kb = int(status[start : status.index(b"\n", start)].split()[0])
    except (OSError, ValueError, IndexError):
        return None
    cpu_seconds = _cpu_seconds(pid)
    if cpu_seconds is None:
        return None
    return _zygote.Usage(cpu_seconds, 0.0, peak_kb)


def _isolation_reason(report: bytes) -> str:
    # Written by the child's set-up before user code could run; still parsed defensively.
    try:
        body = json.loads(report[:4096])
        return f"isolation layer {body['layer']} unavailable: {body['reason']}"[:500]
    except Exception:  # noqa: BLE001 - any malformed report is just "unavailable"
        return "an isolation layer is unavailable"


def _remove_stale_roots(tmp: Path) -> None:
    """Remove the working directories of fork servers that died without closing."""
    for root in tmp.glob("sandbox-*-*"):
        if owner_gone(root.name):
            shutil.rmtree(root, ignore_errors=True)


def _kill_group(pid: int) -> None:
    # The child leads its own process group (session layer); kill it by pid too in case that
    # layer was skipped.
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
