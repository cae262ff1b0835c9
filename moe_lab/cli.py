"""The ``moe-lab`` command: ``moe-lab course ...`` (see :mod:`moe_lab.course`), ``moe-lab grade ...`` and
``moe-lab autograder NN`` (see :mod:`moe_lab.grading`)."""
from __future__ import annotations

import sys

from . import course, grading
from .grading import gradescope

COMMANDS = {"course": course.main, "grade": grading.main, "autograder": gradescope.main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: moe-lab {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
