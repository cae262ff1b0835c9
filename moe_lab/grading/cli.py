"""``moe-lab grade``: grade folders of submissions, or validate the course as shipped."""
from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from .kernel import Limits
from .reports import _num, summary, write_csv, write_feedback
from .runner import ROOT, collect, exercises_of, grade_files, read_submission
from .sandbox import UNSAFE, Sandbox, bwrap_problem


def choose_sandbox(unsafe: bool, hide: list[Path]) -> tuple[Sandbox | None, str]:
    """The sandbox kernels run in, and what to tell the instructor; ``None`` (with the reason) when no sandbox can
    run here and ``unsafe`` was not asked for."""
    course = [ROOT] if (ROOT / "solutions").exists() else []  # a checkout (not an installed package's folder)
    hidden = tuple(str(p.resolve()) for p in [*course, *hide])
    if unsafe:
        return Sandbox("none", hidden), f"WARNING: grading without a sandbox (--unsafe-no-sandbox): {UNSAFE}"
    problem = bwrap_problem()
    if problem is None:
        return Sandbox("bwrap", hidden), "each submission runs in its own bubblewrap sandbox"
    return None, (f"cannot grade safely: {problem}. Install bubblewrap (and allow unprivileged user namespaces), or "
                  f"run the grader in a disposable container or VM and pass --unsafe-no-sandbox: {UNSAFE}")


def validate(root: Path, *, seed: int, limits: Limits, jobs: int, sandbox: Sandbox) -> list[str]:
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
    for sub in grade_files(files, seed=seed, limits=limits, sandbox=sandbox, jobs=jobs, prefixes=prefixes):
        want = sub.max_total if sub.label.startswith("solutions/") else 0
        if sub.status != "graded" or sub.total != want:
            bad = [str(r) for r in sub.results.values() if r.points != (r.max_points if want else 0)]
            problems.append(f"{sub.label}: {sub.status}, {_num(sub.total)}/{sub.max_total} (expected {want}); "
                            + " | ".join(bad + sub.notes))
    return problems


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
                        help="memory limit of a kernel's process group in MB (resident memory, shared included; "
                             "and RLIMIT_DATA), 0 for none (default %(default)s)")
    parser.add_argument("--seed", type=int, help="seed of the grader's cases (default: a fresh random one)")
    parser.add_argument("--validate", action="store_true",
                        help="check that every solution scores full marks and every exercise zero")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="run kernels without a sandbox where none is available (only inside a disposable "
                             "container or VM: the notebooks' code then runs as you)")
    args = parser.parse_args(argv)
    if min(args.jobs, args.timeout, args.cell_timeout, args.call_timeout) <= 0 or args.memory < 0:
        parser.error("--jobs and the timeouts must be positive, --memory >= 0")
    if not args.validate and not args.submissions:
        parser.error("give submission folders or files (or --validate)")
    missing = [str(p) for p in args.submissions if not (p.exists() or p.is_symlink())]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    limits = Limits(args.timeout, args.cell_timeout, args.call_timeout, args.memory, threads)
    outputs = [args.out.parent if args.out.parent != Path("") else Path.cwd(), *([args.feedback] if args.feedback else [])]
    sandbox, message = choose_sandbox(args.unsafe_no_sandbox, [*args.submissions, *outputs])
    print(message, flush=True)
    if sandbox is None:
        return 2
    print(f"grading seed: {seed}", flush=True)
    if args.validate:
        problems = validate(ROOT, seed=seed, limits=limits, jobs=args.jobs, sandbox=sandbox)
        for problem in problems:
            print(f"FAIL {problem}")
        print("validate: " + ("every solution scores full marks, every exercise zero" if not problems
                              else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    files = collect(args.submissions)
    subs = grade_files(files, seed=seed, limits=limits, sandbox=sandbox, jobs=args.jobs)
    write_csv(subs, args.out)
    if args.feedback:
        write_feedback(subs, args.feedback, seed)
    print(f"\n{summary(subs)}\n\nwrote {args.out}" + (f" and feedback in {args.feedback}/" if args.feedback else ""))
    return 0
