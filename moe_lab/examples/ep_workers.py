"""What notebook 08 runs on every rank of a :class:`moe_lab.launch.LocalCluster` (expert parallelism over gloo).

Each function runs inside a worker process whose process group is already initialised and returns plain
tensors and numbers to the notebook. :func:`setup` builds the same full layer and the same global batch on
every rank (and in the notebook, for the single-process reference); each rank keeps its slice of the tokens
and its shard of the experts.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from moe_lab.layer import MoELayer
from moe_lab.parallel import ExpertParallelMoELayer, allreduce_replicated_grads
from moe_lab.timing import StepTimer
from moe_lab.utils import seed_everything


def setup(sizes: list[int], d_model: int, d_ff: int, num_experts: int, k: int, seed: int = 0,
          skew: float = 0.0, **options) -> tuple[MoELayer, torch.Tensor, torch.Tensor]:
    """The full single-process layer, the global batch ``x: [sum(sizes), d_model]`` and fixed output weights
    (the loss is ``sum(y * weights)``). ``skew > 0`` makes the router prefer the first ``num_experts / 2``
    experts (those of the first half of the ranks) through a feature that is always positive."""
    seed_everything(seed)
    layer = MoELayer(d_model, d_ff, num_experts, k, **options)
    x = torch.randn(sum(sizes), d_model)
    x[:, 0] = x[:, 0].abs() + 1
    if skew:
        with torch.no_grad():
            layer.router.weight[: num_experts // 2, 0] += skew
    return layer, x, torch.randn(sum(sizes), d_model)


def _my_slice(sizes: list[int]) -> slice:
    start = sum(sizes[: dist.get_rank()])
    return slice(start, start + sizes[dist.get_rank()])


def forward_backward(sizes: list[int], d_model: int, d_ff: int, num_experts: int, k: int, seed: int = 0,
                     **options) -> dict:
    """One forward and backward pass of this rank's tokens through the sharded layer; returns its output, the
    gradients, the layer's :class:`~moe_lab.parallel.CommStats` and the bytes every all-to-all sent."""
    layer, x, weights = setup(sizes, d_model, d_ff, num_experts, k, seed, **options)
    ep = ExpertParallelMoELayer.from_layer(layer)
    mine = _my_slice(sizes)
    x_local = x[mine].clone().requires_grad_(True)
    timer = StepTimer()
    with timer.step():
        y, info = ep(x_local)
        (y * weights[mine]).sum().backward()
    record = timer.steps[0]
    return {"y": y.detach(), "x_grad": x_local.grad, "router_grad": ep.router.weight.grad,
            "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()},
            "comm": ep.last_comm, "bytes_sent": dict(record.bytes_sent),
            "off_rank_bytes": dict(record.off_rank_bytes), "experts": info.experts}


def timed_steps(tokens: int, d_model: int, d_ff: int, num_experts: int, k: int, steps: int = 6,
                skews: tuple[float, ...] = (0.0,), seed: int = 0) -> list[dict]:
    """Time ``steps`` training steps (forward, backward, data-parallel all-reduce of the router gradient) of
    ``tokens`` tokens per rank with a :class:`~moe_lab.timing.StepTimer`, for a layer per router ``skew`` (see
    :func:`setup`). The layers take turns step by step, so a change of machine load hits them alike; the first
    step of each is warm-up.

    Returns, per skew, this rank's median seconds per region, every step's ``"step"`` time and the slots its
    experts received."""
    world = dist.get_world_size()
    sizes = [tokens] * world
    mine = _my_slice(sizes)
    runs = []
    for skew in skews:
        layer, x, weights = setup(sizes, d_model, d_ff, num_experts, k, seed, skew=skew)
        # inside a model the layer's input needs a gradient too
        runs.append((ExpertParallelMoELayer.from_layer(layer), x[mine].requires_grad_(True), weights[mine],
                     StepTimer()))
    for _ in range(steps):
        for ep, x_local, w_local, timer in runs:
            with timer.time_module(ep.router, "router"), timer.step():
                with timer.region("forward"):
                    y, _ = ep(x_local)
                with timer.region("backward"):
                    (y * w_local).sum().backward()
                with timer.region("gradient all-reduce"):
                    allreduce_replicated_grads(ep)
            ep.zero_grad(set_to_none=True)
    return [{"median": timer.summary(skip=1), "step_times": [s.seconds["step"] for s in timer.steps[1:]],
             "received": ep.last_comm.rows_received} for ep, _, _, timer in runs]


def all_to_all_sweep(sizes_bytes: list[int], repeats: int = 9) -> list[float]:
    """Median seconds of ``all_to_all_single`` on float32 buffers of each size (bytes per rank, own share
    included), after a warm-up exchange; the slowest rank's time is what every rank waits for."""
    world = dist.get_world_size()
    medians = []
    for size in sizes_bytes:
        n = max(world, size // 4 // world * world)
        send, recv = torch.ones(n), torch.empty(n)
        dist.all_to_all_single(recv, send)
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_to_all_single(recv, send)
            times.append(time.perf_counter() - start)
        slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        medians.append(float(slowest))
    return medians


def rank_without_tokens(skip_the_layer: bool, d_model: int = 16, num_experts: int = 4) -> dict:
    """The last rank has no tokens this step. With ``skip_the_layer`` it does what looks harmless, ``if
    x.numel(): y = layer(x)``, and its peers wait forever in the layer's first all-to-all; otherwise it runs the
    layer on its empty batch, joining every exchange, and all ranks finish."""
    world = dist.get_world_size()
    sizes = [8] * (world - 1) + [0]
    layer, x, weights = setup(sizes, d_model, 2 * d_model, num_experts, 2)
    ep = ExpertParallelMoELayer.from_layer(layer)
    mine = _my_slice(sizes)
    x_local = x[mine]
    if skip_the_layer and x_local.numel() == 0:
        y = torch.zeros_like(x_local)
    else:
        y, _ = ep(x_local)
        (y * weights[mine]).sum().backward()
    allreduce_replicated_grads(ep)
    return {"y": y.detach(), "router_grad": ep.router.weight.grad}


def mismatched_layers(d_model: int = 16) -> None:
    """Every rank builds its layer with a different number of experts (a config bug): the layer refuses."""
    world = dist.get_world_size()
    ExpertParallelMoELayer(d_model, 2 * d_model, num_experts=2 * world * (dist.get_rank() + 1), k=2)
