"""Comparison dashboard (notebook 13): compute function against a hand-made result, widget headlessly."""
import statistics

import pytest
import torch

from moe_lab.widgets import comparison_curves, comparison_dashboard


def _result():
    """Two arms, three seeds, made by hand: arm "a" 4 steps, arm "b" 2 steps of twice the FLOPs."""
    def run(seed, ce, times, val):
        return {"seed": seed, "train_ce": ce, "step_time": times, "val": val, "val_ce": val[-1][1]}
    return {"setup": {"seeds": [0, 1, 2]},
            "arms": {"a": {"steps": 4, "flops_per_step": 10}, "b": {"steps": 2, "flops_per_step": 20}},
            "runs": {"a": [run(s, [4.0 + s, 3.0, 2.0 + s, 1.0], [0.1, 0.1, 0.2, 0.2], [[2, 3.0 + s], [4, 2.0 + s]])
                           for s in range(3)],
                     "b": [run(s, [5.0, 1.0 + s], [0.5 * (s + 1), 0.5], [[2, 1.5 + s]]) for s in range(3)]}}


def test_curves_match_a_direct_computation():
    r = _result()
    steps = comparison_curves(r, "steps", window=1)
    assert steps["a"].x.tolist() == [1, 2, 3, 4] and steps["b"].x.tolist() == [1, 2]
    assert steps["a"].mean.tolist() == [5.0, 3.0, 3.0, 1.0]
    assert steps["a"].low.tolist() == [4.0, 3.0, 2.0, 1.0] and steps["a"].high.tolist() == [6.0, 3.0, 4.0, 1.0]
    assert steps["a"].val == [(2.0, 4.0), (4.0, 3.0)] and steps["a"].val_ce == [2.0, 3.0, 4.0]
    flops = comparison_curves(r, "flops", window=1)
    assert flops["a"].x.tolist() == [10, 20, 30, 40] and flops["b"].x.tolist() == [20, 40]
    assert flops["b"].val == [(40.0, 2.5)]
    seconds = comparison_curves(r, "seconds", ["b"], window=1)
    assert list(seconds) == ["b"]
    assert seconds["b"].x.tolist() == pytest.approx([1.0, 1.5])  # mean of 0.5, 1.0, 1.5, then + 0.5


def test_seed_selection_and_smoothing():
    r = _result()
    one = comparison_curves(r, "steps", seeds=[2], window=2)
    assert one["a"].ce.shape == (1, 4)
    assert one["a"].ce[0].tolist() == [6.0, statistics.fmean([6.0, 3.0]), statistics.fmean([3.0, 4.0]), 2.5]
    assert one["b"].val_ce == [3.5]


def test_bad_arguments():
    r = _result()
    with pytest.raises(ValueError, match="x"):
        comparison_curves(r, "tokens")
    with pytest.raises(ValueError, match="arms"):
        comparison_curves(r, arms=["c"])
    with pytest.raises(ValueError, match="seeds"):
        comparison_curves(r, seeds=[7])
    with pytest.raises(ValueError, match="window"):
        comparison_curves(r, window=0)


def test_dashboard_headless():
    dash = comparison_dashboard(_result())
    assert set(dash.controls) == {"x", "seeds", "arms"} and set(dash.last) == {"a", "b"}
    assert dash.png.startswith(b"\x89PNG") and "image/png" in dash._repr_mimebundle_()
    dash.controls["x"].value = "flops"
    assert dash.last["b"].x.tolist() == [20, 40]
    dash.controls["seeds"].value = 1
    assert dash.last["a"].ce.shape[0] == 1 and dash.last["a"].val_ce == [3.0]
    dash.controls["arms"].value = ("b",)
    assert list(dash.last) == ["b"]
    assert "b: 2.500" in dash.text.value


def test_on_a_stored_reference_run():
    from moe_lab.experiments import load_result
    result = load_result("switch_family")
    curves = comparison_curves(result, "flops")
    ends = {arm: float(c.x[-1]) for arm, c in curves.items()}
    budget = result["setup"]["budget"]["amount"]
    assert all(budget * 0.99 < end <= budget for end in ends.values())  # every schedule ends at the budget
    assert all(torch.isfinite(c.mean).all() for c in curves.values())
