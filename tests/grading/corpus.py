"""A corpus of submissions built from the course's current exercise and solution notebooks, with the grade each
must get: correct, partially correct, one per adversarial case the grader must survive, and every attack of issue 22
(:func:`attacks`: on the grader and on classmates, on the request, on the guard, on the answers).

``write(folder, corpus(Course(stem)))`` writes the files and returns ``{file name: Expected}``. Run as a script
to write ``N`` varied submissions of one notebook for the benchmark:
``python tests/grading/corpus.py OUT_DIR [N [NOTEBOOK_STEM]]``.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_lab.checks import REGISTRY
from moe_lab.course import BEGIN, CHECK_CALL, END, ROOT
from moe_lab.utils import seed_everything

MEMORY_MB = 3072  # the memory limit in the corpus test; exception_cells allocates more than this


@dataclass
class Expected:
    """The grade a submission must get: ``points`` per exercise id (``None``: no exercise columns)."""

    status: str
    points: dict[str, int] | None
    reasons: dict[str, str] = field(default_factory=dict)  # exercise id -> text its feedback line must contain
    notes: tuple[str, ...] = ()                            # texts the submission's notes must contain


@dataclass
class Special:
    """A file that is not a plain file: ``kind`` ``"link"`` (to ``target``, which need not exist) or ``"fifo"``."""

    kind: str
    target: str = ""


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _code(source: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}


class Course:
    """One exercise notebook and its solution, cell for cell."""

    def __init__(self, stem: str, root: Path = ROOT):
        self.stem, self.root = stem, root
        self.exercise = _load(root / "exercises" / f"{stem}.ipynb")
        self.solution = _load(root / "solutions" / f"{stem}.ipynb")
        if len(self.exercise["cells"]) != len(self.solution["cells"]):
            raise ValueError(f"{stem}: exercise and solution notebooks differ in cells: rebuild exercises/")
        self.functions: dict[str, str] = self.exercise["metadata"]["moe_lab"]["exercises"]
        self.ids = sorted(self.functions, key=lambda i: tuple(map(int, i.split("."))))
        self.points = {i: REGISTRY[i].points for i in self.ids}
        calls = {i: {j for j in self.ids if j != i and re.search(
            rf"\b{self.functions[j]}\(", _source(self.solution["cells"][self.cell_of(i)]))} for i in self.ids}
        self.needs = {i: self._closure(i, calls) for i in self.ids}  # exercises whose function it calls

    @staticmethod
    def _closure(i: str, calls: dict[str, set[str]]) -> set[str]:
        seen, todo = set(), [i]
        while todo:
            for j in calls[todo.pop()] - seen:
                seen.add(j)
                todo.append(j)
        return seen

    def score(self, solved, broken=()) -> dict[str, int]:
        """Expected points when the exercises in ``solved`` are filled in and those in ``broken`` are not usable."""
        ok = set(solved) - set(broken)
        return {i: self.points[i] if i in ok and self.needs[i] <= ok else 0 for i in self.ids}

    def cell_of(self, ex_id: str) -> int:
        """Index of the cell defining the function of exercise ``ex_id``."""
        pattern = re.compile(rf"^def {self.functions[ex_id]}\(", re.M)
        return next(i for i, c in enumerate(self.exercise["cells"])
                    if c["cell_type"] == "code" and pattern.search(_source(c)))

    def check_cells(self) -> list[int]:
        return [i for i, c in enumerate(self.exercise["cells"])
                if c["cell_type"] == "code" and CHECK_CALL.search(_source(c))]

    def notebook(self, solved=(), extra=None, drop=(), replace=None) -> dict:
        """An exercise notebook with the exercises in ``solved`` filled in from the solution, the cells in
        ``drop`` removed, ``replace`` {index: source} swapped in, and ``extra`` {index: [sources]} inserted
        after cell ``index`` (-1: before the first cell)."""
        nb = copy.deepcopy(self.exercise)
        cells = []
        for i in range(-1, len(nb["cells"])):
            if i >= 0 and i not in drop:
                cell = nb["cells"][i]
                if i in {self.cell_of(e) for e in solved}:
                    lines = _source(self.solution["cells"][i]).splitlines()
                    cell["source"] = "\n".join(line for line in lines if line.strip() not in (BEGIN, END))
                if replace and i in replace:
                    cell["source"] = replace[i]
                cells.append(cell)
            cells += [_code(src) for src in (extra or {}).get(i, [])]
        nb["cells"] = cells
        return nb


def _signature(args) -> str:
    return repr([f"tensor{tuple(a.shape)}{a.dtype}" if isinstance(a, torch.Tensor) else repr(a) for a in args])


def _visible_only(fn: str, ex_id: str, otherwise: str) -> str:
    """A cell wrapping ``fn`` so that it answers only inputs shaped like the visible cases (as a student who
    hard-codes them would); on any other input it runs ``otherwise``."""
    seed_everything(0)
    visible = {_signature(case.args) for case in REGISTRY[ex_id].cases(False)}
    return (f"_visible_{fn} = {sorted(visible)!r}\n_real_{fn} = {fn}\n\n"
            f"def {fn}(*args, **kwargs):\n"
            f"    sig = repr([f'tensor{{tuple(a.shape)}}{{a.dtype}}' if isinstance(a, torch.Tensor) else repr(a) "
            f"for a in args])\n"
            f"    if sig in _visible_{fn}:\n"
            f"        return _real_{fn}(*args, **kwargs)\n"
            f"    {otherwise}\n")


HANG_IGNORING_INTERRUPTS = ("import time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
                            "    except KeyboardInterrupt:\n        pass")
MONKEYPATCH = """\
import sys, types
import moe_lab.checks
import moe_lab.checks.core as core
from moe_lab.checks.core import CheckResult
def fake_run_check(exercise_id, fn, **kwargs):
    ex = core.REGISTRY[exercise_id]
    return CheckResult(ex.id, ex.function, "passed", ex.points, ex.points, 1, 1)
core.run_check = fake_run_check
core.compare = lambda *args, **kwargs: None
moe_lab.checks.run_check = fake_run_check
moe_lab.checks.check = check = lambda exercise_id, fn: print(fake_run_check(exercise_id, fn))
for ex in core.REGISTRY.values():
    ex.reference = lambda *args, **kwargs: 0
    ex.cases = lambda hidden: []
torch.isclose = lambda a, b, **kwargs: torch.ones(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.bool)
torch.allclose = lambda *args, **kwargs: True
sys.modules["moe_lab.checks.core"] = types.SimpleNamespace(run_check=fake_run_check, REGISTRY=core.REGISTRY)
"""


def _routes(course: Course) -> dict[str, list[tuple[str, str]]]:
    """Notebooks of cells (appended at the end) by which each exercise's function reaches moe_lab's reference (or
    switches off the integrity check), with the text its feedback line must contain."""
    header = "import functools, importlib, subprocess, sys, threading, types, _thread\nimport moe_lab\n"
    notebooks: dict[str, list[tuple[str, str]]] = {}

    def ref(i: str) -> str:
        r = REGISTRY[i].reference
        return f"importlib.import_module({r.__module__!r}).{r.__name__}"

    def fn(i: str) -> str:
        return course.functions[i]

    called = "called moe_lab"
    notebooks["integrity_names.ipynb"] = [
        (lambda i: f"{fn(i)} = {ref(i)}\n{fn(i)}.__module__ = '__main__'", called),
        (lambda i: f"{fn(i)} = functools.partial({ref(i)})", called),
        (lambda i: f"_r_{fn(i)} = {ref(i)}\ndef {fn(i)}(*args, **kwargs):\n    return _r_{fn(i)}(*args, **kwargs)", called),
        (lambda i: f"def {fn(i)}(*args, **kwargs):\n    m = importlib.import_module('moe_lab.' + "
                   f"{REGISTRY[i].reference.__module__[8:]!r})\n"
                   f"    return getattr(m, {REGISTRY[i].reference.__name__!r})(*args, **kwargs)", called),
        (lambda i: f"_r = {ref(i)}\n{fn(i)} = types.FunctionType(_r.__code__.replace(co_filename='mine.py'), "
                   f"_r.__globals__, 'mine', _r.__defaults__, _r.__closure__)\n{fn(i)}.__kwdefaults__ = _r.__kwdefaults__",
         called)]
    serve = ("_qi_{f}, _qo_{f} = __import__('queue').Queue(), __import__('queue').Queue()\n"
             "def _serve_{f}(r={r}):\n{body}"
             "{start}\n"
             "def {f}(*args, **kwargs):\n    _qi_{f}.put((args, kwargs))\n    return _qo_{f}.get(timeout=5)")
    loop = "    while True:\n        a, k = _qi_{f}.get()\n        _qo_{f}.put(r(*a, **k))\n"
    notebooks["integrity_objects.ipynb"] = [
        (lambda i: f"def {fn(i)}(*args, **kwargs):\n    moe_lab.MoELayer(4, 4, 2)\n    return 0", called),
        (lambda i: f"def {fn(i)}(*args, **kwargs):\n    out = []\n    t = threading.Thread(target=lambda: out.append("
                   f"{ref(i)}(*args, **kwargs)))\n    t.start()\n    t.join()\n    return out[0]", called),
        (lambda i: f"def {fn(i)}(*args, **kwargs):\n    done, out = threading.Event(), []\n"
                   f"    _thread.start_new_thread(lambda: (out.append({ref(i)}(*args, **kwargs)), done.set()), ())\n"
                   f"    done.wait(5)\n    return out[0]", called),
        (lambda i: serve.format(f=fn(i), r=ref(i), body=loop.format(f=fn(i)),
                                start=f"threading.Thread(target=_serve_{fn(i)}, daemon=True).start()"), called),
        (lambda i: f"import multiprocessing as _mp\n_parent, _child = _mp.get_context('fork').Pipe()\n"
                   f"def _serve(conn, r={ref(i)}):\n    while True:\n        a, k = conn.recv()\n"
                   f"        conn.send(r(*a, **k))\n"
                   f"_mp.get_context('fork').Process(target=_serve, args=(_child,), daemon=True).start()\n"
                   f"_child.close()\ndef {fn(i)}(*args, **kwargs):\n    _parent.send((args, kwargs))\n"
                   f"    return _parent.recv()", "raised")]
    interfered = "the integrity check was interfered with"
    notebooks["integrity_tamper.ipynb"] = [
        (lambda i: f"def {fn(i)}(*args, **kwargs):\n    sys.setprofile(None)\n    return {ref(i)}(*args, **kwargs)",
         interfered),
        (lambda i: f"def {fn(i)}(*args, **kwargs):\n    list(map(sys.settrace, [lambda *a: None]))\n"
                   f"    return {ref(i)}(*args, **kwargs)", interfered),
        (lambda i: f"def {fn(i)}(*args, **kwargs):\n    threading.setprofile(None)\n    out = []\n"
                   f"    t = threading.Thread(target=lambda: out.append({ref(i)}(*args, **kwargs)))\n"
                   f"    t.start()\n    t.join()\n    return out[0]", called),
        (lambda i: f"def {fn(i)}(*args, **kwargs):\n    subprocess.run(['true'])\n    return {ref(i)}(*args, **kwargs)",
         "started a process")]
    out = {name: (header + "\n\n".join(make(i) for (make, _), i in zip(routes, course.ids)),
                  {i: reason for (_, reason), i in zip(routes, course.ids)}) for name, routes in notebooks.items()}
    # a thread that switched its own hook off (and lives on) makes every later graded call report the interference
    first = course.ids[0]
    lasting = ("    while True:\n        a, k = _qi_{f}.get()\n        try:\n            _qo_{f}.put(r(*a, **k))\n"
               "        except Exception as err:\n            _qo_{f}.put(err)\n")
    out["integrity_thread_tamper.ipynb"] = (
        header + serve.format(f=fn(first), r=ref(first), body="    sys.setprofile(None)\n" + lasting.format(f=fn(first)),
                              start=f"threading.Thread(target=_serve_{fn(first)}, daemon=True).start()"),
        {i: "interfered" for i in course.ids})
    return out


def corpus(course: Course, paths: dict[str, str] | None = None) -> dict[str, tuple[dict | bytes, Expected]]:
    """{file name: (notebook or raw bytes, expected grade)} for one exercise notebook; ``paths`` (``submissions``:
    the folder the corpus is written to, ``out``: the grades CSV) arms the attacks that aim at them."""
    ids, fns = course.ids, course.functions
    full, zero = dict(course.points), {i: 0 for i in ids}
    first, second, last = ids[0], ids[1], ids[-1]
    leaves = [i for i in ids[1:] if not any(i in course.needs[j] for j in ids)]  # nothing else calls them
    cell1 = course.cell_of(first)
    checks = course.check_cells()
    lines = [CHECK_CALL.search(_source(course.exercise["cells"][i])) for i in checks]
    out: dict[str, tuple[dict | bytes, Expected]] = {}

    out["Alice Smith_1234_attempt_2.ipynb"] = (course.notebook(ids), Expected("graded", full))
    out["untouched.ipynb"] = (course.notebook(), Expected("graded", zero, {i: "not implemented" for i in ids}))
    out["partial.ipynb"] = (course.notebook(ids[::2]), Expected("graded", course.score(ids[::2])))
    # exceptions, a syntax error in the last exercise's cell, and a memory blow-up (stopped by the memory limit)
    out["exception_cells.ipynb"] = (
        course.notebook(ids, extra={0: ["1 / 0"], cell1: [f"hog = bytearray({MEMORY_MB + 2048} * 2**20)"]},
                        replace={course.cell_of(last): "def broken(:\n    pass"}),
        Expected("graded", course.score(ids, {last}), {last: f"no function named {fns[last]}"},
                 ("raised ZeroDivisionError", "raised SyntaxError", "raised MemoryError")))
    out["infinite_loops.ipynb"] = (
        course.notebook(ids, extra={cell1: ["while True:\n    pass", HANG_IGNORING_INTERRUPTS, "exit()"]}),
        Expected("timeout", full, notes=("was interrupted", "did not stop when interrupted")))
    out["kernel_deaths.ipynb"] = (
        course.notebook(ids, extra={cell1: ["import os\nos._exit(3)"],
                                    course.cell_of(second): ["import ctypes\nctypes.string_at(0)"]}),
        Expected("crashed", full, notes=("'import os') killed the kernel", "'import ctypes') killed the kernel")))
    # check cells: the first deleted, the second duplicated, the third edited; fake PASS lines printed
    fake = "\n".join(f'print("[PASS] {m.group(1)} {m.group(2)}: all 99 cases passed")' for m in lines)
    out["checks_tampered.ipynb"] = (
        course.notebook(ids, drop={checks[0]}, extra={checks[1]: [_source(course.exercise["cells"][checks[1]])]},
                        replace={checks[2]: f"check({lines[2].group(1)!r}, lambda *args: None)\n{fake}"}),
        Expected("graded", full))
    out["fake_pass.ipynb"] = (course.notebook(replace={i: fake for i in checks}), Expected("graded", zero))
    out["renamed_missing.ipynb"] = (
        course.notebook(ids, drop={course.cell_of(second)},
                        replace={cell1: _source(course.notebook(ids)["cells"][cell1]).replace(
                            f"def {fns[first]}(", f"def {fns[first]}_v2(")}),
        Expected("graded", course.score(ids, {first, second}),
                 {first: f"no function named {fns[first]}", second: f"no function named {fns[second]}"}))
    # patch the checker, the references and torch, make every function return 0 and the last one the library's
    ref = REGISTRY[last].reference
    cheat = [f"{fns[i]} = lambda *args, **kwargs: 0" for i in ids[:-1]]
    cheat.append(f"from {ref.__module__} import {ref.__name__} as {fns[last]}")
    imports = min(checks + [cell1]) - 1  # a cell before any exercise
    end = len(course.exercise["cells"]) - 1
    out["monkeypatch.ipynb"] = (course.notebook(extra={imports: [MONKEYPATCH], end: cheat}),
                                Expected("graded", zero, {last: "called moe_lab"}))
    # every route into moe_lab, and every way of switching the integrity check off, scores 0 with the reason
    for name, (cell, reasons) in _routes(course).items():
        points = zero if len(reasons) == len(ids) else course.score(ids, set(reasons))
        out[name] = (course.notebook(ids, extra={end: [cell]}), Expected("graded", points, reasons))
    # an honest function that runs on a thread pool, whose threads a check cell started, still passes
    leaf = leaves[-1]
    pool = (f"import concurrent.futures\n_pool = concurrent.futures.ThreadPoolExecutor(2)\n_own = {fns[leaf]}\n"
            f"def {fns[leaf]}(*args, **kwargs):\n    return _pool.submit(_own, *args, **kwargs).result()\n"
            f"check({leaf!r}, {fns[leaf]})")
    out["thread_pool.ipynb"] = (course.notebook(ids, extra={end: [pool]}), Expected("graded", full))
    # the grader no longer talks through sys.audit: replacing it changes nothing
    out["integrity_audit.ipynb"] = (course.notebook(ids, extra={end: ["import sys\nsys.audit = lambda *args: None"]}),
                                    Expected("graded", full))
    # what a function returns cannot blow up the grader: huge views, shared nesting, long lists, compressed archives
    returns = ["torch.zeros(1).expand(30_000_000)", "_shared", "list(range(10**6))"]
    blowups = "_shared = [0]\nfor _ in range(22):\n    _shared = [_shared, _shared]\n" + "\n".join(
        f"def {fns[i]}(*args, **kwargs):\n    return {r}" for i, r in zip(ids, returns))
    out["blowups.ipynb"] = (course.notebook(ids, extra={end: [blowups]}), Expected(
        "graded", course.score(ids, set(ids[:3])), {i: "too large" for i in ids[:3]}))
    deflate = ("import io, zipfile\n_save = torch.save\n"
               "def _deflated(obj, f, *args, **kwargs):\n    raw = io.BytesIO()\n"
               "    _save([{'out': torch.zeros(2**24)}], raw)\n    src = zipfile.ZipFile(raw)\n"
               "    with zipfile.ZipFile(f, 'w', zipfile.ZIP_DEFLATED) as dst:\n"
               "        for info in src.infolist():\n            dst.writestr(info.filename, src.read(info.filename))\n"
               "torch.save = _deflated")
    out["deflate.ipynb"] = (course.notebook(ids, extra={end: [deflate]}),
                            Expected("graded", zero, {i: "compressed" for i in ids}))
    out.update(attacks(course, paths or {}))
    # malformed cells are graded around, with a note
    malformed = course.notebook(ids)
    code = [c for c in malformed["cells"] if c["cell_type"] == "code"]
    cell = malformed["cells"][course.cell_of(first)]
    cell["source"] = [_source(cell), "\n", 2]
    malformed["cells"][course.cell_of(second)]["source"] = "s = '\ud800'\n" + _source(
        malformed["cells"][course.cell_of(second)])
    out["malformed_cells.ipynb"] = (malformed, Expected("graded", full, notes=(
        f"code cell {code.index(cell) + 1}: its source holds items that are not text", "lone surrogates")))
    lecture = course.root / "notebooks" / f"{course.stem}.ipynb"
    if lecture.exists():
        out[f"{course.stem}.ipynb"] = (_load(lecture), Expected("not-an-exercise", None))
    out[os.fsdecode(b"caf\xe9.ipynb")] = (course.notebook(ids), Expected("graded", full))
    out["x/y.ipynb"] = (course.notebook(ids), Expected("graded", full))
    out["x__y.ipynb"] = (course.notebook(), Expected("graded", zero))
    out["dangling.ipynb"] = (Special("link", "does-not-exist.ipynb"), Expected("unreadable", None,
                                                                            notes=("broken symbolic link",)))
    out["pipe.ipynb"] = (Special("fifo"), Expected("unreadable", None, notes=("not a regular file",)))
    # functions right on the visible cases only: wrong, or killing the kernel, or looping on any other input
    # (the deadly ones are functions no other exercise calls, so that the notebook's own checks survive)
    wrappers = {course.cell_of(i): [_visible_only(fns[i], i, "return 0")] for i in ids}
    reasons = {first: "hidden case"}
    for i, (otherwise, reason) in zip(leaves, [("import os; os._exit(1)", "killed the kernel"),
                                               ("while True: pass", "took longer than")]):
        wrappers[course.cell_of(i)] = [_visible_only(fns[i], i, otherwise)]
        reasons[i] = reason
    out["visible_cases_only.ipynb"] = (course.notebook(ids, extra=wrappers), Expected("graded", zero, reasons))
    lecture = copy.deepcopy(course.exercise)
    del lecture["metadata"]["moe_lab"]
    out["no_metadata.ipynb"] = (lecture, Expected("not-an-exercise", None))
    text = json.dumps(course.notebook(ids))
    out["truncated.ipynb"] = (text[: len(text) // 2].encode(), Expected("unreadable", None))
    out["random_bytes.ipynb"] = (random.Random(0).randbytes(2000), Expected("unreadable", None))
    out["empty.ipynb"] = (b"", Expected("unreadable", None))
    out["list.ipynb"] = (b"[1, 2, 3]", Expected("unreadable", None))
    out["essay.txt"] = (b"I did the exercises on paper.\n", Expected("unreadable", None))
    return out


MARKER = "moe_lab_attack_marker"  # in the command line of every process an attack starts to outlive its kernel


def _honest_one(course: Course, i: str) -> dict:
    """The notebook with only exercise ``i`` solved (the attack cells are appended to it)."""
    return course.notebook([i])


def attacks(course: Course, paths: dict[str, str]) -> dict[str, tuple[dict, Expected]]:
    """Every attack of issue 22 on one notebook, with the grade it must get now: nothing for the attacker, nothing
    taken from a classmate (their rows are checked by the same test), no grader error."""
    ids, fns = course.ids, course.functions
    full, zero = dict(course.points), {i: 0 for i in ids}
    end = len(course.exercise["cells"]) - 1
    refs = {fns[i]: f"importlib.import_module({REGISTRY[i].reference.__module__!r}).{REGISTRY[i].reference.__name__}"
            for i in ids}

    def functions(body: str) -> str:
        """Every graded function defined as ``return <body>`` (``{fn}``, ``{ref}``: its name, its reference)."""
        return "\n".join(f"def {fn}(*args, **kwargs):\n    return " + body.format(fn=fn, ref=ref)
                         for fn, ref in refs.items())

    use_refs = functions("{ref}(*args, **kwargs)")
    head = "import importlib, os, sys, glob, json, threading, time, signal, inspect, torch\n"
    submissions, grades = paths.get("submissions", "/nonexistent"), paths.get("out", "/nonexistent.csv")
    classmate = os.path.join(submissions, "Alice Smith_1234_attempt_2.ipynb")
    out: dict[str, tuple[dict, Expected]] = {}

    def add(name: str, cell: str, points: dict, reasons: dict | None = None, solved=()) -> None:
        out[name] = (course.notebook(list(solved), extra={end: [head + cell]}), Expected("graded", points, reasons or {}))

    # a FIFO or a folder where the grader's files were: the grader has no files the kernel can reach any more
    add("attack_fifo_and_folders.ipynb",
        "for d in ('.', '..', '../grader', '/tmp', '/tmp/grader', os.path.expanduser('~')):\n"
        f"    for i in {ids!r}:\n"
        "        for name in (f'cases_{i}.pt', f'out_{i}.pt'):\n"
        "            try:\n                os.makedirs(d, exist_ok=True)\n"
        "                os.mkfifo(os.path.join(d, name)) if name.startswith('cases') else "
        "os.makedirs(os.path.join(d, name), exist_ok=True)\n"
        "            except OSError:\n                pass", full, solved=ids)
    # a detached process that waits for the grader to exit and rewrites grades.csv in its author's favour
    forged = "submission,status\nattack_detached_rewriter.ipynb,graded\n"
    script = ("import time\nfor _ in range(1200):\n    try:\n"
              f"        open({grades!r}, 'w').write({forged!r})\n"
              "    except OSError:\n        pass\n    time.sleep(0.25)\n")
    add("attack_detached_rewriter.ipynb",
        "import subprocess\n"
        f"subprocess.Popen([sys.executable, '-c', {script!r}, {MARKER!r}], start_new_session=True,\n"
        "                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)",
        zero)
    # a classmate's notebook, found through the grader's command line or its known path, executed for its answers
    add("attack_classmate_exec.ipynb",
        f"found = [{classmate!r}]\n"
        "for cmdline in glob.glob('/proc/*/cmdline'):\n    try:\n"
        "        found += [a for a in open(cmdline).read().split('\\0') if a.endswith('.ipynb') or 'submission' in a]\n"
        "    except OSError:\n        pass\n"
        "for path in found:\n    for nb in ([path] if path.endswith('.ipynb') else glob.glob(path + '/**/*.ipynb', recursive=True)):\n"
        "        try:\n            cells = json.load(open(nb))['cells']\n        except (OSError, ValueError):\n            continue\n"
        "        for cell in cells:\n            src = ''.join(cell['source'])\n"
        "            if cell['cell_type'] == 'code' and src.lstrip().startswith('def ') and 'NotImplementedError' not in src:\n"
        "                exec(src, globals())", zero, {i: "not implemented" for i in ids})
    # a helper in its own session answers the graded functions over a UNIX socket, with the references
    add("attack_socket_helper.ipynb",
        "import socket, pickle\n"
        "def _serve():\n    server = socket.socket(socket.AF_UNIX)\n    server.bind('/tmp/helper.sock')\n    server.listen()\n"
        "    while True:\n        conn, _ = server.accept()\n        name, args, kwargs = pickle.loads(conn.recv(1 << 24))\n"
        f"        conn.sendall(pickle.dumps(eval({refs!r}[name])(*args, **kwargs)))\n"
        "if os.fork() == 0:\n    os.setsid()\n    _serve()\n    os._exit(0)\n"
        "def _ask(name, *args, **kwargs):\n    conn = socket.socket(socket.AF_UNIX)\n    conn.connect('/tmp/helper.sock')\n"
        "    conn.sendall(pickle.dumps((name, args, kwargs)))\n    return pickle.loads(conn.recv(1 << 24))\n"
        + functions("_ask('{fn}', *args, **kwargs)"),
        zero, {i: "raised" for i in ids})
    # the request rewritten inside the kernel: a sys.audit wrapper, __import__ in the globals, an input transformer
    add("attack_audit_wrapper.ipynb",
        "_audit = sys.audit\ndef _wrapper(event, *args):\n    if event == 'moe_lab.grader.call':\n"
        "        args = (*args[:5], ('moe_lab',))\n    return _audit(event, *args)\nsys.audit = _wrapper\n" + use_refs,
        zero, {i: "called moe_lab" for i in ids})
    add("attack_import_hook.ipynb",
        "import builtins\n_real_import = builtins.__import__\n"
        "def __import__(name, *args, **kwargs):\n    module = _real_import(name, *args, **kwargs)\n"
        "    if name == 'sys':\n        class _Sys:\n            def __getattr__(self, key):\n"
        "                return getattr(module, key)\n            def audit(self, event, *a):\n"
        "                return module.audit(event, *a[:5], ('moe_lab',))\n        return _Sys()\n    return module\n"
        + use_refs, zero, {i: "called moe_lab" for i in ids})
    add("attack_input_transformer.ipynb",
        "get_ipython().input_transformers_post.append(lambda lines: [l.replace(', ())', \", ('moe_lab',))\") "
        "for l in lines])\n" + use_refs, zero, {i: "called moe_lab" for i in ids})
    # a pre_run_cell hook that reads the cases the grader sends and answers them with the references
    add("attack_pre_run_cell.ipynb",
        "_answers = {}\ndef _hook(*args):\n    for path in glob.glob('/tmp/**/cases_*.pt', recursive=True):\n"
        "        try:\n            cases = torch.load(path, weights_only=True)\n        except Exception:\n            continue\n"
        f"        for case in cases:\n            for name, ref in {refs!r}.items():\n"
        "                try:\n                    _answers[repr(case['args'])] = eval(ref)(*case['args'])\n"
        "                except Exception:\n                    pass\n"
        "get_ipython().events.register('pre_run_cell', _hook)\n"
        + functions("_answers.get(repr(list(args)), 0)"),
        zero)
    # the guard switched off from the same interpreter: a thread, the notebook's own audit hook, a signal handler
    add("attack_setprofile_thread.ipynb",
        "_go, _done = threading.Event(), threading.Event()\n"
        "def _switch_off():\n    while True:\n        _go.wait()\n        _go.clear()\n"
        "        sys._current_frames = lambda: {}\n        threading.main_thread = lambda: threading.current_thread()\n"
        "        sys.setprofile(None)\n        threading.setprofile(None)\n        _done.set()\n"
        "threading.Thread(target=_switch_off, daemon=True).start()\n"
        + "\n".join(f"def {fn}(*args, **kwargs):\n    _go.set()\n    _done.wait(5)\n    _done.clear()\n"
                     f"    return {ref}(*args, **kwargs)" for fn, ref in refs.items()),
        zero, {i: "interfered" for i in ids})
    worker = ("_work, _result = [], []\ndef _run_work(*ignored):\n    if _work:\n        ref, a, k = _work.pop()\n"
              "        _result.append(ref(*a, **k))\n")

    def handed_over(trigger: str) -> str:
        """Graded functions that hand their reference call to the worker and make it run (``trigger``)."""
        return "\n".join(f"def {fn}(*args, **kwargs):\n    _work.append(({ref}, args, kwargs))\n{trigger}"
                         "    return _result.pop()" for fn, ref in refs.items())

    add("attack_own_audit_hook.ipynb",
        worker + "sys.addaudithook(lambda event, args: _run_work() if event == 'open' else None)\n"
        + handed_over("    open(os.devnull).close()\n"), zero, {i: "interfered" for i in ids})
    add("attack_sigalrm.ipynb",
        worker + "signal.signal(signal.SIGALRM, _run_work)\n"
        + handed_over("    signal.setitimer(signal.ITIMER_REAL, 0.001)\n    deadline = time.time() + 1\n"
                      "    while not _result and time.time() < deadline:\n        sum(range(100))\n"),
        zero, {i: "raised" for i in ids})
    add("attack_guard_state.ipynb",
        "\n".join(f"def {fn}(*args, **kwargs):\n    state = sys.getprofile().__globals__['_STATE']\n"
                   f"    saved, state.guard = state.guard, None\n    try:\n        return {ref}(*args, **kwargs)\n"
                   "    finally:\n        state.guard = saved" for fn, ref in refs.items()),
        zero, {i: "not available while grading" for i in ids})
    add("attack_jit_trace.ipynb",
        "_traced = {}\n"
        f"for name, ref in {refs!r}.items():\n    try:\n"
        f"        case = importlib.import_module('moe_lab.checks').REGISTRY[dict(zip({list(refs)!r}, {ids!r}))[name]]"
        ".cases(False)[0]\n"
        "        _traced[name] = torch.jit.trace(eval(ref), case.args)\n    except Exception:\n        pass\n"
        + functions("_traced['{fn}'](*args)"),
        zero, {i: "raised KeyError" for i in ids})
    # the answers shipped with the course: the solutions next to moe_lab, the references' source
    add("attack_solutions_exec.ipynb",
        "import moe_lab\n"
        f"for folder in (os.path.join(os.path.dirname(moe_lab.__file__), '..', 'solutions'), {str(course.root / 'solutions')!r}):\n"
        f"    for nb in glob.glob(os.path.join(folder, {course.stem[:2] + '_*.ipynb'!r})):\n"
        "        for cell in json.load(open(nb))['cells']:\n            src = ''.join(cell['source'])\n"
        "            if cell['cell_type'] == 'code' and src.lstrip().startswith('def '):\n"
        "                exec(src, globals())", zero, {i: "not implemented" for i in ids})
    add("attack_getsource.ipynb",
        "import textwrap\n"
        f"for name, ref in {refs!r}.items():\n    source = textwrap.dedent(inspect.getsource(eval(ref)))\n"
        "    exec(source.replace('def ' + eval(ref).__name__ + '(', 'def ' + name + '(', 1), globals())",
        zero, {i: "raised" for i in ids})  # the source is the build's stub
    add("attack_lookup_table.ipynb",
        "from moe_lab.checks import REGISTRY\n_table = {}\n"
        f"for i in {ids!r}:\n    for hidden in (False, True):\n        try:\n"
        "            for case in REGISTRY[i].cases(hidden):\n"
        "                _table[repr(case.args)] = REGISTRY[i].reference(*case.args)\n"
        "        except Exception:\n            pass\n"
        + functions("_table.get(repr(args), 0)"), zero)
    # exceptions whose description itself raises; a spreadsheet formula as a file name
    add("attack_broken_exceptions.ipynb",
        "class _Meta(type):\n    @property\n    def __name__(cls):\n        raise RuntimeError('no name')\n"
        "class _Weird(Exception, metaclass=_Meta):\n    def __str__(self):\n        raise RuntimeError('no text')\n"
        + "\n".join(f"def {fn}(*args, **kwargs):\n    raise _Weird()" for fn in refs),
        zero, {i: "raised" for i in ids})
    out['=HYPERLINK("evil","open me").ipynb'] = (course.notebook(ids), Expected("graded", full))
    return out


def write(folder: Path, files: dict[str, tuple[dict | bytes | Special, Expected]]) -> dict[str, Expected]:
    """Write the files; return ``{label: Expected}`` (labels as the grader prints them: bytes of a name that are
    not UTF-8 as ``\\xNN``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (content, _) in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Special):
            os.symlink(content.target, path) if content.kind == "link" else os.mkfifo(path)
            continue
        data = content if isinstance(content, bytes) else (json.dumps(content, indent=1) + "\n").encode()
        path.write_bytes(data)
    return {os.fsencode(name).decode("utf-8", "backslashreplace"): expected for name, (_, expected) in files.items()}


def default_stem(root: Path = ROOT) -> str:
    """The exercise notebook the corpus is built from: 02 (tensors, gradients, and references cheap enough for
    short time limits) if the course has it, else the one with the most exercises that check gradients."""
    stems = sorted(p.stem for p in (root / "solutions").glob("[0-9][0-9]_*.ipynb"))
    if "02_softmax_gating_topk" in stems:
        return "02_softmax_gating_topk"

    def weight(stem: str) -> tuple[int, int]:
        ids = _load(root / "exercises" / f"{stem}.ipynb")["metadata"]["moe_lab"]["exercises"]
        seed_everything(0)
        return sum(any(c.grad_wrt for c in REGISTRY[i].cases(False)) for i in ids), len(ids)

    return max(stems, key=weight)


def benchmark_set(course: Course, n: int) -> dict[str, tuple[dict, Expected]]:
    """``n`` plausible submissions of one notebook: a mix of complete, partial and untouched ones."""
    ids, rng, out = course.ids, random.Random(0), {}
    for k in range(n):
        solved = [i for i in ids if rng.random() < 0.7]
        out[f"student_{k:02d}.ipynb"] = (course.notebook(solved), Expected("graded", course.score(solved)))
    return out


if __name__ == "__main__":
    folder, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 30
    stem = sys.argv[3] if len(sys.argv) > 3 else default_stem()
    write(folder, benchmark_set(Course(stem), n))
    print(f"wrote {n} submissions of {stem} to {folder}")
