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
autocast halves it). A forward pass makes two (dispatch, combine); the backward pass two more. Before the
dispatch, a small all-to-all of the per-expert counts tells every rank how many rows to expect (dropless
splits are not known in advance). Under a :class:`moe_lab.timing.StepTimer` the parts of the exchange are timed
(``"permute"``, ``"counts exchange"``, ``"dispatch all-to-all"``, ``"experts"``, ``"combine all-to-all"``,
``"un-permute + combine"``; the all-to-alls again as ``"... (backward)"``) and their bytes recorded.

Every rank must make the same collective calls in the same order, or its peers wait forever. So a rank with
no tokens still runs the layer (forward and backward: it joins every exchange with empty splits), the layer
checks at construction that every rank built it with the same arguments, and each exchange checks that every
rank sends rows of the same dtype; a mismatch raises the same ``ValueError`` on every rank instead of hanging.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .dispatch import sort_by_expert
from .experts import Experts
from .layer import MoELayer, RoutingInfo
from .losses import AUX_LOSSES
from .permute import combine_slots, gather_slots
from .timing import record_bytes, region
from .utils import compute_dtype
from .validation import check_int, check_number


def _exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group, name: str) -> torch.Tensor:
    """``all_to_all_single`` timed as region ``name``, its bytes recorded (see :mod:`moe_lab.timing`)."""
    out = x.new_empty(sum(output_splits), *x.shape[1:])
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    own = input_splits[dist.get_rank(group)]
    record_bytes(name, sum(input_splits) * row_bytes, (sum(input_splits) - own) * row_bytes)
    with region(name):
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward runs the reverse exchange on the gradients."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, name):
        ctx.splits, ctx.group, ctx.name = (output_splits, input_splits), group, name
        return _exchange(x, output_splits, input_splits, group, name)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group, f"{ctx.name} (backward)"), None, None, None, None


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None = None,
    name: str = "all-to-all",
) -> torch.Tensor:
    """Autograd-aware ``all_to_all_single``: rows ``x: [sum(input_splits), ...]`` are cut into ``input_splits``
    (piece ``r`` goes to rank ``r``); returns ``[sum(output_splits), ...]`` with piece ``r`` from rank ``r``.
    ``name``: the :mod:`moe_lab.timing` region (``name + " (backward)"`` for the gradients' exchange)."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group, name)


def all_to_all_bytes(tokens: int, k: int, d_model: int, bytes_per_element: int) -> int:
    """Bytes one rank sends in one dispatch (or combine) all-to-all, dropless: ``tokens * k * d_model * bytes``."""
    check_int("tokens", tokens, 0)
    check_int("k", k, 1)
    check_int("d_model", d_model, 1)
    check_number("bytes_per_element", bytes_per_element, 0, low_open=True)
    return tokens * k * d_model * bytes_per_element


@dataclass
class CommStats:
    """What one rank sent in one forward pass (rows for its own experts included; backward mirrors it).

    dispatch_bytes / combine_bytes: bytes of token rows sent in the dispatch / combine all-to-all.
    rows_sent: token-slot rows this rank sent out (``tokens * k`` minus dropped slots).
    rows_received: rows it received for its local experts.
    rank: this rank in the group.  input_splits: ``[P]`` rows it sent to each rank in the dispatch (the combine
    receives as many back).  output_splits: ``[P]`` rows it received from each rank.
    received_per_expert: ``[E_local]`` rows its local experts processed.
    """

    dispatch_bytes: int
    combine_bytes: int
    rows_sent: int
    rows_received: int
    rank: int
    input_splits: list[int]
    output_splits: list[int]
    received_per_expert: list[int]

    @property
    def off_rank_dispatch_bytes(self) -> int:
        """Dispatch bytes that left this rank (its rows for its own experts excluded)."""
        if not self.rows_sent:
            return 0
        return self.dispatch_bytes * (self.rows_sent - self.input_splits[self.rank]) // self.rows_sent


_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _exchange_counts(counts: torch.Tensor, dtype: torch.dtype, world: int, group) -> torch.Tensor:
    """The counts all-to-all: ``counts: [E]`` rows this rank sends to each expert -> ``[P, E_local]`` rows each
    rank sends to this rank's experts. Each rank also sends the dtype of its rows; every rank raises the same
    ``ValueError`` if they differ (an all-to-all of mismatched rows would be garbage or hang)."""
    code = _ROW_DTYPES.index(dtype) if dtype in _ROW_DTYPES else len(_ROW_DTYPES)
    grid = counts.view(world, -1)
    send = torch.cat([grid, grid.new_full((world, 1), code)], dim=1)
    recv = torch.empty_like(send)
    with region("counts exchange"):
        dist.all_to_all_single(recv, send, group=group)
    codes = recv[:, -1].tolist()
    if len(set(codes)) > 1:
        names = {i: str(d).replace("torch.", "") for i, d in enumerate(_ROW_DTYPES)}
        sent = ", ".join(f"rank {r}: {names.get(c, 'other')}" for r, c in enumerate(codes))
        raise ValueError(f"ranks send token rows of different dtypes ({sent}): every rank must run the layer "
                         "in the same dtype (the same autocast setting)")
    return recv[:, :-1]


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
    with region("permute"):
        order, counts = sort_by_expert(experts, num_local * world, keep)  # [S] kept slots by expert, [E]
        rows = x.to(compute_dtype(x))
        # [S, d] by destination rank, then local expert; with no tokens an empty slice, still in the graph
        send = gather_slots(rows, order, k) if experts.shape[0] else rows[:0]
    grid = _exchange_counts(counts, send.dtype, world, group)  # [P, E_local]: row s = rank s's rows for my experts
    recv_counts = grid.reshape(-1)
    input_splits = counts.view(world, num_local).sum(1).tolist()
    output_splits = grid.sum(1).tolist()
    recv = all_to_all(send, output_splits, input_splits, group, "dispatch all-to-all")  # by source, then expert
    with region("experts"):
        # Regroup by local expert (source ranks in order inside an expert), run the experts, restore the order.
        arange = torch.arange(world * num_local, device=recv_counts.device)
        expert_major_key = (arange % num_local) * world + arange // num_local
        perm = torch.argsort(expert_major_key.repeat_interleave(recv_counts), stable=True)
        h = local_experts.forward_grouped(recv[perm], grid.sum(0))
        h = torch.empty_like(h).index_copy(0, perm, h)
    back = all_to_all(h, input_splits, output_splits, group, "combine all-to-all")
    with region("un-permute + combine"):
        if experts.shape[0]:
            y = combine_slots(back, order, gates)  # token order, gate-weighted sum over k in float32
        else:  # no tokens here; keep y in the graph so that the backward pass joins the exchanges too
            y = back.new_zeros(0, x.shape[1]) + (back.sum() + gates.sum()) * 0
    stats = CommStats(
        dispatch_bytes=send.numel() * send.element_size(),
        combine_bytes=h.numel() * h.element_size(),
        rows_sent=send.shape[0],
        rows_received=recv.shape[0],
        rank=dist.get_rank(group),
        input_splits=input_splits,
        output_splits=output_splits,
        received_per_expert=grid.sum(0).tolist(),
    )
    return y, stats


def check_same_on_every_rank(config: dict[str, Any], group: dist.ProcessGroup | None = None,
                             what: str = "config") -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all ranks passed an equal ``config``
    (naming the first differing key and the ranks' values). A collective: every rank must call it."""
    configs: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(configs, config, group=group)
    for rank, other in enumerate(configs):
        if other != configs[0]:
            key = next((key for key in sorted(set(other) | set(configs[0]), key=str)
                        if other.get(key) != configs[0].get(key)), None)
            raise ValueError(f"{what} differ across ranks: rank 0 has {key}={configs[0].get(key)!r}, rank {rank} "
                             f"has {key}={other.get(key)!r}; every rank must build the same layer")


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
        if dist.get_rank(group) < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the given group: "
                             "build the layer only on the ranks of its group")
        world = dist.get_world_size(group)
        if num_experts % world:
            raise ValueError(f"num_experts={num_experts} must be a multiple of the group size {world}")
        check_same_on_every_rank(
            {"d_model": d_model, "d_ff": d_ff, "num_experts": num_experts, "k": k, **options}, group,
            what="ExpertParallelMoELayer arguments")
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        """Like :meth:`MoELayer.forward`; a rank with no tokens (``x: [..., 0, d_model]``) still joins every
        exchange, forward and backward, and gets an empty ``y`` (its losses in ``info`` are 0)."""
        c = self.config
        if x.numel() == 0 and x.dim() >= 2 and x.shape[-1] == c.d_model and x.is_floating_point():
            return self._forward_no_tokens(x)
        return super().forward(x)

    def _forward_no_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        c = self.config
        tokens = x.reshape(0, c.d_model)
        clean = noise_std = None
        if c.router == "noisy_topk":
            clean, noise_std, logits = self.router(tokens)
        else:
            logits = self.router(tokens, c.router_dtype)
        # nothing to route (the gating's reshapes may not accept an empty batch): empty selections
        scores = torch.zeros_like(logits, dtype=torch.float32)
        experts = torch.empty(0, c.k, dtype=torch.long, device=x.device)
        gates = torch.zeros(0, c.k, dtype=torch.float32, device=x.device)
        capacity = keep = None
        if self.current_capacity_factor is not None:
            capacity, keep = self._capacity_keep(experts, scores.gather(1, experts))
        # Every parameter gets a (zero) gradient, as on the ranks with tokens, so that the data-parallel all-reduce
        # of the replicated gradients makes the same calls on every rank.
        zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0
        y = self._run_experts(tokens, experts, gates, keep, capacity) + zero
        info = RoutingInfo(
            logits=logits, scores=scores, experts=experts, gates=gates,
            tokens_per_expert=torch.zeros(c.num_experts, dtype=torch.long, device=x.device), keep=None,
            capacity=capacity, batch_shape=tuple(x.shape[:-1]), config=c, clean_logits=clean, noise_std=noise_std,
            computed={"probs": scores, **{name: zero if term.applies(c) else None for name, term in AUX_LOSSES.items()}})
        return y.reshape(*x.shape[:-1], c.d_model), info

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
