"""Expert parallelism: the experts of one MoE layer sharded over the ranks of a ``torch.distributed`` group.

Every rank holds a replica of the router and ``E / world_size`` experts (rank ``r`` owns experts
``r * E_local ... (r + 1) * E_local - 1``) and brings its own tokens (data parallelism for tokens).
One forward pass of :class:`ExpertParallelMoELayer`:

1. route locally: float32 router, top-k (:func:`moe_lab.routing.softmax_topk`) and, with a capacity factor,
   the capacity mask of the *global* batch (:func:`moe_lab.dispatch.capacity_mask` on all ranks' routing);
2. sort the kept token-slots by expert, so the rows for each rank's experts are contiguous;
3. all-to-all the per-expert counts, then the rows themselves (``all_to_all_single`` with uneven splits);
4. run the local experts on the received rows with grouped GEMMs;
5. all-to-all the results back and combine ``y_t = sum_j gate_tj * out_tj`` in float32 (no atomics).

Both token all-to-alls are autograd-aware: the backward pass sends the gradients along the reverse route,
so each expert's weight gradient arrives complete on its owner. The replicated parameters (router, and
everything outside the layer) need the usual data-parallel gradient all-reduce:
:func:`allreduce_replicated_grads`.

The layer equals :class:`moe_lab.MoELayer` run on all ranks' tokens concatenated in rank order, outputs and
gradients, dropless or with capacity dropping. Its :class:`moe_lab.RoutingInfo` describes this rank's
tokens (losses such as the aux loss are per rank, like GShard's per-group losses); ``capacity`` is global.

Communication (dropless): each all-to-all sends ``tokens x k x d_model x bytes_per_element`` bytes per rank
(:func:`all_to_all_bytes`; the slice for the rank's own experts included), in the compute dtype (bf16 under
autocast halves it). A forward pass makes two (dispatch, combine); the backward pass two more.
"""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from .dispatch import sort_by_expert
from .experts import Experts
from .layer import MoELayer
from .permute import combine_slots, gather_slots
from .utils import compute_dtype


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward runs the reverse exchange on the gradients."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty(sum(output_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        grad_in = grad.new_empty(sum(input_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Autograd-aware ``all_to_all_single``: rows ``x: [sum(input_splits), ...]`` are cut into ``input_splits``
    (piece ``r`` goes to rank ``r``); returns ``[sum(output_splits), ...]`` with piece ``r`` from rank ``r``."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def all_to_all_bytes(tokens: int, k: int, d_model: int, bytes_per_element: int) -> int:
    """Bytes one rank sends in one dispatch (or combine) all-to-all, dropless: ``tokens * k * d_model * bytes``."""
    return tokens * k * d_model * bytes_per_element


@dataclass
class CommStats:
    """What one rank sent in one forward pass (rows for its own experts included; backward mirrors it).

    dispatch_bytes / combine_bytes: bytes of token rows sent in the dispatch / combine all-to-all.
    rows_sent: token-slot rows this rank sent out (``tokens * k`` minus dropped slots).
    rows_received: rows it received for its local experts.
    """

    dispatch_bytes: int
    combine_bytes: int
    rows_sent: int
    rows_received: int


def expert_parallel_dispatch(
    x: torch.Tensor,
    experts: torch.Tensor,
    gates: torch.Tensor,
    local_experts: Experts,
    keep: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, CommStats]:
    """Send each kept token-slot to the rank that owns its expert, run the local experts, bring results back.

    x: ``[T, d_model]`` this rank's tokens; experts: ``[T, k]`` global expert ids; gates: ``[T, k]``;
    local_experts: this rank's ``E_local`` experts; keep: ``[T, k]`` bool or None (dropless).
    Returns ``y: [T, d_model]`` (dropped slots add exactly zero) and this rank's :class:`CommStats`.
    """
    world = dist.get_world_size(group)
    num_local = local_experts.num_experts
    k = experts.shape[1]
    order, counts = sort_by_expert(experts, num_local * world, keep)  # [S] kept slots by expert, [E]
    send = gather_slots(x.to(compute_dtype(x)), order, k)  # [S, d] by destination rank, then local expert
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)  # segment s: rank s's rows for my experts
    grid = recv_counts.view(world, num_local)
    input_splits = counts.view(world, num_local).sum(1).tolist()
    output_splits = grid.sum(1).tolist()
    recv = all_to_all(send, output_splits, input_splits, group)  # [R, d], by source rank, then local expert
    # Regroup by local expert (source ranks in order inside an expert), run the experts, restore the order.
    arange = torch.arange(world * num_local, device=recv_counts.device)
    expert_major_key = (arange % num_local) * world + arange // num_local
    perm = torch.argsort(expert_major_key.repeat_interleave(recv_counts), stable=True)
    h = local_experts.forward_grouped(recv[perm], grid.sum(0))
    back = all_to_all(torch.empty_like(h).index_copy(0, perm, h), input_splits, output_splits, group)
    y = combine_slots(back, order, gates)  # token order, gate-weighted sum over k in float32
    stats = CommStats(
        dispatch_bytes=send.numel() * send.element_size(),
        combine_bytes=h.numel() * h.element_size(),
        rows_sent=send.shape[0],
        rows_received=recv.shape[0],
    )
    return y, stats


def _all_gather_rows(t: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's ``t: [sizes[rank], ...]`` in rank order (padding to equal sizes underneath)."""
    padded = t.new_zeros(max(sizes), *t.shape[1:])
    padded[: t.shape[0]] = t
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)])


class ExpertParallelMoELayer(MoELayer):
    """:class:`moe_lab.MoELayer` with its experts sharded over the ranks of ``group`` (default: the world).

    Same arguments as :class:`moe_lab.MoELayer` (except ``dispatch``: always sorted + grouped GEMMs), plus
    ``group``. ``num_experts`` must be a multiple of the group size. The process group must be initialised
    first. Build it from a single-process layer with :meth:`from_layer` to shard existing weights.

    ``forward(x)`` takes this rank's ``x: [..., d_model]`` and returns ``(y, info)`` like ``MoELayer``;
    ``last_comm`` holds the :class:`CommStats` of the last forward pass.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, k: int = 2, *,
                 group: dist.ProcessGroup | None = None, **options: Any):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("ExpertParallelMoELayer needs an initialised process group (dist.init_process_group)")
        if options.get("dispatch", "sorted") != "sorted":
            raise ValueError(f"dispatch must be 'sorted' with expert parallelism, got {options['dispatch']!r}")
        world = dist.get_world_size(group)
        if num_experts % world:
            raise ValueError(f"num_experts={num_experts} must be a multiple of the group size {world}")
        self.group = group  # read by _num_local_experts during MoELayer.__init__ (a plain attribute: allowed)
        super().__init__(d_model, d_ff, num_experts, k, **options)
        self.num_local_experts = num_experts // world
        self.first_expert = dist.get_rank(group) * self.num_local_experts
        self.last_comm: CommStats | None = None

    def _num_local_experts(self, num_experts: int) -> int:
        return num_experts // dist.get_world_size(self.group)

    @classmethod
    def from_layer(cls, layer: MoELayer, group: dist.ProcessGroup | None = None) -> "ExpertParallelMoELayer":
        """Shard a single-process layer (same config): copy its router, shared experts and selection bias, and
        this rank's slice of its experts."""
        ep = cls.from_config(layer.config, group=group).to(layer.experts.w1.device)
        ep.experts.to(layer.experts.w1.dtype)  # the router keeps its own dtype (float32)
        ep.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("experts.")},
                           strict=False)
        local = slice(ep.first_expert, ep.first_expert + ep.num_local_experts)
        with torch.no_grad():
            for name, w in ep.experts.named_parameters():
                w.copy_(getattr(layer.experts, name)[local])
        return ep

    def _capacity_keep(self, experts: torch.Tensor, chosen_probs: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Capacity and ``keep: [T, k]`` of this rank's slots, decided over all ranks' tokens in rank order."""
        size = torch.tensor([experts.shape[0]], device=experts.device)
        sizes_t = [torch.empty_like(size) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(sizes_t, size, group=self.group)
        sizes = [int(s) for s in sizes_t]
        all_experts = _all_gather_rows(experts, sizes, self.group)
        all_probs = _all_gather_rows(chosen_probs.detach().float(), sizes, self.group)
        capacity, keep = super()._capacity_keep(all_experts, all_probs)
        start = sum(sizes[: dist.get_rank(self.group)])
        return capacity, keep[start : start + experts.shape[0]]

    def _run_experts(self, tokens: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor,
                     keep: torch.Tensor | None, capacity: int | None) -> torch.Tensor:
        y, self.last_comm = expert_parallel_dispatch(tokens, experts, gates, self.experts, keep, group=self.group)
        return y

    def extra_repr(self) -> str:
        return (f"local experts {self.first_expert}..{self.first_expert + self.num_local_experts - 1}, "
                + super().extra_repr())


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters every rank holds a copy of: all except the experts of :class:`ExpertParallelMoELayer`."""
    sharded = {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoELayer) for p in m.experts.parameters()}
    return [p for p in model.parameters() if id(p) not in sharded]


def allreduce_replicated_grads(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum the gradients of the replicated parameters over the ranks (the data-parallel all-reduce).

    Call after ``backward()`` on a loss that is this rank's share of the global loss (e.g. the local mean
    divided by the world size): expert gradients are then already complete, and these become complete too.
    """
    for p in replicated_parameters(model):
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def broadcast_replicated(model: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Copy rank ``src``'s replicated parameters to every rank (do it once after building the model)."""
    with torch.no_grad():
        for p in replicated_parameters(model):
            dist.broadcast(p, src=src, group=group)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, out_dir: str) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save(fn(*args), os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # no rank closes its connections while a peer may still be reading from them
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo") -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` fresh local processes joined in a process group; return the list
    of their results (rank order). ``fn`` must be importable (defined in a module, not in a notebook cell)
    and its result saveable with ``torch.save``. Each process uses one CPU thread."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_run_rank, args=(world_size, free_port(), backend, fn, args, out_dir), nprocs=world_size)
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
