"""Instructor grading: run every submitted exercise notebook in its own kernel and score its functions with the
grader's own checks (visible and hidden cases, fresh seed), never with what the notebook printed.

    moe-lab grade SUBMISSIONS... [--out grades.csv] [--feedback DIR] [--jobs N] [--timeout S] [--cell-timeout S]
                  [--call-timeout S] [--memory MB] [--seed N] [--unsafe-no-sandbox]
    moe-lab grade --validate      # every solution scores full marks and every unmodified exercise scores zero
    moe-lab autograder NN         # a Gradescope autograder zip for exercise notebook NN

One concern per module (the threat model is in README.md, "For instructors"):
- ``sandbox``: the bubblewrap sandbox each kernel runs in (or none, when the instructor says so);
- ``build``: the answer-free ``moe_lab`` a kernel imports;
- ``kernel``: a fresh kernel per submission in its sandbox, its time and memory limits;
- ``launcher``: the kernel itself: the integrity guard (``moe_lab.checks.integrity``) on every thread, an IPython
  shell, and the grader's requests over two pipes;
- ``protocol``: the pipe protocol, grader side: cases out, a bounded reply in;
- ``judge``: reference answers (computed here, never in a kernel) and the verdict on a reply;
- ``runner``: finding, reading and identifying submissions, executing their cells, one call per exercise;
- ``reports``: the CSV, the feedback files and the summary;
- ``cli``: the command line and ``--validate``;
- ``gradescope``: the autograder zip and ``results.json``.
"""
from .cli import main, validate
from .judge import judge, reference_cases, verdict
from .kernel import KernelSession, Limits, Outcome
from .reports import exercise_columns, feedback_names, feedback_text, summary, write_csv, write_feedback
from .runner import (Submission, code_cells, collect, course_notebooks, exercises_of, grade_files, grade_submission,
                     identify, prepare, read_submission)
from .sandbox import Sandbox

__all__ = ["KernelSession", "Limits", "Outcome", "Sandbox", "Submission", "code_cells", "collect", "course_notebooks",
           "exercise_columns", "exercises_of", "feedback_names", "feedback_text", "grade_files", "grade_submission",
           "identify", "judge", "main", "prepare", "read_submission", "reference_cases", "summary", "validate",
           "verdict", "write_csv", "write_feedback"]
