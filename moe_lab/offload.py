"""Expert offloading: keep ``C`` of a layer's ``E`` experts on the fast device, load the others on demand.

:class:`ExpertCache` is the bookkeeping (which expert sits in which of the ``C`` slots; LRU or LFU eviction;
speculative prefetch). :func:`simulate_cache` replays a routing trace through it (hit rates for any cache size
without running the model); :class:`OffloadedExperts` runs a layer's experts through it with real copies from a
slow store (pinned host memory when the experts live on a GPU; a separate tensor on CPU), counting the bytes
moved; :func:`offload_experts` offloads every MoE layer of a model, optionally with speculative prefetch as in
Eliseev & Mazur (2023): while layer ``l`` runs, apply layer ``l+1``'s router to layer ``l``'s MoE input and load
the experts it picks before layer ``l+1`` needs them.

Cache semantics (shared by the simulator, the runtime and notebook 09's exercise). Time advances by one per
access. At each step (one forward pass of a layer) the needed experts are served in two passes: first those
already resident (hits), then the missing ones in increasing id (misses, each loaded into a slot). When no slot
is free, a load evicts, among the resident experts the current step does not use (or, when every resident
expert is used by the step, among all of them): LRU the least recently used; LFU the least frequently used
(frequency = steps that used the expert so far, over the whole history), ties to the least recently used.
A prefetch loads guessed experts that are not resident (at most ``C``), evicting by the same rule among experts
not being prefetched; a prefetched expert counts as used at load time for recency, not for frequency.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from .experts import Experts
from .layer import MoELayer, moe_layers
from .utils import compute_dtype
from .validation import check_bool, check_choice, check_ids, check_int, check_tensor, check_type

Policy = Literal["lru", "lfu"]
POLICIES = ("lru", "lfu")
EXPERT_WEIGHTS = ("w1", "w3", "w2")


@dataclass
class CacheStats:
    """Counts of an :class:`ExpertCache` (or of several, added with ``+``).

    accesses: experts needed by steps; hits: of those, already resident (prefetched ones included);
    loads: demand loads (misses: on the critical path); prefetch_loads: speculative loads;
    prefetch_hits: accesses served by an expert a prefetch had loaded.
    """

    accesses: int = 0
    hits: int = 0
    loads: int = 0
    prefetch_loads: int = 0
    prefetch_hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def __add__(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))


class ExpertCache:
    """Which of ``num_experts`` experts occupy the ``capacity`` slots of one layer (see the module docstring).

    :meth:`step` serves the experts one forward pass needs and returns the plan ``(expert, slot, load)`` in
    execution order; :meth:`prefetch` loads guesses ahead of time. ``stats`` counts what happened.
    """

    def __init__(self, num_experts: int, capacity: int, policy: Policy = "lru"):
        check_int("num_experts", num_experts, 1)
        check_int("capacity", capacity, 1, num_experts)
        check_choice("policy", policy, POLICIES)
        self.num_experts, self.capacity, self.policy = int(num_experts), int(capacity), policy
        self.slot: dict[int, int] = {}  # resident expert -> slot
        self.last_used = [-1] * num_experts
        self.freq = [0] * num_experts
        self.clock = 0
        self.prefetched: set[int] = set()  # resident, loaded by a prefetch, not used since
        self.stats = CacheStats()

    def resident(self) -> list[int]:
        """Experts in the cache, sorted."""
        return sorted(self.slot)

    def _touch(self, e: int) -> None:
        self.clock += 1
        self.last_used[e] = self.clock

    def _victim(self, protect: set[int]) -> int:
        candidates = [e for e in self.slot if e not in protect] or list(self.slot)
        if self.policy == "lru":
            return min(candidates, key=lambda e: self.last_used[e])
        return min(candidates, key=lambda e: (self.freq[e], self.last_used[e]))

    def _load(self, e: int, protect: set[int]) -> int:
        if len(self.slot) < self.capacity:
            slot = min(set(range(self.capacity)) - set(self.slot.values()))
        else:
            victim = self._victim(protect)
            slot = self.slot.pop(victim)
            self.prefetched.discard(victim)
        self.slot[e] = slot
        return slot

    def step(self, experts: Sequence[int]) -> list[tuple[int, int, bool]]:
        """Serve one forward pass that needs ``experts`` (any order, repeats allowed) -> ``(expert, slot, load)``
        in execution order: hits first, then misses in increasing id, each loaded into ``slot``."""
        needed = sorted(set(check_ids("experts", experts, self.num_experts)))
        hits = {e for e in needed if e in self.slot}
        plan = []
        for e in sorted(hits):
            self._touch(e)
            self.freq[e] += 1
            if e in self.prefetched:
                self.prefetched.discard(e)
                self.stats.prefetch_hits += 1
            plan.append((e, self.slot[e], False))
        protect = set(needed)
        for e in needed:
            if e not in hits:  # a hit evicted by an earlier miss of this step has already run
                slot = self._load(e, protect)
                self._touch(e)
                self.freq[e] += 1
                plan.append((e, slot, True))
        self.stats.accesses += len(needed)
        self.stats.hits += len(hits)
        self.stats.loads += len(needed) - len(hits)
        return plan

    def prefetch(self, experts: Sequence[int]) -> list[tuple[int, int]]:
        """Load the guessed ``experts`` (most likely first; at most ``capacity`` are kept) that are not resident
        -> the ``(expert, slot)`` loads."""
        guesses = list(dict.fromkeys(check_ids("experts", experts, self.num_experts)))[: self.capacity]
        loads = []
        for e in guesses:
            if e not in self.slot:
                loads.append((e, self._load(e, set(guesses))))
                self._touch(e)
                self.prefetched.add(e)
        self.stats.prefetch_loads += len(loads)
        return loads


def simulate_cache(steps: Sequence[Sequence[int]], num_experts: int, capacity: int, policy: Policy = "lru",
                   guesses: Sequence[Sequence[int]] | None = None) -> CacheStats:
    """Replay one layer's routing: ``steps[t]`` the experts step ``t`` needs (a list of id lists, or a ``[T, k]``
    integer tensor); with ``guesses``, ``guesses[t]`` (most likely first) is prefetched just before step ``t``.
    -> the cache's :class:`CacheStats`."""
    check_type("steps", steps, (Sequence, torch.Tensor), "a sequence of steps, each a sequence of expert ids")
    if guesses is not None:
        check_type("guesses", guesses, (Sequence, torch.Tensor), "None or a sequence with the guessed ids of each step")
        if len(guesses) != len(steps):
            raise ValueError(f"guesses must have one entry per step ({len(steps)}), got {len(guesses)}")
    cache = ExpertCache(num_experts, capacity, policy)
    for t, needed in enumerate(steps):
        if guesses is not None:
            cache.prefetch(check_ids(f"guesses[{t}]", guesses[t], cache.num_experts))
        cache.step(check_ids(f"steps[{t}]", needed, cache.num_experts))
    return cache.stats


def guess_experts(layer: MoELayer, h: torch.Tensor) -> torch.Tensor:
    """Speculative routing: the top-``k`` experts of ``layer``'s router scores (plus its selection bias, if any)
    on hidden states ``h: [..., d_model]`` that were meant for an earlier layer -> ``[T, k]`` expert ids (best
    first). Group limits are ignored: it is a guess."""
    check_type("layer", layer, MoELayer, "a moe_lab.MoELayer")
    check_tensor("h", h, f"[..., d_model={layer.d_model}]")
    if h.dim() == 0 or h.shape[-1] != layer.d_model:
        raise ValueError(f"h must have shape [..., d_model={layer.d_model}], got shape {tuple(h.shape)}")
    tokens = h.detach().reshape(-1, h.shape[-1])
    with torch.no_grad():
        if layer.config.router == "softmax":
            logits = layer.router(tokens, layer.config.router_dtype).float()
        else:
            logits = layer.router(tokens).clean
        scores = logits.sigmoid() if layer.config.score_func == "sigmoid" else logits.softmax(dim=-1)
        if layer.expert_bias is not None:
            scores = scores + layer.expert_bias
        return scores.topk(layer.k, dim=-1).indices


def prefetch_order(guesses: torch.Tensor) -> list[int]:
    """``[T, k]`` guessed experts -> distinct experts, those guessed by more tokens first (then by rank, id)."""
    check_tensor("guesses", guesses, "[tokens, k] (expert ids)", 2, kind="int")
    votes: dict[int, tuple[int, int]] = {}
    for rank, column in enumerate(guesses.T.tolist()):
        for e in column:
            count, best = votes.get(e, (0, rank))
            votes[e] = (count + 1, min(best, rank))
    return sorted(votes, key=lambda e: (-votes[e][0], votes[e][1], e))


def _store_copy(w: torch.Tensor) -> torch.Tensor:
    """The slow store of a weight: pinned host memory for a GPU tensor, a separate copy for a CPU one."""
    w = w.detach()
    if w.device.type == "cuda":
        return w.to("cpu").pin_memory()
    return w.clone()


class _InferenceOnly(torch.autograd.Function):
    """Identity whose backward raises: the offloaded experts' slots are overwritten in place by later loads."""

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("offloaded experts (moe_lab.offload.offload_experts / OffloadedExperts) are inference-only: "
                           "loading an expert overwrites a slot that an earlier expert's matmul saved for backward, so "
                           "there is no backward pass through them; run the forward under torch.no_grad() (or "
                           "torch.inference_mode()), or train without offloading")


def _inference_only(out: torch.Tensor) -> torch.Tensor:
    return _InferenceOnly.apply(out) if out.requires_grad else out


class OffloadedExperts(nn.Module):
    """A layer's experts with only ``capacity`` of them on the compute device (see the module docstring).

    All weights live in a slow store (``store[name]: [E, ...]``, pinned host memory on CUDA, a separate tensor on
    CPU); ``resident`` is an :class:`moe_lab.Experts` of ``capacity`` slots on the compute device. Each forward
    pass asks ``cache`` (:class:`ExpertCache`) for a plan, copies every missing expert's weights from the store
    into its slot (``bytes_loaded``; prefetches: ``bytes_prefetched``) and runs each expert from its slot with
    ``resident.forward_one``, so outputs equal the original experts' per-expert computation. Inference only:
    the store is not trained and not saved in ``state_dict``, and a backward pass through the outputs raises a
    ``RuntimeError`` (slots are overwritten in place); ``forward_one`` and ``forward_grouped`` (the ``sorted``
    dispatch) are supported.
    """

    def __init__(self, experts: Experts, capacity: int, policy: Policy = "lru"):
        super().__init__()
        check_type("experts", experts, Experts, "a moe_lab.Experts (the layer's float experts)")
        self.num_experts, self.d_model, self.d_ff = experts.num_experts, experts.d_model, experts.d_ff
        self.activation, self.dropout = experts.activation, getattr(experts, "dropout", 0.0)
        self.cache = ExpertCache(experts.num_experts, capacity, policy)
        self.names = [n for n in EXPERT_WEIGHTS if getattr(experts, n) is not None]
        self.store = {n: _store_copy(getattr(experts, n)) for n in self.names}
        device = experts.w1.device
        self.resident = Experts(capacity, experts.d_model, experts.d_ff, experts.activation).to(
            device=device, dtype=experts.w1.dtype).requires_grad_(False)
        self.expert_bytes = sum(self.store[n][0].nbytes for n in self.names)
        self.bytes_loaded = self.bytes_prefetched = 0

    def _copy(self, e: int, slot: int) -> None:
        with torch.no_grad():
            for name in self.names:
                getattr(self.resident, name)[slot].copy_(self.store[name][e], non_blocking=True)

    def prefetch(self, experts: Sequence[int]) -> None:
        """Load guessed experts ahead of their use (:meth:`ExpertCache.prefetch`)."""
        for e, slot in self.cache.prefetch(experts):
            self._copy(e, slot)
            self.bytes_prefetched += self.expert_bytes

    def _run(self, needed: list[int], rows: dict[int, slice], x: torch.Tensor, out: torch.Tensor,
             scale: torch.Tensor | None) -> None:
        for e, slot, load in self.cache.step(needed):
            if load:
                self._copy(e, slot)
                self.bytes_loaded += self.expert_bytes
            y = self.resident.forward_one(slot, x[rows[e]])
            out[rows[e]] = y if scale is None else y * scale[rows[e], None].to(y.dtype)

    def forward_one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens (one cache step). x: ``[n, d_model]`` -> ``[n, d_model]``."""
        out = x.new_empty(x.shape[0], self.d_model, dtype=compute_dtype(x))
        self._run([e], {e: slice(None)}, x, out, None)
        return _inference_only(out)

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor, *, fused: bool | None = None,
                        scale: torch.Tensor | None = None) -> torch.Tensor:
        """All experts on expert-sorted rows (one cache step): x ``[S, d_model]``, ``counts: [E]`` ->
        ``[S, d_model]`` (times ``scale: [S]`` per row when given; ``fused`` is accepted for the signature)."""
        rows, start = {}, 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows[e] = slice(start, start + n)
                start += n
        out = x.new_empty(x.shape[0], self.d_model, dtype=compute_dtype(x))
        self._run(list(rows), rows, x, out, scale)
        return _inference_only(out)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, capacity={self.cache.capacity}, policy={self.cache.policy!r}, "
                f"store on {self.store['w1'].device}")


@dataclass
class Offload:
    """What :func:`offload_experts` installed: the :class:`OffloadedExperts` of each MoE layer."""

    layers: list[OffloadedExperts]
    handles: list = field(default_factory=list)

    @property
    def stats(self) -> CacheStats:
        """Counts summed over the layers."""
        total = CacheStats()
        for layer in self.layers:
            total = total + layer.cache.stats
        return total

    @property
    def bytes_loaded(self) -> int:
        return sum(layer.bytes_loaded for layer in self.layers)

    @property
    def bytes_prefetched(self) -> int:
        return sum(layer.bytes_prefetched for layer in self.layers)



@contextmanager
def offload_experts(model: nn.Module, capacity: int, policy: Policy = "lru", *,
                    prefetch: bool = False) -> Iterator[Offload]:
    """Within the ``with`` block, every MoE layer of ``model`` keeps ``capacity`` experts resident
    (:class:`OffloadedExperts`); with ``prefetch``, layer ``l``'s input is routed by layer ``l+1``'s router
    (:func:`guess_experts`) and those experts are prefetched into layer ``l+1``'s cache. The original experts
    come back afterwards. The layers must use the ``sorted`` dispatch (the default). Inference only: a backward
    pass through an offloaded layer raises a ``RuntimeError`` (run the model under ``torch.no_grad()``)."""
    check_type("model", model, nn.Module, "a torch.nn.Module with MoE layers (moe_lab.MoETransformer)")
    check_bool("prefetch", prefetch)
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model has no MoE layer to offload (a {type(model).__name__} without moe_lab.MoELayer)")
    for layer in layers:
        if layer.dispatch != "sorted":
            raise ValueError(f"offloading needs dispatch='sorted' on every MoE layer, got dispatch={layer.dispatch!r}")
        if not isinstance(layer.experts, Experts):
            raise ValueError(f"offloading needs plain moe_lab.Experts, got {type(layer.experts).__name__}")
    originals = [layer.experts for layer in layers]
    offload = Offload([OffloadedExperts(e, capacity, policy) for e in originals])
    for layer, off in zip(layers, offload.layers):
        layer.experts = off
    if prefetch:
        for layer, nxt, off in zip(layers, layers[1:], offload.layers[1:]):
            def hook(module, args, nxt=nxt, off=off):
                off.prefetch(prefetch_order(guess_experts(nxt, args[0])))
            offload.handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield offload
    finally:
        for handle in offload.handles:
            handle.remove()
        for layer, experts in zip(layers, originals):
            layer.experts = experts
