"""The expert-load dashboard: its compute function against plain-Python references, and the widget headlessly."""
import base64
import math
from collections import Counter

import pytest
import torch

from moe_lab.widgets import expert_load_dashboard, routing_snapshot
from moe_lab.widgets.expert_load import RoutingSnapshot


def test_counts_match_a_plain_python_count():
    snap = routing_snapshot(num_experts=6, k=2, num_tokens=50, seed=3)
    counter = Counter(snap.experts.flatten().tolist())
    assert snap.tokens_per_expert.tolist() == [counter.get(e, 0) for e in range(6)]
    assert int(snap.tokens_per_expert.sum()) == 50 * 2
    assert snap.ideal_load == pytest.approx(50 * 2 / 6)
    assert snap.unused_experts == sum(1 for e in range(6) if counter.get(e, 0) == 0)


def test_gates_are_the_renormalised_top_k_of_the_softmax():
    snap = routing_snapshot(num_experts=5, k=3, logit_scale=2.0, num_tokens=20, seed=1)
    for t in range(20):
        probs = snap.probs[t].tolist()
        top = sorted(range(5), key=lambda e: -probs[e])[:3]
        total = sum(probs[e] for e in top)
        assert sorted(snap.experts[t].tolist()) == sorted(top)
        for e in range(5):
            expected = probs[e] / total if e in top else 0.0
            assert snap.gate_matrix[t, e].item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(snap.probs.sum(-1), torch.ones(20))


def test_metrics_match_their_definitions():
    snap = routing_snapshot(num_experts=8, k=2, distribution="clustered", num_tokens=64, seed=0)
    load = snap.tokens_per_expert.tolist()
    mean = sum(load) / len(load)
    assert snap.max_violation == pytest.approx((max(load) - mean) / mean)
    entropies = [-sum(p * math.log(p) for p in row if p > 0) for row in snap.probs.tolist()]
    assert snap.entropy == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)
    assert snap.max_entropy == pytest.approx(math.log(8))
    f = [n / (64 * 2) for n in load]
    p = snap.probs.mean(0).tolist()
    assert snap.aux_loss == pytest.approx(8 * sum(a * b for a, b in zip(f, p)), rel=1e-5)


def test_perfectly_balanced_assignment_has_zero_maxvio_and_unit_aux_loss():
    num_tokens, num_experts, k = 12, 4, 2
    experts = torch.tensor([[(2 * t) % num_experts, (2 * t + 1) % num_experts] for t in range(num_tokens)])
    probs = torch.full((num_tokens, num_experts), 1 / num_experts)
    snap = RoutingSnapshot.from_routing(probs, torch.full((num_tokens, k), 0.5), experts)
    assert snap.tokens_per_expert.tolist() == [6, 6, 6, 6]
    assert snap.max_violation == 0.0
    assert snap.aux_loss == pytest.approx(1.0)
    assert snap.entropy == pytest.approx(math.log(num_experts))


def test_higher_logit_scale_lowers_entropy_but_keeps_the_choice():
    snaps = [routing_snapshot(logit_scale=s, seed=0) for s in (0.1, 1.0, 10.0)]
    entropies = [s.entropy for s in snaps]
    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] == pytest.approx(math.log(8), rel=0.01)  # nearly uniform router
    # a positive scale never changes the ranking of the logits, so the same experts are picked
    for s in snaps[1:]:
        assert torch.equal(s.experts, snaps[0].experts)


def test_concentrated_inputs_are_less_balanced_than_isotropic_ones():
    for seed in range(3):
        gaussian = routing_snapshot(distribution="gaussian", seed=seed).max_violation
        assert routing_snapshot(distribution="clustered", seed=seed).max_violation > gaussian
        assert routing_snapshot(distribution="dominant", seed=seed).max_violation > gaussian


def test_deterministic_given_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = routing_snapshot(seed=5), routing_snapshot(seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.experts, b.experts)
    assert not torch.equal(routing_snapshot(seed=6).probs, a.probs)


@pytest.mark.parametrize("kwargs, name", [
    ({"num_experts": 0}, "num_experts"),
    ({"k": 0}, "k"),
    ({"num_experts": 4, "k": 5}, "k"),
    ({"logit_scale": 0.0}, "logit_scale"),
    ({"logit_scale": float("nan")}, "logit_scale"),
    ({"distribution": "uniform"}, "distribution"),
    ({"num_tokens": 0}, "num_tokens"),
    ({"d_model": 2.5}, "d_model"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        routing_snapshot(**kwargs)
    if name != "d_model":
        with pytest.raises(ValueError, match=name):
            expert_load_dashboard(**kwargs)


def test_dashboard_first_render_and_live_updates():
    dash = expert_load_dashboard(num_experts=8, k=2, num_tokens=64)
    assert set(dash.controls) == {"num_experts", "k", "logit_scale", "distribution", "num_tokens"}
    first = dash.last
    assert first.num_experts == 8 and first.k == 2 and first.num_tokens == 64
    assert torch.equal(first.probs, routing_snapshot(8, 2, 1.0, "gaussian", 64).probs)
    # the first render is static-friendly: a PNG in the plot output and in the display bundle
    assert dash.png.startswith(b"\x89PNG")
    assert base64.b64decode(dash.plot.outputs[0]["data"]["image/png"]) == dash.png
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "image/png" in bundle
    assert "MaxVio" in dash.text.value

    dash.controls["distribution"].value = "dominant"
    assert dash.last.max_violation == pytest.approx(routing_snapshot(8, 2, 1.0, "dominant", 64).max_violation)
    dash.controls["num_tokens"].value = 128
    assert dash.last.num_tokens == 128 and int(dash.last.tokens_per_expert.sum()) == 256
    dash.controls["logit_scale"].value = 10.0
    assert dash.last.entropy < first.entropy


def test_dashboard_keeps_k_at_most_num_experts():
    dash = expert_load_dashboard(num_experts=8, k=6, num_tokens=32)
    dash.controls["num_experts"].value = 4
    assert dash.controls["k"].value == 4 and dash.controls["k"].max == 4
    assert dash.last.num_experts == 4 and dash.last.k == 4
    dash.controls["num_experts"].value = 12
    assert dash.controls["k"].max == 12 and dash.last.k == 4 and dash.last.num_experts == 12
