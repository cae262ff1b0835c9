"""Every case of the bad-input catalogue (tests/bad_input_cases.py) ends in a correct result or a ValueError /
TypeError whose message names the argument."""
import warnings

import pytest

from tests.bad_input_cases import all_cases, names, same

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "casting complex values to real discards the imaginary part"
        if case.error is not None:
            with pytest.raises((ValueError, TypeError)) as info:
                case.call()
            assert names(str(info.value), case.error), f"the message does not name {case.error!r}: {info.value}"
        else:
            result, expected = case.call(), case.expect()
            assert same(result, expected), f"{result!r} != {expected!r}"


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)
