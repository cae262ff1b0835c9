"""Instructor grading: run every submitted exercise notebook in its own kernel and score its functions with the
grader's own checks (visible and hidden cases, fresh seed), never with what the notebook printed.

    moe-lab grade SUBMISSIONS... [--out grades.csv] [--feedback DIR] [--jobs N] [--timeout S] [--cell-timeout S]
                  [--call-timeout S] [--memory MB] [--seed N]
    moe-lab grade --validate      # every solution scores full marks and every unmodified exercise scores zero

One concern per module (the threat model is in README.md, "For instructors"):
- ``kernel``: the sandbox: a fresh kernel per submission, its process group, time and memory limits;
- ``launcher``: what runs first in that kernel: the integrity guard (``moe_lab.checks.integrity``) on every
  thread, and the signed replies to the grader's calls;
- ``protocol``: the call protocol, grader side: cases out, a verified and bounded reply in;
- ``judge``: reference answers (computed here, never in a kernel) and the verdict on a reply;
- ``runner``: finding, reading and identifying submissions, executing their cells, one call per exercise;
- ``reports``: the CSV, the feedback files and the summary;
- ``cli``: the command line and ``--validate``.
"""
from .cli import main, validate
from .judge import judge, reference_cases, verdict
from .kernel import KernelSession, Limits, Outcome
from .reports import exercise_columns, feedback_names, feedback_text, summary, write_csv, write_feedback
from .runner import (Submission, code_cells, collect, course_notebooks, exercises_of, grade_files, grade_submission,
                     identify, prepare, read_submission)

__all__ = ["KernelSession", "Limits", "Outcome", "Submission", "code_cells", "collect", "course_notebooks",
           "exercise_columns", "exercises_of", "feedback_names", "feedback_text", "grade_files", "grade_submission",
           "identify", "judge", "main", "prepare", "read_submission", "reference_cases", "summary", "validate",
           "verdict", "write_csv", "write_feedback"]
