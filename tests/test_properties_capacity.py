"""Property-based tests of expert capacity (expert_capacity, capacity_mask, queue_positions) against exact
rational arithmetic and a slow queue-filling reference, and of the errors bad input must get."""
import math
from fractions import Fraction

import torch
from hypothesis import given, strategies as st

from moe_lab.dispatch import DROP_POLICIES, capacity_mask, expert_capacity, queue_positions
from tests.references import ref_queue_positions
from tests.strategies import (ID_DTYPES, NOT_FLOAT_DTYPES, NOT_ID_DTYPES, bad_ints, bad_positive_numbers, poisoned,
                              raises_naming, seeds)


@given(st.integers(0, 50_000), st.integers(1, 64), st.integers(1, 4_000).map(lambda n: n / 1000), st.data())
def test_expert_capacity_is_the_exact_ceiling(num_tokens, num_experts, capacity_factor, data):
    """Capacity factors with up to 3 decimals (as people write them: 1.25, 1.1): the ceiling of the exact rational
    ``T k CF / E``, never an extra slot from float noise, and at least one slot when there are tokens."""
    k = data.draw(st.integers(1, min(num_experts, 4)))
    exact = Fraction(num_tokens * k) * Fraction(str(capacity_factor)) / num_experts
    capacity = expert_capacity(num_tokens, num_experts, capacity_factor, k)
    assert capacity == math.ceil(exact)
    assert isinstance(capacity, int) and (capacity >= 1) == (num_tokens >= 1)


@given(st.integers(1, 999), st.integers(1, 64), st.floats(1e-300, 1e-3))
def test_expert_capacity_is_never_zero_for_tiny_factors(num_tokens, num_experts, capacity_factor):
    assert expert_capacity(num_tokens, num_experts, capacity_factor) == 1


@st.composite
def routed(draw, policies=DROP_POLICIES):
    """``(experts [T, k], probs [T, k], num_experts, capacity, policy)`` from a top-k of random probabilities."""
    num_experts = draw(st.integers(1, 8))
    k = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(0, 16))
    probs = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(draw(seeds))).softmax(-1)
    chosen, experts = probs.topk(k, dim=-1)
    return experts, chosen, num_experts, draw(st.integers(0, num_tokens * k + 1)), draw(st.sampled_from(policies))


@given(routed())
def test_queue_positions_and_capacity_mask_match_the_slow_queue(problem):
    experts, probs, num_experts, capacity, policy = problem
    ref = ref_queue_positions(experts, probs, policy)
    assert torch.equal(queue_positions(experts, num_experts, probs, policy), ref)
    keep = capacity_mask(experts, num_experts, capacity, probs, policy)
    assert torch.equal(keep, ref < capacity)
    kept_per_expert = torch.bincount(experts[keep], minlength=num_experts)
    assert bool((kept_per_expert <= capacity).all())
    # nothing is dropped while its expert still has room
    wanted = torch.bincount(experts.reshape(-1), minlength=num_experts)
    assert torch.equal(kept_per_expert, wanted.clamp(max=capacity))


@given(routed(), st.sampled_from(ID_DTYPES))
def test_capacity_mask_takes_any_integer_ids(problem, dtype):
    experts, probs, num_experts, capacity, policy = problem
    assert torch.equal(capacity_mask(experts.to(dtype), num_experts, capacity, probs, policy),
                       capacity_mask(experts, num_experts, capacity, probs, policy))


# ------------------------------------------------------------------------------------------------- bad input
@given(st.sampled_from(["num_tokens", "num_experts", "k"]), st.data())
def test_expert_capacity_rejects_bad_sizes(name, data):
    args = {"num_tokens": 10, "num_experts": 4, "k": 2}
    args[name] = data.draw(bad_ints(0) if name == "num_tokens" else bad_ints(1, 4 if name == "k" else None))
    raises_naming(name, expert_capacity, args["num_tokens"], args["num_experts"], 1.0, args["k"])


@given(bad_positive_numbers())
def test_expert_capacity_rejects_bad_factors(value):
    raises_naming("capacity_factor", expert_capacity, 10, 4, value)


@given(routed(), bad_ints(0))
def test_capacity_mask_rejects_bad_capacities(problem, capacity):
    experts, probs, num_experts, _, policy = problem
    raises_naming("capacity", capacity_mask, experts, num_experts, capacity, probs, policy)


@given(routed(), st.sampled_from(NOT_ID_DTYPES))
def test_capacity_mask_rejects_non_integer_ids(problem, dtype):
    experts, probs, num_experts, capacity, policy = problem
    bad = experts.to(dtype) + 0.9 if dtype.is_floating_point else experts.to(dtype)  # 0.9 must not become 0
    raises_naming("experts", capacity_mask, bad, num_experts, capacity, probs, policy)


@given(routed().filter(lambda p: p[0].numel() > 0), st.data())
def test_capacity_mask_rejects_ids_out_of_range(problem, data):
    experts, probs, num_experts, capacity, policy = problem
    bad = experts.clone()
    bad.view(-1)[data.draw(st.integers(0, bad.numel() - 1))] = data.draw(
        st.integers(num_experts, 10 * num_experts) | st.integers(-100, -1))
    raises_naming("experts", capacity_mask, bad, num_experts, capacity, probs, policy)


@given(routed(policies=("probability", "batch_priority")).filter(lambda p: p[0].numel() > 0), st.data())
def test_capacity_mask_rejects_bad_probs(problem, data):
    experts, probs, num_experts, capacity, policy = problem
    bad = data.draw(st.one_of(poisoned(probs), st.sampled_from(NOT_FLOAT_DTYPES).map(probs.to),
                              st.just(probs[:, :0]), st.just(probs.tolist()), st.none()))
    raises_naming("probs", capacity_mask, experts, num_experts, capacity, bad, policy)


@given(routed(), st.text(max_size=8).filter(lambda s: s not in DROP_POLICIES))
def test_capacity_mask_rejects_unknown_policies(problem, policy):
    experts, probs, num_experts, capacity, _ = problem
    raises_naming("drop_policy", capacity_mask, experts, num_experts, capacity, probs, policy)
