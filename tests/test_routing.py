"""Softmax and sigmoid top-k gating and group-limited top-k against direct, obviously-correct computations and a
slow per-token reading of DeepSeek-V3's official inference gate."""
import math

import pytest
import torch

from moe_lab.routing import (Router, check_experts, check_finite_logits, dense_gates, group_limited_topk,
                             sigmoid_topk, softmax_topk)


def naive_gating(logits, k, renormalize):
    """Per-token Python reference: exp/sum softmax, sort, keep k."""
    gates, experts = [], []
    for row in logits.double().tolist():
        m = max(row)
        e = [math.exp(v - m) for v in row]
        p = [v / sum(e) for v in e]
        idx = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        g = [p[i] for i in idx]
        if renormalize:
            g = [v / sum(g) for v in g]
        gates.append(g)
        experts.append(idx)
    return torch.tensor(gates, dtype=torch.float64), torch.tensor(experts)


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_matches_naive(k, renormalize):
    logits = torch.randn(20, 5) * 3
    probs, gates, experts = softmax_topk(logits, k, renormalize=renormalize)
    ref_gates, ref_experts = naive_gating(logits, k, renormalize)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(gates.double(), ref_gates, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert probs.dtype == gates.dtype == torch.float32


def test_softmax_after_topk_equals_renormalised_before():
    logits = torch.randn(30, 8)
    _, g_after, e_after = softmax_topk(logits, 3, softmax_order="after_topk")
    _, g_before, e_before = softmax_topk(logits, 3, softmax_order="before_topk", renormalize=True)
    assert torch.equal(e_after, e_before)
    torch.testing.assert_close(g_after, g_before)


def test_gating_is_float32_for_bf16_logits():
    logits = (torch.randn(10, 4) * 10).bfloat16()
    probs, gates, _ = softmax_topk(logits, 2)
    assert probs.dtype == gates.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits.float(), -1))


def test_router_runs_in_float32_under_autocast():
    router = Router(16, 4)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x @ router.weight.T)


def test_gradients_reach_router_through_gates():
    logits = torch.randn(6, 4, requires_grad=True)
    _, gates, _ = softmax_topk(logits, 2)
    (gates * torch.randn_like(gates)).sum().backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [0, 5, -1, 2.0, True])
def test_bad_k_names_argument(k):
    with pytest.raises(ValueError, match="k must be"):
        softmax_topk(torch.randn(3, 4), k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_rejected(bad):
    logits = torch.randn(3, 4)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        softmax_topk(logits, 2)


def test_checks_never_read_values_off_cpu():
    """Off the CPU (here the meta device, which holds no values) a value read would be a host-device sync:
    the checks skip it unless anomaly detection (PyTorch's debug mode) is on."""
    logits, experts = torch.empty(3, 4, device="meta"), torch.empty(3, 2, dtype=torch.long, device="meta")
    check_finite_logits(logits)
    check_experts(experts, 4)
    with torch.autograd.set_detect_anomaly(True), pytest.raises(RuntimeError, match="meta"):
        check_finite_logits(logits)  # reads (and so fails on meta tensors) in debug mode


def test_bad_options_rejected():
    with pytest.raises(ValueError, match="softmax_order"):
        softmax_topk(torch.randn(3, 4), 2, softmax_order="middle")
    with pytest.raises(ValueError, match="renormalize=False"):
        softmax_topk(torch.randn(3, 4), 2, softmax_order="after_topk", renormalize=False)
    with pytest.raises(ValueError, match="shape"):
        softmax_topk(torch.randn(3), 1)


def test_softmax_before_topk_selects_by_logits_not_underflowing_probs():
    probs, gates, experts = softmax_topk(torch.tensor([[0.0, 100.0, 300.0]]), 2)
    assert experts.tolist() == [[2, 1]] and probs[0, 1] == 0  # exp(-200) underflows in float32
    assert torch.isfinite(gates).all() and gates.tolist() == [[1.0, 0.0]]
    _, _, experts = softmax_topk(torch.tensor([[0.0, 100.0, 300.0, -50.0]]), 3, renormalize=False)
    assert experts.tolist() == [[2, 1, 0]]


def test_float64_logits_beyond_float32_range_rejected():
    with pytest.raises(ValueError, match="exceed the torch.float32 range"):
        softmax_topk(torch.tensor([[0.0, 1e300]], dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="exceed the torch.float32 range"):
        sigmoid_topk(torch.tensor([[0.0, -1e39, 1.0]], dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="exceed the torch.float16 range"):
        softmax_topk(torch.tensor([[0.0, 7e4]]), 1, dtype=torch.float16)
    _, gates, _ = softmax_topk(torch.tensor([[0.0, 1e30]], dtype=torch.float64), 1)  # in range: fine
    assert gates.dtype == torch.float32 and torch.isfinite(gates).all()


# ------------------------------------------------- the official DeepSeek-V3 gate, one token at a time
def official_gate(row, bias, k, n_groups, topk_groups, score_func, route_scale):
    """Slow per-token reading of DeepSeek-V3's ``inference/model.py`` ``Gate`` (float64): scores (softmax or
    sigmoid), bias added for selection only, groups scored by top-2 sum with a bias else max, the best
    ``topk_groups`` kept and the others -inf, top-k, weights from the unbiased scores, renormalised for sigmoid
    only, times ``route_scale``."""
    if score_func == "softmax":
        m = max(row)
        e = [math.exp(v - m) for v in row]
        scores = [v / sum(e) for v in e]
    else:
        scores = [1 / (1 + math.exp(-v)) for v in row]
    sel = [s + b for s, b in zip(scores, bias)] if bias is not None else list(scores)
    if n_groups > 1:
        size = len(row) // n_groups
        groups = [sel[g * size:(g + 1) * size] for g in range(n_groups)]
        group_scores = [sum(sorted(g, reverse=True)[:2]) if bias is not None else max(g) for g in groups]
        kept = sorted(range(n_groups), key=lambda g: -group_scores[g])[:topk_groups]
        sel = [v if i // size in kept else -math.inf for i, v in enumerate(sel)]
    chosen = sorted(range(len(row)), key=lambda i: -sel[i])[:k]
    weights = [scores[i] for i in chosen]
    if score_func == "sigmoid":
        weights = [w / sum(weights) for w in weights]
    return chosen, [w * route_scale for w in weights]


@pytest.mark.parametrize("score_func,with_bias,E,k,n_groups,topk_groups,scale", [
    ("sigmoid", True, 64, 8, 8, 4, 2.5),    # V3 (scaled down): bias, 8 groups / 4 kept, top-2 sums
    ("sigmoid", True, 16, 4, 1, 1, 2.5),    # bias, no group limit
    ("sigmoid", False, 32, 6, 4, 2, 1.0),   # no bias: groups scored by their max
    ("softmax", False, 64, 6, 8, 3, 16.0),  # V2: softmax before top-k, device-limited, route_scale 16
    ("softmax", False, 64, 6, 1, 1, 1.0),   # DeepSeekMoE 16B
])
def test_routing_matches_the_official_deepseek_gate(score_func, with_bias, E, k, n_groups, topk_groups, scale):
    logits = torch.randn(200, E) * 2
    bias = torch.randn(E) * 0.3 if with_bias else None
    options = dict(bias=bias, n_groups=n_groups, topk_groups=topk_groups, routed_scaling_factor=scale,
                   group_score="top2_sum" if with_bias else "max")
    if score_func == "sigmoid":
        _, gates, experts = sigmoid_topk(logits, k, **options)
    else:
        _, gates, experts = softmax_topk(logits, k, renormalize=False, **options)
    ref = [official_gate(row, None if bias is None else bias.tolist(), k, n_groups, topk_groups, score_func, scale)
           for row in logits.double().tolist()]
    assert experts.tolist() == [chosen for chosen, _ in ref]  # exact decisions, in order
    torch.testing.assert_close(gates.double(), torch.tensor([w for _, w in ref], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_gates_never_depend_on_the_bias():
    """Changing the bias changes which experts are selected; a token that keeps its selected set keeps its
    gates (up to the order of the normaliser's sum), and without renormalisation every expert that stays
    selected keeps its gate exactly."""
    logits = torch.randn(300, 16)
    bias = torch.zeros(16)
    other = torch.randn(16) * 0.2
    for renormalize in (True, False):
        _, g0, e0 = sigmoid_topk(logits, 4, bias=bias, renormalize=renormalize)
        _, g1, e1 = sigmoid_topk(logits, 4, bias=other, renormalize=renormalize)
        same_set = (e0.sort(-1).values == e1.sort(-1).values).all(-1)
        assert 0 < same_set.sum() < 300  # the bias changed some selections, not all
        by_expert0 = dense_gates(g0, e0, 16)
        by_expert1 = dense_gates(g1, e1, 16)
        torch.testing.assert_close(by_expert0[same_set], by_expert1[same_set], rtol=1e-6, atol=0)
        if not renormalize:
            both = (by_expert0 > 0) & (by_expert1 > 0)
            assert torch.equal(by_expert0[both], by_expert1[both])
            torch.testing.assert_close(g1, torch.sigmoid(logits).gather(1, e1))


def test_softmax_with_selection_bias():
    logits = torch.randn(100, 8)
    bias = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    probs, gates, experts = softmax_topk(logits, 2, bias=bias, renormalize=False)
    assert (experts == 0).any(-1).all()  # +1 on probabilities in [0, 1]: expert 0 always selected
    torch.testing.assert_close(gates, probs.gather(1, experts))


def test_sigmoid_gating_formula():
    logits = torch.randn(50, 8)
    scores, gates, experts = sigmoid_topk(logits, 3, routed_scaling_factor=2.5)
    torch.testing.assert_close(scores, torch.sigmoid(logits))
    assert torch.equal(experts, logits.topk(3).indices)
    torch.testing.assert_close(gates.sum(-1), torch.full((50,), 2.5))
    _, g1, _ = sigmoid_topk(logits, 1)  # k = 1: the raw score (no normalisation to 1)
    torch.testing.assert_close(g1[:, 0], torch.sigmoid(logits).amax(-1))
    logits.requires_grad_(True)
    (sigmoid_topk(logits, 3)[1] * torch.randn(50, 3)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_low_precision_gating_math():
    logits = torch.randn(40, 8) * 3
    probs, gates, _ = softmax_topk(logits, 2, dtype=torch.bfloat16)
    assert probs.dtype == gates.dtype == torch.bfloat16
    torch.testing.assert_close(probs, logits.bfloat16().softmax(-1))
    scores, _, _ = sigmoid_topk(logits, 2, bias=torch.zeros(8), dtype=torch.float16)
    assert scores.dtype == torch.float16


# ------------------------------------------------- group-limited top-k
def slow_group_limited(scores, k, n_groups, topk_groups, group_score):
    out_v, out_e = [], []
    for row in scores.double().tolist():
        size = len(row) // n_groups
        groups = [row[g * size:(g + 1) * size] for g in range(n_groups)]
        gs = [max(g) if group_score == "max" else sum(sorted(g, reverse=True)[:2]) for g in groups]
        kept = set(sorted(range(n_groups), key=lambda g: -gs[g])[:topk_groups])
        allowed = [i for i in range(len(row)) if i // size in kept]
        chosen = sorted(allowed, key=lambda i: -row[i])[:k]
        out_e.append(chosen)
        out_v.append([row[i] for i in chosen])
    return torch.tensor(out_v, dtype=torch.float64), torch.tensor(out_e)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
@pytest.mark.parametrize("E,k,n_groups,topk_groups", [(16, 4, 4, 2), (32, 8, 8, 4), (12, 2, 3, 1), (8, 3, 2, 2)])
def test_group_limited_topk_matches_slow_reference(group_score, E, k, n_groups, topk_groups):
    scores = torch.rand(100, E)
    values, experts = group_limited_topk(scores, k, n_groups=n_groups, topk_groups=topk_groups,
                                         group_score=group_score)
    ref_v, ref_e = slow_group_limited(scores, k, n_groups, topk_groups, group_score)
    assert experts.dtype == torch.int64 and torch.equal(experts, ref_e)
    torch.testing.assert_close(values.double(), ref_v)
    groups = experts // (E // n_groups)
    assert all(len(set(row)) <= topk_groups for row in groups.tolist())


def test_masked_groups_are_minus_infinity_not_zero():
    """With a negative bias every kept score is below 0: a group masked with 0 (vLLM #13474, DeepSeek-V3 #741)
    would then beat all of them."""
    scores = torch.sigmoid(torch.randn(50, 16)) - 2.0  # biased selection scores, all negative
    values, experts = group_limited_topk(scores, 3, n_groups=4, topk_groups=2, group_score="top2_sum")
    group_scores = scores.view(50, 4, 4).topk(2, -1).values.sum(-1)
    kept = group_scores.topk(2, -1).indices
    assert all(set(e) <= set(range(g * 4, g * 4 + 4)) | set(range(h * 4, h * 4 + 4))
               for e, (g, h) in zip((experts).tolist(), kept.tolist()))
    assert (values < 0).all()
    zero_masked = scores.view(50, 4, 4) * torch.zeros(50, 4).scatter(1, kept, 1.0).unsqueeze(-1)
    buggy = zero_masked.view(50, 16).topk(3).indices
    assert not torch.equal(buggy, experts)  # the bug really picks masked experts here


def test_group_limited_works_for_softmax_and_log_space_group_scores():
    logits = torch.randn(80, 16)
    _, _, experts = softmax_topk(logits, 4, n_groups=4, topk_groups=2, group_score="top2_sum")
    _, ref = group_limited_topk(logits.softmax(-1), 4, n_groups=4, topk_groups=2, group_score="top2_sum")
    assert torch.equal(experts, ref)
    _, _, experts = sigmoid_topk(logits, 4, n_groups=4, topk_groups=2, group_score="top2_sum")
    _, ref = group_limited_topk(logits.sigmoid(), 4, n_groups=4, topk_groups=2, group_score="top2_sum")
    assert torch.equal(experts, ref)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_groups=3), "n_groups=3 must divide num_experts=16"),
    (dict(topk_groups=5), "topk_groups must satisfy"),
    (dict(topk_groups=0), "topk_groups must be an integer >= 1"),
    (dict(k=9, topk_groups=2), "k=9 is larger than the 8 experts left after group masking"),
    (dict(group_score="sum"), "group_score must be one of"),
    (dict(n_groups=16, topk_groups=2, group_score="top2_sum"), "groups of >= 2 experts"),
    (dict(k=0), "k must be"),
])
def test_group_limited_topk_bad_input(kwargs, match):
    args = {"k": 2, "n_groups": 4, "topk_groups": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        group_limited_topk(torch.rand(5, 16), args.pop("k"), **args)
    with pytest.raises(ValueError, match="scores must have shape"):
        group_limited_topk(torch.rand(16), 2, n_groups=4, topk_groups=2)


def test_bad_bias_and_scale_rejected():
    for bias in (torch.zeros(7), torch.zeros(8, 1), torch.zeros(8, dtype=torch.long), [0.0] * 8):
        with pytest.raises(ValueError, match=r"bias must be a floating-point tensor of shape \[num_experts\]=\[8\]"):
            sigmoid_topk(torch.randn(3, 8), 2, bias=bias)
        with pytest.raises(ValueError, match="bias must be"):
            softmax_topk(torch.randn(3, 8), 2, bias=bias)
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        sigmoid_topk(torch.randn(3, 8), 2, routed_scaling_factor=-1.0)


def test_sigmoid_renormalised_gates_sum_to_one_where_every_score_underflows():
    """sigmoid(-108) and sigmoid(-140) are 0 in float32; their ratio is not (found by the property tests)."""
    _, gates, experts = sigmoid_topk(torch.tensor([[-108.45, -139.86, -200.0]]), 2)
    assert experts.tolist() == [[0, 1]]
    torch.testing.assert_close(gates, torch.tensor([[1.0, math.exp(-139.86 + 108.45)]]))
