"""Every solution passes its visible and hidden cases; every generated stub fails them all; every notebook has a
long exercise and every exercise hidden cases; the README course map matches the registry."""
import re
from collections import Counter

import nbformat
import pytest

from moe_lab.checks import REGISTRY, run_check
from moe_lab.utils import seed_everything

from .notebook_code import ROOT, exercises_of, notebook_namespace

SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def test_every_registered_exercise_appears_in_a_solution():
    in_notebooks = {ex for path in SOLUTIONS for ex in exercises_of(path)}
    assert in_notebooks == set(REGISTRY)


@pytest.mark.slow
@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_solutions_pass_visible_and_hidden_cases(path):
    namespace = notebook_namespace(path)
    for ex_id, function in exercises_of(path).items():
        assert REGISTRY[ex_id].function == function
        for seed in (0, 12345):
            result = run_check(ex_id, namespace[function], hidden=True, seed=seed)
            assert result.status == "passed", str(result)
            assert result.points == REGISTRY[ex_id].points


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_exercise_stubs_fail_every_case(path):
    exercise = ROOT / "exercises" / path.name
    namespace = notebook_namespace(exercise)
    for ex_id, function in exercises_of(exercise).items():
        for hidden in (False, True):
            result = run_check(ex_id, namespace[function], hidden=hidden)
            assert result.status == "not implemented" and result.points == 0, str(result)


def test_readme_course_table_matches_the_registry():
    rows = re.findall(r"^\| (\d\d) \| .*\| (\d+) \((\d+) points\) \|$", (ROOT / "README.md").read_text(), re.M)
    counts, points = Counter(), Counter()
    for ex_id, ex in REGISTRY.items():
        counts[ex_id[:2]] += 1
        points[ex_id[:2]] += ex.points
    assert {nb: (int(n), int(p)) for nb, n, p in rows} == {nb: (counts[nb], points[nb]) for nb in counts}


# The exercises a strong student needs about 20 minutes for (an algorithm with an edge case, a gradient by hand, a
# whole layer): every notebook has at least one, and its header says which.
LONG = {"01.4", "02.5", "03.2", "04.2", "04.4", "05.2", "05.4", "06.2", "07.3", "08.6", "09.2", "10.2", "11.6", "12.7",
        "13.5"}


def test_every_notebook_has_a_long_exercise_named_in_its_header():
    for path in SOLUTIONS:
        ids = exercises_of(path)
        long_ones = sorted(LONG & set(ids))
        assert long_ones, path.stem
        header = nbformat.read(path, as_version=4).cells[0].source
        points = " · ".join(f"{i} ({REGISTRY[i].points})" for i in ids)
        assert f"**Points:** {points} — {sum(REGISTRY[i].points for i in ids)} in all. {', '.join(long_ones)} " \
            in header, path.stem
        assert "hint(" in header and "**The rule:**" in header, path.stem
    assert all(REGISTRY[i].points >= 3 for i in LONG)


def test_every_exercise_has_hidden_cases():
    for ex_id, ex in REGISTRY.items():
        seed_everything(0)
        visible = ex.cases(False)
        seed_everything(1000)
        assert len(ex.cases(True)) > len(visible) >= 1, ex_id


EXERCISE_NOTEBOOKS = sorted((ROOT / "exercises").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", EXERCISE_NOTEBOOKS, ids=lambda p: p.stem)
def test_every_instruction_the_notebook_gives_runs(path, capsys):
    """What the header tells a student to call (``hint("08.1")``), and the ``hint(...)`` a failing check line
    points to, run after the notebook's first code cell (its imports) without a NameError."""
    nb = nbformat.read(path, as_version=4)
    namespace: dict = {}
    exec(next(c.source for c in nb.cells if c.cell_type == "code"), namespace)
    calls = re.findall(r"`([A-Za-z_]\w*\([^`]*\))`", nb.cells[0].source)
    assert calls, "the header gives no call to run"
    for ex_id in nb.metadata["moe_lab"]["exercises"]:
        namespace["check"](ex_id, lambda *args, **kwargs: None)
        calls += re.findall(r"(hint\('\d\d\.\d+'\))", capsys.readouterr().out)
    for call in calls:
        eval(call, namespace)
        assert capsys.readouterr().out.startswith("Hint "), call


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("ex_id", sorted(REGISTRY))
def test_hidden_cases_are_random(ex_id):
    """A lookup table of the package's case builders does not score: the hidden cases differ from seed to seed."""
    ex = REGISTRY[ex_id]
    drawn = []
    for seed in (1, 2):
        seed_everything(seed + 1000)
        drawn.append(ex.cases(True))
    assert not all(_same((a.args, a.kwargs), (b.args, b.kwargs)) for a, b in zip(*drawn)), ex_id
