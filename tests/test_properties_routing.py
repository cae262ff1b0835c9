"""Property-based tests of routing (softmax / sigmoid top-k, group-limited top-k, routers) against slow per-token
Python references, and of the errors every bad input must get."""
import pytest
import torch
from hypothesis import given, strategies as st

from moe_lab.routing import (NoisyTopKRouter, Router, dense_gates, group_limited_topk, sigmoid_topk, softmax_topk)
from tests.references import ref_gating
from tests.strategies import (NOT_FLOAT_DTYPES, bad_ints, bad_positive_numbers, poisoned, raises_naming, randn,
                              seeds)


@st.composite
def routing_problems(draw, max_tokens=12, max_experts=10):
    """``(logits [T, E] float32, k)`` with distinct logits (randn)."""
    num_tokens, num_experts = draw(st.integers(0, max_tokens)), draw(st.integers(1, max_experts))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 100.0]))
    return randn(draw(seeds), num_tokens, num_experts) * scale, draw(st.integers(1, num_experts))


def assert_gating(out, ref):
    scores, gates, experts = out
    assert torch.equal(experts, ref[2])
    torch.testing.assert_close(scores.double(), ref[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gates.double(), ref[1], rtol=1e-5, atol=1e-7)
    assert scores.dtype == gates.dtype == torch.float32 and experts.dtype == torch.int64


@given(routing_problems(), st.sampled_from([("before_topk", True), ("before_topk", False), ("after_topk", True)]),
       st.sampled_from([1.0, 2.5]))
def test_softmax_topk_matches_per_token_reference(problem, order, scale):
    (logits, k), (softmax_order, renormalize) = problem, order
    out = softmax_topk(logits, k, softmax_order=softmax_order, renormalize=renormalize, routed_scaling_factor=scale)
    assert_gating(out, ref_gating(logits, k, "softmax", renormalize, softmax_order, scale=scale))


@given(routing_problems(), st.booleans(), st.booleans())
def test_sigmoid_topk_matches_per_token_reference(problem, renormalize, with_bias):
    logits, k = problem
    bias = randn(7, logits.shape[1]) * 0.3 if with_bias else None
    assert_gating(sigmoid_topk(logits, k, renormalize=renormalize, bias=bias),
                  ref_gating(logits, k, "sigmoid", renormalize, bias=bias))


@given(st.data())
def test_softmax_with_bias_selects_by_probs_plus_bias(data):
    logits, k = data.draw(routing_problems())
    bias = randn(data.draw(seeds), logits.shape[1]) * 0.2
    assert_gating(softmax_topk(logits, k, bias=bias), ref_gating(logits, k, "softmax", bias=bias))


@st.composite
def grouped_problems(draw):
    n_groups, size = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    group_score = draw(st.sampled_from(["max", "top2_sum"] if size >= 2 or n_groups == 1 else ["max"]))
    topk_groups = draw(st.integers(1, n_groups))
    k = draw(st.integers(1, topk_groups * size if n_groups > 1 else n_groups * size))
    logits = randn(draw(seeds), draw(st.integers(0, 10)), n_groups * size) * 2
    return logits, k, (n_groups, topk_groups, group_score)


@given(grouped_problems(), st.sampled_from(["softmax", "sigmoid"]), st.booleans())
def test_group_limited_gating_matches_reference(problem, score_func, with_bias):
    logits, k, groups = problem
    bias = randn(3, logits.shape[1]) * 0.1 if with_bias else None
    gate = softmax_topk if score_func == "softmax" else sigmoid_topk
    out = gate(logits, k, n_groups=groups[0], topk_groups=groups[1], group_score=groups[2], bias=bias)
    assert_gating(out, ref_gating(logits, k, score_func, bias=bias, groups=groups))


@given(grouped_problems())
def test_group_limited_topk_matches_reference(problem):
    logits, k, (n_groups, topk_groups, group_score) = problem
    scores = logits.sigmoid() - 0.5  # negative scores too: masked experts must be -inf, not 0
    values, experts = group_limited_topk(scores, k, n_groups=n_groups, topk_groups=topk_groups, group_score=group_score)
    size = scores.shape[1] // n_groups
    for row, got in zip(scores.tolist(), experts.tolist()):
        def group_score_of(g):
            members = sorted(row[g * size:(g + 1) * size], reverse=True)
            return members[0] if group_score == "max" or n_groups == 1 else members[0] + members[1]
        kept = sorted(range(n_groups), key=lambda g: -group_score_of(g))[:topk_groups] if n_groups > 1 else [0]
        candidates = [i for g in kept for i in range(g * size, (g + 1) * size)]
        assert got == sorted(candidates, key=lambda i: -row[i])[:k]
    torch.testing.assert_close(values, scores.gather(1, experts))


@given(st.integers(1, 6), st.integers(1, 6),
       st.lists(st.sampled_from([0.0, 1.0, -3.0, 50.0, 300.0, -1e4, 1e30, -1e30]), min_size=1, max_size=36),
       st.data())
def test_softmax_topk_on_extreme_and_tied_logits_selects_a_topk(num_tokens, num_experts, values, data):
    """Huge, tied and far-apart logits (probabilities underflow to exactly 0): the selection is still a top-k by
    logit, the gates are the probabilities of the selected experts, and everything stays finite."""
    logits = torch.tensor((values * 36)[: num_tokens * num_experts]).view(num_tokens, num_experts)
    k = data.draw(st.integers(1, num_experts))
    probs, gates, experts = softmax_topk(logits, k, renormalize=False)
    for row, chosen in zip(logits.tolist(), experts.tolist()):
        assert len(set(chosen)) == k
        assert sorted((row[i] for i in chosen), reverse=True) == sorted(row, reverse=True)[:k]
    torch.testing.assert_close(gates, probs.gather(1, experts))
    assert torch.isfinite(probs).all() and torch.isfinite(gates).all()


@given(st.integers(0, 8), st.integers(1, 12), st.integers(1, 8), seeds,
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_router_is_a_float32_linear_map(num_tokens, d_model, num_experts, seed, dtype):
    router = Router(d_model, num_experts)
    x = randn(seed, num_tokens, d_model, dtype=dtype)
    logits = router(x)
    assert logits.dtype == torch.float32 and logits.shape == (num_tokens, num_experts)
    ref = x.double() @ router.weight.detach().double().T
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)


@given(routing_problems())
def test_dense_gates_scatter(problem):
    logits, k = problem
    _, gates, experts = softmax_topk(logits, k)
    dense = dense_gates(gates, experts, logits.shape[1])
    for t in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            want = sum(g for g, e in zip(gates[t].tolist(), experts[t].tolist()) if e == j)
            assert dense[t, j].item() == pytest.approx(want)


# ------------------------------------------------------------------------------------------------- bad input
GATES = [softmax_topk, sigmoid_topk]


@given(routing_problems(), st.sampled_from(NOT_FLOAT_DTYPES), st.sampled_from(GATES))
def test_gating_rejects_non_float_logits(problem, dtype, gate):
    logits, k = problem
    raises_naming("logits", gate, logits.to(dtype), k)


@given(st.data(), st.sampled_from(GATES))
def test_gating_rejects_non_finite_logits(data, gate):
    logits, k = data.draw(routing_problems().filter(lambda p: p[0].numel() > 0))
    raises_naming("logits", gate, data.draw(poisoned(logits)), k)


@given(st.data(), st.sampled_from(GATES), st.floats(3.5e38, 1e300) | st.floats(-1e300, -3.5e38))
def test_gating_rejects_float64_logits_beyond_float32(data, gate, huge):
    logits, k = data.draw(routing_problems().filter(lambda p: p[0].numel() > 0))
    logits = logits.double()
    logits.view(-1)[data.draw(st.integers(0, logits.numel() - 1))] = huge
    raises_naming("logits", gate, logits, k)


@given(routing_problems(), st.data(), st.sampled_from(GATES))
def test_gating_rejects_bad_k(problem, data, gate):
    logits, _ = problem
    raises_naming("k", gate, logits, data.draw(bad_ints(1, logits.shape[1])))


@given(st.integers(0, 4), st.sampled_from(GATES), st.sampled_from(["0-D", "1-D", "3-D", "no experts", "list"]))
def test_gating_rejects_bad_shapes(num_tokens, gate, what):
    logits = {"0-D": torch.tensor(1.0), "1-D": torch.zeros(4), "3-D": torch.zeros(2, num_tokens, 4),
              "no experts": torch.zeros(num_tokens, 0), "list": [[0.0, 1.0]] * num_tokens}[what]
    raises_naming("logits", gate, logits, 1)


@given(routing_problems(), bad_positive_numbers(), st.sampled_from(GATES))
def test_gating_rejects_bad_scaling_factor(problem, value, gate):
    logits, k = problem
    raises_naming("routed_scaling_factor", gate, logits, k, routed_scaling_factor=value)


@given(routing_problems(), st.sampled_from(GATES), st.data())
def test_gating_rejects_bad_bias(problem, gate, data):
    logits, k = problem
    num_experts = logits.shape[1]
    bias = data.draw(st.sampled_from([
        torch.zeros(num_experts + 1), torch.zeros(1, num_experts), torch.zeros(num_experts, dtype=torch.long),
        torch.zeros(num_experts, dtype=torch.bool), torch.zeros(num_experts, dtype=torch.complex64), [0.0] * num_experts]))
    raises_naming("bias", gate, logits, k, bias=bias)
    raises_naming("bias", gate, logits, k, bias=data.draw(poisoned(torch.zeros(num_experts))))


@given(st.integers(2, 12), st.integers(1, 12), st.sampled_from(GATES))
def test_gating_rejects_groups_that_do_not_divide(num_experts, n_groups, gate):
    if num_experts % n_groups == 0:
        n_groups = num_experts + 1
    raises_naming("n_groups", gate, torch.zeros(3, num_experts), 1, n_groups=n_groups, topk_groups=1)


@given(st.sampled_from([Router, NoisyTopKRouter]), bad_ints(1), st.booleans())
def test_routers_reject_bad_sizes(cls, value, bad_d_model):
    if bad_d_model:
        raises_naming("d_model", cls, value, 4)
    else:
        raises_naming("num_experts", cls, 4, value)


@given(st.sampled_from([Router, NoisyTopKRouter]), st.sampled_from(NOT_FLOAT_DTYPES), st.integers(0, 5))
def test_routers_reject_non_float_input(cls, dtype, num_tokens):
    raises_naming("x", cls(6, 3), torch.zeros(num_tokens, 6, dtype=dtype))
    raises_naming("x", cls(6, 3), torch.zeros(num_tokens, 5))
