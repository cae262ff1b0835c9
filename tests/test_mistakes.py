"""Every known mistake registered with an exercise is caught by the exercise's visible cases (so the checker can
name it), and is a real mistake: it never passes the hidden cases either."""
import pytest

from moe_lab.checks import REGISTRY, run_check

MISTAKES = [(ex_id, description) for ex_id, ex in sorted(REGISTRY.items()) for description in ex.mistakes]


@pytest.mark.parametrize("ex_id, description", MISTAKES, ids=[f"{e}: {d[:40]}" for e, d in MISTAKES])
def test_known_mistakes_fail_the_visible_cases(ex_id, description):
    wrong = REGISTRY[ex_id].mistakes[description]
    for hidden in (False, True):
        result = run_check(ex_id, wrong, hidden=hidden)
        assert result.status == "failed" and result.points == 0, str(result)
