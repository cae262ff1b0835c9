"""The sandbox: one fresh Jupyter kernel per submission, in its own process group, with time and memory limits.

Memory is limited twice: ``RLIMIT_DATA`` in the kernel (an allocation beyond it raises ``MemoryError``), and a
watchdog in the grader that sums the resident memory of every process in the kernel's process group (private
and shared pages, ``mmap``'d files and libraries included, from ``/proc``) every ``WATCH_INTERVAL`` seconds (the
group's members are listed every ``MEMBERS_EVERY`` looks) and kills the group when it passes the limit. Before each graded call, processes the notebook left running in the
group are killed, so no helper started by a cell can answer for the student's function.
"""
from __future__ import annotations

import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "launcher.py"
INTERRUPT_GRACE = 5.0     # seconds a kernel gets to stop after an interrupt before it is killed
WATCH_INTERVAL = 0.1      # seconds between two looks at the kernel's memory
MEMBERS_EVERY = 10        # ... and between two listings of its process group, in looks


@dataclass
class Limits:
    """Resource limits for one submission. ``total``: seconds to execute the notebook (replays included);
    ``cell``: seconds per cell; ``call``: seconds to run one exercise's cases (visible and hidden) through the
    student's function; ``memory_mb``: the memory of the kernel's process group (see the module docstring),
    0 = none; ``threads``: OpenMP threads of the kernel."""

    total: float = 300.0
    cell: float = 60.0
    call: float = 120.0
    memory_mb: int = 4096
    threads: int = 1


@dataclass
class Outcome:
    """What running one piece of code did: ``kind`` is ``ok``, ``error`` (with ``ename``), ``timeout``
    (the kernel stopped after an interrupt), ``hung`` (it did not: killed) or ``dead`` (the kernel died)."""

    kind: str
    ename: str = ""


def group_members(pgid: int) -> list[int]:
    """Process ids in process group ``pgid`` (Linux ``/proc``; empty elsewhere)."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
                pids.append(int(entry))
    return pids


def resident_bytes(pids: list[int]) -> int:
    """Resident memory of ``pids`` summed (``/proc/PID/statm``: private, shared and file-backed pages)."""
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


class KernelSession:
    """One fresh kernel in its own process group: run code with a time limit, discarding its output.
    ``private`` is a folder only the grader uses (the key that signs the kernel's replies passes through it)."""

    def __init__(self, cwd: Path, limits: Limits, private: Path):
        from jupyter_client import KernelManager

        # CPU only: the grader's references are CPU tensors, and one GPU is not shared among parallel kernels
        env = {**os.environ, "MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
            p for p in (str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")) if p)}
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(limits.threads)
        self.key = secrets.token_bytes(32)
        fd, key_path = tempfile.mkstemp(dir=private, prefix="key_")
        with os.fdopen(fd, "wb") as f:
            f.write(self.key)
        self.limits, self.memory_killed = limits, False
        self.km = KernelManager(kernel_name="python3")
        self.km.kernel_spec.argv[:] = [sys.executable, str(LAUNCHER), str(limits.memory_mb * 2**20), key_path,
                                       str(PACKAGE), "-f", "{connection_file}"]
        self.km.start_kernel(cwd=str(cwd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.km.provisioner.pid
        self._stop = threading.Event()
        if limits.memory_mb > 0:
            threading.Thread(target=self._watch, daemon=True).start()
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=60)
        except RuntimeError:
            self.shutdown()
            raise
        # exit() / quit() in a cell would stop the kernel a moment later, in the middle of another cell
        self.run("get_ipython().ask_exit = lambda: None", 30)

    def _watch(self) -> None:
        limit, members, tick = self.limits.memory_mb * 2**20, [self.pid], 0
        while not self._stop.wait(WATCH_INTERVAL):
            tick += 1
            if tick % MEMBERS_EVERY == 0:  # listing the group reads all of /proc: not every time
                members = group_members(self.pid) or [self.pid]
            if resident_bytes(members) > limit:
                self.memory_killed = True
                self._kill_group()
                return

    def _kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass

    def kill_strays(self) -> None:
        """Kill every process of the kernel's group except the kernel itself."""
        for _ in range(3):
            strays = [pid for pid in group_members(self.pid) if pid != self.pid]
            if not strays:
                return
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)

    def death(self) -> str:
        """Why the kernel died, if the grader knows: its memory limit."""
        return f" (its memory passed the limit of {self.limits.memory_mb} MB)" if self.memory_killed else ""

    def _wait(self, msg_id: str, timeout: float) -> Outcome | None:
        """Outcome of request ``msg_id`` once the kernel is idle again; ``None`` if ``timeout`` passes first."""
        deadline, ename = time.monotonic() + timeout, ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = self.kc.get_iopub_msg(timeout=min(left, 0.5))
            except queue.Empty:
                if not self.km.is_alive():
                    return Outcome("dead")
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                ename = str(msg["content"].get("ename", "Error"))[:100]
            elif msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                return Outcome("error", ename) if ename else Outcome("ok")

    def run(self, code: str, timeout: float) -> Outcome:
        """Execute ``code``; on timeout interrupt it, and kill the kernel if it does not stop."""
        if not self.km.is_alive():
            return Outcome("dead")
        msg_id = self.kc.execute(code, store_history=False, allow_stdin=False)
        outcome = self._wait(msg_id, timeout)
        if outcome is not None:
            return outcome
        self.km.interrupt_kernel()
        outcome = self._wait(msg_id, INTERRUPT_GRACE)
        if outcome is None:
            self.shutdown()
            return Outcome("hung")
        return outcome if outcome.kind == "dead" else Outcome("timeout")

    def alive(self) -> bool:
        return self.km.is_alive()

    def shutdown(self) -> None:
        """Stop the kernel and its process group (idempotent)."""
        self._stop.set()
        try:
            self.kc.stop_channels()
        finally:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)
            self._kill_group()
