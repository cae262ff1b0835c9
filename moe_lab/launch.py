"""Run a function on several local processes joined in a ``torch.distributed`` process group, from a script, a
test or a notebook, and get every rank's return value back.

    with LocalCluster(2) as cluster:          # 2 fresh processes (gloo, one CPU thread each), started once
        results = cluster.run(fn, *args)       # fn(*args) on every rank at once -> [rank 0's result, rank 1's, ...]
        more = cluster.run(other_fn)           # the same processes and process group again
    results = run_local(fn, 2, *args)          # a cluster for one call

``fn`` must be importable by name in a fresh process: a function defined at the top level of a module (not a
lambda, a nested function or a function defined in a notebook cell); its arguments and its result must be
picklable. The workers do not depend on how this process was started (Jupyter kernel, pytest, a script without
``if __name__ == "__main__"``): one fresh Python process (``python -c ...``) imports torch and moe_lab once and
forks the ``world_size`` workers from it (POSIX only), so starting 4 workers costs about one ``import torch``,
not four. They inherit the environment; they talk to this process over pipes and to each other through gloo (or
NCCL, one GPU per rank), rendezvousing through a file (no TCP port to pick).

Failures never hang the caller: a rank that raises makes ``run`` raise :class:`WorkerError` naming the rank,
with that rank's traceback; a call that has not finished after ``timeout`` seconds (typically a rank waiting in
a collective that a peer never joins) raises :class:`TimeoutError` naming the ranks still running. Either way
the workers are killed and the cluster is closed (a process group in an unknown state is not reused). Workers
also exit by themselves when this process goes away: an idle worker sees its pipe close, a busy one hits the
process group's timeout (the same ``timeout``).
"""
from __future__ import annotations

import importlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from datetime import timedelta
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path
from typing import Any, Callable

from .validation import check_choice, check_int, check_number

BACKENDS = ("gloo", "nccl")
_BOOT = "import sys; from moe_lab.launch import _zygote_main; _zygote_main(sys.argv[1:])"
_ERROR_GRACE_S = 1.0  # after one rank fails, how long to wait for the others' errors before killing them
_STOP_GRACE_S = 10.0  # how long a worker may take to leave its process group when the cluster closes


class WorkerError(RuntimeError):
    """A worker process raised (or died). ``rank``, ``world_size``; ``exc_type`` and ``message`` of the
    exception; ``remote_traceback``: the worker's traceback (or the tail of its output if it died)."""

    def __init__(self, rank: int, world_size: int, exc_type: str, message: str, remote_traceback: str):
        self.rank, self.world_size = rank, world_size
        self.exc_type, self.message, self.remote_traceback = exc_type, message, remote_traceback
        super().__init__(f"rank {rank} of {world_size} raised {exc_type}: {message}\n\n"
                         f"--- traceback on rank {rank} ---\n{remote_traceback}")

    @property
    def summary(self) -> str:
        """One line: which rank raised what."""
        return f"rank {self.rank} of {self.world_size} raised {self.exc_type}: {self.message}"


def _importable_name(fn: Callable) -> tuple[str, str]:
    """``(module, qualname)`` by which a fresh process finds ``fn``, or a ``TypeError`` saying why it cannot."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not callable(fn) or module is None or qualname is None:
        raise TypeError(f"fn must be a function, got {type(fn).__name__}")
    if module == "__main__" or "<" in qualname:
        raise TypeError(
            f"fn={qualname!r} from module {module!r} cannot be found by a fresh worker process: define it at the "
            "top level of an importable module (a notebook cell, a script's __main__, a lambda or a nested "
            "function do not work)")
    return module, qualname


def _resolve(module: str, qualname: str) -> Callable:
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _send(conn: Connection, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(obj))  # plain pickle: tensors by value (no shared-memory handles)


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _shutdown(zygote: list[subprocess.Popen], conns: list[Connection], folder: str, graceful: bool) -> None:
    """Stop the workers (ask them to leave the process group first if ``graceful``), kill whatever is left of
    the cluster's process group (the zygote and its workers), then delete ``folder``."""
    if graceful:
        for conn in conns:
            try:
                _send(conn, ("stop",))
            except OSError:
                pass
        try:
            zygote[0].wait(_STOP_GRACE_S)  # the zygote exits once every worker has
        except (subprocess.TimeoutExpired, IndexError):
            pass
    for proc in zygote:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the zygote and the workers it forked
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    for conn in conns:
        conn.close()
    shutil.rmtree(folder, ignore_errors=True)


class LocalCluster:
    """``world_size`` local worker processes in one process group, kept alive between :meth:`run` calls.

    backend: ``"gloo"`` (CPU) or ``"nccl"`` (rank ``r`` uses GPU ``r``). threads: CPU threads per worker
    (``torch.set_num_threads`` and ``OMP_NUM_THREADS``). timeout: seconds allowed for starting the workers and,
    by default, for each :meth:`run`; also the process group's own timeout. ``startup_s``: how long starting
    took (process launch, ``import torch``, joining the process group).
    """

    def __init__(self, world_size: int, *, backend: str = "gloo", threads: int = 1, timeout: float = 300.0):
        check_int("world_size", world_size, 1)
        check_choice("backend", backend, BACKENDS)
        check_int("threads", threads, 1)
        check_number("timeout (seconds)", timeout, 0, low_open=True)
        world_size, threads = int(world_size), int(threads)
        self.world_size, self.backend, self.timeout = world_size, backend, float(timeout)
        self.closed = False
        start = time.perf_counter()
        self._folder = tempfile.mkdtemp(prefix="moe_lab_cluster_")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        search_path = [os.getcwd() if p == "" else p for p in sys.path]
        self._zygote: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._zygote, self._conns, self._folder, False)
        theirs: list[Connection] = []
        try:
            for _ in range(world_size):
                mine, other = Pipe()
                self._conns.append(mine)
                theirs.append(other)
            fds = [str(c.fileno()) for c in theirs]
            try:
                with open(os.path.join(self._folder, "zygote.log"), "wb") as log:
                    self._zygote.append(subprocess.Popen(
                        [sys.executable, "-c", _BOOT, self._folder, *fds], pass_fds=[c.fileno() for c in theirs],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                        start_new_session=True))
            finally:
                for other in theirs:
                    other.close()  # only the workers keep these ends: a dead worker closes its pipe
            for rank, conn in enumerate(self._conns):
                _send(conn, {"rank": rank, "world_size": world_size, "backend": backend, "threads": threads,
                             "timeout": self.timeout, "init_method": f"file://{self._folder}/rendezvous",
                             "sys_path": search_path})
            self._gather("starting the workers", self.timeout)
        except BaseException:
            self._abort()
            raise
        self.startup_s = time.perf_counter() - start

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on every rank at once; return the results in rank order.

        Raises :class:`WorkerError` if a rank raises or dies, :class:`TimeoutError` after ``timeout`` seconds
        (default: the cluster's); both close the cluster.
        """
        if self.closed:
            raise RuntimeError("this LocalCluster is closed (after close() or a failed run): start a new one")
        module, qualname = _importable_name(fn)
        if timeout is not None:
            check_number("timeout (seconds)", timeout, 0, low_open=True)
        try:
            for conn in self._conns:
                _send(conn, ("run", module, qualname, args, kwargs))
            return self._gather(f"{qualname}()", self.timeout if timeout is None else timeout)
        except BaseException:  # a failure, a timeout, or the user interrupting the notebook
            self._abort()
            raise

    def _gather(self, what: str, timeout: float) -> list[Any]:
        """One reply from every rank, or the root-cause failure once it is clear (see :meth:`_root_cause`)."""
        results: dict[int, Any] = {}
        errors: dict[int, tuple[float, WorkerError]] = {}  # rank -> (when it failed, error)
        pending = dict(enumerate(self._conns))
        deadline = time.monotonic() + timeout
        while pending:
            if errors:
                deadline = min(deadline, first_error_at + _ERROR_GRACE_S)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for conn in wait(list(pending.values()), timeout=remaining):
                rank = next(r for r, c in pending.items() if c is conn)
                del pending[rank]
                try:
                    reply = _recv(conn)
                except (EOFError, OSError):
                    reply = ("died",)
                if reply[0] == "ok":
                    results[rank] = reply[1]
                    continue
                if not errors:
                    first_error_at = time.monotonic()
                if reply[0] == "error":
                    *fields, failed_at = reply[1:]
                    errors[rank] = (failed_at, WorkerError(rank, self.world_size, *fields))
                else:  # a dead process is a root cause: it sorts first
                    errors[rank] = (float("-inf"), WorkerError(
                        rank, self.world_size, "ProcessExit", "the worker process died (its pipe closed)",
                        self._log_tail(rank)))
        if errors:
            raise self._root_cause(errors)
        if pending:
            raise TimeoutError(
                f"{what} did not finish within {timeout:.1f} s: rank(s) {sorted(pending)} of {self.world_size} still "
                f"running (finished: {sorted(results)}). A rank that waits in a collective its peers never join "
                "hangs until a timeout: every rank must make the same collective calls in the same order")
        return [results[r] for r in range(self.world_size)]

    @staticmethod
    def _root_cause(errors: dict[int, tuple[float, WorkerError]]) -> WorkerError:
        """The failure to report: a dead worker, else the earliest exception (the others are usually its
        consequences, e.g. peers losing their connection); the same error on several ranks: the lowest rank."""
        first = min(errors.values(), key=lambda item: item[0])[1]
        same = [e for _, e in errors.values() if (e.exc_type, e.message) == (first.exc_type, first.message)]
        cause = min(same if first.exc_type != "ProcessExit" else [first], key=lambda e: e.rank)
        alike = sorted(e.rank for e in same if e is not cause)
        others = sorted(r for r in errors if r != cause.rank and r not in alike)
        notes = ([f"rank(s) {alike} raised the same"] if alike else []) + (
            [f"rank(s) {others} failed too, probably as a consequence"] if others else [])
        if notes:
            cause.args = (cause.args[0] + f"\n({'; '.join(notes)})",)
        return cause

    def _log_tail(self, rank: int, chars: int = 2000) -> str:
        """The end of what rank ``rank`` printed (or of the zygote's output, if it died before forking)."""
        for name in (f"{rank}.log", "zygote.log"):
            try:
                text = Path(self._folder, name).read_text(errors="replace")
            except OSError:
                continue
            if text:
                return text[-chars:]
        return ""

    def _abort(self) -> None:
        self.closed = True
        self._finalizer.detach()
        _shutdown(self._zygote, self._conns, self._folder, graceful=False)

    def close(self) -> None:
        """Let the workers leave the process group and exit (killed after a grace period). Idempotent."""
        if not self.closed:
            self.closed = True
            self._finalizer.detach()
            _shutdown(self._zygote, self._conns, self._folder, graceful=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running"
        return f"LocalCluster(world_size={self.world_size}, backend={self.backend!r}, {state})"


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", threads: int = 1,
              timeout: float = 300.0) -> list[Any]:
    """``fn(*args)`` on ``world_size`` fresh local processes in one process group; the results in rank order.

    ``timeout`` bounds starting the workers and the call, each. Errors as :meth:`LocalCluster.run`.
    """
    _importable_name(fn)  # before any process starts
    with LocalCluster(world_size, backend=backend, threads=threads, timeout=timeout) as cluster:
        return cluster.run(fn, *args)


def _zygote_main(argv: list[str]) -> None:
    """``argv = [folder, fd_0, ..., fd_{P-1}]``: import torch once, fork one worker per pipe, wait for them."""
    import torch  # noqa: F401  (the expensive part, done once for all workers)
    import torch.distributed  # noqa: F401

    import moe_lab.parallel  # noqa: F401  (what workers usually run; importing it starts no threads)

    folder, fds = argv[0], [int(fd) for fd in argv[1:]]
    children = []
    for rank, fd in enumerate(fds):
        pid = os.fork()
        if pid == 0:
            for other in fds:
                if other != fd:
                    os.close(other)
            log = os.open(os.path.join(folder, f"{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 1
            try:
                _worker_main(fd)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # no interpreter teardown: fast, and nothing of the zygote's runs twice
        children.append(pid)
    for fd in fds:
        os.close(fd)  # only the workers hold their pipe ends: a dead worker shows up as a closed pipe
    for pid in children:
        os.waitpid(pid, 0)


def _worker_main(fd: int) -> None:
    """A worker: join the process group, then run the parent's calls until told to stop or the parent goes."""
    conn = Connection(fd)
    setup = _recv(conn)
    sys.path[:] = setup["sys_path"]
    import torch
    import torch.distributed as dist

    torch.set_num_threads(setup["threads"])
    try:
        if setup["backend"] == "nccl":
            torch.cuda.set_device(setup["rank"])
        dist.init_process_group(setup["backend"], init_method=setup["init_method"], rank=setup["rank"],
                                world_size=setup["world_size"], timeout=timedelta(seconds=setup["timeout"]))
    except BaseException as err:
        _send(conn, ("error", type(err).__name__, str(err), traceback.format_exc(), time.time()))
        return
    _send(conn, ("ok", None))
    while True:
        try:
            message = _recv(conn)
        except (EOFError, OSError):  # the parent has gone: leave without waiting for peers
            return
        if message[0] == "stop":
            break
        _, module, qualname, args, kwargs = message
        try:
            payload = pickle.dumps(("ok", _resolve(module, qualname)(*args, **kwargs)))
        except BaseException as err:
            payload = pickle.dumps(("error", type(err).__name__, str(err), traceback.format_exc(), time.time()))
        conn.send_bytes(payload)
    dist.barrier()  # no rank closes its connections while a peer may still be reading from them
    dist.destroy_process_group()
