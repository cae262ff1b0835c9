"""The grader's kernel launcher: ``python launcher.py MEMORY_BYTES KEY_FILE PACKAGE_DIR -f CONNECTION_FILE``.

Runs in the kernel process before any student code: sets the memory limit, reads (and deletes) the key that
signs replies, loads the integrity guard and the calling code from their files (not through ``moe_lab``, which
the student may patch), gives every thread started from now on the guard's profile hook, and installs an audit
hook that serves the grader's calls. Then it starts the IPython kernel.

A graded call is the audit event ``moe_lab.grader.call`` (see :func:`moe_lab.grading.protocol.request`); its
reply file is a JSON header line (nonce, integrity report, HMAC-SHA256 of header and body with the key) followed
by the records, saved with ``torch.save``. A reply that is missing or whose signature does not verify means the
notebook interfered with the call.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys

from _hashlib import hmac_digest

CALL_EVENT = "moe_lab.grader.call"
_open, _write, _close = os.open, os.write, os.close


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sign(key: bytes, header: dict, body: bytes) -> str:
    """The signature of a reply: HMAC-SHA256 over the header (without ``mac``, canonical JSON) and the body."""
    text = json.dumps({k: v for k, v in header.items() if k != "mac"}, sort_keys=True).encode()
    return hmac_digest(key, text + b"\n" + body, "sha256").hex()


class Handler:
    """Serves the grader's calls in the kernel: each runs the student's function on the cases under a guard."""

    __cantrace__ = True  # profile hooks see the calls made inside this audit hook (CPython skips them otherwise)

    def __init__(self, integrity, calls, key: bytes, package_dir: str):
        self.integrity, self.calls, self._key = integrity, calls, key
        self.table = integrity.CodeTable(package_dir)
        self.busy = False

    def __call__(self, event: str, args: tuple) -> None:
        if event == CALL_EVENT and not self.busy and len(args) == 6:
            self.busy = True
            try:
                self.call(*args)
            finally:
                self.busy = False

    def call(self, namespace, name, cases_path, out_path, nonce, allow) -> None:
        header, body = {"nonce": str(nonce)}, b""
        guard = self.integrity.Guard(tuple(str(a) for a in allow), self.table)
        with guard:
            import torch

            fn = dict.get(namespace, name) if isinstance(namespace, dict) else None
            if fn is None or not callable(fn):
                header["missing"] = str(type(fn).__name__)[:100]
            else:
                cases = torch.load(str(cases_path), weights_only=True)
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
        header["mac"] = sign(self._key, header, body)
        fd = _open(str(out_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        try:
            data = json.dumps(header).encode() + b"\n" + body
            while data:
                data = data[_write(fd, data):]
        finally:
            _close(fd)


def main() -> None:
    import resource

    limit, key_path, package_dir = int(sys.argv.pop(1)), sys.argv.pop(1), sys.argv.pop(1)
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    with open(key_path, "rb") as f:
        key = f.read()
    os.unlink(key_path)
    checks = os.path.join(package_dir, "checks")
    integrity = _load("_moe_lab_grader_integrity", os.path.join(checks, "integrity.py"))
    calls = _load("_moe_lab_grader_calls", os.path.join(checks, "calls.py"))
    handler = Handler(integrity, calls, key, package_dir)
    del key
    integrity.trust(integrity.trusted_codes(vars(calls), globals()))
    integrity.hook_all_threads()
    sys.addaudithook(handler)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p not in ("", here)]
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
