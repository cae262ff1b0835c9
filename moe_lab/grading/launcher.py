"""The grading kernel: ``python launcher.py LIMITS_JSON FD_IN FD_OUT``, started by the grader inside a submission's
sandbox (:mod:`moe_lab.grading.sandbox`), with the answer-free ``moe_lab`` (:mod:`moe_lab.grading.build`) first
on its path.

Before any student code runs it sets its resource limits, points standard input and output at ``/dev/null``, loads
the integrity guard and the calling code from their files (not through ``moe_lab``, which the student may patch),
gives every thread started from now on the guard's profile hook, and creates an IPython shell. Then it serves the
grader over two pipes the grader created (``FD_IN``, ``FD_OUT``), one request at a time; nothing else reaches it
(no files, no sockets, no audit events, nothing the notebook's namespace or IPython's hooks can rewrite):

- ``{"op": "run", "id", "code", "cell"}`` runs a code cell (as code cell number ``cell``) and answers
  ``{"op": "ran", "id", "outcome": "ok" | "error", "ename"}``;
- ``{"op": "call", "id", "function", "allow"}`` with the cases (``torch.save`` bytes) as payload runs the
  function of that name on each case under the guard and answers ``{"op": "called", "id", "integrity",
  "missing"?}`` with the records (``torch.save`` bytes) as payload.

A frame is ``struct ">II"`` (header and payload lengths), the JSON header, then the payload. ``SIGINT`` interrupts
the request being served (and nothing else). Everything in this process can be reached by the student's code; the
sandbox and the answer-free library are what contain it, the guard is defence in depth.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import struct
import sys

FRAME = struct.Struct(">II")
_read, _write = os.read, os.write


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encode(header: dict, payload: bytes = b"") -> bytes:
    """One frame: lengths, the JSON header, the payload."""
    head = json.dumps(header).encode()
    return FRAME.pack(len(head), len(payload)) + head + payload


class Channel:
    """The kernel's end of the two pipes: blocking reads and writes of whole frames."""

    def __init__(self, fd_in: int, fd_out: int):
        self.fd_in, self.fd_out = fd_in, fd_out

    def _exactly(self, n: int) -> bytes | None:
        chunks = []
        while n > 0:
            chunk = _read(self.fd_in, min(n, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> tuple[dict, bytes] | None:
        """The next request, or ``None`` when the grader closed its end."""
        lengths = self._exactly(FRAME.size)
        if lengths is None:
            return None
        head, size = FRAME.unpack(lengths)
        header, payload = self._exactly(head), self._exactly(size) if size else b""
        if header is None or payload is None:
            return None
        return json.loads(header), payload

    def send(self, header: dict, payload: bytes = b"") -> None:
        data = memoryview(encode(header, payload))
        while data:
            data = data[_write(self.fd_out, data):]


class Handler:
    """Serves the grader's requests: cells run in the IPython shell, graded calls under the integrity guard."""

    def __init__(self, integrity, calls, package_dir: str):
        self.integrity, self.calls = integrity, calls
        self.table = integrity.CodeTable(package_dir)
        self.busy = False

    def interrupt(self, signum, frame) -> None:
        """SIGINT: stop the request being served (a cell or a call that runs too long); ignored between requests."""
        if self.busy:
            raise KeyboardInterrupt

    def run(self, shell, code: str, cell: int) -> dict:
        shell.execution_count = cell
        result = shell.run_cell(code, store_history=True)
        error = result.error_before_exec or result.error_in_exec
        if error is None:
            return {"outcome": "ok"}
        return {"outcome": "error", "ename": self.calls._name(type(error))}

    def call(self, namespace: dict, name: str, allow, payload: bytes) -> tuple[dict, bytes]:
        """Run the function ``name`` of ``namespace`` on the cases in ``payload``: (header, records)."""
        header, body = {}, b""
        guard = self.integrity.Guard(tuple(str(a) for a in allow), self.table)
        with guard:
            import torch

            fn = dict.get(namespace, name)
            if fn is None or not callable(fn):
                header["missing"] = self.calls._name(type(fn))
            else:
                cases = torch.load(io.BytesIO(payload), weights_only=True)
        if "missing" not in header:
            records = []
            for case in cases:
                records.append(self.calls.run_case(fn, case, guard))
                if guard.violation or guard.tamper or any(k in records[-1] for k in self.calls.FINAL):
                    break  # the verdict is known: the later cases do not change it
            with guard:
                buffer = io.BytesIO()
                torch.save(records, buffer)
                body = buffer.getvalue()
        header["integrity"] = {"violation": guard.violation, "tamper": guard.tamper}
        return header, body

    def serve(self, shell, channel: Channel) -> None:
        namespace = shell.user_ns
        while True:
            request = channel.receive()
            if request is None:
                return
            header, payload = request
            reply, body = {"id": header.get("id")}, b""
            self.busy = True
            try:
                if header.get("op") == "run":
                    reply.update(op="ran", **self.run(shell, str(header["code"]), int(header["cell"])))
                elif header.get("op") == "call":
                    more, body = self.call(namespace, str(header["function"]), header.get("allow", ()), payload)
                    reply.update(op="called", **more)
            except KeyboardInterrupt:
                reply.update(op="interrupted")
            finally:
                self.busy = False
            channel.send(reply, body)


def _limit(resource, which: int, value: int) -> None:
    if value > 0:
        hard = resource.getrlimit(which)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def main() -> None:
    import resource

    limits, fd_in, fd_out = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    _limit(resource, resource.RLIMIT_DATA, limits.get("memory", 0))
    _limit(resource, resource.RLIMIT_NPROC, limits.get("processes", 0))
    _limit(resource, resource.RLIMIT_NOFILE, limits.get("files", 0))
    _limit(resource, resource.RLIMIT_FSIZE, limits.get("file_size", 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checks = os.path.join(package_dir, "checks")
    integrity = _load("_moe_lab_grader_integrity", os.path.join(checks, "integrity.py"))
    calls = _load("_moe_lab_grader_calls", os.path.join(checks, "calls.py"))
    handler = Handler(integrity, calls, package_dir)
    integrity.trust(integrity.trusted_codes(vars(calls), globals()))
    signal.signal(signal.SIGINT, handler.interrupt)
    integrity.keep_signal_handler(handler.interrupt)
    integrity.hook_all_threads()
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p not in ("", here)]
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.ask_exit = lambda: None  # exit() / quit() in a cell must not end the kernel
    cells = shell.compile._filename_map  # code name -> execution count, which run() sets to the code cell number
    shell.compile.format_code_name = lambda name: ("code cell", str(cells[name])) if name in cells else None
    channel = Channel(fd_in, fd_out)
    channel.send({"op": "ready"})
    handler.serve(shell, channel)


if __name__ == "__main__":
    main()
