"""The instructor's grader: verdicts agree with the checker, replies are bounded, reports are safe, each kernel runs
in a sandbox with an answer-free moe_lab, and a corpus of correct, partial and adversarial submissions (built from
the current exercises/solutions, with every attack of issue 22) is graded end to end into the expected CSV."""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from moe_lab import grading
from moe_lab.checks import REGISTRY, calls, integrity, run_check
from moe_lab.checks.core import CheckResult, Case, Exercise
from moe_lab.checks.nb13 import _LayerBlock
from moe_lab.course import ROOT
from moe_lab.grading import launcher, protocol
from moe_lab.grading.build import cached_build
from moe_lab.grading.kernel import PACKAGE, KernelSession, Limits
from moe_lab.grading.sandbox import Sandbox, bwrap_problem
from moe_lab.utils import seed_everything

from .grading.corpus import MARKER, MEMORY_MB, Course, corpus, default_stem, write
from .grading.corpus import _visible_only as visible_only_cell
from .notebook_code import notebook_namespace

SEED = 1234
integrity.trust(integrity.trusted_codes(vars(launcher)))
needs_bwrap = pytest.mark.skipif(bwrap_problem() is not None, reason=f"no sandbox here: {bwrap_problem()}")


@functools.lru_cache(maxsize=None)
def _solutions(prefix: str) -> dict:
    return notebook_namespace(next((ROOT / "solutions").glob(f"{prefix}_*.ipynb")))


_HANDLER = []


def _kernel_call(tmp_path: Path, ex: Exercise, fn, cases=None, namespace=None) -> CheckResult:
    """Grade ``fn`` with the kernel's own calling code (the launcher's handler, run here) and judge its reply."""
    cases = grading.reference_cases(ex, SEED) if cases is None else cases
    if not _HANDLER:
        _HANDLER.append(launcher.Handler(integrity, calls, str(PACKAGE)))
    header, body = _HANDLER[0].call({ex.function: fn} if namespace is None else namespace, ex.function, ex.allow,
                                    protocol.cases_payload(cases))
    return grading.verdict(ex, cases, protocol.read_reply(header, body, len(cases)), "")


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
        if isinstance(args, (list, tuple)):
            return [signature(a) for a in args]
        return (tuple(args.shape), args.dtype) if isinstance(args, torch.Tensor) else args

    seed_everything(0)  # the grader's visible cases are the notebook's
    visible = [signature(case.args) for case in ex.cases(False)]

    def fn(*args, **kwargs):
        out = solution(*args, **kwargs)
        if signature(args) in visible:
            return out
        return torch.zeros_like(out) if isinstance(out, torch.Tensor) else 0
    return fn


LIBRARY_CLASSES = {"13.5": _LayerBlock}
"""The library's answer to an exercise whose student writes a class (``Exercise.drive``): the class its reference
trains."""


@pytest.mark.parametrize("ex_id", sorted(REGISTRY))
def test_verdicts_agree_with_the_checker(tmp_path, ex_id):
    """The grader's split check (call in the kernel's handler, compare in the grader) gives run_check's verdict.
    Exercises whose reference is slow (a training run) get only the cheap candidates."""
    ex = REGISTRY[ex_id]
    start = time.perf_counter()
    cases = grading.reference_cases(ex, SEED)
    cheap = time.perf_counter() - start < 0.5 and ex.drive is None  # a class has no detached / visible-only wrapper
    solution = _solutions(ex_id[:2])[ex.function]
    library = LIBRARY_CLASSES.get(ex_id, ex.reference)
    candidates = {"solution": solution, "library": library, "zero": lambda *a, **k: 0, "todo": _not_implemented}
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
    handler = launcher.Handler(integrity, calls, str(PACKAGE))
    header, body = handler.call({ex.function: _not_implemented}, ex.function, (), protocol.cases_payload(cases))
    records = protocol.read_reply(header, body, len(cases))["records"]
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


def _body(records) -> bytes:
    buffer = io.BytesIO()
    torch.save(records, buffer)
    return buffer.getvalue()


def test_replies_and_frames_are_bounded(tmp_path):
    header = {"integrity": {"violation": None, "tamper": None}}
    assert protocol.read_reply(header, _body([{"out": 1}]), 1)["records"] == [{"out": 1}]
    assert protocol.read_reply({**header, "missing": "NoneType"}, b"", 1)["missing"] == "NoneType"
    with pytest.raises(protocol.BadReply, match="not a torch archive"):
        protocol.read_reply(header, b"garbage", 1)
    read, write = os.pipe()
    reader = protocol.Reader(read)
    try:
        os.write(write, launcher.encode({"id": 1}, b"xy"))
        assert reader.read(time.monotonic() + 5) == ({"id": 1}, b"xy")
        os.write(write, launcher.FRAME.pack(10, 0)[:5])  # half a frame: no answer yet, nothing lost
        assert reader.read(time.monotonic() + 0.2) is None
        os.write(write, launcher.FRAME.pack(10, 0)[5:] + b"not json!!")
        with pytest.raises(protocol.ChannelClosed, match="not the grader's protocol"):
            reader.read(time.monotonic() + 5)
    finally:
        os.close(read)
        os.close(write)
    for data, problem in ((launcher.FRAME.pack(2**16, 2**30), "limit"), (b"", "died")):  # 1 GB announced; the end
        read, write = os.pipe()
        reader = protocol.Reader(read)
        os.write(write, data)
        os.close(write)
        with pytest.raises(protocol.ChannelClosed, match=problem):
            reader.read(time.monotonic() + 5)
        os.close(read)


def test_replies_cannot_blow_up_the_grader():
    """The attacks of a student who patches torch.save in the kernel, each answered without materialising."""
    header = {"integrity": {}}
    with pytest.raises(protocol.BadReply, match="too large"):
        protocol.read_reply(header, _body([{"out": torch.zeros(1).expand(30_000_000)}]), 1)  # a 1.7 KB body
    shared = [0]
    for _ in range(22):
        shared = [shared, shared]
    with pytest.raises(protocol.BadReply, match="too many values"):
        protocol.read_reply(header, _body([{"out": shared}]), 1)
    raw = io.BytesIO()
    torch.save([{"out": torch.zeros(2**24)}], raw)  # 64 MiB of zeros, a few hundred KB deflated
    deflated = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert len(deflated.getvalue()) < 2**20
    with pytest.raises(protocol.BadReply, match="compressed"):
        protocol.read_reply(header, deflated.getvalue(), 1)


def test_csv_cells_are_never_formulas(tmp_path):
    subs = [grading.Submission('=HYPERLINK("http://x","open me").ipynb', tmp_path, status="unreadable",
                               notes=["+1", "@SUM(A1)"]),
            grading.Submission("-2.ipynb", tmp_path, status="unreadable", notes=["\tx"])]
    grading.write_csv(subs, tmp_path / "g.csv")
    with open(tmp_path / "g.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert [r[0] for r in rows] == ["'-2.ipynb", "'=HYPERLINK(\"http://x\",\"open me\").ipynb"]
    assert [r[-1] for r in rows] == ["'\tx", "'+1; @SUM(A1)"]


# ------------------------------------------------------------------------------------------- the sandbox


@pytest.fixture(scope="module")
def build02():
    stem = default_stem()
    return cached_build(stem[:2], grading.exercises_of(stem[:2]), PACKAGE)


def _session(build: Path, tmp_path: Path, kind: str = "bwrap", **limits) -> KernelSession:
    return KernelSession(build, Limits(**limits), Sandbox(kind, hide=(str(ROOT), str(tmp_path))), tmp_path)


def _holds(session: KernelSession, condition: str) -> bool:
    """Whether ``condition`` (Python) holds inside the kernel."""
    outcome = session.run(f"assert {condition}", 60)
    assert outcome.kind in ("ok", "error"), outcome
    return outcome.kind == "ok"


@needs_bwrap
def test_the_sandbox_hides_the_course_the_submissions_and_the_grader(tmp_path, build02):
    (tmp_path / "classmate.ipynb").write_text("{}")
    session = _session(build02, tmp_path)
    try:
        assert _holds(session, "__import__('moe_lab').__file__ == '/course/moe_lab/__init__.py'")
        for path in (tmp_path / "classmate.ipynb", tmp_path, ROOT / "solutions", ROOT / "moe_lab",
                     PACKAGE / "checks" / "nb02.py", f"/proc/{os.getpid()}", build02.parent / "04",
                     Path.home() / ".cache"):
            assert _holds(session, f"not __import__('os').path.exists({str(path)!r})"), path
        assert _holds(session, "len([p for p in __import__('os').listdir('/proc') if p.isdigit()]) == 2")
        assert _holds(session, "__import__('os').getcwd() == '/tmp/work'")
        assert not _holds(session, "open('/course/x', 'w')")  # read-only
        assert not _holds(session, "open('/usr/x', 'w')")
        source = "__import__('inspect').getsource(__import__('moe_lab.checks.nb02', fromlist=['_']).topk_gating)"
        assert _holds(session, f"'not available while grading' in {source}")
        assert _holds(session, f"'softmax_topk' not in {source}")
        assert not _holds(session, "__import__('moe_lab.routing', fromlist=['_']).softmax_topk("
                                   "__import__('torch').randn(3, 4), 2)")
    finally:
        session.shutdown()


@needs_bwrap
def test_the_sandbox_has_no_network(tmp_path, build02):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    session = _session(build02, tmp_path)
    try:
        assert _holds(session, "__import__('socket').socket().connect_ex(('127.0.0.1', 1)) != 0")
        code = f"__import__('socket').create_connection(('127.0.0.1', {port}), timeout=3)"
        assert not _holds(session, code)
        assert not _holds(session, "__import__('socket').create_connection(('8.8.8.8', 53), timeout=3)")
    finally:
        session.shutdown()
        server.close()


@needs_bwrap
def test_nothing_started_in_a_cell_outlives_its_kernel(tmp_path, build02):
    session = _session(build02, tmp_path)
    try:
        code = ("import subprocess, sys\nfor _ in range(3):\n    subprocess.Popen([sys.executable, '-c', "
                "'import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(600)'], "
                "start_new_session=True)\nimport time\ntime.sleep(2)")
        assert session.run(code, 60).kind == "ok"
        started = [pid for pid in session.members() if pid not in (session.proc.pid, session.init, session.pid)]
        assert len(started) >= 3, started
        session.kill_strays()
        assert [pid for pid in session.members() if pid not in (session.proc.pid, session.init, session.pid)] == []
        assert session.run(code, 60).kind == "ok"
    finally:
        session.shutdown()
    time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in started)
    assert session.members() == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@needs_bwrap
def test_processes_and_temporary_files_are_limited(tmp_path, build02):
    session = _session(build02, tmp_path, memory_mb=1024, processes=32)
    try:
        fork_bomb = "import subprocess\nfor _ in range(100):\n    subprocess.Popen(['sleep', '60'])"
        outcome = session.run(fork_bomb, 60)  # RLIMIT_NPROC stops it (an error), or, as root, the watchdog (dead)
        assert outcome.kind == "error" or (outcome.kind == "dead" and "more than 32 processes" in session.death())
    finally:
        session.shutdown()
    session = _session(build02, tmp_path, memory_mb=1024)
    try:
        outcome = session.run("f = open('/tmp/big', 'wb')\nfor _ in range(1500):\n    f.write(bytes(2**20))", 60)
        assert outcome.kind in ("error", "dead"), outcome
    finally:
        session.shutdown()


@pytest.mark.parametrize("kind", ["bwrap", "none"])
def test_memory_limit_counts_shared_memory(tmp_path, build02, kind):
    """RLIMIT_DATA does not count a shared mapping; the watchdog over the kernel's processes does."""
    if kind == "bwrap" and bwrap_problem():
        pytest.skip(bwrap_problem())
    session = _session(build02, tmp_path, kind, memory_mb=1024)
    try:
        outcome = session.run("import mmap\nm = mmap.mmap(-1, 3 * 2**30)\nfor i in range(0, len(m), 4096):\n"
                              "    m[i] = 1", 60)
        assert outcome.kind == "dead" and session.memory_killed
        assert "memory passed the limit of 1024 MB" in session.death()
    finally:
        session.shutdown()


def test_without_a_sandbox_the_grader_refuses_unless_told(monkeypatch, capsys, tmp_path):
    from moe_lab.grading import cli

    monkeypatch.setattr(cli, "bwrap_problem", lambda: "bubblewrap is not installed")
    (tmp_path / "s").mkdir()
    assert grading.main([str(tmp_path / "s"), "--out", str(tmp_path / "g.csv")]) == 2
    out = capsys.readouterr().out
    assert "cannot grade safely: bubblewrap is not installed" in out and "--unsafe-no-sandbox" in out
    assert "other submissions" in out and not (tmp_path / "g.csv").exists()
    assert grading.main([str(tmp_path / "s"), "--out", str(tmp_path / "g.csv"), "--unsafe-no-sandbox"]) == 0
    assert "WARNING: grading without a sandbox" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- end to end


def _marked_processes() -> list[int]:
    """Processes an attack started to outlive its kernel (their command line holds ``MARKER``)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if MARKER.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """The corpus written to a folder and graded once with the command line (in sandboxes where this machine has
    them); then, a few seconds after the grader exited, the CSV as it is on disk."""
    folder = tmp_path_factory.mktemp("corpus")
    course = Course(default_stem())
    out, feedback = folder / "grades.csv", folder / "feedback"
    expected = write(folder / "submissions", corpus(course, {"submissions": str(folder / "submissions"),
                                                             "out": str(out)}))
    sandbox = [] if bwrap_problem() is None else ["--unsafe-no-sandbox"]
    code = grading.main([str(folder / "submissions"), "--out", str(out), "--feedback", str(feedback), "--jobs", "2",
                         "--seed", str(SEED), "--cell-timeout", "30", "--call-timeout", "30", "--timeout", "180",
                         "--memory", str(MEMORY_MB), *sandbox])
    assert code == 0
    time.sleep(3)  # an attack's detached process would rewrite the CSV now
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return course, expected, rows, feedback, bool(sandbox)


@pytest.mark.slow
def test_corpus_csv(graded):
    course, expected, rows, _, _ = graded
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
        label = "'" + name if name.startswith("=") else name  # a formula is kept as text
        want.append([label, nb, e.status, *points, str(total), max_total])
    assert got == want


@pytest.mark.slow
def test_no_attack_outlives_the_grader(graded):
    *_, unsafe = graded
    if unsafe:
        pytest.skip("graded without a sandbox on this machine: processes can outlive it")
    assert _marked_processes() == []


@pytest.mark.slow
def test_corpus_feedback(graded):
    _, expected, rows, feedback, _ = graded
    notes = {row["submission"].removeprefix("'"): row["note"] for row in rows}
    names = grading.feedback_names(list(expected))
    assert sorted(os.listdir(feedback)) == sorted(names.values())
    for name, e in expected.items():
        text = (feedback / names[name]).read_text()
        assert f"Status:   {e.status}" in text
        verdicts = [block[block.index("\n[") + 1:] for block in text.split("\n\n") if "\n[" in block]
        blocks = {verdict.split()[1]: " ".join(verdict.split()) for verdict in verdicts}
        for ex_id, reason in e.reasons.items():
            assert reason in blocks[ex_id], (name, blocks[ex_id])
            assert all(len(line) <= 100 for line in text.splitlines() if line.startswith("    ")), name
        for note in e.notes:
            assert note in notes[name], (name, notes[name])


@pytest.mark.slow
def test_validate_the_course_as_shipped():
    unsafe = [] if bwrap_problem() is None else ["--unsafe-no-sandbox"]
    assert grading.main(["--validate", "--jobs", "2", "--seed", str(SEED), "--cell-timeout", "30", *unsafe]) == 0


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
    sandbox = Sandbox("bwrap" if bwrap_problem() is None else "none", hide=(str(ROOT),))
    problems = grading.validate(tmp_path, seed=SEED, limits=Limits(cell=30), jobs=2, sandbox=sandbox)
    assert len(problems) == 2
    assert any(p.startswith(f"solutions/{stem}.ipynb") and last in p for p in problems)
    assert any(p.startswith(f"exercises/{stem}.ipynb") and "registry" in p for p in problems)


# ------------------------------------------------------------------------------------------- Gradescope


def _unzip(archive: Path, into: Path) -> None:
    """Extract as Gradescope does, keeping the executable bits."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            path = Path(zf.extract(info, into))
            mode = info.external_attr >> 16
            if mode:
                path.chmod(mode & 0o777)


@pytest.mark.slow
def test_gradescope_autograder(tmp_path):
    """The built zip's run_autograder, run in a folder laid out as Gradescope lays it out (/autograder/source,
    /autograder/submission, /autograder/results), grades a solution to full marks and a blank exercise to zero, and
    keeps a hidden case's detail for after publication."""
    from moe_lab.grading import gradescope

    stem = default_stem()
    course = Course(stem)
    archive = gradescope.build_zip(stem[:2], tmp_path / "autograder.zip")
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    assert {"setup.sh", "run_autograder", "autograder.json", "pyproject.toml", "moe_lab/__init__.py"} <= set(names)
    assert not any(n.startswith(("solutions/", "exercises/", "notebooks/", "tests/")) for n in names)
    first = course.ids[0]
    visible_only = course.notebook(course.ids, extra={course.cell_of(first): [
        visible_only_cell(course.functions[first], first, "return 0")]})
    submissions = {"solution": course.notebook(course.ids), "blank": course.exercise, "visible_only": visible_only}
    cache = tmp_path / "cache"
    env = {**os.environ, "MOE_LAB_PYTHON": sys.executable, "MOE_LAB_GRADING_CACHE": str(cache)}
    got = {}
    for name, nb in submissions.items():
        root = tmp_path / name / "autograder"
        _unzip(archive, root / "source")
        (root / "submission").mkdir(parents=True)
        (root / "submission" / f"{name} (1).ipynb").write_text(json.dumps(nb))
        run_env = {**env, "AUTOGRADER": str(root), "PYTHONPATH": str(root / "source")}
        if name == "solution":  # what setup.sh does once: the answer-free build
            subprocess.run([sys.executable, "-m", "moe_lab.grading.gradescope", "prepare", "--config",
                            str(root / "source" / "autograder.json")], env=run_env, check=True, cwd="/", timeout=900)
        out = subprocess.run([str(root / "source" / "run_autograder")], env=run_env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stdout + out.stderr
        got[name] = json.loads((root / "results" / "results.json").read_text())
    points = course.points
    for name, data in got.items():
        assert set(data) >= {"score", "output", "tests"} and "seed" in data["output"]
        visible = [t for t in data["tests"] if t["visibility"] == "visible"]
        assert [t["number"] for t in visible] == course.ids
        assert [t["max_score"] for t in visible] == [points[i] for i in course.ids]
        assert all(t["name"].startswith(t["number"]) and t["output"] for t in visible)
    assert got["solution"]["score"] == sum(points.values())
    assert all(t["score"] == t["max_score"] for t in got["solution"]["tests"])
    assert got["blank"]["score"] == 0 and all("not implemented" in t["output"] for t in got["blank"]["tests"])
    hidden = got["visible_only"]["tests"]
    assert hidden[0]["score"] == 0 and "hidden cases" in hidden[0]["output"] and "hidden case '" not in hidden[0]["output"]
    assert hidden[1] == {**hidden[1], "number": f"{first}.hidden", "visibility": "after_published", "max_score": 0}
    assert "hidden case '" in hidden[1]["output"]
    assert got["visible_only"]["score"] == sum(points.values()) - points[first]


# ------------------------------------------------------------------------------------------- honest answers


def _calls_other_moe_lab_code(ex: Exercise) -> bool:
    """Whether the reference runs moe_lab code other than its own (then a copy of it calls the library)."""
    table, own, seen = integrity.package_table(), ex.reference.__code__, set()

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            kind = table.lookup(code)
            if kind and code is not own and not kind[0].startswith(table.lookup(own)[0] + ".<locals>"):
                seen.add(kind[0])

    case = grading.reference_cases(ex, SEED)[0].case
    sys.setprofile(profile)
    try:
        from moe_lab.checks.core import reference_answer

        reference_answer(ex.reference, case)
    finally:
        sys.setprofile(None)
    return bool(seen - {n for n in seen if n.startswith("moe_lab.checks.core")})


def _as_notebook_code(fn, filename: str = "/tmp/ipykernel_1/2415.py"):
    """``fn``'s source run as a notebook cell would run it, after the imports of its module (as a student who imports
    what the library imports: CPython 3.11 compiles ``torch.f(...)`` differently when ``torch`` is imported in the
    same cell): the same code, compiled in another file."""
    import ast
    import importlib.util
    import inspect
    import textwrap

    module = inspect.getmodule(fn)
    imports = []
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            node.module = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__)
            node.level = 0
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.module != "__future__" if isinstance(
                node, ast.ImportFrom) else isinstance(node, ast.Import):
            imports.append(ast.unparse(node))
    source = "\n".join(imports) + "\n\n" + textwrap.dedent(inspect.getsource(fn))
    namespace = dict(fn.__globals__)
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    return namespace[fn.__name__]


SLOW_REFERENCES = ("04.5", "13.5")  # training runs: their references call the library anyway


def _renamed_solution(ex: Exercise):
    """The solution's function (or class: every method) with every local variable renamed, unparsed (other spacing,
    no comments) and run as a notebook cell of another name, next to the solution notebook's other functions."""
    import ast

    import nbformat

    path = next((ROOT / "solutions").glob(f"{ex.id[:2]}_*.ipynb"))
    cell = next(c.source for c in nbformat.read(path, as_version=4).cells
                if c.cell_type == "code" and (f"def {ex.function}(" in c.source or f"class {ex.function}(" in c.source))
    tree = ast.parse(cell)
    top = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == ex.function)
    for fn in [top] if isinstance(top, ast.FunctionDef) else [n for n in top.body if isinstance(n, ast.FunctionDef)]:
        params = {a.arg for a in ast.walk(fn) if isinstance(a, ast.arg)}
        local = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} - params
        for node in ast.walk(fn):
            if isinstance(node, ast.Name) and node.id in local:
                node.id = f"my_{node.id}"
            elif isinstance(node, ast.Nonlocal):
                node.names = [f"my_{n}" if n in local else n for n in node.names]
    namespace = dict(_solutions(ex.id[:2]))
    exec(compile(ast.unparse(top), "/tmp/ipykernel_1/91.py", "exec"), namespace)
    return namespace[ex.function]


@pytest.mark.parametrize("ex_id", sorted(REGISTRY))
def test_honest_answers_written_like_the_library_pass(tmp_path, ex_id):
    """Honest answers written differently from the solutions get full marks: the solution moved into a helper of
    another name; the solution with other variable names; and, for every reference that calls no other moe_lab
    code, the library's own code character for character (the same bytecode, names and qualified names, e.g.
    11.5's generator expression), written in a notebook: not moe_lab's code."""
    ex = REGISTRY[ex_id]
    solution = _solutions(ex_id[:2])[ex.function]
    namespace = {"solution": solution}
    exec(compile("def _my_helper(*args, **kwargs):\n    return solution(*args, **kwargs)\n\n"
                 f"def {ex.function}(*args, **kwargs):\n    return _my_helper(*args, **kwargs)\n",
                 "/tmp/ipykernel_1/77.py", "exec"), namespace)
    assert _kernel_call(tmp_path, ex, namespace[ex.function]).status == "passed"
    result = _kernel_call(tmp_path, ex, _renamed_solution(ex))
    assert result.status == "passed", result.message
    if ex_id in SLOW_REFERENCES or _calls_other_moe_lab_code(ex):
        return
    copy = _as_notebook_code(ex.reference)
    assert (copy.__code__.co_code, copy.__code__.co_qualname) == (ex.reference.__code__.co_code,
                                                                  ex.reference.__code__.co_qualname)
    result = _kernel_call(tmp_path, ex, copy)
    assert result.status == "passed", result.message
    assert run_check(ex_id, copy, hidden=True).status == "passed"


def test_an_io_error_is_the_submissions_note(tmp_path, monkeypatch):
    from moe_lab.grading import runner

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner.tempfile, "TemporaryDirectory", broken)
    stem = default_stem()
    (tmp_path / "s.ipynb").write_text(json.dumps(Course(stem).exercise))
    sub = grading.grade_files([(tmp_path / "s.ipynb", "s.ipynb")], seed=SEED, limits=Limits(),
                              sandbox=Sandbox("none"), progress=False)[0]
    assert sub.status == "graded" and "I/O error" in sub.notes[-1] and "No space left" in sub.notes[-1]
    assert set(sub.results) == set(Course(stem).ids)
    assert all("not graded" in r.message for r in sub.results.values())
