"""Course tools: generate ``exercises/`` from ``solutions/``, and execute notebooks to store their outputs.

    python -m moe_lab.course build            # solutions/*.ipynb -> exercises/*.ipynb
    python -m moe_lab.course build --check    # exit 1 if exercises/ is stale
    python -m moe_lab.course execute [NB...]  # run notebooks/ and solutions/ in place, storing outputs

Every notebook the tool writes carries the installed kernelspec (``KERNELSPEC``) and the kernel's ``language_info``
(an exercise notebook: its solution's, stored by ``execute``), so opening it in JupyterLab with the Python that
executed it does not mark it modified (JupyterLab replaces both with the running kernel's and marks the notebook
modified when they differ, e.g. on another Python version). ``execute`` stores the widget state of every displayed widget (JupyterLab shows the
dashboards of a trusted notebook from it, without a kernel) and gives each progress bar a text fallback that shows
where it ended (an untrusted notebook shows the text, not the widget).

A solution cell marks the code to hide with ``# BEGIN SOLUTION`` / ``# END SOLUTION`` lines; the exercise gets
``raise NotImplementedError`` at the same indentation, outputs cleared and ``# NBVAL_CHECK_OUTPUT`` removed
(an unfinished exercise prints TODO lines, not the solution's PASS lines).
"""
from __future__ import annotations

import argparse
import html
import re
import sys
import time
from pathlib import Path

import nbformat

from .checks.calls import STUB_MESSAGE

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
CHECK_CALL = re.compile(r"""check\(\s*["'](\d\d\.\d+)["']\s*,\s*(\w+)\s*\)""")
# what ipykernel installs as "python3" (``jupyter kernelspec list``); a test checks it against the installed one
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` block with a ``NotImplementedError`` stub."""
    out, inside, indent = [], False, ""
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"{where}: nested {BEGIN}")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f'{indent}raise NotImplementedError("{STUB_MESSAGE}")')
        elif stripped == END:
            if not inside:
                raise ValueError(f"{where}: {END} without {BEGIN}")
            inside = False
        elif not inside and stripped != CHECK_MARK:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN} without {END}")
    return "\n".join(out)


def exercise_notebook(solution: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The exercise version of a solution notebook (a new object; ``solution`` is not modified)."""
    nb = nbformat.from_dict(solution)
    checks = []
    for i, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            checks += CHECK_CALL.findall(cell.source)
            cell.source = strip_solutions(cell.source, f"{name} cell {i}")
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    # the kernel's language_info as the solution's execution stored it (JupyterLab writes the running kernel's over
    # it and marks the notebook modified unless they are equal); the build stays a function of solutions/
    nb.metadata["language_info"] = dict(solution.metadata.get("language_info") or {"name": "python"})
    nb.metadata["moe_lab"] = {
        "notebook": name,
        "role": "exercise",
        "exercises": {ex_id: function for ex_id, function in checks},
    }
    return nb


def _dumps(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def build(check_only: bool = False, root: Path = ROOT) -> list[Path]:
    """Regenerate ``exercises/`` from ``solutions/``; return the files that changed (or would change)."""
    changed = []
    wanted = set()
    for src in sorted((root / "solutions").glob("[0-9][0-9]_*.ipynb")):
        dst = root / "exercises" / src.name
        wanted.add(dst)
        text = _dumps(exercise_notebook(nbformat.read(src, as_version=4), src.stem))
        if not dst.exists() or dst.read_text() != text:
            changed.append(dst)
            if not check_only:
                dst.parent.mkdir(exist_ok=True)
                dst.write_text(text)
    for orphan in sorted(set((root / "exercises").glob("[0-9][0-9]_*.ipynb")) - wanted):
        changed.append(orphan)
        if not check_only:
            orphan.unlink()
    return changed


def _model_refs(value) -> list[str]:
    """Model ids a widget state refers to (``"IPY_MODEL_<id>"`` strings, nested in lists and dicts)."""
    if isinstance(value, str):
        return [value[len("IPY_MODEL_"):]] if value.startswith("IPY_MODEL_") else []
    if isinstance(value, dict):
        value = list(value.values())
    return [ref for item in value for ref in _model_refs(item)] if isinstance(value, list) else []


def _progress_text(state: dict, box_id: str) -> str | None:
    """tqdm's text for a stored progress bar (``HBox(HTML, Progress, HTML)``), or None for other widgets."""
    children = [state.get(ref) for ref in _model_refs(state[box_id]["state"].get("children", []))]
    names = [child and child["model_name"] for child in children]
    if names[::2] != ["HTMLModel", "HTMLModel"] or names[1:2] not in (["FloatProgressModel"], ["IntProgressModel"]):
        return None
    left, bar, right = (child["state"] for child in children)
    filled = round(10 * bar.get("value", 0) / bar["max"]) if bar.get("max") else 0
    text = f"{left.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right.get('value', '')}"
    return html.unescape(re.sub(r"<[^>]+>", "", text)).replace("\u2007", " ")  # tqdm pads with figure spaces


def store_widget_state(nb: nbformat.NotebookNode) -> None:
    """Keep only the widget state that the notebook's widget views need, and give each stored progress bar a
    ``text/plain`` that shows where it ended (tqdm's is the 0% line it printed when the bar appeared)."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    views = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
             if WIDGET_VIEW in output.get("data", {})]
    needed, todo = set(), [output["data"][WIDGET_VIEW]["model_id"] for output in views]
    while todo:
        model_id = todo.pop()
        if model_id in state and model_id not in needed:
            needed.add(model_id)
            todo += _model_refs(state[model_id]["state"])
    for output in views:
        model_id = output["data"][WIDGET_VIEW]["model_id"]
        text = _progress_text(state, model_id) if model_id in state else None
        if text is not None:
            output["data"]["text/plain"] = text
    if needed:
        nb.metadata["widgets"][WIDGET_STATE]["state"] = {i: state[i] for i in sorted(needed)}
    else:
        nb.metadata.pop("widgets", None)


def execute(paths: list[Path], timeout: int = 600) -> None:
    """Execute notebooks in place (fresh kernel, cwd = the notebook's folder) and store their outputs, the
    widget state and the installed kernelspec."""
    from nbclient import NotebookClient

    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nb.metadata.pop("widgets", None)  # state of a previous run
        start = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False, store_widget_state=True,
                       coalesce_streams=True, resources={"metadata": {"path": str(path.parent)}}).execute()
        for cell in nb.cells:
            cell.metadata.pop("execution", None)
        store_widget_state(nb)
        nb.metadata["kernelspec"] = dict(KERNELSPEC)
        path.write_text(_dumps(nb))
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_lab.course", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="generate exercises/ from solutions/")
    p_build.add_argument("--check", action="store_true", help="only report; exit 1 if exercises/ is stale")
    p_exec = sub.add_parser("execute", help="execute notebooks in place and store outputs")
    p_exec.add_argument("notebooks", nargs="*", type=Path,
                        help="default: notebooks/*.ipynb and solutions/*.ipynb")
    args = parser.parse_args(argv)
    if args.command == "build":
        changed = build(check_only=args.check)
        for path in changed:
            print(f"{'stale' if args.check else 'wrote'}: {path.relative_to(ROOT)}")
        if args.check and changed:
            print("exercises/ is stale: run `python -m moe_lab.course build`", file=sys.stderr)
            return 1
        if not changed:
            print("exercises/ is up to date")
        return 0
    paths = args.notebooks or sorted([*ROOT.glob("notebooks/[0-9]*.ipynb"), *ROOT.glob("solutions/[0-9]*.ipynb")])
    execute([p.resolve() for p in paths])
    return 0


if __name__ == "__main__":
    sys.exit(main())
