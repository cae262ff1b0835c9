"""``python -m moe_lab.grade ...``: the instructor's grader (see :mod:`moe_lab.grading`)."""
import sys

from .grading import main

if __name__ == "__main__":
    sys.exit(main())
