"""Every case of the bad-input catalogue (tests/bad_input_cases.py) ends in a correct result or a ValueError /
TypeError whose message names the argument."""
import warnings
from pathlib import Path

import pytest
import torch

from tests.bad_input_cases import all_cases, counts_table, same
from tests.strategies import names

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "casting complex values to real discards the imaginary part"
        if case.error is not None:
            with pytest.raises(case.raises) as info:
                case.call()
            assert names(str(info.value), case.error), f"the message does not name {case.error!r}: {info.value}"
        else:
            result, expected = case.call(), case.expect()
            assert same(result, expected), f"{result!r} != {expected!r}"


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


def test_readme_states_the_catalogue_counts():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert counts_table() in readme, "update the README's table:\n" + counts_table()


@pytest.mark.parametrize("counts", [[1, 1, 4], [1, 1], [2, 2]], ids=["3 groups for 2 matrices", "4 rows of 6",
                                                                     "4 rows of 6 in 2 groups"])
def test_grouped_mm_rejects_counts_that_do_not_match_its_operands(counts):
    """``counts`` needs one entry per matrix of ``w``, summing to the rows of ``x`` (``[1, 1, 4]`` once silently
    dropped the third group: a [2, 2] result for 6 rows)."""
    from moe_lab.experts import grouped_mm

    with pytest.raises(ValueError, match="counts"):
        grouped_mm(torch.randn(6, 3), torch.randn(2, 3, 2), torch.tensor(counts), fused=False)


def test_all_finite_is_exact_even_where_the_sum_overflows():
    """The one-reduction finiteness test behind the input checks: a sum of finite values that overflows still
    counts as finite (the exact test decides), NaN and infinities anywhere do not."""
    from moe_lab.validation import all_finite

    big = torch.full((4, 3), 3e38)  # finite, but its sum overflows float32
    assert all_finite(big) and all_finite(big.bfloat16()) and all_finite(torch.arange(5))
    assert all_finite(torch.zeros(0)) and all_finite(torch.tensor([True]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(2, 5)
        t[1, 3] = bad
        assert not all_finite(t) and not all_finite(t.double()) and not all_finite(t.T)
    from moe_lab.validation import check_finite

    with pytest.raises(ValueError, match="x must be finite, got 1 non-finite"):
        check_finite("x", torch.tensor([1.0, float("nan")]))
