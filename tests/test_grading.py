"""The instructor's grader: verdicts agree with the checker, replies are verified and bounded, reports are safe,
and a corpus of correct, partial and adversarial submissions (built from the current exercises/solutions) is
graded end to end into the expected CSV."""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch

from moe_lab import grading
from moe_lab.checks import REGISTRY, calls, integrity, run_check
from moe_lab.checks.core import CheckResult, Case, Exercise
from moe_lab.course import ROOT
from moe_lab.grading import launcher, protocol
from moe_lab.grading.kernel import PACKAGE, KernelSession, Limits
from moe_lab.utils import seed_everything

from .grading.corpus import MEMORY_MB, Course, corpus, default_stem, write
from .notebook_code import notebook_namespace

SEED = 1234
KEY = b"k" * 32
integrity.trust(integrity.trusted_codes(vars(launcher)))


@functools.lru_cache(maxsize=None)
def _solutions(prefix: str) -> dict:
    return notebook_namespace(next((ROOT / "solutions").glob(f"{prefix}_*.ipynb")))


def _kernel_call(tmp_path: Path, ex: Exercise, fn, cases=None, namespace=None) -> CheckResult:
    """Grade ``fn`` with the kernel's own calling code (the launcher's handler, run here) and judge its reply."""
    cases = grading.reference_cases(ex, SEED) if cases is None else cases
    cases_path, out_path = tmp_path / f"cases_{ex.id}.pt", tmp_path / f"out_{ex.id}.pt"
    protocol.save_cases(cases, cases_path)
    handler = launcher.Handler(integrity, calls, KEY, str(PACKAGE))
    handler.call({ex.function: fn} if namespace is None else namespace, ex.function, cases_path, out_path, "n1",
                 ex.allow)
    return grading.verdict(ex, cases, protocol.read_reply(out_path, KEY, "n1", len(cases)), "")


def _detached(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.detach() for o in out)
        return out.detach() if isinstance(out, torch.Tensor) else out
    return wrapped


def _not_implemented(*args, **kwargs):
    raise NotImplementedError


def _visible_only(ex_id: str, solution):
    """Right on inputs shaped like the visible cases (as the grader draws them), zeros elsewhere."""
    ex = REGISTRY[ex_id]

    def signature(args):
        return [(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]

    seed_everything(SEED)
    visible = [signature(case.args) for case in ex.cases(False)]

    def fn(*args, **kwargs):
        out = solution(*args, **kwargs)
        if signature(args) in visible:
            return out
        return torch.zeros_like(out) if isinstance(out, torch.Tensor) else 0
    return fn


@pytest.mark.parametrize("ex_id", sorted(REGISTRY))
def test_verdicts_agree_with_the_checker(tmp_path, ex_id):
    """The grader's split check (call in the kernel's handler, compare in the grader) gives run_check's verdict.
    Exercises whose reference is slow (a training run) get only the cheap candidates."""
    ex = REGISTRY[ex_id]
    start = time.perf_counter()
    cases = grading.reference_cases(ex, SEED)
    cheap = time.perf_counter() - start < 0.5
    solution = _solutions(ex_id[:2])[ex.function]
    candidates = {"solution": solution, "library": ex.reference, "zero": lambda *a, **k: 0, "todo": _not_implemented}
    if cheap:
        candidates.update({"detached": _detached(solution), "visible only": _visible_only(ex_id, solution)})
    for name, fn in candidates.items():
        got = _kernel_call(tmp_path, ex, fn, cases)
        if name == "solution" and not cheap:
            assert got.status == "passed"
            continue
        want = run_check(ex_id, fn, hidden=True, seed=SEED)
        assert (got.status, got.points, got.passed_cases) == (want.status, want.points, want.passed_cases), name
        assert got.message.replace("visible case", "case").replace("hidden case", "case") == want.message, name
        if name == "library":
            assert got.status == "failed" and "called moe_lab" in got.message
    if cheap:
        assert got.status == "failed" and "hidden case" in got.message  # visible only


def test_unsupported_objects_and_the_integrity_rule(tmp_path, monkeypatch):
    import numpy as np

    ex = REGISTRY["02.3"]
    result = _kernel_call(tmp_path, REGISTRY["02.1"], lambda x, w: np.zeros(3))
    assert result.status == "failed" and "got ndarray" in result.message
    from moe_lab.metrics import tokens_per_expert

    def wrapper(experts, num_experts):
        return tokens_per_expert(experts, num_experts)

    result = _kernel_call(tmp_path, ex, wrapper)
    assert result.status == "failed" and result.message.startswith(
        "tokens_per_expert called moe_lab.metrics.tokens_per_expert while being graded")
    monkeypatch.setattr(ex, "allow", ("moe_lab.metrics.tokens_per_expert",))
    assert _kernel_call(tmp_path, ex, wrapper).status == "passed"
    result = _kernel_call(tmp_path, ex, lambda e, n: REGISTRY["02.4"].reference(e, n)[1])
    assert "called moe_lab.checks.nb02.group_by_expert" in result.message


def test_the_kernel_stops_at_a_case_that_settles_the_verdict(tmp_path):
    ex = REGISTRY["02.3"]
    cases = grading.reference_cases(ex, SEED)
    protocol.save_cases(cases, tmp_path / "cases.pt")
    handler = launcher.Handler(integrity, calls, KEY, str(PACKAGE))
    handler.call({ex.function: _not_implemented}, ex.function, tmp_path / "cases.pt", tmp_path / "out.pt", "n", ())
    records = protocol.read_reply(tmp_path / "out.pt", KEY, "n", len(cases))["records"]
    assert records == [{"not_implemented": True}]
    assert grading.judge(ex, cases, records).status == "not implemented"
    right = {"out": cases[0].ref.expected}
    assert grading.judge(ex, cases, [right]).status == "error"  # cut short without a reason: not trusted
    assert grading.judge(ex, cases, [right, {"raised": "KeyError: 1"}]).passed_cases == 1


def test_known_mistakes_in_the_grader(tmp_path):
    """The grader computes the mistakes' answers itself and names the one the reply matches."""
    def cases(hidden):
        return [Case("T=3, E=4", (torch.randn(3, 4), 2.0))] + ([Case("T=9, E=2", (torch.randn(9, 2), 0.5))]
                                                                if hidden else [])

    ex = Exercise("99.1", "scaled_softmax", "A toy", 1, lambda logits, t: (logits / t).softmax(-1), cases,
                  "divide, then normalise", mistakes={"multiplying by the temperature":
                                                      lambda logits, t: (logits * t).softmax(-1)})
    result = _kernel_call(tmp_path, ex, lambda logits, t: (logits * t).softmax(-1))
    assert result.status == "failed" and "visible case 'T=3, E=4' failed" in result.message
    assert "this looks like multiplying by the temperature" in result.message


def test_read_and_identify(tmp_path):
    notebooks = {"02": "02_softmax_gating_topk"}
    for content in (b"\x00\xff", b"{", b"[]", b'{"cells": 3}', b"[" * 100_000):
        (tmp_path / "bad.ipynb").write_bytes(content)
        with pytest.raises(ValueError):
            grading.read_submission(tmp_path / "bad.ipynb")
    nb = {"cells": [], "metadata": {"moe_lab": {"notebook": "02_softmax_gating_topk"}}}
    assert grading.identify(nb, "x.ipynb", notebooks) == "02"
    checked = {"cells": [{"cell_type": "code", "source": 'check("02.1", router_probs)'}], "metadata": {}}
    assert grading.identify(checked, "bob-02_softmax_gating_topk.ipynb", notebooks) == "02"
    lecture = {"cells": [{"cell_type": "code", "source": "import moe_lab"}], "metadata": {}}
    assert grading.identify(lecture, "02_softmax_gating_topk.ipynb", notebooks) is None
    assert grading.identify({"cells": [], "metadata": {"moe_lab": {"notebook": 7}}}, "x.ipynb", notebooks) is None


def test_malformed_cells_are_graded_around():
    cells = [{"cell_type": "code", "source": ["a\n", "b"]}, {"cell_type": "markdown", "source": "c"},
             {"cell_type": "code", "source": ["x = 1\n", 2]}, {"cell_type": "code", "source": "s = '\ud800'"},
             {"cell_type": "code", "source": 7}]
    sources, notes = grading.code_cells({"cells": cells})
    assert sources == ["a\nb", "x = 1\n", "s = '\\ud800'", ""]
    assert notes == ["code cell 2: its source holds items that are not text; they were left out",
                     "code cell 3: its source holds characters that are not valid Unicode (lone surrogates); they "
                     "were run as \\u escapes",
                     "code cell 4: its source holds items that are not text; they were left out"]
    assert eval(sources[2].split(" = ")[1]) == "\ud800"  # the escape means the same string


def test_collect_labels(tmp_path):
    for rel in ("a/x.ipynb", "b/x.ipynb", "c.ipynb", ".ipynb_checkpoints/c.ipynb", "d/.hidden"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    os.symlink("nowhere.ipynb", tmp_path / "dangling.ipynb")
    os.mkfifo(tmp_path / "pipe.ipynb")
    os.symlink(tmp_path / "a", tmp_path / "linked_folder")
    (tmp_path / os.fsdecode(b"caf\xe9.ipynb")).write_text("{}")
    labels = [label for _, label in grading.collect([tmp_path])]
    assert labels == ["a/x.ipynb", "b/x.ipynb", "c.ipynb", "caf\\xe9.ipynb", "dangling.ipynb", "pipe.ipynb"]
    files = grading.collect([tmp_path / "a/x.ipynb", tmp_path / "b/x.ipynb", tmp_path / "a/x.ipynb"])
    assert [label for _, label in files] == [str(tmp_path / "a/x.ipynb"), f"{tmp_path / 'a/x.ipynb'} [2]",
                                             str(tmp_path / "b/x.ipynb")]
    start = time.monotonic()
    for name, why in (("dangling.ipynb", "broken symbolic link"), ("pipe.ipynb", "not a regular file")):
        sub, nb = grading.prepare(tmp_path / name, name, {"02": "02_softmax_gating_topk"})
        assert (sub.status, nb) == ("unreadable", None) and why in sub.notes[0]
    assert time.monotonic() - start < 5  # the FIFO did not block


def test_csv_feedback_and_summary(tmp_path):
    passed = CheckResult("02.1", "router_probs", "passed", 1, 1, 9, 9)
    weird = os.fsencode(os.fsdecode(b"caf\xe9.ipynb")).decode("utf-8", "backslashreplace")
    subs = [grading.Submission("z.ipynb", tmp_path, "02_softmax_gating_topk", "graded", {"02.1": passed}, [], 9),
            grading.Submission("a/x.ipynb", tmp_path, "02_softmax_gating_topk", "grader-error", {}, ["boom"], 9),
            grading.Submission("a__x.ipynb", tmp_path, "02_softmax_gating_topk", "graded", {}, ["x" * 40_000], 9),
            grading.Submission(weird, tmp_path, status="unreadable", notes=["not a notebook"]),
            grading.Submission("b.txt", tmp_path, status="unreadable", notes=["not a notebook"])]
    grading.write_csv(subs, tmp_path / "g.csv")
    with open(tmp_path / "g.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["submission", "notebook", "status", "02.1", "02.2", "02.3", "02.4", "02.5", "total",
                       "max_total", "note"]
    assert [r[0] for r in rows[1:]] == ["a/x.ipynb", "a__x.ipynb", "b.txt", "caf\\xe9.ipynb", "z.ipynb"]
    assert rows[5][3:5] == ["1", ""] and rows[5][-3:] == ["1", "9", ""]
    assert 32_000 >= len(rows[2][-1]) > 31_000 and rows[2][-1].endswith("the feedback file has every note)")
    grading.write_feedback(subs, tmp_path / "fb", seed=5)
    names = grading.feedback_names([s.label for s in subs])
    assert names["a/x.ipynb"] == "a%2Fx.ipynb.txt" and names["a__x.ipynb"] == "a__x.ipynb.txt"
    assert sorted(os.listdir(tmp_path / "fb")) == sorted(names.values())
    feedback = (tmp_path / "fb" / "z.ipynb.txt").read_text()
    assert f"02.1 {REGISTRY['02.1'].title}\n[PASS] 02.1 router_probs" in feedback
    assert "- boom" in (tmp_path / "fb" / "a%2Fx.ipynb.txt").read_text()
    text = grading.summary(subs)
    assert "router_probs" in text and "grader-error" in text and "unreadable" in text


def test_feedback_names_are_distinct_and_safe():
    labels = ["x/y.ipynb", "x__y.ipynb", "x%2Fy.ipynb", "A.ipynb", "a.ipynb", ".hidden", "..", "é.ipynb",
              "a" * 300 + "1", "a" * 300 + "2", "caf\\xe9.ipynb", "c:d*e?.ipynb"]
    names = grading.feedback_names(labels)
    assert len({n.casefold() for n in names.values()}) == len(labels)
    for name in names.values():
        assert "/" not in name and not name.startswith(".") and len(name.encode()) <= 220
        assert all(c.isascii() and (c.isalnum() or c in " -_+=,@().%~") for c in name), name


# ------------------------------------------------------------------------------------------- replies


def _reply(path: Path, records, nonce: str = "n", key: bytes = KEY, body: bytes | None = None, **header):
    if body is None:
        buffer = io.BytesIO()
        torch.save(records, buffer)
        body = buffer.getvalue()
    head = {"nonce": nonce, "integrity": {"violation": None, "tamper": None}, **header}
    head["mac"] = launcher.sign(key, head, body)
    path.write_bytes(json.dumps(head).encode() + b"\n" + body)


def test_replies_are_verified(tmp_path):
    out = tmp_path / "out.pt"
    _reply(out, [{"out": 1}])
    assert protocol.read_reply(out, KEY, "n", 1)["records"] == [{"out": 1}]
    for nonce, key in (("other", KEY), ("n", b"x" * 32)):
        _reply(out, [{"out": 1}], nonce=nonce, key=key)
        with pytest.raises(protocol.BadReply, match="not signed") as err:
            protocol.read_reply(out, KEY, "n", 1)
        assert not err.value.signed
    out.write_bytes(b'{"nonce": "n", "mac": "\\u00e9"}\n')
    with pytest.raises(protocol.BadReply, match="not signed"):
        protocol.read_reply(out, KEY, "n", 1)
    out.write_bytes(b"garbage")
    with pytest.raises(protocol.BadReply, match="not signed"):
        protocol.read_reply(out, KEY, "n", 1)
    out.unlink()
    os.mkfifo(out)
    with pytest.raises(protocol.BadReply, match="not a regular file"):
        protocol.read_reply(out, KEY, "n", 1)
    out.unlink()
    os.symlink("/dev/zero", out)
    with pytest.raises(protocol.BadReply, match="unusable"):
        protocol.read_reply(out, KEY, "n", 1)


def test_replies_cannot_blow_up_the_grader(tmp_path):
    """The attacks of a student who patches torch.save in the kernel, each answered without materialising."""
    out = tmp_path / "out.pt"
    _reply(out, [{"out": torch.zeros(1).expand(30_000_000)}])  # a 1.7 KB file
    with pytest.raises(protocol.BadReply, match="too large"):
        protocol.read_reply(out, KEY, "n", 1)
    shared = [0]
    for _ in range(22):
        shared = [shared, shared]
    _reply(out, [{"out": shared}])
    with pytest.raises(protocol.BadReply, match="too many values"):
        protocol.read_reply(out, KEY, "n", 1)
    raw = io.BytesIO()
    torch.save([{"out": torch.zeros(2**24)}], raw)  # 64 MiB of zeros, a few hundred KB deflated
    deflated = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert len(deflated.getvalue()) < 2**20
    _reply(out, None, body=deflated.getvalue())
    with pytest.raises(protocol.BadReply, match="compressed") as err:
        protocol.read_reply(out, KEY, "n", 1)
    assert err.value.signed


def test_memory_limit_counts_shared_memory(tmp_path):
    """RLIMIT_DATA does not count a shared mapping; the watchdog over the process group does."""
    session = KernelSession(tmp_path, Limits(memory_mb=1024), tmp_path)
    try:
        outcome = session.run("import mmap\nm = mmap.mmap(-1, 3 * 2**30)\nfor i in range(0, len(m), 4096):\n"
                              "    m[i] = 1", 60)
        assert outcome.kind == "dead" and session.memory_killed
        assert "memory passed the limit of 1024 MB" in session.death()
    finally:
        session.shutdown()


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """The corpus written to a folder and graded once with the command line."""
    folder = tmp_path_factory.mktemp("corpus")
    course = Course(default_stem())
    expected = write(folder / "submissions", corpus(course))
    out, feedback = folder / "grades.csv", folder / "feedback"
    code = grading.main([str(folder / "submissions"), "--out", str(out), "--feedback", str(feedback), "--jobs", "2",
                         "--seed", str(SEED), "--cell-timeout", "30", "--call-timeout", "30", "--timeout", "180",
                         "--memory", str(MEMORY_MB)])
    assert code == 0
    with open(out, newline="", encoding="utf-8") as f:
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
    names = grading.feedback_names(list(expected))
    assert sorted(os.listdir(feedback)) == sorted(names.values())
    for name, e in expected.items():
        text = (feedback / names[name]).read_text()
        assert f"Status:   {e.status}" in text
        for ex_id, reason in e.reasons.items():
            line = next(line for line in text.splitlines() if line.startswith("[") and f"] {ex_id} " in line)
            assert reason in line, (name, line)
            assert len(line) < 2000
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
    problems = grading.validate(tmp_path, seed=SEED, limits=Limits(cell=30), jobs=2)
    assert len(problems) == 2
    assert any(p.startswith(f"solutions/{stem}.ipynb") and last in p for p in problems)
    assert any(p.startswith(f"exercises/{stem}.ipynb") and "registry" in p for p in problems)
