"""Exercises of 08_training_systems: all-to-all traffic and time, split sizes, memory per rank, fan-out under a
device limit, and a fixed-capacity (static-shape) dispatch with its combine."""
from __future__ import annotations

import random

import torch

from ..cost_model import dispatch_bytes, ep_bytes_per_step, ep_step_time, rank_state_bytes
from ..dispatch import queue_positions
from ..metrics import devices_per_token
from ..routing import group_limited_topk
from .core import Case, exercise


def bytes_per_step(tokens: int, k: int, d_model: int, bytes_per_element: int, world_size: int) -> float:
    """Reference for 08.1: expected bytes one rank sends to other ranks per MoE layer and training step."""
    return ep_bytes_per_step(tokens, k, d_model, bytes_per_element, world_size)


@exercise("08.1", function="bytes_per_step", title="All-to-all bytes per training step", points=1,
          reference=bytes_per_step,
          hint="count the all-to-alls of one step (forward and backward) and the share of each that leaves the rank",
          hints=("dispatch + combine in the forward pass, the same two again on the gradients in the backward pass",
                 "each all-to-all holds tokens * k * d_model * bytes; evenly spread, (P - 1) / P of it goes to "
                 "other ranks"),
          mistakes={
              "only the forward pass (2 all-to-alls)": lambda t, k, d, b, p: ep_bytes_per_step(t, k, d, b, p) / 2,
              "the rows for the rank's own experts counted as sent": lambda t, k, d, b, p: ep_bytes_per_step(
                  t, k, d, b, p, off_rank=False),
              "only the dispatch all-to-all": lambda t, k, d, b, p: ep_bytes_per_step(t, k, d, b, p) / 4,
          })
def _bytes_cases(hidden: bool) -> list[Case]:
    configs = [(4096, 8, 7168, 2, 8), (16, 2, 4, 4, 2)]
    if hidden:
        configs += [(100, 2, 8, 4, 1), (1, 1, 1, 1, 3),
                    (random.randint(1, 10**5), random.randint(1, 8), 1024, 2, random.choice([4, 16, 64]))]
    return [Case(f"tokens={t}, k={k}, d_model={d}, bytes={b}, world_size={p}", (t, k, d, b, p))
            for t, k, d, b, p in configs]


def all_to_all_splits(counts: torch.Tensor, rank: int) -> tuple[list[int], list[int]]:
    """Reference for 08.2: ``(input_splits, output_splits)`` of rank ``rank``'s dispatch all-to-all, from
    ``counts: [P, E]`` (row r: the slots rank r sends to each expert; rank r owns a contiguous block of E/P)."""
    world = counts.shape[0]
    grid = counts.view(world, world, -1)  # [source rank, destination rank, local expert]
    return grid[rank].sum(-1).tolist(), grid[:, rank].sum(-1).tolist()


def _round_robin_splits(counts: torch.Tensor, rank: int) -> tuple[list[int], list[int]]:
    world = counts.shape[0]
    owner = torch.arange(counts.shape[1]) % world
    send = [int(counts[rank, owner == r].sum()) for r in range(world)]
    return send, [int(counts[r, owner == rank].sum()) for r in range(world)]


@exercise("08.2", function="all_to_all_splits", title="Split sizes of the dispatch all-to-all", points=2,
          reference=all_to_all_splits,
          hint="after the counts exchange every rank knows how many rows go from each rank to each expert; "
               "group the experts by the rank that owns them",
          hints=("input_splits[r]: rows this rank sends to rank r = its counts for rank r's experts, summed",
                 "output_splits[r]: rows this rank receives from rank r = rank r's counts for this rank's experts",
                 "counts.view(P, P, E // P) indexes [source rank, destination rank, local expert]"),
          mistakes={"input and output splits swapped": lambda c, r: all_to_all_splits(c, r)[::-1],
                    "experts assigned round-robin (e on rank e % P) instead of in contiguous blocks":
                        _round_robin_splits})
def _splits_cases(hidden: bool) -> list[Case]:
    configs = [(2, 4, 0), (4, 8, 2)]
    if hidden:
        configs += [(1, 3, 0), (3, 6, 2), (4, 4, 3), (random.choice([2, 8]), 16, 1)]
    cases = []
    for world, experts, rank in configs:
        counts = torch.randint(0, 20, (world, experts))
        counts[:, 0] = 0  # an expert nobody routes to
        cases.append(Case(f"P={world}, E={experts}, rank={rank}", (counts, rank)))
    if hidden:
        cases.append(Case("a rank that receives nothing", (torch.tensor([[5, 0, 3, 0], [2, 0, 7, 0]]), 1)))
    return cases


def rank_training_memory(replicated_params: int, expert_params: int, world_size: int, ep_size: int,
                         zero: bool) -> float:
    """Reference for 08.3: bytes of training state per rank, bf16 mixed precision with Adam."""
    return rank_state_bytes(replicated_params, expert_params, world_size, ep_size, "bf16", zero)["total"]


def _everything_sharded(rep: int, exp: int, world: int, ep: int, zero: bool) -> float:
    return rank_state_bytes(0, rep + exp, world, ep, "bf16", zero)["total"]


def _zero_shards_weights_too(rep: int, exp: int, world: int, ep: int, zero: bool) -> float:
    if not zero:
        return rank_training_memory(rep, exp, world, ep, False)
    return (rep / world + exp / ep / (world // ep)) * 16


@exercise("08.3", function="rank_training_memory", title="Training memory per rank under expert parallelism",
          points=2, reference=rank_training_memory,
          hint="experts are split over the ep_size ranks of an expert-parallel group; everything else is a full "
               "copy on every rank; 16 bytes per parameter held (2 + 2 + 4 + 8)",
          hints=("bf16 weights (2 bytes) and gradients (2); fp32 master copy (4) and Adam's two moments (8)",
                 "ZeRO-1 splits only the 12 bytes of optimizer state over the ranks that hold the same parameter: "
                 "all world_size ranks for a replicated one, world_size / ep_size for an expert"),
          mistakes={"the replicated parameters sharded like the experts": _everything_sharded,
                    "ZeRO-1 applied to weights and gradients too": _zero_shards_weights_too})
def _memory_cases(hidden: bool) -> list[Case]:
    configs = [(1_600_000_000, 45_100_000_000, 8, 8, False), (100, 800, 8, 4, True)]
    if hidden:
        configs += [(100, 800, 8, 1, False), (10, 640, 64, 64, True), (1, 0, 1, 1, True),
                    (random.randint(1, 10**9), random.randint(1, 10**10), 16, random.choice([1, 2, 4, 8, 16]),
                     random.random() < 0.5)]
    return [Case(f"replicated={r}, expert={e}, world_size={w}, ep_size={p}, zero={z}", (r, e, w, p, z))
            for r, e, w, p, z in configs]


def step_time(compute_s: float, bytes_per_rank: float, world_size: int, latency_s: float,
              bandwidth: float) -> tuple[float, float]:
    """Reference for 08.4: ``(total seconds, communication share)`` of a step with 4 all-to-alls, no overlap."""
    est = ep_step_time(compute_s, bytes_per_rank, world_size, latency_s, bandwidth)
    return est.total_s, est.comm_share


def _all_bytes_cross(compute_s, n, world, alpha, beta):
    comm = 4 * ((world - 1) * alpha + n / beta) if world > 1 else 0.0
    return compute_s + comm, comm / (compute_s + comm) if compute_s + comm else 0.0


def _one_latency(compute_s, n, world, alpha, beta):
    comm = 4 * (alpha + (world - 1) / world * n / beta) if world > 1 else 0.0
    return compute_s + comm, comm / (compute_s + comm) if compute_s + comm else 0.0


@exercise("08.4", function="step_time", title="Alpha-beta step time and communication share", points=2,
          reference=step_time,
          hint="one all-to-all is P - 1 messages of bytes / P each; a message costs latency + size / bandwidth; "
               "a step makes 4 all-to-alls and computes, without overlap",
          hints=("all-to-all time = (P - 1) * latency + (P - 1) / P * bytes_per_rank / bandwidth (0 for P = 1)",
                 "share = communication / (compute + communication); 0.0 when the step takes no time"),
          mistakes={"every byte crosses the network (no (P - 1) / P)": _all_bytes_cross,
                    "one latency per all-to-all instead of P - 1": _one_latency})
def _time_cases(hidden: bool) -> list[Case]:
    configs = [(0.01, 8e6, 4, 1e-5, 1e9), (0.01515, 16384 * 6 * 2048 * 2, 8, 1e-5, 153e9)]
    if hidden:
        configs += [(0.02, 1e6, 1, 1e-5, 1e9), (0.0, 0.0, 2, 0.0, 1e9), (0.001, 1e3, 64, 3e-5, 12.5e9),
                    (random.uniform(1e-3, 1.0), random.uniform(1e6, 1e9), random.choice([2, 8, 32]), 1e-5,
                     random.choice([1.25e9, 43e9, 153e9]))]
    return [Case(f"compute_s={c:g}, bytes_per_rank={n:g}, world_size={p}, latency_s={a:g}, bandwidth={b:g}",
                 (c, n, p, a, b)) for c, n, p, a, b in configs]


def fanout_bytes(experts: torch.Tensor, num_experts: int, world_size: int, rank: int, d_model: int,
                 bytes_per_element: int) -> tuple[torch.Tensor, int, int]:
    """Reference for 08.5: ``(fan-out [T] int64, bytes sent off-rank one row per slot, one row per rank)``."""
    return (devices_per_token(experts, num_experts, world_size),
            dispatch_bytes(experts, num_experts, world_size, rank, d_model, bytes_per_element),
            dispatch_bytes(experts, num_experts, world_size, rank, d_model, bytes_per_element, dedup=True))


def _own_rank_counted(experts, num_experts, world, rank, d, b):
    fanout, per_slot, _ = fanout_bytes(experts, num_experts, world, rank, d, b)
    return fanout, per_slot, int(fanout.sum()) * d * b


def _fanout_counts_experts(experts, num_experts, world, rank, d, b):
    _, per_slot, dedup = fanout_bytes(experts, num_experts, world, rank, d, b)
    return torch.full((experts.shape[0],), experts.shape[1], dtype=torch.int64), per_slot, dedup


@exercise("08.5", function="fanout_bytes", title="Fan-out and bytes under device-limited routing", points=2,
          reference=fanout_bytes,
          hint="a token's fan-out is the number of distinct ranks that own its k experts; a row that stays on this "
               "rank costs no communication",
          hints=("owner of expert e: e // (num_experts // world_size)",
                 "one row per slot: count the slots whose owner is not this rank; one row per rank: count the "
                 "(token, owner) pairs with owner != rank, each pair once; multiply by d_model * bytes"),
          mistakes={"the token's own rank counted in the per-rank bytes": _own_rank_counted,
                    "fan-out counted as experts, not ranks": _fanout_counts_experts})
def _fanout_cases(hidden: bool) -> list[Case]:
    configs = [(16, 4, 4, None, 0), (16, 4, 4, 2, 1)]  # (E, P, k, device limit M or None, rank)
    if hidden:
        configs += [(8, 1, 2, None, 0), (16, 8, 3, 2, 5), (12, 3, 1, None, 2), (64, 8, 6, 3, random.randint(0, 7))]
    cases = []
    for num_experts, world, k, limit, rank in configs:
        scores = torch.rand(random.randint(6, 12) if hidden else 8, num_experts)
        if limit is None:
            experts = scores.topk(k, dim=-1).indices
        else:
            experts = group_limited_topk(scores, k, n_groups=world, topk_groups=limit)[1]
        name = f"E={num_experts}, P={world}, k={k}, {'no limit' if limit is None else f'M={limit}'}, rank={rank}"
        cases.append(Case(name, (experts, num_experts, world, rank, 8, 2)))
    return cases


def capacity_dispatch_combine(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, weights: torch.Tensor,
                              capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 08.6: fixed-capacity (GShard) dispatch into ``buffer: [E, C, d]`` by position priority,
    linear experts ``buffer[e] @ weights[e]``, and the gate-weighted combine ``y: [T, d]`` of the kept slots."""
    num_experts, d = weights.shape[0], x.shape[1]
    pos = queue_positions(experts, num_experts)  # [T, k], position priority
    keep = pos < capacity
    token = torch.arange(x.shape[0]).unsqueeze(1).expand_as(experts)
    flat = (experts * capacity + pos)[keep]  # [kept] row of each kept slot in the [E * C] buffer
    buffer = x.new_zeros(num_experts * capacity, d).index_copy(0, flat, x[token[keep]])
    out = torch.bmm(buffer.view(num_experts, capacity, d), weights).reshape(num_experts * capacity, weights.shape[2])
    rows = out.new_zeros(*experts.shape, out.shape[1])
    rows = rows.index_put((token[keep], keep.nonzero()[:, 1]), out[flat])
    y = (rows * torch.where(keep, gates, torch.zeros_like(gates)).unsqueeze(-1)).sum(dim=1)
    return y, buffer.view(num_experts, capacity, d)


def _token_major_priority(x, experts, gates, weights, capacity):
    """Wrong: each token's slots in turn (token 0's choices, then token 1's ...)."""
    flat_pos = queue_positions(experts.reshape(-1, 1), weights.shape[0]).view_as(experts)
    return _combine_at(x, experts, gates, weights, capacity, flat_pos)


def _dropped_pass_through(x, experts, gates, weights, capacity):
    """Wrong: a dropped slot adds ``gate * x`` (the token passed through the expert branch)."""
    y, buffer = capacity_dispatch_combine(x, experts, gates, weights, capacity)
    dropped = queue_positions(experts, weights.shape[0]) >= capacity
    return y + (torch.where(dropped, gates, torch.zeros_like(gates)).sum(1, keepdim=True) * x), buffer


def _combine_at(x, experts, gates, weights, capacity, pos):
    num_experts, d = weights.shape[0], x.shape[1]
    buffer = x.new_zeros(num_experts, capacity, d)
    y = x.new_zeros(x.shape[0], weights.shape[2])
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e, p = int(experts[t, j]), int(pos[t, j])
            if p < capacity:
                buffer[e, p] = x[t]
                y[t] += gates[t, j] * (x[t] @ weights[e])
    return y, buffer


def _capacity_case(name: str, t: int, e: int, k: int, d: int, capacity: int, grads: bool = True) -> Case:
    skew = torch.zeros(e)
    skew[0] = 1.5  # expert 0 is popular: it overflows
    experts = (torch.randn(t, e) + skew).topk(k, dim=-1).indices
    gates = torch.rand(t, k)
    return Case(name, (torch.randn(t, d), experts, gates, torch.randn(e, d, d) / d**0.5, capacity),
                grad_wrt=(0, 2, 3) if grads else ())


@exercise("08.6", function="capacity_dispatch_combine", title="Fixed-capacity dispatch and combine", points=4,
          reference=capacity_dispatch_combine,
          hint="every expert gets a buffer of exactly `capacity` rows, filled in priority order: all first "
               "choices (token order), then all second choices; slots beyond the buffer are dropped and add 0",
          hints=("a slot's queue position = how many slots of higher priority chose the same expert; keep it "
                 "if the position is < capacity",
                 "buffer[e, position] = x[token] for kept slots, zeros elsewhere; out = buffer[e] @ weights[e]",
                 "y[t] = sum over t's kept slots j of gates[t, j] * out[expert, position]; build y without "
                 "in-place writes into tensors that need gradients (torch.stack / index_put on a fresh tensor)"),
          mistakes={"priority token by token instead of choice by choice": _token_major_priority,
                    "dropped slots pass the token through (gate * x added)": _dropped_pass_through})
def _capacity_cases(hidden: bool) -> list[Case]:
    cases = [_capacity_case("T=12, E=4, k=2, d=3, capacity=4", 12, 4, 2, 3, 4),
             _capacity_case("T=6, E=3, k=1, d=2, capacity=4 (nothing dropped)", 6, 3, 1, 2, 4)]
    if hidden:
        cases += [_capacity_case("T=32, E=8, k=2, d=5, capacity=5", 32, 8, 2, 5, 5),
                  _capacity_case("T=5, E=4, k=2, d=2, capacity=0 (everything dropped)", 5, 4, 2, 2, 0, grads=False),
                  _capacity_case("T=1, E=2, k=2, d=4, capacity=1", 1, 2, 2, 4, 1),
                  _capacity_case("T=20, E=6, k=3, d=3, capacity=2", 20, 6, 3, 3, 2)]
    return cases
