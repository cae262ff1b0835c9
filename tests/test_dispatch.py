"""Every dispatch path equals a dense, obviously-correct computation, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from moe_lab.dispatch import DISPATCH, dispatch_sorted, sort_by_expert
from moe_lab.experts import Experts, grouped_mm


def dense_reference(x, experts, gates, ffns):
    """Run every expert on every token, then pick: y_t = sum_j gates[t,j] * E_{experts[t,j]}(x_t)."""
    x = x.float()
    w1, w2 = ffns.w1.float(), ffns.w2.float()
    h = torch.einsum("td,edf->etf", x, w1)
    if ffns.activation == "swiglu":
        h = F.silu(h) * torch.einsum("td,edf->etf", x, ffns.w3.float())
    else:
        h = F.gelu(h)
    all_out = torch.einsum("etf,efd->etd", h, w2)  # [E, T, d]
    picked = all_out[experts, torch.arange(x.shape[0])[:, None]]  # [T, k, d]
    return (picked * gates.float()[..., None]).sum(1)


def make_case(tokens, num_experts, k, activation="swiglu", dtype=torch.float32, device="cpu", empty=()):
    ffns = Experts(num_experts, 16, 24, activation).to(device=device, dtype=dtype)
    x = torch.randn(tokens, 16, device=device, dtype=dtype)
    scores = torch.rand(tokens, num_experts, device=device)
    scores[:, list(empty)] = -1  # these experts get no tokens
    experts = scores.topk(k, dim=-1).indices
    gates = torch.rand(tokens, k, device=device).softmax(-1)
    return x, experts, gates, ffns


def grads(fn, x, experts, gates, ffns):
    x = x.detach().requires_grad_(True)
    gates = gates.detach().requires_grad_(True)
    y = fn(x, experts, gates, ffns)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y)
    params = [p for p in (ffns.w1, ffns.w3, ffns.w2) if p is not None]
    return y, torch.autograd.grad((y.float() * weights.float()).sum(), [x, gates, *params])


CASES = [
    dict(tokens=50, num_experts=8, k=2),
    dict(tokens=33, num_experts=4, k=1, activation="gelu"),
    dict(tokens=20, num_experts=6, k=6),
    dict(tokens=1, num_experts=8, k=2),
    dict(tokens=40, num_experts=8, k=3, empty=(0, 5, 7)),
    dict(tokens=7, num_experts=1, k=1),
]


@pytest.mark.parametrize("impl", sorted(DISPATCH))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dispatch_matches_dense_reference_fp32(impl, case, device):
    x, experts, gates, ffns = make_case(**case, device=device)
    y_ref, g_ref = grads(dense_reference, x, experts, gates, ffns)
    y, g = grads(DISPATCH[impl], x, experts, gates, ffns)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["sorted", "onehot"])
@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dispatch_agrees_with_loop_bf16(impl, case, device):
    x, experts, gates, ffns = make_case(**case, dtype=torch.bfloat16, device=device)
    y_ref, g_ref = grads(DISPATCH["loop"], x, experts, gates, ffns)
    y, g = grads(DISPATCH[impl], x, experts, gates, ffns)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_fused_and_fallback_agree(dtype):
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 16, dtype=dtype)
    w = torch.randn(6, 16, 8, dtype=dtype)
    ref = torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip([0, *counts.cumsum(0)[:-1]], counts.cumsum(0)))])
    fallback = grouped_mm(x, w, counts, fused=False)
    torch.testing.assert_close(fallback, ref)
    if hasattr(F, "grouped_mm"):
        torch.testing.assert_close(grouped_mm(x, w, counts, fused=True), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_sorted_fused_and_fallback_agree_with_gradients():
    x, experts, gates, ffns = make_case(64, 8, 2)
    y1, g1 = grads(lambda *a: dispatch_sorted(*a, fused=False), x, experts, gates, ffns)
    y2, g2 = grads(lambda *a: dispatch_sorted(*a), x, experts, gates, ffns)
    torch.testing.assert_close(y1, y2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_sort_by_expert_is_stable_grouping():
    experts = torch.tensor([[2, 0], [0, 1], [2, 1]])
    order, counts = sort_by_expert(experts, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    assert (order // 2).tolist() == [0, 1, 1, 2, 0, 2]  # expert 0: tokens 0,1; expert 1: 1,2; expert 2: 0,2
    assert experts.reshape(-1)[order].tolist() == [0, 0, 1, 1, 2, 2]


def test_sorted_dispatch_is_deterministic():
    x, experts, gates, ffns = make_case(128, 8, 2)
    assert torch.equal(dispatch_sorted(x, experts, gates, ffns), dispatch_sorted(x, experts, gates, ffns))


@pytest.mark.parametrize("impl", sorted(DISPATCH))
@pytest.mark.parametrize("bad", [[[0, 1], [2, 9]], [[0, -1], [2, 3]]])
def test_out_of_range_expert_ids_rejected(impl, bad):
    x, _, gates, ffns = make_case(2, 4, 2)
    experts = torch.tensor(bad)
    for keep in (None, torch.ones(2, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="expert ids in 0..3"):
            DISPATCH[impl](x, experts, gates, ffns, keep)
    with pytest.raises(ValueError, match="shape \\[tokens, k\\]"):
        sort_by_expert(torch.tensor([0, 1]), 4)
