"""Load the functions a course notebook defines, without running its check cells."""
from __future__ import annotations

from pathlib import Path

import nbformat

from moe_lab.course import CHECK_CALL

ROOT = Path(__file__).resolve().parent.parent


def notebook_namespace(path: Path) -> dict:
    """Execute a notebook's code cells (except check cells) in a fresh namespace and return it."""
    nb = nbformat.read(path, as_version=4)
    namespace: dict = {"__name__": "__notebook__"}
    for cell in nb.cells:
        if cell.cell_type == "code" and not CHECK_CALL.search(cell.source):
            exec(compile(cell.source, f"{path.name}", "exec"), namespace)
    return namespace


def exercises_of(path: Path) -> dict[str, str]:
    """Exercise id -> function name, from the check cells of a notebook."""
    nb = nbformat.read(path, as_version=4)
    return {ex: fn for cell in nb.cells if cell.cell_type == "code" for ex, fn in CHECK_CALL.findall(cell.source)}
