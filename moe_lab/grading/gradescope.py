"""Gradescope: ``moe-lab autograder NN`` builds the autograder zip of exercise notebook ``NN``; inside Gradescope's
container, ``run_autograder`` grades ``/autograder/submission`` into ``/autograder/results/results.json``.

The zip holds ``setup.sh`` (installs Python, bubblewrap, CPU torch and the course package, and builds the
answer-free ``moe_lab`` once), ``run_autograder``, ``autograder.json`` (the notebook) and the package's sources;
never ``solutions/``. Each submission runs in a bubblewrap sandbox where the container allows user namespaces;
otherwise the container is the boundary (Gradescope runs each submission in a container of its own), and the kernel
runs as an unprivileged user that cannot read the course's installed package (``setup.sh`` makes it readable by root
only), so the references stay out of its reach either way.

``results.json`` follows Gradescope's specification: one test per exercise (``score``, ``max_score``, ``output``: the
verdict the grader's feedback gives, ``visibility: visible``); when an exercise failed on a hidden case, its visible
output says so and the hidden case's detail is a second, zero-point test with ``visibility: after_published``.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import stat
import sys
import zipfile
from pathlib import Path

from .kernel import PACKAGE, Limits
from .runner import ROOT, collect, course_notebooks, exercises_of, grade_files, prepare
from .sandbox import UNSAFE, Sandbox, bwrap_problem

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image (the zip is in /autograder/source).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends python3 python3-venv python3-pip bubblewrap
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install -q --index-url https://download.pytorch.org/whl/cpu "torch=={torch}"
/autograder/venv/bin/pip install -q /autograder/source
# the installed course (its references) is root's only: a kernel without a sandbox runs as an unprivileged user
chmod -R go-rwx "$(/autograder/venv/bin/python -c 'import moe_lab, os; print(os.path.dirname(moe_lab.__file__))')"
chmod -R go-rwx /autograder/source
mkdir -p /autograder/cache && chmod 755 /autograder/cache
cd / && MOE_LAB_GRADING_CACHE=/autograder/cache /autograder/venv/bin/python -m moe_lab.grading.gradescope prepare \\
    --config /autograder/source/autograder.json
chmod -R a+rX /autograder/cache
"""
RUN = """#!/usr/bin/env bash
# Gradescope runs this for each submission: grade /autograder/submission into /autograder/results/results.json.
set -euo pipefail
AUTOGRADER="${AUTOGRADER:-/autograder}"
PYTHON="${MOE_LAB_PYTHON:-$AUTOGRADER/venv/bin/python}"
export MOE_LAB_GRADING_CACHE="${MOE_LAB_GRADING_CACHE:-$AUTOGRADER/cache}"
mkdir -p "$AUTOGRADER/results"
cd /
exec "$PYTHON" -m moe_lab.grading.gradescope run --config "$AUTOGRADER/source/autograder.json" \\
    --submission "$AUTOGRADER/submission" --results "$AUTOGRADER/results/results.json"
"""


def _notebook(prefix: str) -> str:
    notebooks = course_notebooks()
    if prefix not in notebooks:
        raise SystemExit(f"moe-lab autograder: NN must be an exercise notebook, one of {sorted(notebooks)}; "
                         f"got {prefix!r}")
    return notebooks[prefix]


def build_zip(prefix: str, out: Path, package: Path = PACKAGE) -> Path:
    """Write the Gradescope autograder zip for exercise notebook ``prefix`` to ``out``."""
    import torch

    config = {"notebook": _notebook(prefix), "limits": {"total": 600, "cell": 120, "call": 240, "memory_mb": 3072}}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in (("setup.sh", SETUP.replace("{torch}", torch.__version__.split("+")[0])),
                           ("run_autograder", RUN)):
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o755) << 16
            zf.writestr(info, text)
        zf.writestr("autograder.json", json.dumps(config, indent=1) + "\n")
        zf.write(package.parent / "pyproject.toml", "pyproject.toml")
        zf.writestr("README.md", "MoE Lab autograder: the course package, without solutions.\n")
        for path in sorted(package.rglob("*.py")):
            if "__pycache__" not in path.parts:
                zf.write(path, str(path.relative_to(package.parent)))
    return out


def results(sub, seed: int, sandbox_note: str) -> dict:
    """Gradescope's ``results.json`` for one graded submission."""
    tests = []
    for ex in exercises_of(sub.notebook[:2]) if sub.notebook else []:
        result = sub.results.get(ex.id)
        text = str(result) if result is not None else f"{ex.id} {ex.function}: not graded"
        hidden = result is not None and result.message.startswith("hidden case")
        visible = (f"[FAIL] {ex.id} {ex.function}: (0/{ex.points} points)\n    failed one of the grader's hidden "
                   "cases (other sizes, seeds and edge cases than the notebook's): the details show once grades "
                   "are published") if hidden else text
        tests.append({"name": f"{ex.id} {ex.title}", "number": ex.id, "score": result.points if result else 0,
                      "max_score": ex.points, "output": visible, "visibility": "visible"})
        if hidden:
            tests.append({"name": f"{ex.id} {ex.title}: the hidden case", "number": f"{ex.id}.hidden", "score": 0,
                          "max_score": 0, "output": text, "visibility": "after_published"})
    lines = [f"Status: {sub.status}. Hidden cases drawn with seed {seed}. {sandbox_note}"]
    lines += [f"- {note}" for note in sub.notes]
    return {"score": sub.total, "output": "\n".join(lines), "visibility": "visible", "stdout_visibility": "hidden",
            "tests": tests}


def _sandbox() -> tuple[Sandbox, str]:
    hidden = tuple(str(p) for p in (ROOT,) if (ROOT / "solutions").exists())
    problem = bwrap_problem()
    if problem is None:
        return Sandbox("bwrap", hidden), "The submission ran in a bubblewrap sandbox."
    user = 65534 if os.geteuid() == 0 else None
    note = (f"No sandbox in this container ({problem}): the container is the boundary"
            + (", and the kernel ran as an unprivileged user." if user is not None else f" ({UNSAFE})."))
    return Sandbox("none", hidden, user=user), note


def run(config_path: Path, submission: Path, out: Path) -> dict:
    """Grade the notebook in ``submission`` (Gradescope's folder) and write ``results.json`` to ``out``."""
    config = json.loads(config_path.read_text())
    prefix = config["notebook"][:2]
    limits = Limits(**config.get("limits", {}))
    seed = secrets.randbelow(2**31)
    sandbox, note = _sandbox()
    files = [(path, label) for path, label in collect([submission]) if label.endswith(".ipynb")]
    notebooks = course_notebooks()
    chosen = next(((p, label) for p, label in files if prepare(p, label, notebooks)[0].notebook[:2] == prefix),
                  files[0] if files else None)
    if chosen is None:
        data = {"score": 0, "output": f"No notebook (.ipynb) was submitted: upload exercises/{config['notebook']}"
                ".ipynb with your functions filled in.", "tests": []}
    else:
        sub = grade_files([chosen], seed=seed, limits=limits, sandbox=sandbox, prefixes={chosen[1]: prefix},
                          progress=False)[0]
        data = results(sub, seed, note)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    """``moe-lab autograder NN [--out FILE]``; ``python -m moe_lab.grading.gradescope prepare|run ...`` inside
    Gradescope."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["prepare"], ["run"]):
        parser = argparse.ArgumentParser(prog="python -m moe_lab.grading.gradescope")
        parser.add_argument("command", choices=["prepare", "run"])
        parser.add_argument("--config", type=Path, required=True)
        parser.add_argument("--submission", type=Path)
        parser.add_argument("--results", type=Path)
        args = parser.parse_args(argv)
        if args.command == "prepare":
            from .build import cached_build

            prefix = json.loads(args.config.read_text())["notebook"][:2]
            print(cached_build(prefix, exercises_of(prefix), PACKAGE))
            return 0
        run(args.config, args.submission, args.results)
        return 0
    parser = argparse.ArgumentParser(prog="moe-lab autograder", description="Build the Gradescope autograder zip "
                                     "of one exercise notebook (README: 'Gradescope').")
    parser.add_argument("notebook", help="the exercise notebook's number, e.g. 02")
    parser.add_argument("--out", type=Path, help="zip to write (default: autograder_NN.zip)")
    args = parser.parse_args(argv)
    prefix = args.notebook[:2]
    out = build_zip(prefix, args.out or Path(f"autograder_{prefix}.zip"))
    print(f"wrote {out}: upload it as the autograder of {_notebook(prefix)} (Gradescope: 'Configure Autograder', "
          "'Zip file upload', Ubuntu base image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
