"""Balancing and stability losses against direct, obviously-correct implementations."""
import math

import pytest
import torch

from moe_lab import MoELayer, seed_everything
from moe_lab.losses import (cv_squared, importance_loss, load_loss, prob_in_topk, router_z_loss,
                            switch_aux_loss)
from moe_lab.metrics import (drop_rate, max_over_mean, max_violation,
                             routing_entropy, tokens_per_expert, unrouted_fraction)
from moe_lab.routing import dense_gates, softmax_topk


def _cv2(values):
    vals = [float(v) for v in values]
    mean = sum(vals) / len(vals)
    return sum((v - mean) ** 2 for v in vals) / len(vals) / mean**2


def test_cv_squared_matches_formula():
    seed_everything(0)
    v = torch.rand(7) + 0.1
    assert float(cv_squared(v)) == pytest.approx(_cv2(v), rel=1e-5)
    assert float(cv_squared(torch.ones(5))) == 0.0
    assert float(cv_squared(torch.tensor([3.0]))) == 0.0


def test_importance_loss_matches_loop():
    seed_everything(0)
    _, gates, experts = softmax_topk(torch.randn(30, 6), 2)
    importance = [0.0] * 6
    for t in range(30):
        for j in range(2):
            importance[int(experts[t, j])] += float(gates[t, j])
    assert float(importance_loss(dense_gates(gates, experts, 6))) == pytest.approx(_cv2(importance), rel=1e-5)


def _kth_excluding(h_row, k, i):
    others = sorted((float(v) for j, v in enumerate(h_row) if j != i), reverse=True)
    return others[k - 1]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prob_in_topk_matches_paper_definition(k):
    seed_everything(k)
    clean, std = torch.randn(12, 5), torch.rand(12, 5) + 0.2
    noisy = clean + torch.randn(12, 5) * std
    got = prob_in_topk(clean, noisy, std, k)
    for t in range(12):
        for i in range(5):
            z = (float(clean[t, i]) - _kth_excluding(noisy[t], k, i)) / float(std[t, i])
            assert float(got[t, i]) == pytest.approx(0.5 * (1 + math.erf(z / math.sqrt(2))), abs=1e-5)
    load = got.sum(0)
    assert float(load_loss(clean, noisy, std, k)) == pytest.approx(_cv2(load), rel=1e-4)


def test_prob_in_topk_all_experts_selected():
    clean = torch.randn(4, 3)
    assert torch.equal(prob_in_topk(clean, clean, torch.ones(4, 3), 3), torch.ones(4, 3))


def test_smooth_load_is_differentiable_and_tracks_counts():
    seed_everything(0)
    clean = torch.randn(4000, 4, requires_grad=True)
    std = torch.full((4000, 4), 0.5, requires_grad=True)
    with torch.no_grad():
        noisy = clean + torch.randn(4000, 4) * std
    p = prob_in_topk(clean, noisy, std, 1)
    p.sum().backward()
    assert clean.grad.abs().sum() > 0 and std.grad.abs().sum() > 0
    # the expected load is close to the realised count of a fresh noise draw
    counts = tokens_per_expert(noisy.topk(1).indices, 4).float()
    torch.testing.assert_close(p.sum(0).detach(), counts, rtol=0.1, atol=0)


def test_switch_aux_loss_matches_loop_and_is_one_when_uniform():
    seed_everything(0)
    probs, _, experts = softmax_topk(torch.randn(40, 5), 2)
    f = [0.0] * 5
    for e in experts.reshape(-1).tolist():
        f[e] += 1 / experts.numel()
    p = probs.mean(0).tolist()
    assert float(switch_aux_loss(probs, experts)) == pytest.approx(5 * sum(a * b for a, b in zip(f, p)), rel=1e-5)
    uniform = torch.full((8, 4), 0.25)
    experts_uniform = torch.arange(8).remainder(4).unsqueeze(1)
    assert float(switch_aux_loss(uniform, experts_uniform)) == pytest.approx(1.0)
    alpha = 1e-2
    assert float(alpha * switch_aux_loss(uniform, experts_uniform)) == pytest.approx(alpha)


def test_switch_aux_gradient_pushes_hardest_on_busiest_expert():
    """dL/dP_i = N * f_i: the more tokens an expert gets, the stronger its probability is pushed down."""
    probs = torch.full((6, 3), 1 / 3, requires_grad=True)
    experts = torch.tensor([[0], [0], [0], [1], [1], [2]])
    switch_aux_loss(probs, experts).backward()
    col = probs.grad[0]
    assert col[0] > col[1] > col[2] > 0
    torch.testing.assert_close(col * 6, 3 * torch.tensor([3 / 6, 2 / 6, 1 / 6]))


def test_switch_aux_minimum_at_uniform():
    """With hard (one-hot) router probabilities P_i = f_i, so N * sum f_i^2 >= 1, with equality iff uniform."""
    seed_everything(0)
    for _ in range(20):
        experts = torch.randint(0, 4, (64, 1))
        probs = torch.nn.functional.one_hot(experts[:, 0], 4).float()
        f = tokens_per_expert(experts, 4).float() / 64
        loss = float(switch_aux_loss(probs, experts))
        assert loss == pytest.approx(4 * float((f * f).sum()), rel=1e-5) and loss >= 1.0
    balanced = torch.arange(64).remainder(4).unsqueeze(1)
    assert float(switch_aux_loss(torch.nn.functional.one_hot(balanced[:, 0], 4).float(), balanced)) == pytest.approx(1.0)


def test_router_z_loss_matches_direct():
    seed_everything(0)
    z = torch.randn(9, 5) * 3
    direct = sum(math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row in z) / 9
    assert float(router_z_loss(z)) == pytest.approx(direct, rel=1e-5)


def test_metrics():
    load = torch.tensor([4, 2, 2, 0])
    assert max_violation(load) == pytest.approx(1.0)
    assert max_over_mean(load) == pytest.approx(2.0)
    dropped = torch.tensor([[True, False], [True, True], [False, False]])
    assert drop_rate(dropped) == pytest.approx(0.5)
    assert unrouted_fraction(dropped) == pytest.approx(1 / 3)
    assert routing_entropy(torch.full((3, 4), 0.25)) == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="load"):
        max_over_mean(torch.zeros(3))


def test_layer_reports_losses():
    seed_everything(0)
    layer = MoELayer(8, 8, 4, 2, router="noisy_topk")
    _, info = layer(torch.randn(20, 8))
    assert info.load_loss is not None and info.importance_loss.ndim == 0
    _, info = MoELayer(8, 8, 4, 2)(torch.randn(20, 8))
    assert info.load_loss is None and info.clean_logits is None
