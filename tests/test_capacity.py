"""Expert capacity and token dropping: capacity never exceeded, priority order respected, dropped slots are
exactly zero in the output and in the gradients, in every dispatch path."""
import math

import pytest
import torch

from moe_lab import MoELayer, seed_everything
from moe_lab.dispatch import (DISPATCH, capacity_mask, dispatch_loop, expert_capacity, queue_positions,
                              sort_by_expert)
from moe_lab.experts import Experts
from moe_lab.metrics import tokens_per_expert


@pytest.mark.parametrize("tokens,experts,cf,k,expected", [
    (100, 10, 1.0, 1, 10), (100, 10, 1.25, 1, 13), (100, 10, 1.1, 1, 11), (64, 8, 1.0, 2, 16),
    (10, 4, 1.0, 1, 3), (1, 64, 1.0, 1, 1), (0, 4, 2.0, 2, 0), (4096, 128, 1.25, 2, 80),
])
def test_expert_capacity_rounds_up(tokens, experts, cf, k, expected):
    assert expert_capacity(tokens, experts, cf, k) == expected == math.ceil(round(tokens * k * cf / experts, 9))


@pytest.mark.parametrize("bad", [0, -1.0, None, "1.0", True])
def test_capacity_factor_validated(bad):
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 2, bad)
    if bad is not None:
        with pytest.raises(ValueError, match="capacity_factor"):
            MoELayer(4, 4, 2, 1, capacity_factor=bad)


def _reference_keep(experts, probs, num_experts, capacity, policy):
    """Slow, obvious version: walk the slots in priority order and fill each expert's queue."""
    num_tokens, k = experts.shape
    slots = [(j, t) for j in range(k) for t in range(num_tokens)]  # first choices of all tokens first
    if policy == "probability":
        slots = sorted(slots, key=lambda s: -float(probs[s[1], s[0]]))  # stable: ties keep position order
    if policy == "batch_priority":  # V-MoE: tokens by their top-1 probability, all first choices first
        tokens = sorted(range(num_tokens), key=lambda t: -max(float(p) for p in probs[t]))
        slots = [(j, t) for j in range(k) for t in tokens]
    used = [0] * num_experts
    keep = torch.zeros(num_tokens, k, dtype=torch.bool)
    for j, t in slots:
        e = int(experts[t, j])
        if used[e] < capacity:
            used[e] += 1
            keep[t, j] = True
    return keep


@pytest.mark.parametrize("policy", ["position", "probability", "batch_priority"])
@pytest.mark.parametrize("num_tokens,num_experts,k,capacity", [(20, 4, 1, 3), (33, 8, 2, 5), (16, 4, 4, 7), (5, 3, 2, 0)])
def test_capacity_mask_matches_reference(policy, num_tokens, num_experts, k, capacity):
    seed_everything(num_tokens)
    probs, experts = torch.randn(num_tokens, num_experts).softmax(-1).topk(k, dim=-1)
    keep = capacity_mask(experts, num_experts, capacity, probs, policy)
    assert torch.equal(keep, _reference_keep(experts, probs, num_experts, capacity, policy))
    kept = tokens_per_expert(experts[keep].unsqueeze(1), num_experts) if keep.any() else torch.zeros(num_experts)
    assert int(kept.max()) <= capacity
    routed = tokens_per_expert(experts, num_experts)
    torch.testing.assert_close(kept.long(), routed.clamp(max=capacity))  # an expert with room keeps everyone


def test_position_priority_first_choices_before_second():
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])
    # expert 0's queue: t0 (1st), t2 (1st), t1 (2nd); expert 1's queue: t1 (1st), t0 (2nd), t2 (2nd)
    assert queue_positions(experts, 2).tolist() == [[0, 1], [0, 2], [1, 2]]
    assert capacity_mask(experts, 2, 2).tolist() == [[True, True], [True, False], [True, False]]


def test_batch_priority_serves_first_choices_before_second_in_confidence_order():
    # token 0 is hesitant (top-1 0.4), token 1 confident (0.8); both want expert 0, token 1 only as 2nd choice
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])
    probs = torch.tensor([[0.4, 0.35], [0.8, 0.15], [0.6, 0.3]])
    # tokens by top-1 probability: t1, t2, t0. Expert 0's queue: t2 (1st), t0 (1st), t1 (2nd); expert 1's: t1 (1st),
    # t2 (2nd), t0 (2nd). With room for 2 on expert 1, V-MoE keeps the 2nd choice of the more confident token t2;
    # ranking slots by their own probability keeps t0's (0.35 > 0.3)
    assert queue_positions(experts, 2, probs, "batch_priority").tolist() == [[1, 2], [0, 2], [0, 1]]
    assert capacity_mask(experts, 2, 1, probs, "batch_priority").tolist() == [[False, False], [True, False],
                                                                              [True, False]]
    assert capacity_mask(experts, 2, 2, probs, "probability")[:, 1].tolist() == [True, False, False]
    assert capacity_mask(experts, 2, 2, probs, "batch_priority")[:, 1].tolist() == [False, False, True]
    with pytest.raises(ValueError, match="probs"):
        capacity_mask(experts, 2, 2, None, "batch_priority")


def test_probability_priority_keeps_most_confident():
    experts = torch.zeros(4, 1, dtype=torch.long)
    probs = torch.tensor([[0.3], [0.9], [0.5], [0.9]])
    assert capacity_mask(experts, 2, 2, probs, "probability")[:, 0].tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="drop_policy"):
        capacity_mask(experts, 2, 2, probs, "random")
    with pytest.raises(ValueError, match="probs"):
        capacity_mask(experts, 2, 2, None, "probability")


def test_sort_by_expert_with_keep():
    experts = torch.tensor([[2, 0], [0, 1], [2, 1]])
    keep = torch.tensor([[True, False], [True, True], [False, True]])
    order, counts = sort_by_expert(experts, 3, keep)
    assert order.tolist() == [2, 3, 5, 0] and counts.tolist() == [1, 2, 1]


@pytest.mark.parametrize("dispatch", list(DISPATCH))
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dropped_slots_are_exactly_zero_in_output_and_grads(dispatch, activation):
    seed_everything(0)
    num_tokens, d, num_experts, k = 24, 8, 4, 2
    ffns = Experts(num_experts, d, 16, activation)
    x = torch.randn(num_tokens, d, requires_grad=True)
    gates = torch.rand(num_tokens, k, requires_grad=True)
    experts = torch.rand(num_tokens, num_experts).topk(k, dim=-1).indices
    keep = capacity_mask(experts, num_experts, 5)
    keep[0] = False  # token 0 loses both slots
    y = DISPATCH[dispatch](x, experts, gates, ffns, keep)
    # reference: only the kept slots, each computed on its own
    ref = torch.zeros(num_tokens, d)
    for t, j in zip(*torch.where(keep)):
        ref[t] += gates[t, j].detach() * ffns.forward_one(int(experts[t, j]), x[t : t + 1].detach())[0].detach()
    torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(y[0]) == 0
    (y * torch.randn_like(y)).sum().backward()
    assert torch.count_nonzero(gates.grad[~keep]) == 0 and torch.count_nonzero(x.grad[0]) == 0
    assert torch.count_nonzero(gates.grad[keep]) == int(keep.sum())


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_all_dispatch_paths_agree_under_capacity(policy):
    seed_everything(0)
    x = torch.randn(40, 8)
    outs, grads = [], []
    for dispatch in DISPATCH:
        torch.manual_seed(1)
        layer = MoELayer(8, 16, 4, 2, dispatch=dispatch, capacity_factor=0.75, drop_policy=policy)
        y, info = layer(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(layer.router.weight.grad.clone())
        assert info.capacity == 15 and 0 < info.drop_rate < 1
    for y, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(y, outs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-6)


def test_layer_dropless_default_and_huge_capacity_agree():
    seed_everything(0)
    x = torch.randn(30, 8)
    torch.manual_seed(1)
    y0, info0 = MoELayer(8, 16, 4, 2)(x)
    torch.manual_seed(1)
    y1, info1 = MoELayer(8, 16, 4, 2, capacity_factor=4.0)(x)
    assert info0.capacity is None and not info0.dropped.any() and info0.drop_rate == 0.0
    assert info1.capacity == 60 and not info1.dropped.any()
    torch.testing.assert_close(y0, y1)


def test_drop_rate_monotone_in_capacity_factor():
    seed_everything(0)
    x = torch.randn(256, 16)
    torch.manual_seed(0)
    layer = MoELayer(16, 16, 8, 2, capacity_factor=0.25)
    rates = []
    for cf in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0):
        layer.capacity_factor = cf
        rates.append(layer(x)[1].drop_rate)
    assert all(a >= b for a, b in zip(rates, rates[1:])), rates
    assert rates[0] > 0.5 and rates[-1] == 0.0


def test_onehot_buffer_is_capacity():
    seed_everything(0)
    ffns = Experts(4, 8, 8, "gelu")
    x, experts = torch.randn(12, 8), torch.randint(0, 4, (12, 1))
    gates = torch.ones(12, 1)
    keep = capacity_mask(experts, 4, 2)
    y = DISPATCH["onehot"](x, experts, gates, ffns, keep, capacity=2)
    torch.testing.assert_close(y, dispatch_loop(x, experts, gates, ffns, keep))
    with pytest.raises(ValueError, match="capacity"):
        DISPATCH["onehot"](x, experts, gates, ffns, None, capacity=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capacity_on_every_device_and_dtype(device, dtype):
    """Capacity and noisy routing on CPU and (when present) CUDA, in float32 and bfloat16: paths agree, drops are zero."""
    seed_everything(0)
    x = torch.randn(96, 16, device=device, dtype=dtype)
    outs = []
    for dispatch in DISPATCH:
        torch.manual_seed(1)
        layer = MoELayer(16, 32, 8, 2, dispatch=dispatch, router="noisy_topk", capacity_factor=0.5).to(device, dtype)
        with torch.no_grad():
            layer.router.weight.normal_()
        layer.eval()
        y, info = layer(x)
        assert y.dtype == dtype and info.logits.dtype == torch.float32 and info.capacity == 12
        assert int(tokens_per_expert(info.experts[~info.dropped][:, None], 8).max()) <= 12
        assert (y[info.dropped.all(-1)] == 0).all()
        outs.append(y.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=tol, atol=tol)
