"""Capacity dashboard (notebook 05): queues and drops against a slow reference, widget headlessly."""
import pytest
import torch

from moe_lab.widgets import capacity_dashboard, capacity_snapshot


def _routing():
    gen = torch.Generator().manual_seed(0)
    probs, experts = (torch.randn(40, 4, generator=gen) + torch.tensor([1.5, 0, 0, 0])).softmax(-1).topk(2, dim=-1)
    return experts, probs


def test_snapshot_against_reference_queue():
    experts, probs = _routing()
    snap = capacity_snapshot(experts, probs, 4, capacity_factor=0.75)
    assert snap.capacity == 15
    seen = [0] * 4
    for j in range(2):
        for t in range(40):  # position priority: all first choices, then all second choices
            e = int(experts[t, j])
            assert int(snap.positions[t, j]) == seen[e]
            assert bool(snap.keep[t, j]) == (seen[e] < 15)
            seen[e] += 1
    assert snap.routed.tolist() == seen
    assert snap.kept.tolist() == [min(n, 15) for n in seen]
    assert snap.drop_rate == pytest.approx(sum(max(n - 15, 0) for n in seen) / 80)


def test_drop_rate_monotone_in_capacity_factor():
    experts, probs = _routing()
    for policy in ("position", "probability"):
        rates = [capacity_snapshot(experts, probs, 4, cf, policy).drop_rate for cf in (0.25, 0.5, 1.0, 1.5, 2.0)]
        assert rates == sorted(rates, reverse=True) and rates[-1] == 0.0 and rates[0] > 0.5


def test_dashboard_headless():
    experts, probs = _routing()
    dash = capacity_dashboard(experts, probs, 4, capacity_factor=1.0)
    assert set(dash.controls) == {"capacity_factor", "policy"}
    assert dash.last.capacity == 20 and dash.png.startswith(b"\x89PNG")
    dash.controls["capacity_factor"].value = 0.5
    assert dash.last.capacity == 10 and dash.last.drop_rate > 0.3
    dash.controls["policy"].value = "probability"
    kept, mine = dash.last.keep, experts == 0  # expert 0 overflows; it keeps its most confident slots
    assert (~kept & mine).any() and probs[kept & mine].min() >= probs[~kept & mine].max()
    assert "drop rate" in dash.text.value
