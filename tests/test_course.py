"""The course tool: exercises are generated from solutions and must not be stale."""
import shutil
import subprocess
import sys

import nbformat
import pytest

from moe_lab.course import build, exercise_notebook, strip_solutions

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
