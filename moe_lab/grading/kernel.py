"""A submission's kernel, grader side: start it in its sandbox (:mod:`moe_lab.grading.sandbox`), run code with a time
limit over the pipes (:mod:`moe_lab.grading.protocol`), watch its memory, and kill it.

Memory is limited twice: ``RLIMIT_DATA`` in the kernel (an allocation beyond it raises ``MemoryError``), and a
watchdog here that every ``WATCH_INTERVAL`` seconds sums the resident memory of every process of the kernel (its
sandbox's processes, read from the sandbox's own ``/proc``; without a sandbox, its process group and its
descendants, listed every ``MEMBERS_EVERY`` looks) and what its ``/tmp`` and ``/dev/shm`` hold, and kills them all
when that passes the limit, or when it runs more processes than its limit (``RLIMIT_NPROC`` does the same inside the
sandbox, except for a grader running as root, whose sandboxes the Linux kernel exempts from it). Before each graded call, the processes the notebook left running are killed, so no
helper started by a cell can answer for the student's function.
"""
from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import protocol
from .protocol import ChannelClosed, Reader
from .sandbox import Sandbox, environment

PACKAGE = Path(__file__).resolve().parent.parent
INTERRUPT_GRACE = 5.0     # seconds a kernel gets to stop after an interrupt before it is killed
START_TIMEOUT = 120.0     # seconds a kernel gets to start (a busy machine, a cold disk cache)
WATCH_INTERVAL = 0.1      # seconds between two looks at the kernel's memory
MEMBERS_EVERY = 10        # ... and between two listings of its processes, in looks


@dataclass
class Limits:
    """Resource limits for one submission. ``total``: seconds to execute the notebook (replays included);
    ``cell``: seconds per cell; ``call``: seconds to run one exercise's cases (visible and hidden) through the
    student's function; ``memory_mb``: the memory of the kernel's processes and its temporary files (see the
    module docstring), 0 = none; ``threads``: OpenMP threads of the kernel; ``processes``: processes in its sandbox;
    ``files``: open files per process; ``file_mb``: the size of one file it writes."""

    total: float = 300.0
    cell: float = 60.0
    call: float = 120.0
    memory_mb: int = 4096
    threads: int = 1
    processes: int = 256
    files: int = 1024
    file_mb: int = 1024


@dataclass
class Outcome:
    """What running one piece of code did: ``kind`` is ``ok``, ``error`` (with ``ename``), ``timeout``
    (the kernel stopped after an interrupt), ``hung`` (it did not: killed) or ``dead`` (the kernel died, or its
    pipes broke); ``header`` and ``payload``: the kernel's reply."""

    kind: str
    ename: str = ""
    header: dict | None = None
    payload: bytes = b""


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live process (Linux ``/proc``; empty elsewhere)."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and fields[0] != b"Z":
                table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def family(root: int, group: int | None = None) -> list[int]:
    """``root`` and its descendants (and, with ``group``, every process in that process group)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root] + [pid for pid, (_, pgid) in table.items() if group is not None and pgid == group]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return sorted(found)


def resident_bytes(pids: list[int], proc: str = "/proc") -> int:
    """Resident memory of ``pids`` summed (``/proc/PID/statm``: private, shared and file-backed pages)."""
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


class KernelSession:
    """One fresh kernel of a submission: run code with a time limit, and call its functions.
    ``build``: the folder holding the answer-free ``moe_lab``; ``work``: its working directory when there is no
    sandbox (inside one, its private ``/tmp/work``)."""

    def __init__(self, build: Path, limits: Limits, sandbox: Sandbox, work: Path):
        self.limits, self.sandbox, self.killed_for = limits, sandbox, ""
        self._ids = 0
        from_grader, to_kernel = os.pipe()  # the kernel reads requests from the first pipe
        from_kernel, to_grader = os.pipe()  # and writes replies to the second
        config = json.dumps({"memory": limits.memory_mb * 2**20, "files": limits.files,
                             "file_size": limits.file_mb * 2**20,
                             "processes": limits.processes if sandbox.kind == "bwrap" else 0})
        argv = [sys.executable, "launcher", config, str(from_grader), str(to_grader)]
        keep = [from_grader, to_grader]
        info_read = None
        if sandbox.kind == "bwrap":
            info_read, info_write = os.pipe()
            keep.append(info_write)
            command, env, cwd = sandbox.command(argv, build, limits.threads, info_write), None, None
        else:
            command = [sys.executable, str(build / "moe_lab" / "grading" / "launcher.py"), *argv[2:]]
            env = {**environment(str(build), limits.threads, home=str(work)), "PATH": os.environ.get("PATH", "")}
            cwd = work
        user = {}
        if sandbox.kind != "bwrap" and sandbox.user is not None:
            os.chown(work, sandbox.user, sandbox.user)
            user = {"user": sandbox.user, "group": sandbox.user, "extra_groups": []}
        try:
            self.proc = subprocess.Popen(command, pass_fds=keep, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True, env=env, cwd=cwd, **user)
        finally:
            for fd in keep:
                os.close(fd)
        self.to_kernel, self.reader = to_kernel, Reader(from_kernel)
        self._stop, self._closed = threading.Event(), threading.Lock()
        try:
            self.pid = self.init = self._sandbox_init(info_read) if info_read is not None else self.proc.pid
            threading.Thread(target=self._watch, daemon=True).start()
            ready = self.reader.read(time.monotonic() + START_TIMEOUT)
            if ready is None or ready[0].get("op") != "ready":
                raise RuntimeError("the kernel did not start in time")
            if info_read is not None:  # the kernel is the only child of the sandbox's init
                self.pid = next((pid for pid, (parent, _) in _processes().items() if parent == self.init), self.init)
        except (OSError, RuntimeError, ValueError) as err:
            self.shutdown()
            raise RuntimeError(f"the kernel did not start ({err})") from None

    def _sandbox_init(self, fd: int) -> int:
        """The PID (on the host) of the sandbox's process 1, from bubblewrap's info pipe."""
        deadline, data = time.monotonic() + START_TIMEOUT, b""
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
                try:
                    return int(json.loads(data)["child-pid"])
                except (ValueError, KeyError, TypeError):
                    continue
        finally:
            os.close(fd)
        raise RuntimeError("bubblewrap did not start the kernel")

    def members(self) -> list[int]:
        """Every process of the kernel: bubblewrap and its sandbox's processes (nothing leaves the sandbox's PID
        namespace); without a sandbox, the kernel's descendants and its process group."""
        return family(self.proc.pid, None if self.sandbox.kind == "bwrap" else self.proc.pid)

    def _tmp_bytes(self) -> int:
        """What the sandbox's ``/tmp`` and ``/dev/shm`` hold (tmpfs: memory), read through its root."""
        total = 0
        if self.sandbox.kind == "bwrap":
            for folder in ("tmp", "dev/shm"):
                try:
                    st = os.statvfs(f"/proc/{self.init}/root/{folder}")
                    total += (st.f_blocks - st.f_bfree) * st.f_frsize
                except OSError:
                    continue
        return total

    def _usage(self, members: list[int]) -> tuple[int, int]:
        """(processes, bytes of memory) of the kernel. In a sandbox, read from its own ``/proc`` (through its root:
        only its processes, cheap enough to read at every look)."""
        if self.sandbox.kind == "bwrap":
            proc = f"/proc/{self.init}/root/proc"
            try:
                pids = [int(e) for e in os.listdir(proc) if e.isdigit()]
            except OSError:
                return 0, 0
            return len(pids), resident_bytes(pids, proc) + self._tmp_bytes()
        return len(members), resident_bytes(members)

    def _watch(self) -> None:
        limit, members, tick = self.limits.memory_mb * 2**20, [self.proc.pid], 0
        while not self._stop.wait(WATCH_INTERVAL):
            tick += 1
            if self.sandbox.kind != "bwrap" and tick % MEMBERS_EVERY == 1:  # reads all of /proc: not every time
                members = self.members() or [self.proc.pid]
            processes, memory = self._usage(members)
            if (limit and memory > limit) or processes > self.limits.processes + 2:  # + the sandbox's init, a shell
                self.killed_for = "memory" if limit and memory > limit else "processes"
                self.kill()
                return

    def kill(self) -> None:
        """Kill the kernel and every process of its sandbox (or group)."""
        for pid in [self.proc.pid, *self.members()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.sandbox.kind != "bwrap":
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def kill_strays(self) -> None:
        """Kill every process of the kernel's sandbox (or group) except the kernel and bubblewrap itself."""
        keep = {self.proc.pid, self.init, self.pid}
        for _ in range(3):
            strays = [pid for pid in self.members() if pid not in keep]
            if not strays:
                return
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)

    @property
    def memory_killed(self) -> bool:
        return self.killed_for == "memory"

    def death(self) -> str:
        """Why the kernel died, if the grader knows: its memory or process limit."""
        if self.killed_for == "memory":
            return f" (its memory passed the limit of {self.limits.memory_mb} MB)"
        if self.killed_for == "processes":
            return f" (it ran more than {self.limits.processes} processes)"
        return ""

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.killed_for

    def request(self, header: dict, payload: bytes, timeout: float) -> Outcome:
        """Send a request and wait for its reply; on timeout interrupt it, and kill the kernel if it does not stop."""
        if not self.alive():
            return Outcome("dead")
        self._ids += 1
        header = {**header, "id": f"{self._ids}-{secrets.token_hex(4)}"}
        deadline = time.monotonic() + timeout
        try:
            protocol.write_frame(self.to_kernel, header, payload, deadline)
            reply = self._reply(header["id"], deadline)
            if reply is not None:
                return reply
            try:
                os.kill(self.pid, signal.SIGINT)
            except OSError:
                pass
            reply = self._reply(header["id"], time.monotonic() + INTERRUPT_GRACE)
        except ChannelClosed:
            self.kill()
            return Outcome("dead")
        except TimeoutError:
            reply = None
        if reply is None:
            self.shutdown()
            return Outcome("hung")
        return reply if reply.kind in ("dead",) else Outcome("timeout", reply.ename, reply.header, reply.payload)

    def _reply(self, request_id: str, deadline: float) -> Outcome | None:
        while True:
            frame = self.reader.read(deadline)
            if frame is None:
                return None if self.alive() else Outcome("dead")
            header, payload = frame
            if header.get("id") != request_id:
                continue  # a late reply to an earlier, interrupted request
            if header.get("op") == "interrupted":
                return Outcome("error", "KeyboardInterrupt", header)
            if header.get("outcome") == "error":
                return Outcome("error", str(header.get("ename", "Error"))[:100], header, payload)
            return Outcome("ok", "", header, payload)

    def run(self, code: str, timeout: float, cell: int = 0) -> Outcome:
        """Run ``code`` as code cell number ``cell``."""
        return self.request({"op": "run", "code": code, "cell": cell}, b"", timeout)

    def call(self, function: str, allow: tuple[str, ...], cases: bytes, timeout: float) -> Outcome:
        """Call the notebook's function ``function`` on ``cases`` (see :func:`protocol.cases_payload`)."""
        return self.request({"op": "call", "function": function, "allow": list(allow)}, cases, timeout)

    def shutdown(self) -> None:
        """Stop the kernel and everything it started (idempotent)."""
        self._stop.set()
        self.kill()
        if self._closed.acquire(blocking=False):  # the pipes are closed once (a closed fd number is reused)
            for fd in (self.to_kernel, self.reader.fd):
                os.close(fd)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
