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
