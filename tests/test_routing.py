"""Softmax top-k gating against direct, obviously-correct computations."""
import math

import pytest
import torch

from moe_lab.routing import Router, check_experts, check_finite_logits, softmax_topk


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
