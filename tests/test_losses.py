"""Balancing and stability losses against direct, obviously-correct implementations."""
import math

import pytest
import torch

from moe_lab import MoELayer, seed_everything
from moe_lab.losses import (bias_update, communication_balance_loss, cv_squared, device_balance_loss,
                            importance_loss, load_loss, prob_in_topk, router_z_loss, sequence_balance_loss,
                            switch_aux_loss)
from moe_lab.metrics import (devices_per_token, drop_rate, max_over_mean, max_violation, max_violation_tensor,
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


# ---------------------------------------------------------------- DeepSeek balance losses, by loops
def _f(expert_ids, num_experts, k, tokens):
    counts = [0] * num_experts
    for e in expert_ids:
        counts[e] += 1
    return [num_experts / (k * tokens) * c for c in counts]


def test_sequence_balance_loss_matches_per_sequence_loop():
    seed_everything(0)
    scores = torch.rand(3, 10, 8)
    probs = scores / scores.sum(-1, keepdim=True)
    experts = scores.topk(2, -1).indices
    expected = 0.0
    for b in range(3):
        f = _f(experts[b].reshape(-1).tolist(), 8, 2, 10)
        p = [sum(float(probs[b, t, i]) for t in range(10)) / 10 for i in range(8)]
        expected += sum(fi * pi for fi, pi in zip(f, p)) / 3
    assert float(sequence_balance_loss(probs, experts)) == pytest.approx(expected, rel=1e-5)
    # one sequence = the Switch loss on it; balanced sequences give 1
    torch.testing.assert_close(sequence_balance_loss(probs[:1], experts[:1]), switch_aux_loss(probs[0], experts[0]))
    balanced = torch.arange(8).view(1, 8, 1)
    assert float(sequence_balance_loss(torch.full((1, 8, 8), 1 / 8), balanced)) == pytest.approx(1.0)


def test_sequence_loss_sees_imbalance_that_the_batch_loss_averages_away():
    """Sequence 0 uses only expert 0, sequence 1 only expert 1: balanced over the batch, not per sequence."""
    experts = torch.tensor([[[0]] * 4, [[1]] * 4])
    probs = torch.nn.functional.one_hot(experts[..., 0], 2).float()
    assert float(switch_aux_loss(probs.view(8, 2), experts.view(8, 1))) == pytest.approx(1.0)
    assert float(sequence_balance_loss(probs, experts)) == pytest.approx(2.0)


def test_device_and_communication_losses_match_loops():
    seed_everything(1)
    T, E, k, D, M = 40, 12, 3, 4, 2
    scores = torch.rand(T, E)
    probs = scores / scores.sum(-1, keepdim=True)
    experts = scores.topk(k, -1).indices
    size = E // D
    f = _f(experts.reshape(-1).tolist(), E, k, T)
    p = [float(probs[:, i].mean()) for i in range(E)]
    dev = sum((sum(f[j] for j in range(d * size, (d + 1) * size)) / size)
              * sum(p[j] for j in range(d * size, (d + 1) * size)) for d in range(D))
    assert float(device_balance_loss(probs, experts, D)) == pytest.approx(dev, rel=1e-5)
    sent = [sum(any(e // size == d for e in row) for row in experts.tolist()) for d in range(D)]
    comm = sum(D / (M * T) * sent[d] * sum(p[j] for j in range(d * size, (d + 1) * size)) for d in range(D))
    assert float(communication_balance_loss(probs, experts, D, M)) == pytest.approx(comm, rel=1e-5)
    # with one device both are constant 1; so is each when perfectly balanced
    assert float(device_balance_loss(probs, experts, 1)) == pytest.approx(1.0)
    assert float(communication_balance_loss(probs, experts, 1, 1)) == pytest.approx(1.0)
    uniform, spread = torch.full((4, 4), 0.25), torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    assert float(device_balance_loss(uniform, spread, 2)) == pytest.approx(1.0)
    assert float(communication_balance_loss(uniform, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), 2, 1)) \
        == pytest.approx(1.0)


def test_device_losses_are_differentiable_in_probs():
    probs = torch.full((6, 4), 0.25, requires_grad=True)
    experts = torch.tensor([[0], [0], [0], [1], [2], [3]])
    (device_balance_loss(probs, experts, 2) + communication_balance_loss(probs, experts, 2, 1)).backward()
    assert probs.grad[0, 0] > probs.grad[0, 2] > 0  # the busy device is pushed hardest


def test_balance_losses_bad_input():
    with pytest.raises(ValueError, match="n_devices must be an integer >= 1 dividing num_experts=6"):
        device_balance_loss(torch.full((3, 6), 1 / 6), torch.zeros(3, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_devices"):
        communication_balance_loss(torch.full((3, 6), 1 / 6), torch.zeros(3, 1, dtype=torch.long), 3, 4)
    with pytest.raises(ValueError, match=r"\[B, T, E\]"):
        sequence_balance_loss(torch.full((3, 6), 1 / 6), torch.zeros(3, 1, dtype=torch.long))


def test_bias_update_formula():
    bias, load = torch.tensor([0.5, 0.0, -0.5, 0.0]), torch.tensor([10, 2, 4, 4])  # mean 5
    torch.testing.assert_close(bias_update(bias, load, 1e-3), bias + torch.tensor([-1e-3, 1e-3, 1e-3, 1e-3]))
    centered = bias_update(bias, load, 1e-3, centered=True)
    torch.testing.assert_close(centered, bias + torch.tensor([-1.5e-3, 0.5e-3, 0.5e-3, 0.5e-3]))
    assert float(centered.sum()) == pytest.approx(float(bias.sum()), abs=1e-7)
    assert torch.equal(bias_update(bias, torch.full((4,), 3), 1e-3), bias)  # balanced: no change
    assert bias_update(bias.bfloat16(), load, 1e-3).dtype == torch.float32
    with pytest.raises(ValueError, match="rate"):
        bias_update(bias, load, -1e-3)
    with pytest.raises(ValueError, match="shape"):
        bias_update(bias, load[:3], 1e-3)


def test_bias_update_counts_stay_exact_where_bf16_would_flip_the_sign():
    """Megatron-LM #1482: at 40,840 tokens bf16 spacing is 256, so a count just below the mean rounds above it."""
    load = torch.tensor([40_833, 40_847, 40_840, 40_840])  # mean 40,840: expert 0 is underloaded
    assert load.bfloat16()[0].float() == 40_960 > load.float().mean()  # in bf16 it looks overloaded
    assert bias_update(torch.zeros(4), load, 1e-3)[0] > 0  # counted exactly: its bias goes up


def test_devices_per_token_and_max_violation_tensor():
    experts = torch.tensor([[0, 1, 2], [0, 4, 7], [6, 7, 5]])
    assert devices_per_token(experts, 8, 4).tolist() == [2, 3, 2]  # devices {0, 1}, {0, 2, 3}, {3, 2}
    assert devices_per_token(experts, 8, 1).tolist() == [1, 1, 1]
    assert devices_per_token(experts, 8, 8).tolist() == [3, 3, 3]
    load = torch.tensor([[[4, 2, 2, 0], [1, 1, 1, 1]]])
    torch.testing.assert_close(max_violation_tensor(load), torch.tensor([[1.0, 0.0]]))
    assert float(max_violation_tensor(load[0, 0])) == max_violation(load[0, 0])
