"""Notebook 09's exercises: every known mistake is caught by the visible or hidden cases (and is told apart from
the reference), and the cache simulator's rule variants reduce to the reference when no rule is changed."""
import pytest

from moe_lab.checks import REGISTRY, run_check
from moe_lab.checks.core import exercise_cases
from moe_lab.checks.nb09 import _cache_variant, simulate_expert_cache

NB09 = [ex_id for ex_id in REGISTRY if ex_id.startswith("09.")]


def test_notebook_09_has_five_exercises_with_mistakes():
    assert len(NB09) >= 5 and all(REGISTRY[i].mistakes for i in NB09)


@pytest.mark.parametrize("ex_id", NB09)
def test_every_known_mistake_fails(ex_id):
    for description, mistake in REGISTRY[ex_id].mistakes.items():
        result = run_check(ex_id, mistake, hidden=True)
        assert result.status == "failed", (description, str(result))


def test_cache_variant_without_changes_is_the_reference():
    for seed in (0, 1, 2):
        for case, _ in exercise_cases(REGISTRY["09.2"], seed, hidden=True):
            assert _cache_variant(*case.args) == simulate_expert_cache(*case.args), case.name
