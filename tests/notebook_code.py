"""Load the functions a course notebook defines without running its check cells; which notebooks the browser test
runs; and nbval's verdict on a run of a notebook made elsewhere (in the browser)."""
from __future__ import annotations

import copy
import re
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


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"


def widget_notebooks() -> list[Path]:
    """The lecture notebooks (``notebooks/NN_*.ipynb``) whose stored outputs show a widget: the browser test runs
    them (and, when it runs, checks them as nbval would, so nbval does not run them a second time)."""
    return [path for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
            if any(WIDGET_VIEW in out.get("data", {}) for cell in nbformat.read(path, as_version=4).cells
                   if cell.cell_type == "code" for out in cell.outputs)]


def _comparable(outputs: list[dict]) -> dict[str, list]:
    """Outputs as ``nbval --nbval-lax`` compares them: streams coalesced, every key but the skipped ones (metadata,
    images, widget views, ...), text joined and sanitised with :data:`SANITIZE`."""
    from nbval.plugin import coalesce_streams, get_sanitize_patterns, transform_streams_for_comparison

    skip = ("metadata", "traceback", "prompt_number", "output_type", "name", "execution_count", WIDGET_VIEW,
            "image/png", "image/jpeg")
    patterns = get_sanitize_patterns(SANITIZE.read_text())

    def clean(value):
        value = "".join(value) if isinstance(value, list) else value
        if isinstance(value, str):
            for regex, replace in patterns:
                value = re.sub(regex, replace, value)
        return value

    flat: dict[str, list] = {}
    nodes = [nbformat.from_dict(copy.deepcopy(out)) for out in outputs]
    for node in nodes:  # JupyterLab may keep a stream's text as a list of lines
        if node.get("output_type") == "stream" and isinstance(node.text, list):
            node.text = "".join(node.text)
    for out in transform_streams_for_comparison(coalesce_streams(nodes)):
        for key, value in out.items():
            if key not in skip:
                for k, v in (value.items() if key == "data" else [(key, value)]):
                    if k not in skip:
                        flat.setdefault(k, []).append(clean(v))
    return flat


def run_problems(executed: list[dict], stored: list[dict]) -> list[str]:
    """What ``nbval --nbval-lax`` with :data:`SANITIZE` would report about a run of a notebook whose code cells are
    ``stored`` (the file's) and came out as ``executed`` (same cells, run): cells with an error output, and cells
    marked ``# NBVAL_CHECK_OUTPUT`` whose outputs differ from the stored ones."""
    from nbval.plugin import find_comment_markers

    code = [(i, ran, ref) for i, (ran, ref) in enumerate(zip(executed, stored)) if ref["cell_type"] == "code"]
    problems = [f"cell {i}: {out.get('ename')}: {out.get('evalue')}" for i, ran, _ in code
                for out in ran.get("outputs", []) if out.get("output_type") == "error"]
    for i, ran, ref in code:
        source = "".join(ref["source"]) if isinstance(ref["source"], list) else ref["source"]
        markers = dict(find_comment_markers(source))
        if markers.get("check") is True and ref.get("execution_count") is not None:
            got, expected = _comparable(ran.get("outputs", [])), _comparable(ref.get("outputs", []))
            if got != expected:
                problems.append(f"cell {i} (NBVAL_CHECK_OUTPUT) outputs differ: expected {expected}, got {got}")
    return problems
