"""Running submissions: find the files, read and identify each notebook, execute its code cells in a kernel in
its sandbox (replaying it in a fresh one when a cell hangs or kills the kernel), and grade each exercise with one
call."""
from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import REGISTRY
from ..checks.core import CheckResult, Exercise, GradedCase
from ..course import CHECK_CALL
from . import protocol
from .build import cached_build
from .judge import reference_cases, verdict
from .kernel import PACKAGE, KernelSession, Limits
from .protocol import BadReply
from .sandbox import Sandbox

ROOT = PACKAGE.parent
MAX_RESTARTS = 3          # fresh kernels per submission after a cell or a call hangs or kills the kernel
MAX_NOTEBOOK_BYTES = 50 * 2**20


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
    """The notebook as a dict; ``ValueError`` if the file is not a readable notebook (never blocks: a FIFO or a
    device is refused)."""
    import json

    if path.is_symlink() and not path.exists():
        raise ValueError("a broken symbolic link")
    try:
        data = protocol.read_bounded(path.resolve(), MAX_NOTEBOOK_BYTES)
    except ValueError as err:
        raise ValueError(f"file {err}") from None
    try:
        nb = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"not a notebook ({type(err).__name__})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError("not a notebook (no list of cells)")
    return nb


def code_cells(nb: dict) -> tuple[list[str], list[str]]:
    """Source of every code cell, in order, and notes on malformed cells (graded around, never fatal): parts of a
    source that are not strings are left out, and characters that are not valid Unicode (lone surrogates) are
    run as ``\\u`` escapes."""
    sources, notes = [], []
    for cell in nb["cells"]:
        if not (isinstance(cell, dict) and cell.get("cell_type") == "code"):
            continue
        src, name = cell.get("source", ""), f"code cell {len(sources) + 1}"
        parts = src if isinstance(src, list) else [src]
        text = "".join(p for p in parts if isinstance(p, str))
        if any(not isinstance(p, str) for p in parts):
            notes.append(f"{name}: its source holds items that are not text; they were left out")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
            notes.append(f"{name}: its source holds characters that are not valid Unicode (lone surrogates); "
                         "they were run as \\u escapes")
        sources.append(text)
    return sources, notes


def identify(nb: dict, filename: str, notebooks: dict[str, str]) -> str | None:
    """The prefix of the exercise notebook ``nb`` is: from its ``moe_lab`` metadata, else from a course
    notebook name inside ``filename`` if the notebook has that notebook's check cells (a lecture notebook of the
    same name has none); ``None`` if neither names a notebook with exercises."""
    meta = nb.get("metadata")
    meta = meta.get("moe_lab") if isinstance(meta, dict) else None
    name = meta.get("notebook") if isinstance(meta, dict) else None
    if isinstance(name, str) and name[:2] in notebooks:
        return name[:2]
    found = [p for p, full in notebooks.items() if full in filename]
    if len(found) != 1:
        return None
    checked = {ex_id.split(".")[0] for src in code_cells(nb)[0] for ex_id, _ in CHECK_CALL.findall(src)}
    return found[0] if found[0] in checked else None


def _cell_name(i: int, source: str) -> str:
    first = next((line.strip() for line in source.splitlines() if line.strip()), "")
    return f"code cell {i + 1} ({first[:40]!r})"


class _Runner:
    """Executes one submission's cells, replaying them in a fresh kernel when a cell hangs or kills it."""

    def __init__(self, cells: list[str], build: Path, work: Path, limits: Limits, sandbox: Sandbox,
                 sub: Submission):
        self.cells, self.build, self.work, self.limits, self.sandbox, self.sub = cells, build, work, limits, sandbox, sub
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
                self.session = KernelSession(self.build, self.limits, self.sandbox, self.work)
            except Exception as err:  # no kernel: the submission still gets its row
                self._event("crashed", str(err))
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
            outcome = self.session.run(source, min(self.limits.cell, left), cell=i + 1)
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
                self._event("crashed", f"{name} killed the kernel{self.session.death()}; the notebook was re-run "
                                       "in a fresh kernel without that cell")
                return i
        return None

    def call(self, ex: Exercise, cases: list[GradedCase], payload: bytes) -> tuple[dict | None, str]:
        """Call the student's function for ``ex`` on the cases (``payload``): (checked reply, problem)."""
        if self.session is None or not self.session.alive():
            if self.deadline <= time.monotonic() or not self.start():
                return None, "not graded: no working kernel was left for it"
        self.session.kill_strays()
        outcome = self.session.call(ex.function, ex.allow, payload, self.limits.call)
        if outcome.kind in ("hung", "dead"):
            death = self.session.death()
            self.close()
            what = f"killed the kernel{death}" if outcome.kind == "dead" else \
                "ran forever (it did not stop when interrupted)"
            return None, f"calling {ex.function} on the grader's cases {what}"
        if outcome.kind == "timeout":
            return None, f"calling {ex.function} on the grader's cases took longer than {self.limits.call:g} s"
        if outcome.header.get("op") != "called":
            return None, f"the grader could not call {ex.function} in your kernel ({outcome.ename or 'no reply'})"
        try:
            return protocol.read_reply(outcome.header, outcome.payload, len(cases)), ""
        except BadReply as err:
            return None, f"the grader could not use what {ex.function} returned: {err}"

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
    prefix = prefix or identify(nb, label, notebooks)
    if prefix is None:
        sub.status = "not-an-exercise"
        sub.notes.append("not a course exercise notebook: no moe_lab metadata naming one and no check cells "
                         "(a lecture notebook?); submit the file from exercises/")
        return sub, None
    sub.notebook, sub.max_total = notebooks[prefix], sum(ex.points for ex in exercises_of(prefix))
    return sub, nb


def grade_submission(sub: Submission, nb: dict, refs: dict[str, list[GradedCase]], payloads: dict[str, bytes],
                     build: Path, limits: Limits, sandbox: Sandbox) -> Submission:
    """Run a prepared submission's notebook in a fresh kernel (in ``sandbox``, with the answer-free ``moe_lab`` in
    ``build``) and grade each of its exercises with ``refs`` (exercise id -> reference cases; ``payloads``: their
    inputs as the kernel takes them); fills in and returns ``sub``. An I/O error of the grader's is this
    submission's note: its exercises not graded yet say so."""
    start = time.monotonic()
    cells, notes = code_cells(nb)
    sub.notes += notes
    exercises = exercises_of(sub.notebook[:2])
    try:
        with tempfile.TemporaryDirectory(prefix="moe_lab_grade_") as tmp:
            runner = _Runner(cells, build, Path(tmp), limits, sandbox, sub)
            try:
                runner.start()
                for ex in exercises:
                    reply, problem = runner.call(ex, refs[ex.id], payloads[ex.id])
                    sub.results[ex.id] = verdict(ex, refs[ex.id], reply, problem)
            finally:
                runner.close()
    except OSError as err:
        sub.notes.append(f"the grader hit an I/O error on this submission ({err}); rerun it")
        for ex in exercises:
            sub.results.setdefault(ex.id, verdict(ex, refs[ex.id], None, "not graded: the grader hit an I/O error"))
    sub.seconds = time.monotonic() - start
    return sub


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (``os.fsdecode`` surrogates) shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def collect(inputs: list[Path]) -> list[tuple[Path, str]]:
    """(file, label) for every input file; folders are searched recursively (links to folders are not followed),
    skipping hidden names; every other entry (a broken link, a FIFO) is a file and gets a row. Labels are
    printable relative paths, or full paths where those repeat (numbered if they still do); sorted by label."""
    found: list[tuple[Path, str, str]] = []
    for item in inputs:
        if item.is_dir() and not item.is_symlink():
            for folder, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for file in sorted(files):
                    if not file.startswith("."):
                        path = Path(folder) / file
                        found.append((path, printable(path.relative_to(item).as_posix()), printable(str(path))))
        else:
            found.append((item, printable(item.name), printable(str(item))))
    short = [label for _, label, _ in found]
    labelled = [(p, label if short.count(label) == 1 else full) for p, label, full in found]
    seen: dict[str, int] = {}
    unique = []
    for path, label in labelled:
        seen[label] = seen.get(label, 0) + 1
        unique.append((path, label if seen[label] == 1 else f"{label} [{seen[label]}]"))
    return sorted(unique, key=lambda pair: pair[1])


def grade_files(files: list[tuple[Path, str]], *, seed: int, limits: Limits, sandbox: Sandbox, jobs: int = 1,
                prefixes: dict[str, str] | None = None, progress: bool = True) -> list[Submission]:
    """Grade ``(path, label)`` pairs, ``jobs`` at a time, each kernel in its own ``sandbox``; ``prefixes``
    (label -> notebook prefix) overrides identification. Always one ``Submission`` per file, in the order given."""
    notebooks = course_notebooks()
    prepared = [prepare(path, label, notebooks, (prefixes or {}).get(label)) for path, label in files]
    present = sorted({sub.notebook[:2] for sub, nb in prepared if nb is not None})
    builds = {p: cached_build(p, exercises_of(p), PACKAGE) for p in present}
    refs = {ex.id: reference_cases(ex, seed) for p in present for ex in exercises_of(p)}  # before any thread
    payloads = {ex_id: protocol.cases_payload(cases) for ex_id, cases in refs.items()}
    done, lock = [0], threading.Lock()

    def one(item: tuple[Submission, dict | None]) -> Submission:
        sub, nb = item
        if nb is not None:
            try:
                grade_submission(sub, nb, refs, payloads, builds[sub.notebook[:2]], limits, sandbox)
            except Exception as err:  # a grader bug must not cost the submission its row
                sub.status, sub.results = "grader-error", {}
                sub.notes.append(f"{type(err).__name__}: {err}"[:1000])
        if progress:
            with lock:
                done[0] += 1
                score = f"{sub.total:g}/{sub.max_total}" if sub.max_total is not None else "-"
                print(f"[{done[0]}/{len(files)}] {sub.label}: {sub.status}, {score} ({sub.seconds:.1f} s)", flush=True)
        return sub

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, prepared))
