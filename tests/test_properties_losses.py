"""Property-based tests of the balance / stability losses and the routing metrics against hand-written per-token
and per-expert Python loops, and of the errors bad input must get."""
import math
import statistics

import pytest
import torch
from hypothesis import given, strategies as st

from moe_lab.losses import (bias_update, communication_balance_loss, cv_squared, device_balance_loss,
                            importance_loss, load_loss, prob_in_topk, router_z_loss, sequence_balance_loss,
                            switch_aux_loss)
from moe_lab.metrics import (devices_per_token, drop_rate, max_violation, max_violation_tensor, routing_entropy,
                             tokens_per_expert, unrouted_fraction)
from moe_lab.routing import dense_gates, softmax_topk
from tests.strategies import NOT_FLOAT_DTYPES, NOT_ID_DTYPES, bad_ints, poisoned, raises_naming, randn, seeds


@st.composite
def routings(draw, min_tokens=1, groups=False):
    """``(logits [T, E], probs [T, E], gates [T, k], experts [T, k], n_groups)`` from a softmax top-k."""
    n_groups = draw(st.integers(1, 4)) if groups else 1
    num_experts = n_groups * draw(st.integers(1, 4))
    num_tokens, k = draw(st.integers(min_tokens, 12)), draw(st.integers(1, num_experts))
    logits = randn(draw(seeds), num_tokens, num_experts) * draw(st.sampled_from([0.5, 2.0, 8.0]))
    probs, gates, experts = softmax_topk(logits, k)
    return logits, probs, gates, experts, n_groups


def counts_of(experts, num_experts):
    counts = [0] * num_experts
    for e in experts.reshape(-1).tolist():
        counts[e] += 1
    return counts


def mean_over_tokens(probs):
    return [statistics.fmean(col) for col in zip(*probs.double().tolist())]


def close(value, want):
    assert float(value) == pytest.approx(want, rel=1e-5, abs=1e-6)


@given(st.lists(st.floats(0, 1e6, width=32), max_size=12), st.floats(0, 1e-3))
def test_cv_squared_is_population_variance_over_mean_squared(values, eps):
    got = cv_squared(torch.tensor(values, dtype=torch.float32), eps)
    want = statistics.pvariance(values) / (statistics.fmean(values) ** 2 + eps) if len(values) >= 2 else 0.0
    if math.isfinite(want):
        assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-6)


@given(routings(min_tokens=0))
def test_importance_loss_is_cv_squared_of_the_summed_gates(r):
    _, probs, gates, experts, _ = r
    num_experts = probs.shape[1]
    importance = [0.0] * num_experts
    for row_g, row_e in zip(gates.tolist(), experts.tolist()):
        for g, e in zip(row_g, row_e):
            importance[e] += g
    want = statistics.pvariance(importance) / (statistics.fmean(importance) ** 2 + 1e-10) if num_experts > 1 else 0.0
    close(importance_loss(dense_gates(gates, experts, num_experts)), want)


@given(routings(), seeds)
def test_smooth_load_matches_the_papers_definition(r, seed):
    clean, _, _, _, _ = r
    num_experts, k = clean.shape[1], r[3].shape[1]
    std = randn(seed, *clean.shape).abs() + 0.1
    noisy = clean + randn(seed + 1, *clean.shape) * std
    got = prob_in_topk(clean, noisy, std, k)
    load = [0.0] * num_experts
    for t in range(clean.shape[0]):
        for i in range(num_experts):
            others = sorted((noisy[t, j].item() for j in range(num_experts) if j != i), reverse=True)
            if k == num_experts:
                p = 1.0
            else:
                z = (clean[t, i].item() - others[k - 1]) / std[t, i].item()
                p = 0.5 * (1 + math.erf(z / math.sqrt(2)))
            assert got[t, i].item() == pytest.approx(p, abs=1e-5)
            load[i] += p
    want = statistics.pvariance(load) / (statistics.fmean(load) ** 2 + 1e-10) if num_experts > 1 else 0.0
    assert float(load_loss(clean, noisy, std, k)) == pytest.approx(want, rel=1e-4, abs=1e-5)


@given(routings())
def test_switch_aux_loss_matches_its_formula(r):
    _, probs, _, experts, _ = r
    num_experts = probs.shape[1]
    f = [c / experts.numel() for c in counts_of(experts, num_experts)]
    close(switch_aux_loss(probs, experts), num_experts * sum(a * b for a, b in zip(f, mean_over_tokens(probs))))


@given(routings(), st.sampled_from([1.0, 30.0, 1e4]))
def test_router_z_loss_matches_its_formula(r, scale):
    logits = r[0] * scale
    lse = [max(row) + math.log(sum(math.exp(v - max(row)) for v in row)) for row in logits.double().tolist()]
    assert float(router_z_loss(logits)) == pytest.approx(statistics.fmean(v * v for v in lse), rel=1e-5)


@given(st.integers(1, 3), routings())
def test_sequence_balance_loss_is_the_mean_per_sequence_switch_loss(batch, r):
    _, probs, _, experts, _ = r
    num_tokens, num_experts = probs.shape
    probs, experts = probs.repeat(batch, 1)[torch.randperm(batch * num_tokens)], experts.repeat(batch, 1)
    seq = [probs[b * num_tokens:(b + 1) * num_tokens] for b in range(batch)]
    ids = [experts[b * num_tokens:(b + 1) * num_tokens] for b in range(batch)]
    k = experts.shape[1]
    want = statistics.fmean(
        sum(num_experts / (k * num_tokens) * c * p for c, p in zip(counts_of(e, num_experts), mean_over_tokens(s)))
        for s, e in zip(seq, ids))
    close(sequence_balance_loss(probs.view(batch, num_tokens, -1), experts.view(batch, num_tokens, -1)), want)


@given(routings(groups=True), st.data())
def test_device_and_communication_losses_match_loops(r, data):
    _, probs, _, experts, n_devices = r
    num_tokens, num_experts = probs.shape
    size, k = num_experts // n_devices, experts.shape[1]
    f = [num_experts / (k * num_tokens) * c for c in counts_of(experts, num_experts)]
    p = mean_over_tokens(probs)
    f_dev = [statistics.fmean(f[d * size:(d + 1) * size]) for d in range(n_devices)]
    p_dev = [sum(p[d * size:(d + 1) * size]) for d in range(n_devices)]
    close(device_balance_loss(probs, experts, n_devices), sum(a * b for a, b in zip(f_dev, p_dev)))
    max_devices = data.draw(st.integers(1, n_devices))
    sent = [sum(any(e // size == d for e in row) for row in experts.tolist()) for d in range(n_devices)]
    want = sum(n_devices / (max_devices * num_tokens) * s * q for s, q in zip(sent, p_dev))
    close(communication_balance_loss(probs, experts, n_devices, max_devices), want)
    assert devices_per_token(experts, num_experts, n_devices).tolist() == \
        [len({e // size for e in row}) for row in experts.tolist()]


@given(st.lists(st.integers(0, 100), min_size=1, max_size=10), st.floats(0, 1), st.booleans())
def test_bias_update_matches_its_formula(load, rate, centered):
    bias = torch.linspace(-1, 1, len(load))
    mean = statistics.fmean(load)
    delta = [rate * ((mean > v) - (mean < v)) for v in load]
    if centered:
        delta = [d - statistics.fmean(delta) for d in delta]
    want = [b + d for b, d in zip(bias.tolist(), delta)]
    assert bias_update(bias, torch.tensor(load), rate, centered=centered).tolist() == pytest.approx(want, abs=1e-6)


@given(routings(min_tokens=0))
def test_tokens_per_expert_counts(r):
    experts, num_experts = r[3], r[1].shape[1]
    assert tokens_per_expert(experts, num_experts).tolist() == counts_of(experts, num_experts)


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=10).filter(any), st.integers(1, 3))
def test_max_violation_matches_its_formula(load, rows):
    want = (max(load) - statistics.fmean(load)) / statistics.fmean(load)
    assert max_violation(torch.tensor(load)) == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(max_violation_tensor(torch.tensor([load] * rows)), torch.full((rows,), want))


@given(routings())
def test_routing_entropy_matches_its_formula(r):
    probs = r[1]
    want = statistics.fmean(-sum(p * math.log(p) for p in row if p > 0) for row in probs.double().tolist())
    assert routing_entropy(probs) == pytest.approx(want, rel=1e-4, abs=1e-6)


@given(st.lists(st.lists(st.booleans(), min_size=2, max_size=2), max_size=10))
def test_drop_rate_and_unrouted_fraction(rows):
    dropped = torch.tensor(rows, dtype=torch.bool).view(-1, 2)
    flat = [x for row in rows for x in row]
    assert drop_rate(dropped) == pytest.approx(sum(flat) / len(flat) if flat else 0.0)
    assert unrouted_fraction(dropped) == pytest.approx(sum(all(r) for r in rows) / len(rows) if rows else 0.0)


# ------------------------------------------------------------------------------------------------- bad input
LOSSES = {"switch": lambda p, e: switch_aux_loss(p, e),
          "sequence": lambda p, e: sequence_balance_loss(p[None], e[None]),
          "device": lambda p, e: device_balance_loss(p, e, 1),
          "communication": lambda p, e: communication_balance_loss(p, e, 1, 1)}


@given(routings(), st.sampled_from(sorted(LOSSES)), st.data())
def test_balance_losses_reject_bad_probs(r, loss, data):
    _, probs, _, experts, _ = r
    bad = data.draw(st.one_of(poisoned(probs), st.sampled_from(NOT_FLOAT_DTYPES).map(probs.to)))
    raises_naming("probs", LOSSES[loss], bad, experts)


@given(routings(), st.sampled_from(sorted(LOSSES)), st.data())
def test_balance_losses_reject_bad_ids(r, loss, data):
    _, probs, _, experts, _ = r
    num_experts = probs.shape[1]
    if data.draw(st.booleans()):
        dtype = data.draw(st.sampled_from(NOT_ID_DTYPES))
        bad = experts.to(dtype) + 0.9 if dtype.is_floating_point else experts.to(dtype)
    else:
        bad = experts.clone()
        bad.view(-1)[data.draw(st.integers(0, bad.numel() - 1))] = data.draw(
            st.integers(num_experts, 10 * num_experts) | st.integers(-10, -1))
    raises_naming("experts", LOSSES[loss], probs, bad)


@given(st.integers(0, 4), st.integers(0, 4), st.sampled_from(sorted(LOSSES)))
def test_balance_losses_reject_empty_input(num_tokens, num_experts, loss):
    if num_tokens and num_experts:
        return
    raises_naming("probs", LOSSES[loss], torch.zeros(num_tokens, num_experts),
                  torch.zeros(num_tokens, 1, dtype=torch.long))


@given(st.integers(0, 4), st.integers(0, 4), st.data())
def test_z_loss_and_entropy_reject_empty_or_bad_input(num_tokens, num_experts, data):
    if num_tokens and num_experts:
        logits = randn(data.draw(seeds), num_tokens, num_experts)
        bad = data.draw(st.one_of(poisoned(logits), st.sampled_from(NOT_FLOAT_DTYPES).map(logits.to)))
    else:
        bad = torch.zeros(num_tokens, num_experts)
    raises_naming("logits", router_z_loss, bad)
    raises_naming("probs", routing_entropy, bad)


@given(routings(), bad_ints(1))
def test_metrics_reject_bad_num_experts(r, num_experts):
    raises_naming("num_experts", tokens_per_expert, r[3], num_experts)


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=8)
       .filter(lambda v: not all(math.isfinite(x) and x >= 0 for x in v) or sum(v) == 0))
def test_max_violation_rejects_bad_loads(load):
    raises_naming("load", max_violation, torch.tensor(load))
