"""The test infrastructure's own checks: what nbval --nbval-lax would report about a notebook run elsewhere (the
browser test's "run all", which replaces nbval's run of the lecture notebooks with widgets)."""
import copy
import json

import nbformat
import pytest

from .notebook_code import ROOT, run_problems, widget_notebooks

CHECKED = "# NBVAL_CHECK_OUTPUT\nprint(x)"


def cell(source, outputs, count=1):
    return nbformat.v4.new_code_cell(source, outputs=[nbformat.from_dict(o) for o in outputs],
                                     execution_count=count)


def stream(text, name="stdout"):
    return {"output_type": "stream", "name": name, "text": text}


@pytest.mark.parametrize("path", widget_notebooks()[:3], ids=lambda p: p.stem)
def test_a_stored_notebook_agrees_with_itself(path):
    cells = json.loads(path.read_text())["cells"]
    assert run_problems(copy.deepcopy(cells), cells) == []


def test_checked_outputs_compare_as_nbval_compares_them():
    stored = [cell(CHECKED, [stream("a 0x7f12 b\n"), stream("c\n")]), cell("print(y)", [stream("1\n")]),
              nbformat.v4.new_markdown_cell("text")]
    same = [cell(CHECKED, [stream(["a 0xbeef", " b\nc\n"])]),  # other address, streams split otherwise
            cell("print(y)", [stream("2\n")]), stored[2]]  # an unchecked cell may print anything
    assert run_problems(same, stored) == []
    changed = copy.deepcopy(same)
    changed[0].outputs = [stream("a 0x1 b\nd\n")]
    assert run_problems(changed, stored) == [
        "cell 0 (NBVAL_CHECK_OUTPUT) outputs differ: expected {'stdout': ['a 0xADDRESS b\\nc\\n']}, "
        "got {'stdout': ['a 0xADDRESS b\\nd\\n']}"]
    failed = copy.deepcopy(same)
    failed[1].outputs = [nbformat.from_dict({"output_type": "error", "ename": "ValueError", "evalue": "bad",
                                             "traceback": []})]
    assert run_problems(failed, stored) == ["cell 1: ValueError: bad"]
    unrun = [cell(CHECKED, [], count=None), *stored[1:]]  # nbval checks no unrun reference cell
    assert run_problems(same, unrun) == []


def test_widget_views_and_images_are_not_compared():
    view = {"output_type": "display_data", "metadata": {},
            "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "a"}, "image/png": "AAA",
                     "text/plain": "Figure"}}
    other = copy.deepcopy(view)
    other["data"].update({"application/vnd.jupyter.widget-view+json": {"model_id": "b"}, "image/png": "BBB"})
    assert run_problems([cell(CHECKED, [other])], [cell(CHECKED, [view])]) == []


def test_the_browser_covers_every_lecture_notebook_with_a_widget():
    names = {p.name for p in widget_notebooks()}
    assert "00_welcome.ipynb" in names and "01_why_moe.ipynb" not in names  # 01 shows no widget
    assert names <= {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
