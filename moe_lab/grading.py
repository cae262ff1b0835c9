"""Instructor grading: run every submitted exercise notebook in its own kernel and score its functions with the
grader's own checks (visible and hidden cases, fresh seed), never with what the notebook printed.

    moe-lab grade SUBMISSIONS... [--out grades.csv] [--feedback DIR] [--jobs N] [--timeout S] [--cell-timeout S]
                  [--call-timeout S] [--memory MB] [--seed N]
    moe-lab grade --validate      # every solution scores full marks and every unmodified exercise scores zero

How a submission is graded (the threat model is in README.md, "For instructors"):
1. The notebook is read as plain JSON; its metadata (written by ``moe-lab course build``) names the exercise
   notebook. Which exercises it has and which function each needs come from the grader's registry, never from the
   submission.
2. Its code cells run in a fresh kernel (own process group, temporary working directory, memory limit), each cell
   with a time limit and the whole notebook with a total limit. An exception moves on to the next cell; a cell
   that hangs through an interrupt or kills the kernel is skipped and the notebook is replayed in a new kernel.
3. The grader process, which never runs student code, builds the cases and reference answers (``moe_lab`` as it
   was imported before any kernel started) and writes the inputs to a file. A short call in the kernel loads
   them, calls the student's function and saves what it returned; the grader loads that file with
   ``torch.load(weights_only=True)`` (data only, no code) and compares it with its references. Patching
   ``moe_lab``, the checker or torch inside the kernel therefore changes nothing the grader computes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checks import REGISTRY
from .checks.core import (NOT_DIFFERENTIABLE, STUB_MESSAGE, Case, CheckResult, Exercise, Reference, compare,
                          compare_gradients, exercise_cases, reference_answer)

ROOT = Path(__file__).resolve().parent.parent
MAX_RESTARTS = 3          # fresh kernels per submission after a cell or a call hangs or kills the kernel
INTERRUPT_GRACE = 5.0     # seconds a kernel gets to stop after an interrupt before it is killed
MAX_NOTEBOOK_BYTES = 50 * 2**20
MAX_RESULT_BYTES = 256 * 2**20


@dataclass
class Limits:
    """Resource limits for one submission. ``total``: seconds to execute the notebook (replays included);
    ``cell``: seconds per cell; ``call``: seconds to run one exercise's cases (visible and hidden) through the
    student's function; ``memory_mb``: the kernel's ``RLIMIT_DATA`` (heap and private writable memory; not
    an address-space limit, which the CUDA build of torch exceeds just by loading its libraries), 0 = none."""

    total: float = 300.0
    cell: float = 60.0
    call: float = 120.0
    memory_mb: int = 4096
    threads: int = 1


# --------------------------------------------------------------------------------------------- references


@dataclass
class GradedCase:
    """A case (visible or hidden) with the grader's reference answer."""

    case: Case
    hidden: bool
    ref: Reference


def reference_cases(ex: Exercise, seed: int) -> list[GradedCase]:
    """The visible then hidden cases of ``ex`` for ``seed``, with the reference outputs and gradients
    (the same cases and cotangents as ``run_check(ex.id, fn, hidden=True, seed=seed)``)."""
    return [GradedCase(case, hidden, reference_answer(ex, case)) for case, hidden in exercise_cases(ex, seed, True)]


def _exercise_key(exercise_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in exercise_id.split("."))


def course_notebooks(root: Path = ROOT) -> dict[str, str]:
    """Exercise-notebook prefix (``"02"``) -> notebook name, for every prefix with registered exercises."""
    prefixes = {ex_id.split(".")[0] for ex_id in REGISTRY}
    names = {}
    for folder in ("solutions", "exercises"):
        for path in sorted((root / folder).glob("[0-9][0-9]_*.ipynb")):
            names.setdefault(path.stem[:2], path.stem)
    return {p: names.get(p, p) for p in sorted(prefixes)}


def exercises_of(prefix: str) -> list[Exercise]:
    """The registered exercises of notebook ``prefix`` in order (``02.1``, ``02.2``, ...)."""
    return sorted((ex for ex in REGISTRY.values() if ex.id.split(".")[0] == prefix), key=lambda e: _exercise_key(e.id))


# --------------------------------------------------------------------------------------------- the kernel

_LAUNCH = """\
import resource, sys
limit = int(sys.argv.pop(1))
if limit > 0:
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
if sys.path and sys.path[0] == "":
    del sys.path[0]
from ipykernel import kernelapp
kernelapp.launch_new_instance()
"""


@dataclass
class Outcome:
    """What running one piece of code did: ``kind`` is ``ok``, ``error`` (with ``ename``), ``timeout``
    (the kernel stopped after an interrupt), ``hung`` (it did not: killed) or ``dead`` (the kernel died)."""

    kind: str
    ename: str = ""


class KernelSession:
    """One fresh kernel in its own process group: run code with a time limit, discarding its output."""

    def __init__(self, cwd: Path, limits: Limits):
        from jupyter_client import KernelManager

        # CPU only: the grader's references are CPU tensors, and one GPU is not shared among parallel kernels
        env = {**os.environ, "MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(limits.threads)
        self.km = KernelManager(kernel_name="python3")
        self.km.kernel_spec.argv[:] = [sys.executable, "-c", _LAUNCH, str(limits.memory_mb * 2**20),
                                       "-f", "{connection_file}"]
        self.km.start_kernel(cwd=str(cwd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=60)
        except RuntimeError:
            self.shutdown()
            raise
        # exit() / quit() in a cell would stop the kernel a moment later, in the middle of another cell
        self.run("get_ipython().ask_exit = lambda: None", 30)

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
        try:
            self.kc.stop_channels()
        finally:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)


# --------------------------------------------------------------------------------------------- one submission

_CALL = '''\
def _moe_lab_grader_call(name, cases_path, out_path):
    import torch

    def text(err):
        try:
            return f"{type(err).__name__}: {err}"[:300]
        except Exception:
            return type(err).__name__

    def plain(v, depth=0):
        if depth > 20:
            raise ValueError("the output is nested too deeply")
        if isinstance(v, torch.Tensor):
            return v.detach().as_subclass(torch.Tensor).clone()
        if v is None or isinstance(v, bool):
            return v
        for kind in (int, float, str):
            if isinstance(v, kind):
                return kind(v)
        if isinstance(v, (tuple, list)):
            return (tuple if isinstance(v, tuple) else list)(plain(x, depth + 1) for x in v)
        return {"__unsupported__": type(v).__name__}

    fn = globals().get(name)  # the kernel's user namespace
    if fn is None or not callable(fn):
        torch.save({"missing": type(fn).__name__}, out_path)
        return
    records = []
    for case in torch.load(cases_path, weights_only=True):
        args, rec = list(case["args"]), {}
        for i in case["grad_wrt"]:
            args[i] = args[i].detach().requires_grad_(True)
        try:
            got = fn(*args, **case["kwargs"])
            rec["out"] = plain(got)
        except NotImplementedError as err:
            if str(err) in ("", STUB_MESSAGE):
                rec["not_implemented"] = True
            else:
                rec["raised"] = text(err)
        except (Exception, SystemExit) as err:
            rec["raised"] = text(err)
        else:
            out = got[0] if isinstance(got, (tuple, list)) and got else got
            if case["grad_wrt"] and not (isinstance(out, torch.Tensor) and out.requires_grad):
                rec["grad_error"] = NOT_DIFFERENTIABLE
            elif case["grad_wrt"]:
                try:
                    grads = torch.autograd.grad((out * case["weights"].to(out.dtype)).sum(),
                                                [args[i] for i in case["grad_wrt"]], allow_unused=True)
                    rec["grads"] = [None if g is None else plain(g) for g in grads]
                except (Exception, SystemExit) as err:
                    rec["grad_error"] = f"computing the gradients raised {text(err)}"
        records.append(rec)
    module = str(getattr(fn, "__module__", None) or "")
    torch.save({"records": records, "module": module}, out_path)
'''.replace("STUB_MESSAGE", repr(STUB_MESSAGE)).replace("NOT_DIFFERENTIABLE", repr(NOT_DIFFERENTIABLE))


class _Unsupported:
    """Stands for a returned object of a type the grader does not load (its name shows in the verdict)."""


def _revive(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__unsupported__"}:
        return type(str(value["__unsupported__"]), (_Unsupported,), {"__repr__": lambda self: "<object>"})()
    if isinstance(value, (tuple, list)):
        return type(value)(_revive(v) for v in value)
    return value


def _gradient_problem(ex: Exercise, item: GradedCase, rec: dict) -> str | None:
    if rec.get("grad_error"):
        return str(rec["grad_error"])
    grads = rec.get("grads")
    if not (isinstance(grads, list) and len(grads) == len(item.case.grad_wrt)):
        return "the grader could not read the gradients of your function"
    return compare_gradients(ex, item.case, item.ref, [None if g is None else _revive(g) for g in grads])


def judge(ex: Exercise, cases: list[GradedCase], records: list[dict]) -> CheckResult:
    """Compare what the student's function returned (``records``, one per case) with the references."""
    result = CheckResult(ex.id, ex.function, "failed", 0, ex.points, 0, len(cases))
    if not (isinstance(records, list) and len(records) == len(cases) and all(isinstance(r, dict) for r in records)):
        result.status, result.message = "error", "the grader could not read what your function returned"
        return result
    for item, rec in zip(cases, records):
        case = item.case
        if rec.get("not_implemented"):
            result.status = "not implemented"
            return result
        if "raised" in rec:
            problem = f"raised {rec['raised']}"
        else:
            problem = compare(item.ref.expected, _revive(rec.get("out")), ex.rtol, ex.atol)
            if not problem and case.grad_wrt:
                problem = _gradient_problem(ex, item, rec)
        if problem:
            kind = "hidden" if item.hidden else "visible"
            result.message = f"{kind} case '{case.name}' failed: {problem}. Hint: {ex.hint}"
            return result
        result.passed_cases += 1
    result.status, result.points = "passed", ex.points
    return result


@dataclass
class Submission:
    """The grade of one input file."""

    label: str
    path: Path
    notebook: str = ""
    status: str = "graded"
    results: dict[str, CheckResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    max_total: int | None = None
    seconds: float = 0.0

    @property
    def total(self) -> float:
        return sum(r.points for r in self.results.values())


def read_submission(path: Path) -> dict:
    """The notebook as a dict; ``ValueError`` if the file is not a readable notebook."""
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"file larger than {MAX_NOTEBOOK_BYTES // 2**20} MB")
    try:
        nb = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not a notebook ({type(err).__name__})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError("not a notebook (no list of cells)")
    return nb


def identify(nb: dict, filename: str, notebooks: dict[str, str]) -> str | None:
    """The prefix of the exercise notebook ``nb`` is: from its ``moe_lab`` metadata, else from a course
    notebook name inside ``filename``; ``None`` if neither names a notebook with exercises."""
    meta = nb.get("metadata")
    meta = meta.get("moe_lab") if isinstance(meta, dict) else None
    name = meta.get("notebook") if isinstance(meta, dict) else None
    if isinstance(name, str) and name[:2] in notebooks:
        return name[:2]
    found = [p for p, full in notebooks.items() if full in filename]
    return found[0] if len(found) == 1 else None


def code_cells(nb: dict) -> list[str]:
    """Source of every code cell, in order."""
    sources = []
    for cell in nb["cells"]:
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            src = cell.get("source", "")
            sources.append("".join(src) if isinstance(src, list) else str(src))
    return sources


def _cell_name(i: int, source: str) -> str:
    first = next((line.strip() for line in source.splitlines() if line.strip()), "")
    return f"code cell {i + 1} ({first[:40]!r})"


class _Runner:
    """Executes one submission's cells, replaying them in a fresh kernel when a cell hangs or kills it."""

    def __init__(self, cells: list[str], work: Path, limits: Limits, sub: Submission):
        self.cells, self.work, self.limits, self.sub = cells, work, limits, sub
        self.deadline = time.monotonic() + limits.total
        self.skip: set[int] = set()
        self.reported: set[int] = set()  # cells whose error is already noted (re-runs repeat them)
        self.kernels_left = 1 + MAX_RESTARTS
        self.session: KernelSession | None = None

    def _event(self, status: str, note: str) -> None:
        if self.sub.status == "graded":
            self.sub.status = status
        self.sub.notes.append(note)

    def start(self) -> bool:
        """Run the notebook (the cells not skipped) in a fresh kernel; ``False`` if no kernel is left."""
        while self.kernels_left > 0:
            self.close()
            self.kernels_left -= 1
            try:
                self.session = KernelSession(self.work, self.limits)
            except Exception as err:  # no kernel: the submission still gets its row
                self._event("crashed", f"the kernel did not start: {err}")
                return False
            fatal = self._run_cells()
            if fatal is None:
                return True
            self.skip.add(fatal)
        self.close()
        self.sub.notes.append(f"gave up after {MAX_RESTARTS} restarts of the kernel")
        return False

    def _run_cells(self) -> int | None:
        for i, source in enumerate(self.cells):
            if i in self.skip:
                continue
            left = self.deadline - time.monotonic()
            if left <= 0:
                self._event("timeout", f"total time limit of {self.limits.total:g} s reached before "
                                       f"{_cell_name(i, source)}; later cells were not run")
                return None
            outcome = self.session.run(source, min(self.limits.cell, left))
            name = _cell_name(i, source)
            if outcome.kind == "error" and i not in self.reported:
                self.reported.add(i)
                self.sub.notes.append(f"{name} raised {outcome.ename}")
            elif outcome.kind == "timeout":
                self.skip.add(i)  # a re-run in a fresh kernel leaves it out
                self._event("timeout", f"{name} timed out after {min(self.limits.cell, left):g} s and was interrupted")
            elif outcome.kind == "hung":
                self._event("timeout", f"{name} timed out and did not stop when interrupted: the kernel was killed, "
                                       "and the notebook re-run in a fresh kernel without that cell")
                return i
            elif outcome.kind == "dead":
                self._event("crashed", f"{name} killed the kernel; the notebook was re-run in a fresh kernel "
                                       "without that cell")
                return i
        return None

    def call(self, ex: Exercise, cases_path: Path, out_path: Path) -> tuple[dict | None, str]:
        """Call the student's function for ``ex`` on the cases in ``cases_path``: (loaded results, problem)."""
        if self.session is None or not self.session.alive():
            if self.deadline <= time.monotonic() or not self.start():
                return None, "not graded: no working kernel was left for it"
        out_path.unlink(missing_ok=True)
        code = _CALL + f"\n_moe_lab_grader_call({ex.function!r}, {str(cases_path)!r}, {str(out_path)!r})\n"
        outcome = self.session.run(code, self.limits.call)
        if outcome.kind in ("hung", "dead"):
            self.close()
            what = "killed the kernel" if outcome.kind == "dead" else "ran forever (it did not stop when interrupted)"
            return None, f"calling {ex.function} on the grader's cases {what}"
        if outcome.kind == "timeout":
            return None, f"calling {ex.function} on the grader's cases took longer than {self.limits.call:g} s"
        try:
            if out_path.stat().st_size > MAX_RESULT_BYTES:
                return None, f"what {ex.function} returned is larger than {MAX_RESULT_BYTES // 2**20} MB"
            return torch.load(out_path, weights_only=True, map_location="cpu"), ""
        except Exception as err:  # the call failed in the kernel, or left a file that is not plain data
            why = outcome.ename or type(err).__name__
            return None, f"the grader could not call {ex.function} in your kernel ({why})"

    def close(self) -> None:
        if self.session is not None:
            self.session.shutdown()
            self.session = None


def prepare(path: Path, label: str, notebooks: dict[str, str], prefix: str | None = None
            ) -> tuple[Submission, dict | None]:
    """Read and identify one file: its ``Submission`` (``unreadable`` / ``not-an-exercise``, or the notebook
    and its ``max_total`` set) and the notebook (``None`` if there is nothing to run). ``prefix`` forces it."""
    sub = Submission(label, path)
    try:
        nb = read_submission(path)
    except (OSError, ValueError) as err:
        sub.status = "unreadable"
        sub.notes.append(str(err))
        return sub, None
    prefix = prefix or identify(nb, path.name, notebooks)
    if prefix is None:
        sub.status = "not-an-exercise"
        sub.notes.append("no moe_lab metadata naming a course exercise notebook (submit the file from exercises/)")
        return sub, None
    sub.notebook, sub.max_total = notebooks[prefix], sum(ex.points for ex in exercises_of(prefix))
    return sub, nb


def grade_submission(sub: Submission, nb: dict, refs: dict[str, list[GradedCase]], limits: Limits) -> Submission:
    """Run a prepared submission's notebook in a fresh kernel and grade each of its exercises with ``refs``
    (exercise id -> reference cases); fills in and returns ``sub``."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="moe_lab_grade_") as tmp:
        grader, work = Path(tmp) / "grader", Path(tmp) / "work"
        grader.mkdir()
        work.mkdir()
        runner = _Runner(code_cells(nb), work, limits, sub)
        try:
            runner.start()
            for ex in exercises_of(sub.notebook[:2]):
                cases_path = grader / f"cases_{ex.id}.pt"
                _save_cases(refs[ex.id], cases_path)
                loaded, problem = runner.call(ex, cases_path, grader / f"out_{ex.id}.pt")
                sub.results[ex.id] = _verdict(ex, refs[ex.id], loaded, problem)
        finally:
            runner.close()
    sub.seconds = time.monotonic() - start
    return sub


def _save_cases(cases: list[GradedCase], path: Path) -> None:
    torch.save([{"args": list(c.case.args), "kwargs": c.case.kwargs, "grad_wrt": list(c.case.grad_wrt),
                 "weights": c.ref.weights} for c in cases], path)


def _verdict(ex: Exercise, cases: list[GradedCase], loaded: Any, problem: str) -> CheckResult:
    result = CheckResult(ex.id, ex.function, "error", 0, ex.points, 0, len(cases), problem)
    if problem:
        return result
    if not isinstance(loaded, dict):
        result.message = "the grader could not read what your function returned"
    elif "missing" in loaded:
        kind = loaded["missing"]
        result.message = (f"no function named {ex.function} is defined (renamed, deleted, or its cell failed?)"
                          if kind == "NoneType" else f"{ex.function} should be a function, got {kind}")
    elif str(loaded.get("module", "")).split(".")[0] == "moe_lab":
        result.status = "failed"
        result.message = f"{ex.function} is moe_lab's own implementation ({loaded['module']}), not yours"
    else:
        try:
            return judge(ex, cases, loaded.get("records"))
        except Exception as err:  # data the grader cannot compare: the student's problem, not a grader crash
            result.message = f"the grader could not compare what your function returned ({type(err).__name__})"
    return result


# --------------------------------------------------------------------------------------------- many submissions


def collect(inputs: list[Path]) -> list[tuple[Path, str]]:
    """(file, label) for every input file; folders are searched recursively, skipping hidden names.
    Labels are file names, or paths where names repeat; sorted by label."""
    found: list[tuple[Path, str]] = []
    for item in inputs:
        if item.is_dir():
            for path in sorted(item.rglob("*")):
                rel = path.relative_to(item)
                if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                    found.append((path, rel.as_posix()))
        else:
            found.append((item, item.name))
    labels = [label for _, label in found]
    found = [(p, label if labels.count(label) == 1 else str(p)) for p, label in found]
    return sorted(found, key=lambda pair: pair[1])


def grade_files(files: list[tuple[Path, str]], *, seed: int, limits: Limits, jobs: int = 1,
                prefixes: dict[str, str] | None = None, progress: bool = True) -> list[Submission]:
    """Grade ``(path, label)`` pairs, ``jobs`` at a time; ``prefixes`` (label -> notebook prefix) overrides
    identification. Always one ``Submission`` per file, in the order given."""
    notebooks = course_notebooks()
    prepared = [prepare(path, label, notebooks, (prefixes or {}).get(label)) for path, label in files]
    present = sorted({sub.notebook[:2] for sub, nb in prepared if nb is not None})
    refs = {ex.id: reference_cases(ex, seed) for p in present for ex in exercises_of(p)}  # before any thread
    done, lock = [0], threading.Lock()

    def one(item: tuple[Submission, dict | None]) -> Submission:
        sub, nb = item
        if nb is not None:
            try:
                grade_submission(sub, nb, refs, limits)
            except Exception as err:  # a grader bug must not cost the submission its row
                sub.status, sub.results = "grader-error", {}
                sub.notes.append(f"{type(err).__name__}: {err}")
        if progress:
            with lock:
                done[0] += 1
                score = f"{sub.total:g}/{sub.max_total}" if sub.max_total is not None else "-"
                print(f"[{done[0]}/{len(files)}] {sub.label}: {sub.status}, {score} ({sub.seconds:.1f} s)", flush=True)
        return sub

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, prepared))


def exercise_columns(subs: list[Submission]) -> list[str]:
    """Exercise ids of every notebook among ``subs``, in order."""
    prefixes = {s.notebook[:2] for s in subs if s.notebook}
    return [ex.id for p in sorted(prefixes) for ex in exercises_of(p)]


def _num(x: float) -> str:
    return f"{x:g}"


def write_csv(subs: list[Submission], path: Path) -> None:
    """One row per submission, sorted by its label."""
    columns = exercise_columns(subs)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["submission", "notebook", "status", *columns, "total", "max_total", "note"])
        for s in sorted(subs, key=lambda s: s.label):
            points = [_num(s.results[c].points) if c in s.results else "" for c in columns]
            max_total = "" if s.max_total is None else s.max_total
            writer.writerow([s.label, s.notebook, s.status, *points, _num(s.total), max_total, "; ".join(s.notes)])


def feedback_text(sub: Submission, seed: int) -> str:
    """A readable report for the student: every exercise's verdict, the failing case and the hint."""
    lines = [f"MoE Lab feedback for {sub.label}", ""]
    if sub.notebook:
        lines.append(f"Notebook: {sub.notebook}")
    lines.append(f"Status:   {sub.status}")
    if sub.max_total is not None:
        lines.append(f"Score:    {_num(sub.total)} / {sub.max_total}")
        lines += ["", "Each function was checked by the grader on the visible cases and on hidden cases",
                  f"(seed {seed}), independently of what your notebook printed.", ""]
        for ex_id in sorted(sub.results, key=_exercise_key):
            lines += [f"{ex_id} {REGISTRY[ex_id].title}", str(sub.results[ex_id]), ""]
    if sub.notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in sub.notes]
    return "\n".join(lines) + "\n"


def write_feedback(subs: list[Submission], folder: Path, seed: int) -> None:
    """``folder/<label>.txt`` per submission (``/`` in labels becomes ``__``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in subs:
        (folder / (re.sub(r"[\\/]", "__", sub.label) + ".txt")).write_text(feedback_text(sub, seed))


def summary(subs: list[Submission]) -> str:
    """Per-exercise mean score and pass rate, and counts per status (pandas tables as text)."""
    import pandas as pd

    rows = []
    for ex_id in exercise_columns(subs):
        got = [s.results[ex_id] for s in subs if ex_id in s.results]
        if not got:  # only grader errors for this notebook
            continue
        ex = REGISTRY[ex_id]
        rows.append({"exercise": ex_id, "function": ex.function, "points": ex.points, "submissions": len(got),
                     "mean score": round(sum(r.points for r in got) / len(got), 2),
                     "pass rate": round(sum(r.status == "passed" for r in got) / len(got), 2)})
    counts = pd.Series([s.status for s in subs]).value_counts().rename_axis("status").rename("submissions")
    table = pd.DataFrame(rows).to_string(index=False) if rows else "(no exercise notebooks)"
    return f"{table}\n\n{counts.to_frame().to_string()}"


# --------------------------------------------------------------------------------------------- validation


def validate(root: Path, *, seed: int, limits: Limits, jobs: int) -> list[str]:
    """Problems with the course as shipped (empty list: all good): every solution must score full marks,
    every unmodified exercise zero, and each exercise notebook must list exactly its registered exercises."""
    problems, files, prefixes = [], [], {}
    for folder in ("solutions", "exercises"):
        for path in sorted((root / folder).glob("[0-9][0-9]_*.ipynb")):
            label = f"{folder}/{path.name}"
            files.append((path, label))
            prefixes[label] = path.stem[:2]
            if folder == "exercises":
                meta = read_submission(path).get("metadata", {}).get("moe_lab", {})
                listed = meta.get("exercises", {})
                registered = {ex.id: ex.function for ex in exercises_of(path.stem[:2])}
                if listed != registered:
                    problems.append(f"{label}: its check cells cover {listed}, the registry has {registered}")
    if not files:
        return [f"no notebooks under {root / 'solutions'} or {root / 'exercises'}"]
    for sub in grade_files(files, seed=seed, limits=limits, jobs=jobs, prefixes=prefixes):
        want = sub.max_total if sub.label.startswith("solutions/") else 0
        if sub.status != "graded" or sub.total != want:
            bad = [str(r) for r in sub.results.values() if r.points != (r.max_points if want else 0)]
            problems.append(f"{sub.label}: {sub.status}, {_num(sub.total)}/{sub.max_total} (expected {want}); "
                            + " | ".join(bad + sub.notes))
    return problems


# --------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moe-lab grade", description="Grade submitted exercise notebooks into a CSV (and feedback files), each "
        "in its own kernel, with the grader's own visible and hidden cases (README: 'For instructors').")
    parser.add_argument("submissions", nargs="*", type=Path, help="folders (searched recursively) or files")
    parser.add_argument("--out", type=Path, default=Path("grades.csv"), help="CSV to write (default grades.csv)")
    parser.add_argument("--feedback", type=Path, help="write a feedback file per submission into this folder")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="submissions graded in parallel")
    parser.add_argument("--timeout", type=float, default=Limits.total,
                        help="seconds to execute one notebook (default %(default)s)")
    parser.add_argument("--cell-timeout", type=float, default=Limits.cell,
                        help="seconds per cell (default %(default)s)")
    parser.add_argument("--call-timeout", type=float, default=Limits.call,
                        help="seconds to run one exercise's grading cases through the student's function "
                             "(default %(default)s)")
    parser.add_argument("--memory", type=int, default=Limits.memory_mb,
                        help="memory limit of a kernel in MB (RLIMIT_DATA), 0 for none (default %(default)s)")
    parser.add_argument("--seed", type=int, help="seed of the grader's cases (default: a fresh random one)")
    parser.add_argument("--validate", action="store_true",
                        help="check that every solution scores full marks and every exercise zero")
    args = parser.parse_args(argv)
    if min(args.jobs, args.timeout, args.cell_timeout, args.call_timeout) <= 0 or args.memory < 0:
        parser.error("--jobs and the timeouts must be positive, --memory >= 0")
    if not args.validate and not args.submissions:
        parser.error("give submission folders or files (or --validate)")
    missing = [str(p) for p in args.submissions if not p.exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    limits = Limits(args.timeout, args.cell_timeout, args.call_timeout, args.memory, threads)
    print(f"grading seed: {seed}", flush=True)
    if args.validate:
        problems = validate(ROOT, seed=seed, limits=limits, jobs=args.jobs)
        for problem in problems:
            print(f"FAIL {problem}")
        print("validate: " + ("every solution scores full marks, every exercise zero" if not problems
                              else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    files = collect(args.submissions)
    subs = grade_files(files, seed=seed, limits=limits, jobs=args.jobs)
    write_csv(subs, args.out)
    if args.feedback:
        write_feedback(subs, args.feedback, seed)
    print(f"\n{summary(subs)}\n\nwrote {args.out}" + (f" and feedback in {args.feedback}/" if args.feedback else ""))
    return 0
