"""StepTimer: regions per step, nesting, bytes, module hooks, and no effect outside a step."""
import time

import pytest
import torch

from moe_lab.timing import StepTimer, record_bytes, region


def _library_code(seconds: float) -> None:
    """Stands in for library code that marks its own parts."""
    with region("inner"):
        time.sleep(seconds)
    record_bytes("inner", 100, 60)


def test_regions_accumulate_per_step_and_nest():
    timer = StepTimer()
    for seconds in (0.02, 0.0, 0.01):
        with timer.step():
            with timer.region("outer"):
                _library_code(seconds)
                _library_code(seconds)  # entered twice in one step: adds up
    assert len(timer.steps) == 3
    for record, seconds in zip(timer.steps, (0.02, 0.0, 0.01)):
        assert record.seconds["inner"] >= 2 * seconds
        assert record.seconds["step"] >= record.seconds["outer"] >= record.seconds["inner"]
        assert record.bytes_sent["inner"] == 200 and record.off_rank_bytes["inner"] == 120
    summary = timer.summary()
    assert list(summary) == ["step", "outer", "inner"]
    assert summary["inner"] == sorted(r.seconds["inner"] for r in timer.steps)[1]  # the median of three
    assert timer.summary(stat="max")["inner"] >= 0.04 and timer.summary(skip=1, stat="min")["inner"] < 0.02


def test_a_region_missing_from_a_step_counts_zero():
    timer = StepTimer()
    for extra in (True, False, False):
        with timer.step():
            if extra:
                with timer.region("rare"):
                    pass
    assert timer.summary()["rare"] == 0.0 and timer.summary(stat="max")["rare"] > 0


def test_nothing_is_recorded_outside_a_step():
    timer = StepTimer()
    _library_code(0.0)
    with timer.region("free"):
        pass
    assert timer.steps == []
    with pytest.raises(ValueError, match="no steps"):
        timer.summary()
    with timer.step():
        pass
    assert dict(timer.steps[0].seconds).keys() == {"step"} and not timer.steps[0].bytes_sent


def test_time_module_times_each_forward_call_and_removes_its_hooks():
    router = torch.nn.Linear(4, 3)
    timer = StepTimer()
    with timer.time_module(router, "router"):
        with timer.step():
            router(torch.randn(2, 4))
            router(torch.randn(2, 4))
    assert timer.steps[0].seconds["router"] > 0
    assert not router._forward_hooks and not router._forward_pre_hooks


def test_bad_use():
    timer = StepTimer()
    with pytest.raises(RuntimeError, match="do not nest"):
        with timer.step():
            with timer.step():
                pass
    with timer.step():
        pass
    with pytest.raises(ValueError, match="stat"):
        timer.summary(stat="mode")
