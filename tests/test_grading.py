"""The instructor's grader: verdicts agree with the checker, and a corpus of correct, partial and adversarial
submissions (built from the current exercises/solutions) is graded end to end into the expected CSV."""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from moe_lab import grading
from moe_lab.checks import REGISTRY, run_check
from moe_lab.course import ROOT
from moe_lab.utils import seed_everything

from .grading.corpus import MEMORY_MB, Course, corpus, default_stem, write

SEED = 1234


def _kernel_call(tmp_path: Path, ex_id: str, fn, cases=None):
    """Grade ``fn`` the way the kernel call does (the call code run in a plain namespace) and judge it."""
    ex = REGISTRY[ex_id]
    cases = grading.reference_cases(ex, SEED) if cases is None else cases
    cases_path, out_path = tmp_path / f"cases_{ex_id}.pt", tmp_path / f"out_{ex_id}.pt"
    grading._save_cases(cases, cases_path)
    namespace = {ex.function: fn}
    exec(grading._CALL, namespace)
    namespace["_moe_lab_grader_call"](ex.function, str(cases_path), str(out_path))
    return grading._verdict(ex, cases, torch.load(out_path, weights_only=True), "")


def _detached(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.detach() for o in out)
        return out.detach() if isinstance(out, torch.Tensor) else out
    return wrapped


def _not_implemented(*args, **kwargs):
    raise NotImplementedError


def _visible_only(ex_id: str):
    """Right on inputs shaped like the visible cases (as the grader draws them), zeros elsewhere."""
    ex = REGISTRY[ex_id]

    def signature(args):
        return [(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]

    seed_everything(SEED)
    visible = [signature(case.args) for case in ex.cases(False)]

    def fn(*args, **kwargs):
        out = ex.reference(*args, **kwargs)
        if signature(args) in visible:
            return out
        return torch.zeros_like(out) if isinstance(out, torch.Tensor) else 0
    return fn


@pytest.mark.parametrize("ex_id", sorted(REGISTRY))
def test_verdicts_agree_with_the_checker(tmp_path, ex_id):
    """The grader's split check (call in the kernel, compare in the grader) gives run_check's verdict.
    Exercises whose reference is slow (a training run) get only the cheap candidates."""
    ex = REGISTRY[ex_id]
    start = time.perf_counter()
    cases = grading.reference_cases(ex, SEED)
    cheap = time.perf_counter() - start < 0.5
    candidates = {"reference": lambda *a, **k: ex.reference(*a, **k), "zero": lambda *a, **k: 0,
                  "todo": _not_implemented}
    if cheap:
        candidates.update({"detached": _detached(ex.reference), "visible only": _visible_only(ex_id)})
    for name, fn in candidates.items():
        got = _kernel_call(tmp_path, ex_id, fn, cases)
        if name == "reference" and not cheap:
            assert got.status == "passed"
            continue
        want = run_check(ex_id, fn, hidden=True, seed=SEED)
        assert (got.status, got.points, got.passed_cases) == (want.status, want.points, want.passed_cases), name
        if want.status == "failed":
            assert ex.hint in got.message
    if cheap:
        assert got.status == "failed" and "hidden case" in got.message  # visible only


def test_unsupported_and_library_objects(tmp_path):
    import numpy as np

    result = _kernel_call(tmp_path, "02.1", lambda x, w: np.zeros(3))
    assert result.status == "failed" and "got ndarray" in result.message
    result = _kernel_call(tmp_path, "02.1", REGISTRY["02.1"].reference)  # the library's own function
    assert result.status == "failed" and "moe_lab's own implementation" in result.message


def test_read_and_identify(tmp_path):
    notebooks = {"02": "02_softmax_gating_topk"}
    for content in (b"\x00\xff", b"{", b"[]", b'{"cells": 3}'):
        (tmp_path / "bad.ipynb").write_bytes(content)
        with pytest.raises(ValueError):
            grading.read_submission(tmp_path / "bad.ipynb")
    nb = {"cells": [], "metadata": {"moe_lab": {"notebook": "02_softmax_gating_topk"}}}
    assert grading.identify(nb, "x.ipynb", notebooks) == "02"
    assert grading.identify({"cells": [], "metadata": {}}, "bob-02_softmax_gating_topk.ipynb", notebooks) == "02"
    assert grading.identify({"cells": [], "metadata": {"moe_lab": {"notebook": 7}}}, "x.ipynb", notebooks) is None
    cells = [{"cell_type": "code", "source": ["a\n", "b"]}, {"cell_type": "markdown", "source": "c"}]
    assert grading.code_cells({"cells": cells}) == ["a\nb"]


def test_collect_labels(tmp_path):
    for rel in ("a/x.ipynb", "b/x.ipynb", "c.ipynb", ".ipynb_checkpoints/c.ipynb", "d/.hidden"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    assert [label for _, label in grading.collect([tmp_path])] == ["a/x.ipynb", "b/x.ipynb", "c.ipynb"]
    files = grading.collect([tmp_path / "a/x.ipynb", tmp_path / "b/x.ipynb"])
    assert [label for _, label in files] == [str(tmp_path / "a/x.ipynb"), str(tmp_path / "b/x.ipynb")]


def test_csv_feedback_and_summary_of_rows_without_results(tmp_path):
    from moe_lab.checks.core import CheckResult

    passed = CheckResult("02.1", "router_probs", "passed", 1, 1, 9, 9)
    subs = [grading.Submission("z.ipynb", tmp_path, "02_softmax_gating_topk", "graded", {"02.1": passed}, [], 9),
            grading.Submission("a/x.ipynb", tmp_path, "02_softmax_gating_topk", "grader-error", {}, ["boom"], 9),
            grading.Submission("b.txt", tmp_path, status="unreadable", notes=["not a notebook"])]
    grading.write_csv(subs, tmp_path / "g.csv")
    with open(tmp_path / "g.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["submission", "notebook", "status", "02.1", "02.2", "02.3", "02.4", "02.5", "total",
                       "max_total", "note"]
    assert [r[0] for r in rows[1:]] == ["a/x.ipynb", "b.txt", "z.ipynb"]
    assert rows[3][3:5] == ["1", ""] and rows[3][-3:] == ["1", "9", ""]
    grading.write_feedback(subs, tmp_path / "fb", seed=5)
    feedback = (tmp_path / "fb" / "z.ipynb.txt").read_text()
    assert f"02.1 {REGISTRY['02.1'].title}\n[PASS] 02.1 router_probs" in feedback
    assert "- boom" in (tmp_path / "fb" / "a__x.ipynb.txt").read_text()
    text = grading.summary(subs)
    assert "router_probs" in text and "grader-error" in text and "unreadable" in text


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """The corpus written to a folder and graded once with the command line."""
    folder = tmp_path_factory.mktemp("corpus")
    course = Course(default_stem())
    expected = write(folder / "submissions", corpus(course))
    out, feedback = folder / "grades.csv", folder / "feedback"
    code = grading.main([str(folder / "submissions"), "--out", str(out), "--feedback", str(feedback), "--jobs", "2",
                         "--seed", str(SEED), "--cell-timeout", "12", "--call-timeout", "15", "--timeout", "120",
                         "--memory", str(MEMORY_MB)])
    assert code == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    return course, expected, rows, feedback


@pytest.mark.slow
def test_corpus_csv(graded):
    course, expected, rows, _ = graded
    columns = ["submission", "notebook", "status", *course.ids, "total", "max_total"]
    assert list(rows[0]) == columns + ["note"]
    got = [[row[c] for c in columns] for row in rows]
    want = []
    for name in sorted(expected):
        e = expected[name]
        nb = course.exercise["metadata"]["moe_lab"]["notebook"] if e.points is not None else ""
        points = [str(e.points[i]) for i in course.ids] if e.points is not None else [""] * len(course.ids)
        total = sum(e.points.values()) if e.points else 0
        max_total = str(sum(course.points.values())) if e.points is not None else ""
        want.append([name, nb, e.status, *points, str(total), max_total])
    assert got == want


@pytest.mark.slow
def test_corpus_feedback(graded):
    _, expected, rows, feedback = graded
    notes = {row["submission"]: row["note"] for row in rows}
    for name, e in expected.items():
        text = (feedback / f"{name}.txt").read_text()
        assert f"Status:   {e.status}" in text
        for ex_id, reason in e.reasons.items():
            line = next(line for line in text.splitlines() if line.startswith("[") and f"] {ex_id} " in line)
            assert reason in line, (name, line)
        for note in e.notes:
            assert note in notes[name], (name, notes[name])


@pytest.mark.slow
def test_validate_the_course_as_shipped():
    assert grading.main(["--validate", "--jobs", "2", "--seed", str(SEED), "--cell-timeout", "30"]) == 0


@pytest.mark.slow
def test_validate_catches_a_wrong_solution_and_stale_metadata(tmp_path):
    stem = sorted(p.stem for p in (ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))[0]
    for folder in ("solutions", "exercises"):
        (tmp_path / folder).mkdir()
        shutil.copy(ROOT / folder / f"{stem}.ipynb", tmp_path / folder)
    course = Course(stem, tmp_path)
    solution = course.solution
    last = course.ids[-1]
    cell = solution["cells"][course.cell_of(last)]
    lines = "".join(cell["source"]).splitlines()
    begin = next(i for i, line in enumerate(lines) if line.strip() == "# BEGIN SOLUTION")
    lines.insert(begin + 1, lines[begin].replace("# BEGIN SOLUTION", "return None"))  # a wrong solution
    cell["source"] = "\n".join(lines)
    (tmp_path / "solutions" / f"{stem}.ipynb").write_text(json.dumps(solution))
    exercise = course.exercise
    del exercise["metadata"]["moe_lab"]["exercises"][course.ids[0]]
    (tmp_path / "exercises" / f"{stem}.ipynb").write_text(json.dumps(exercise))
    problems = grading.validate(tmp_path, seed=SEED, limits=grading.Limits(cell=30), jobs=2)
    assert len(problems) == 2
    assert any(p.startswith(f"solutions/{stem}.ipynb") and last in p for p in problems)
    assert any(p.startswith(f"exercises/{stem}.ipynb") and "registry" in p for p in problems)
