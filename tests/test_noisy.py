"""Noisy top-k gating (Shazeer et al. 2017) and Switch jitter: noise in training only, correct formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe_lab import MoELayer, seed_everything
from moe_lab.routing import NoisyTopKRouter, add_gating_noise, dense_gates, multiplicative_jitter, softmax_topk


def test_noisy_router_zero_init_and_formula():
    seed_everything(0)
    router = NoisyTopKRouter(6, 4)
    assert torch.count_nonzero(router.weight) == 0 and torch.count_nonzero(router.noise_weight) == 0
    with torch.no_grad():
        router.weight.normal_()
        router.noise_weight.normal_()
    x = torch.randn(10, 6)
    gen = torch.Generator().manual_seed(3)
    out = router(x, generator=gen)
    clean = x @ router.weight.T
    std = torch.log1p(torch.exp(x @ router.noise_weight.T))  # softplus written out
    noise = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.clean, clean)
    torch.testing.assert_close(out.noise_std, std)
    torch.testing.assert_close(out.noisy, clean + noise * std)


def test_noise_only_in_training():
    seed_everything(0)
    layer = MoELayer(8, 16, 4, 2, router="noisy_topk", jitter_eps=0.1)
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(32, 8)
    layer.eval()
    y1, i1 = layer(x)
    y2, i2 = layer(x)
    assert torch.equal(y1, y2) and torch.equal(i1.logits, i1.clean_logits)
    layer.train()
    _, i3 = layer(x)
    _, i4 = layer(x)
    assert not torch.equal(i3.logits, i4.logits)  # fresh noise each training step


def test_paper_gating_equals_softmax_over_kept_noisy_logits():
    seed_everything(0)
    h = torch.randn(20, 8)
    _, gates, experts = softmax_topk(h, 3)  # defaults: softmax before top-k, renormalise
    masked = torch.full_like(h, -math.inf).scatter(1, experts, h.gather(1, experts))  # KeepTopK
    torch.testing.assert_close(dense_gates(gates, experts, 8), masked.softmax(-1))


def test_noise_at_zero_init_spreads_tokens():
    """With W_g = W_noise = 0 the clean logits tie; only the noise (std log 2) chooses, roughly uniformly."""
    seed_everything(0)
    layer = MoELayer(8, 8, 4, 1, router="noisy_topk", renormalize=False)
    _, info = layer(torch.randn(4000, 8))
    torch.testing.assert_close(info.noise_std, torch.full((4000, 4), math.log(2)))
    share = info.tokens_per_expert.float() / 4000
    assert share.min() > 0.2 and share.max() < 0.3


def test_noise_gradient_reaches_noise_weight():
    seed_everything(0)
    layer = MoELayer(8, 8, 4, 2, router="noisy_topk")
    y, info = layer(torch.randn(16, 8))
    (y.square().sum() + info.load_loss).backward()
    assert layer.router.noise_weight.grad.abs().sum() > 0


def test_multiplicative_jitter_range_and_identity():
    x = torch.randn(1000, 4)
    assert multiplicative_jitter(x, 0.0) is x
    ratio = multiplicative_jitter(x, 0.1, torch.Generator().manual_seed(0)) / x
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6 and ratio.std() > 0.04
    with pytest.raises(ValueError, match="jitter_eps"):
        multiplicative_jitter(x, 1.5)
    with pytest.raises(ValueError, match="jitter_eps"):
        MoELayer(4, 4, 2, 1, jitter_eps=-0.1)


def test_add_gating_noise_is_float32_and_uses_std():
    clean = torch.zeros(5000, 3, dtype=torch.bfloat16)
    std = torch.tensor([0.0, 1.0, 3.0]).expand(5000, 3)
    h = add_gating_noise(clean, std, torch.Generator().manual_seed(0))
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.std(0), torch.tensor([0.0, 1.0, 3.0]), atol=0.1, rtol=0.05)


def test_router_choice_validated():
    with pytest.raises(ValueError, match="router must be one of"):
        MoELayer(4, 4, 2, 1, router="sigmoid")
    assert F.softplus(torch.zeros(1)).item() == pytest.approx(math.log(2))
