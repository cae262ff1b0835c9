"""The course tool: exercises are generated from solutions and must not be stale."""
import shutil
import subprocess
import sys

import nbformat
import pytest

from moe_lab.course import (
    KERNELSPEC, WIDGET_STATE, WIDGET_VIEW, build, exercise_notebook, store_widget_state, strip_solutions,
)

from .notebook_code import ROOT


def test_strip_solutions_keeps_signature_and_indentation():
    source = 'def f(x):\n    """Doc."""\n    # BEGIN SOLUTION\n    return x + 1\n    # END SOLUTION\n'
    assert strip_solutions(source) == (
        'def f(x):\n    """Doc."""\n    # YOUR CODE HERE\n    raise NotImplementedError("replace this line with your code")'
    )
    assert strip_solutions("# NBVAL_CHECK_OUTPUT\ncheck('01.1', f)") == "check('01.1', f)"


@pytest.mark.parametrize("source,match", [
    ("# BEGIN SOLUTION\nx = 1\n", "without # END"),
    ("x = 1\n# END SOLUTION\n", "without # BEGIN"),
    ("# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n", "nested"),
])
def test_strip_solutions_rejects_broken_markers(source, match):
    with pytest.raises(ValueError, match=match):
        strip_solutions(source)


def test_exercise_notebook_is_clean_and_labelled():
    solution = nbformat.read(ROOT / "solutions" / "02_softmax_gating_topk.ipynb", as_version=4)
    nb = exercise_notebook(solution, "02_softmax_gating_topk")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert not any("BEGIN SOLUTION" in c.source or "NBVAL_CHECK_OUTPUT" in c.source for c in code)
    assert nb.metadata["moe_lab"]["role"] == "exercise"
    assert nb.metadata["moe_lab"]["exercises"]["02.5"] == "moe_forward"
    assert any(c.outputs for c in solution.cells if c.cell_type == "code")  # the input is not modified


def test_repository_exercises_are_up_to_date():
    result = subprocess.run([sys.executable, "-m", "moe_lab.course", "build", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_check_detects_stale_and_orphan_exercises(tmp_path):
    shutil.copytree(ROOT / "solutions", tmp_path / "solutions")
    assert build(root=tmp_path)  # first build writes every exercise
    assert build(check_only=True, root=tmp_path) == []
    solution = tmp_path / "solutions" / "01_why_moe.ipynb"
    nb = nbformat.read(solution, as_version=4)
    nb.cells[0].source += "\nA new sentence."
    nbformat.write(nb, solution)
    (tmp_path / "exercises" / "99_orphan.ipynb").write_text("{}")
    stale = build(check_only=True, root=tmp_path)
    assert {p.name for p in stale} == {"01_why_moe.ipynb", "99_orphan.ipynb"}
    build(root=tmp_path)
    assert build(check_only=True, root=tmp_path) == []
    assert not (tmp_path / "exercises" / "99_orphan.ipynb").exists()


def test_kernelspec_is_the_installed_one():
    """Opening a notebook must not mark it modified: the stored kernelspec equals what ipykernel installs."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNELSPEC["name"])
    assert (spec.display_name, spec.language) == (KERNELSPEC["display_name"], KERNELSPEC["language"])


def test_every_notebook_the_tool_writes_carries_the_kernelspec():
    # solutions/ get it the next time their outputs are stored with `execute`
    stored = sorted([*ROOT.glob("notebooks/[0-9]*.ipynb"), *ROOT.glob("exercises/[0-9]*.ipynb")])
    assert stored
    for path in stored:
        assert nbformat.read(path, as_version=4).metadata["kernelspec"] == KERNELSPEC, path.name
    solution = nbformat.read(ROOT / "solutions" / "01_why_moe.ipynb", as_version=4)
    solution.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    assert exercise_notebook(solution, "01_why_moe").metadata["kernelspec"] == KERNELSPEC


def _progress_bar_notebook() -> nbformat.NotebookNode:
    """A notebook as nbclient leaves it after a tqdm bar (HBox of HTML, FloatProgress, HTML) ran to the end,
    with the state of a widget that is not displayed anywhere."""
    def model(name, **state):
        return {"model_name": name, "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
                "state": {"_model_name": name, **state}}

    state = {
        "box": model("HBoxModel", children=["IPY_MODEL_left", "IPY_MODEL_bar", "IPY_MODEL_right"],
                     layout="IPY_MODEL_layout"),
        "left": model("HTMLModel", value="train: 100%"), "bar": model("FloatProgressModel", value=80.0, max=80.0),
        "right": model("HTMLModel", value="\u2007\u200780/80\u2007[00:01&lt;00:00]"),
        "layout": model("LayoutModel"), "closed": model("IntSliderModel", value=3),
    }
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("train()")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "text/plain": "train:   0%|          | 0/80 [00:00<?, ?it/s]",
        "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0, "model_id": "box"}})]
    nb.cells = [cell]
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    return nb


def test_store_widget_state_keeps_what_views_need_and_shows_where_bars_ended():
    nb = _progress_bar_notebook()
    store_widget_state(nb)
    assert set(nb.metadata["widgets"][WIDGET_STATE]["state"]) == {"box", "left", "bar", "right", "layout"}
    assert nb.cells[0].outputs[0]["data"]["text/plain"] == "train: 100%|██████████|  80/80 [00:01<00:00]"


def test_store_widget_state_drops_the_metadata_without_views():
    nb = _progress_bar_notebook()
    nb.cells[0].outputs = []
    store_widget_state(nb)
    assert "widgets" not in nb.metadata


def test_stored_lecture_notebooks_hold_the_state_of_every_widget_they_show():
    for path in sorted(ROOT.glob("notebooks/[0-9]*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        views = [out["data"][WIDGET_VIEW]["model_id"] for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.outputs if WIDGET_VIEW in out.get("data", {})]
        state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
        assert all(view in state for view in views), f"{path.name}: a displayed widget has no stored state"
        texts = [out["data"]["text/plain"] for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                 if WIDGET_VIEW in out.get("data", {})]
        assert not any(" 0%|" in text for text in texts), f"{path.name}: a stored progress bar shows 0%"


def test_exercise_notebooks_carry_the_kernels_language_info():
    """JupyterLab replaces the stored language_info with the running kernel's and marks the notebook modified if they
    differ: an exercise stores its solution's (what ipykernel reported when it was executed), all of its fields."""
    from ipykernel.ipkernel import IPythonKernel

    for solution in sorted(ROOT.glob("solutions/[0-9]*.ipynb")):
        stored = nbformat.read(ROOT / "exercises" / solution.name, as_version=4).metadata["language_info"]
        assert stored == nbformat.read(solution, as_version=4).metadata["language_info"], solution.name
        assert set(stored) == set(IPythonKernel.language_info), solution.name
