"""Slot permutations with deterministic backward passes, against plain indexing and loops."""
import pytest
import torch

from moe_lab.permute import combine_slots, gather_slots, sum_slots


def _case(tokens=7, k=3, d=5, drop=False):
    order = torch.randperm(tokens * k)
    if drop:
        order = order[: tokens * k - 4]  # four slots dropped
    x = torch.randn(tokens, d, dtype=torch.float64, requires_grad=True)
    return x, order, k


@pytest.mark.parametrize("drop", [False, True])
def test_gather_and_sum_match_indexing_and_gradcheck(drop):
    x, order, k = _case(drop=drop)
    torch.testing.assert_close(gather_slots(x, order, k), x[order // k])
    rows = torch.randn(order.numel(), x.shape[1], dtype=torch.float64, requires_grad=True)
    expected = torch.zeros(x.shape, dtype=torch.float64)
    for i, s in enumerate(order.tolist()):
        expected[s // k] += rows[i].detach()
    torch.testing.assert_close(sum_slots(rows, order, x.shape[0], k), expected)
    assert torch.autograd.gradcheck(lambda t: gather_slots(t, order, k), (x,))
    assert torch.autograd.gradcheck(lambda r: sum_slots(r, order, x.shape[0], k), (rows,))


@pytest.mark.parametrize("drop", [False, True])
def test_combine_slots_is_the_gated_sum(drop):
    x, order, k = _case(drop=drop)
    h = torch.randn(order.numel(), x.shape[1], dtype=torch.float64, requires_grad=True)
    gates = torch.rand(x.shape[0], k, dtype=torch.float64, requires_grad=True)
    expected = torch.zeros(x.shape, dtype=torch.float64)
    for i, s in enumerate(order.tolist()):
        expected[s // k] += gates[s // k, s % k].detach() * h[i].detach()
    torch.testing.assert_close(combine_slots(h, order, gates), expected)
    assert torch.autograd.gradcheck(lambda a, b: combine_slots(a, order, b), (h, gates))


def test_sum_slots_accumulates_in_float32():
    rows = torch.tensor([[256.0], [1.0], [1.0]], dtype=torch.bfloat16)  # 256 + 1 + 1 = 258 exactly in bf16
    assert sum_slots(rows, torch.arange(3), 1, 3).item() == 258.0  # bf16 adds one by one would give 256
