"""Every solution passes its visible and hidden cases; every generated stub fails them all."""
import re
from collections import Counter

import pytest

from moe_lab.checks import REGISTRY, run_check

from .notebook_code import ROOT, exercises_of, notebook_namespace

SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def test_every_registered_exercise_appears_in_a_solution():
    in_notebooks = {ex for path in SOLUTIONS for ex in exercises_of(path)}
    assert in_notebooks == set(REGISTRY)


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
