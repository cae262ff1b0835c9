"""The ``moe_lab`` a submission's kernel imports: a copy of the package that holds no answers.

For an exercise notebook, the code that answers its exercises is found by running each exercise's reference and
known mistakes on a case under a profiler (in the grader, from the real package): every ``moe_lab`` function they
run. In the copy, each such function is

- *absent* (its body raises ``RuntimeError: ... is not available while grading``; signature and docstring stay),
  unless code that an exercise of the notebook is allowed to call (``Exercise.allow``) needs it;
- *for library callers only* if allowed code needs it (e.g. notebook 04's ``MoELayer.forward`` computes the Switch
  aux loss of 04.3): it runs when the nearest caller outside installed packages (torch, the standard library) is
  genuine ``moe_lab`` code, and raises otherwise.

Every function of the exercise registrations (``moe_lab/checks/nbNN.py``: references, known mistakes, case
builders) is absent in every build, ``check`` reports that the grader checks outside the kernel
(``checks.core.GRADING_BUILD``), and the course's ``solutions/`` are not part of the package. The infrastructure
(``INFRASTRUCTURE``) is never touched. The grader keeps the real references outside the sandbox.
"""
from __future__ import annotations

import ast
import compileall
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..checks import integrity
from ..checks.core import Exercise, exercise_cases, reference_answer

INFRASTRUCTURE = ("moe_lab.validation", "moe_lab.utils", "moe_lab.config", "moe_lab.checks.core",
                  "moe_lab.checks.calls", "moe_lab.checks.integrity", "moe_lab.grading", "moe_lab.course",
                  "moe_lab.cli", "moe_lab.grade")
UNAVAILABLE = "is not available while grading (the grader computes the answers outside this kernel)"
IMPORTING, STUB = "_grading_importing", "_grading_unavailable"  # names the build adds to exercise modules
VALIDATION = re.compile(r"^_?check")  # argument checks (check_k, _check_activation): never answers, used everywhere
IMPORT_TRACE = """
import importlib, json, pkgutil, sys
for heavy in ("torch", "numpy", "matplotlib.pyplot", "pandas", "ipywidgets", "IPython"):  # not profiled: faster
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
called = set()
def profile(frame, event, arg):
    if event == "call":
        called.add((frame.f_code.co_filename, frame.f_code.co_qualname))
sys.setprofile(profile)
import moe_lab
for info in pkgutil.walk_packages(moe_lab.__path__, "moe_lab."):
    if info.name.startswith(("moe_lab.bench", "moe_lab.examples", "moe_lab.grading", "moe_lab.cli", "moe_lab.grade")):
        continue  # tools, never imported by a student's kernel
    try:
        importlib.import_module(info.name)
    except BaseException:
        pass
sys.setprofile(None)
with open(sys.argv[1], "w") as f:
    json.dump(sorted(called), f)
"""


def _deferred(name: str) -> bool:
    """Code autograd runs later (a ``backward``, a closure used as a gradient hook), whoever built the graph: no
    build touches it (it only computes the gradients of forward code, which the build does cover)."""
    return name.endswith(".backward") or ".<locals>." in name


def _function(name: str) -> str:
    """The function (``def``) that holds the code ``name``: itself, or the one a comprehension or lambda is in
    (``moe_lab.f`` for ``moe_lab.f.<locals>.<genexpr>``)."""
    parts = name.split(".")
    while len(parts) > 2 and parts[-1].startswith("<") and parts[-2] == "<locals>":
        parts = parts[:-2]
    return ".".join(parts)


def trace(exercises: list[Exercise]) -> tuple[set[str], set[str], set[str]]:
    """``(answers, needed, allowed)`` for a notebook's ``exercises``: the moe_lab functions their references and
    known mistakes run (first visible case), those of them that run inside code the exercises may call, and the
    names the exercises allow (qualified names of functions)."""
    table = integrity.package_table()
    answers, needed, allowed = set(), set(), set()
    for ex in exercises:
        case = exercise_cases(ex, 0, False)[0][0]
        codes: dict[int, object] = {}
        under: set[int] = set()

        def profile(frame, event, arg, ex=ex, codes=codes, under=under):
            if event != "call":
                return
            code = frame.f_code
            codes.setdefault(id(code), code)
            if not ex.allow or id(code) in under:
                return
            kind = table.lookup(code)
            caller = frame.f_back  # called, earlier, inside allowed code: already marked
            if (kind and integrity.is_allowed(kind[0], ex.allow)) or (caller is not None and id(caller.f_code) in under):
                under.add(id(code))

        for fn in (ex.reference, *ex.mistakes.values()):
            sys.setprofile(profile)
            try:
                reference_answer(fn, case)
            except Exception:  # noqa: BLE001  (a mistake that does not apply to this case)
                pass
            finally:
                sys.setprofile(None)
        for key, code in codes.items():
            kind = table.lookup(code)
            if kind is None or not kind[1]:
                continue
            name = _function(kind[0])
            if name.startswith(INFRASTRUCTURE):
                continue
            answers.add(name)
            if key in under:
                needed.add(name)
        allowed.update(entry for entry in ex.allow)
    return answers, needed, allowed


class _Stubber(ast.NodeTransformer):
    """Replace the bodies of the functions in ``absent`` (and, with ``everything``, of every function and lambda)
    by a ``RuntimeError``, and prepend the library-caller check to those in ``checked``."""

    def __init__(self, module: str, absent: set[str], checked: set[str], everything: bool):
        self.module, self.absent, self.checked, self.everything = module, absent, checked, everything
        self.scope: list[str] = []

    def _qualname(self, name: str) -> str:
        return ".".join([self.module, *self.scope, name])

    @staticmethod
    def _raise(name: str) -> ast.stmt:
        return ast.parse(f"raise RuntimeError({f'{name} {UNAVAILABLE}'!r})").body[0]

    def _function(self, node):
        name = self._qualname(node.name)
        doc = node.body[:1] if ast.get_docstring(node) is not None else []
        if self.everything:  # while the module is imported, a call (a mistake's factory) gets a stub back
            node.body = doc + ast.parse(f"if {IMPORTING}:\n    return {STUB}({name!r})").body + [self._raise(name)]
            return node
        if name in self.absent:
            node.body = doc + [self._raise(name)]
            return node
        if name in self.checked:
            check = ast.parse(f"__import__('moe_lab.checks.integrity', fromlist=['_']).library_callers_only({name!r})")
            node.body = doc + check.body + node.body[len(doc):]
        self.scope += [node.name, "<locals>"]
        self.generic_visit(node)
        del self.scope[-2:]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()
        return node

    def visit_Lambda(self, node):
        if self.everything:
            node.body = ast.parse(f"{STUB}({self.module + '.<lambda>'!r})()", mode="eval").body
        return node

    def frame(self, tree: ast.Module) -> ast.Module:
        """In an exercise module: the stub factory and the flag that says the module is being imported."""
        if self.everything:
            head = ast.parse(f"{IMPORTING} = True\n\ndef {STUB}(name):\n    def unavailable(*args, **kwargs):\n"
                             f"        raise RuntimeError(name + {' ' + UNAVAILABLE!r})\n    return unavailable\n").body
            at = next((i + 1 for i, node in enumerate(tree.body) if isinstance(node, ast.ImportFrom)
                       and node.module == "__future__"), 0)
            tree.body[at:at] = head
            tree.body += ast.parse(f"{IMPORTING} = False").body
        return tree

    def visit_Assign(self, node):  # GRADING_BUILD = False -> True in checks.core
        if self.module == "moe_lab.checks.core" and [getattr(t, "id", None) for t in node.targets] == ["GRADING_BUILD"]:
            node.value = ast.Constant(True)
        return node


def _module(path: Path, package: Path) -> str:
    return integrity.module_name(str(path), str(package))


def imported(package: Path) -> set[str]:
    """Qualified names of the package's functions that run while its modules are imported (in a fresh
    interpreter): class bodies and module constants need them, so no build touches them."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", IMPORT_TRACE, f"{tmp}/called.json"], capture_output=True, check=True,
                       cwd=tmp, env={**os.environ, "PYTHONPATH": str(package.parent), "MPLBACKEND": "Agg"})
        called = json.loads(Path(f"{tmp}/called.json").read_text())
    prefix = os.path.realpath(package) + os.sep
    return {f"{integrity.module_name(f, str(package))}.{q}" for f, q in called
            if os.path.realpath(f).startswith(prefix)}


def build(exercises: list[Exercise], dest: Path, package: Path, keep: set[str] = frozenset()) -> Path:
    """Write the answer-free copy of ``package`` for a notebook's ``exercises`` to ``dest/moe_lab``
    (byte-compiled), leaving the functions in ``keep`` (see :func:`imported`) as they are; returns ``dest``."""
    answers, needed, allowed = trace(exercises)
    answers = {n for n in answers if n not in keep and not VALIDATION.match(n.rsplit(".", 1)[-1]) and not _deferred(n)}
    absent = {n for n in answers if n not in needed and not integrity.is_allowed(n, tuple(allowed))}
    checked = {n for n in answers & needed if not integrity.is_allowed(n, tuple(allowed))}
    target = dest / "moe_lab"
    if target.exists():
        shutil.rmtree(target)
    for folder, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        out = target / Path(folder).relative_to(package)
        out.mkdir(parents=True, exist_ok=True)
        for file in sorted(f for f in files if f.endswith(".py")):
            src = Path(folder) / file
            module = _module(src, package)
            exercises = module.startswith("moe_lab.checks.nb")
            mine = {n for n in absent | checked if n.startswith(module + ".")}
            if not (exercises or mine or module == "moe_lab.checks.core"):
                shutil.copyfile(src, out / file)
                continue
            stubber = _Stubber(module, absent, checked, exercises)
            tree = stubber.frame(stubber.visit(ast.parse(src.read_text(encoding="utf-8"))))
            (out / file).write_text(ast.unparse(ast.fix_missing_locations(tree)) + "\n", encoding="utf-8")
    compileall.compile_dir(str(target), quiet=2)
    return dest


def _fingerprint(package: Path) -> str:
    digest = hashlib.sha256(sys.version.encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


def cache_root() -> Path:
    """Where builds are kept between runs: ``$MOE_LAB_GRADING_CACHE``, else ``~/.cache/moe_lab/grading``."""
    env = os.environ.get("MOE_LAB_GRADING_CACHE")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe_lab" / "grading"
    return Path(env) if env else base


def cached_build(prefix: str, exercises: list[Exercise], package: Path, root: Path | None = None) -> Path:
    """The answer-free build for notebook ``prefix`` (a folder holding ``moe_lab``), built once per version of
    the package's sources and kept under :func:`cache_root` (written to a temporary folder, then renamed)."""
    root = cache_root() if root is None else root
    folder = root / _fingerprint(package)
    final = folder / prefix
    if (final / "moe_lab" / "__init__.py").exists():
        try:
            os.utime(folder)  # in use: not pruned
        except OSError:
            pass
        return final
    if not folder.exists():  # builds of other versions of the sources, unused for a day
        for old in root.glob("*") if root.exists() else []:
            if old.is_dir() and time.time() - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    keep_file = folder / "imported.json"
    try:
        keep = set(json.loads(keep_file.read_text()))
    except (OSError, ValueError):
        keep = imported(package)
        _publish_text(keep_file, json.dumps(sorted(keep)))
    work = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=folder))
    try:
        build(exercises, work, package, keep)
        os.chmod(work, 0o755)
        try:
            os.rename(work, final)
        except OSError:  # another process published it first
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _publish_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
