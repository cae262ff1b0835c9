"""Cost models against hand-computed cases and slow per-token loops."""
import itertools
import math

import pytest
import torch

from moe_lab.calculator import PRESETS, count_params, training_memory
from moe_lab.cost_model import (
    LINKS, all_to_all_time, capacity_buffer_bytes, dispatch_bytes, ep_bytes_per_step, ep_step_time,
    fit_alpha_beta, moe_activation_bytes, rank_memory, rank_state_bytes,
)
from moe_lab.metrics import devices_per_token
from moe_lab.routing import group_limited_topk


def test_bytes_per_step():
    # DeepSeek-V3-like: 4096 tokens, top-8, d=7168, bf16 -> 448 MiB per all-to-all; 4 per step; 7/8 leaves the rank
    assert ep_bytes_per_step(4096, 8, 7168, 2, 8, off_rank=False) == 4 * 448 * 2**20
    assert ep_bytes_per_step(4096, 8, 7168, 2, 8) == 4 * 448 * 2**20 * 7 / 8
    assert ep_bytes_per_step(10, 2, 4, 4, 1) == 0.0  # one rank: nothing leaves it
    assert ep_bytes_per_step(10, 2, 4, 4, 2, layers=3) == 3 * 4 * 10 * 2 * 4 * 4 / 2


def test_alpha_beta_by_hand():
    # 4 ranks, 8 MB each, 10 us latency, 1 GB/s: 3 messages -> 30 us + 3/4 * 8e6 / 1e9 s = 6.03 ms
    assert all_to_all_time(8e6, 4, 1e-5, 1e9) == pytest.approx(6.03e-3)
    assert all_to_all_time(8e6, 1, 1e-5, 1e9) == 0.0
    est = ep_step_time(0.01, 8e6, 4, 1e-5, 1e9)
    assert est.comm_s == pytest.approx(4 * 6.03e-3) and est.total_s == pytest.approx(0.01 + 4 * 6.03e-3)
    assert est.comm_share == pytest.approx(4 * 6.03e-3 / (0.01 + 4 * 6.03e-3))
    assert ep_step_time(0.0, 0.0, 2, 0.0, 1.0).comm_share == 0.0
    with pytest.raises(ValueError, match="bandwidth"):
        all_to_all_time(1.0, 2, 0.0, 0.0)


def test_fit_recovers_alpha_and_beta():
    sizes = [1e3, 1e5, 1e6, 4e6]
    for world in (2, 8):
        times = [all_to_all_time(n, world, 3e-5, 2e9) for n in sizes]
        alpha, beta = fit_alpha_beta(sizes, times, world)
        assert alpha == pytest.approx(3e-5) and beta == pytest.approx(2e9)
    # times that fall below the model at small sizes (an intercept < 0 by plain least squares): latency 0
    alpha, beta = fit_alpha_beta([1e3, 1e6, 4e6], [0.4e-6, 0.5e-3, 2e-3], 2)  # 1 GB/s, the first point fast
    assert alpha == 0.0 and beta == pytest.approx(1e9, rel=0.1)
    with pytest.raises(ValueError, match="distinct sizes"):
        fit_alpha_beta([1e3, 1e3], [1.0, 2.0], 2)
    with pytest.raises(ValueError, match="positive bandwidth"):
        fit_alpha_beta([1e3, 1e6], [2.0, 1.0], 2)


def test_published_links_are_quoted_with_sources():
    assert LINKS["nvlink_deepep"].bandwidth == 153e9 and "DeepEP" in LINKS["nvlink_deepep"].source
    assert LINKS["ethernet_100g"].bandwidth == 100e9 / 8


def _loop_fanout(experts, num_experts, world):
    per_rank = num_experts // world
    return torch.tensor([len({e // per_rank for e in row}) for row in experts.tolist()])


def _loop_dispatch_bytes(experts, num_experts, world, rank, d, b, dedup):
    per_rank = num_experts // world
    rows = 0
    for row in experts.tolist():
        owners = [e // per_rank for e in row]
        rows += len(set(owners) - {rank}) if dedup else sum(o != rank for o in owners)
    return rows * d * b


def test_fanout_and_dispatch_bytes_against_loops():
    gen = torch.Generator().manual_seed(0)
    for num_experts, world, k in [(8, 2, 2), (16, 4, 4), (12, 3, 1), (8, 8, 3)]:
        experts = torch.rand(40, num_experts, generator=gen).topk(k, dim=-1).indices
        assert torch.equal(devices_per_token(experts, num_experts, world), _loop_fanout(experts, num_experts, world))
        for rank, dedup in itertools.product(range(world), (False, True)):
            assert dispatch_bytes(experts, num_experts, world, rank, 16, 2, dedup) == _loop_dispatch_bytes(
                experts, num_experts, world, rank, 16, 2, dedup)
    with pytest.raises(ValueError, match="world_size"):  # issue 23: it named n_groups, which the call has not
        dispatch_bytes(experts, 8, 3, 0, 16, 2)


def _loop_group_limited(scores, k, n_groups, topk_groups, group_score):
    per = scores.shape[1] // n_groups
    values, experts = [], []
    for row in scores.tolist():
        groups = [sorted(row[g * per:(g + 1) * per], reverse=True) for g in range(n_groups)]
        score = [g[0] if group_score == "max" else g[0] + g[1] for g in groups]
        kept = sorted(range(n_groups), key=lambda g: -score[g])[:topk_groups]
        candidates = sorted((row[e], e) for e in range(len(row)) if e // per in kept)[::-1][:k]
        values.append([v for v, _ in candidates])
        experts.append([e for _, e in candidates])
    return torch.tensor(values), torch.tensor(experts)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_device_limited_routing_bounds_the_fanout(group_score):
    scores = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) - 3  # negative: -inf masking matters
    for m in (1, 2, 3, 4):
        values, experts = group_limited_topk(scores, 4, n_groups=4, topk_groups=m, group_score=group_score)
        ref_values, ref_experts = _loop_group_limited(scores, 4, 4, m, group_score)
        assert torch.equal(experts, ref_experts) and torch.allclose(values, ref_values)
        assert experts.dtype == torch.int64
        assert int(devices_per_token(experts, 16, 4).max()) <= m
    unrestricted = scores.topk(4, dim=-1)
    limited = group_limited_topk(scores, 4, n_groups=4, topk_groups=4, group_score=group_score)
    assert torch.equal(limited[1], unrestricted.indices)


def test_capacity_buffers_by_hand():
    # 1024 tokens, 16 experts, top-2, factor 1.25: C = ceil(1024*2/16*1.25) = 160 rows per expert
    assert capacity_buffer_bytes(1024, 16, 2, 1.25, 64, 4) == 16 * 160 * 64 * 4


def test_rank_state_by_hand():
    # 100 replicated + 800 expert parameters, 8 ranks, bf16 mixed precision: 2 + 2 + (4 + 8) bytes per parameter
    ep = rank_state_bytes(100, 800, 8, 8, "bf16")
    assert ep == {"weights": 400, "gradients": 400, "optimizer": 2400, "total": 3200}
    dp = rank_state_bytes(100, 800, 8, 1, "bf16")
    assert dp["total"] == 900 * 16
    hybrid = rank_state_bytes(100, 800, 8, 4, "bf16", zero=True)  # experts 200 per rank, held by 2 copies
    assert hybrid["weights"] == 300 * 2 and hybrid["optimizer"] == (100 / 8 + 200 / 2) * 12
    assert rank_state_bytes(10, 20, 2, 2, "fp32")["optimizer"] == 20 * 8  # fp32: no master copy
    with pytest.raises(ValueError, match="ep_size"):
        rank_state_bytes(1, 1, 8, 3)


def test_rank_memory_of_published_models():
    for name in ("mixtral_8x7b", "deepseek_v3"):
        arch = PRESETS[name]
        counts = count_params(arch)
        routed = counts.components["routed_experts"][0]
        dp = rank_memory(arch, 8, 1)
        assert dp["total"] == training_memory(counts.total, "bf16")["total"]  # data parallel: everything
        ep = rank_memory(arch, 8, 8)
        assert ep["weights"] == (counts.total - routed + routed / 8) * 2
    arch = PRESETS["mixtral_8x7b"]
    # 32 MoE layers x 4096 tokens x top-2 x (4096 + 3 * 14336) values x 2 bytes
    assert moe_activation_bytes(arch, 4096) == 32 * 4096 * 2 * (4096 + 3 * 14336) * 2
    assert rank_memory(arch, 8, 8, tokens_per_rank=4096)["activations"] == moe_activation_bytes(arch, 4096)
    assert math.isclose(rank_memory(arch, 8, 8, tokens_per_rank=0)["total"], rank_memory(arch, 8, 8)["total"])
