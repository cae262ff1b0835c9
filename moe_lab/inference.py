"""Inference measurements: routing traces of generation or evaluation, experts touched per batch, decode timing.

:func:`record_routing` records, for every MoE layer and every forward pass, which experts each token used
(and, for prefetching studies, which experts that layer's router would have picked from the previous MoE
layer's input: :func:`moe_lab.offload.guess_experts`). A :class:`RoutingTrace` turns that into the per-step
expert sets an offloading cache sees (:meth:`RoutingTrace.simulate`), and into batches of tokens for the
experts-touched curve ``E (1 - (1 - k/E)^B)`` (:func:`experts_touched`).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .layer import moe_layers
from .offload import CacheStats, Policy, guess_experts, prefetch_order, simulate_cache
from .routing import check_experts
from .validation import check_bool, check_int, check_type


@dataclass
class RoutingTrace:
    """Routing of every MoE layer over a sequence of forward passes ("calls": a prefill, then decode steps).

    experts[l][c]: ``[*batch_shape, k]`` int64 experts each token used in MoE layer ``l`` during call ``c``
    (``batch_shape`` is ``[B, L]`` for the transformer). guesses[l][c]: the same shape, the experts layer
    ``l``'s router picks from MoE layer ``l-1``'s input (speculative prefetch); empty for the first layer.
    """

    num_experts: int
    k: int
    experts: list[list[torch.Tensor]] = field(default_factory=list)
    guesses: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.experts)

    def _calls(self, layer: int, decode_only: bool) -> list[int]:
        if not self.num_layers:
            raise ValueError("layer: this trace has no MoE layer")
        check_int("layer", layer, 0, self.num_layers - 1)
        check_bool("decode_only", decode_only)
        return [c for c, e in enumerate(self.experts[layer]) if not decode_only or e.shape[-2] == 1]

    def per_position(self) -> "RoutingTrace":
        """The same routing with every call split into one call per position (``[B, L, k]`` -> ``L`` calls of
        ``[B, 1, k]``): the steps a token-by-token decode of the same text would have taken, since a causal model
        with dropless MoE layers routes each position the same way in both (e.g. a trace of an evaluation
        forward pass over real text, replayed as decoding)."""
        def split(calls: list[torch.Tensor]) -> list[torch.Tensor]:
            return [c[:, t:t + 1] for c in calls for t in range(c.shape[1])]

        return RoutingTrace(self.num_experts, self.k, [split(c) for c in self.experts],
                            [split(c) for c in self.guesses])

    def _pick(self, t: torch.Tensor, sequence: int | None) -> torch.Tensor:
        if sequence is None:
            return t
        check_int("sequence", sequence, 0, t.shape[0] - 1)
        return t[sequence]

    def steps(self, layer: int, *, decode_only: bool = True, sequence: int | None = None) -> list[list[int]]:
        """Distinct experts each call of MoE layer ``layer`` used, sorted (``decode_only``: calls of one
        position per sequence, i.e. decode steps, skipping the prefill; ``sequence``: only that sequence of the
        batch, as if it had been generated alone; None: the union over the batch)."""
        return [sorted(set(self._pick(self.experts[layer][c], sequence).reshape(-1).tolist()))
                for c in self._calls(layer, decode_only)]

    def guess_steps(self, layer: int, *, decode_only: bool = True,
                    sequence: int | None = None) -> list[list[int]] | None:
        """The prefetch guesses for the calls of :meth:`steps` (most likely first); None for the first layer."""
        calls = self._calls(layer, decode_only)
        if not self.guesses[layer]:
            return None
        return [prefetch_order(self._pick(self.guesses[layer][c], sequence).reshape(-1, self.k)) for c in calls]

    def tokens(self, layer: int, *, decode_only: bool = False) -> torch.Tensor:
        """``[N, k]`` experts of every token of the recorded calls of MoE layer ``layer``."""
        return torch.cat([self.experts[layer][c].reshape(-1, self.k) for c in self._nonempty_calls(layer, decode_only)])

    def _nonempty_calls(self, layer: int, decode_only: bool) -> list[int]:
        calls = self._calls(layer, decode_only)
        if not calls:
            raise ValueError(f"the trace has no {'decode ' if decode_only else ''}calls of layer {layer}"
                             + (" (decode_only=True skips the prefill: pass decode_only=False)" if decode_only else ""))
        return calls

    def guess_recall(self, layer: int, *, decode_only: bool = True) -> float:
        """Fraction of the experts tokens used in ``layer`` that the speculative guess had named (per token)."""
        if not self.guesses[layer]:
            raise ValueError(f"layer {layer} has no guesses (the first MoE layer has none; record_routing records "
                             "them unless guesses=False)")
        calls = self._nonempty_calls(layer, decode_only)
        used = torch.cat([self.experts[layer][c].reshape(-1, self.k) for c in calls])
        guess = torch.cat([self.guesses[layer][c].reshape(-1, self.k) for c in calls])
        return float((used[:, :, None] == guess[:, None, :]).any(-1).float().mean())

    def simulate(self, capacity: int, policy: Policy = "lru", *, prefetch: bool = False, decode_only: bool = True,
                 sequence: int | None = None) -> CacheStats:
        """Replay the decode steps of every layer through an expert cache of ``capacity`` slots per layer
        (:func:`moe_lab.offload.simulate_cache`; ``sequence`` as in :meth:`steps`) -> counts summed over layers."""
        check_bool("prefetch", prefetch)
        total = CacheStats()
        for layer in range(self.num_layers):
            steps = self.steps(layer, decode_only=decode_only, sequence=sequence)
            guesses = self.guess_steps(layer, decode_only=decode_only, sequence=sequence) if prefetch else None
            total = total + simulate_cache(steps, self.num_experts, capacity, policy, guesses)
        return total


@contextmanager
def record_routing(model: nn.Module, *, guesses: bool = True) -> Iterator[RoutingTrace]:
    """Record a :class:`RoutingTrace` of every forward pass of ``model``'s MoE layers inside the ``with`` block
    (generation or evaluation). ``guesses``: also record each layer's speculative guess from the previous MoE
    layer's input. The layers must share ``num_experts`` and ``k``."""
    check_type("model", model, nn.Module, "a torch.nn.Module with MoE layers (moe_lab.MoETransformer)")
    check_bool("guesses", guesses)
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no MoE layer to trace")
    if len({(layer.num_experts, layer.k) for layer in layers}) != 1:
        raise ValueError("record_routing needs the same num_experts and k in every MoE layer")
    trace = RoutingTrace(layers[0].num_experts, layers[0].k, [[] for _ in layers], [[] for _ in layers])
    handles = []
    for i, layer in enumerate(layers):
        def after(module, args, output, i=i):
            info = output[1]
            trace.experts[i].append(info.experts.detach().cpu().reshape(*info.batch_shape, trace.k))
        handles.append(layer.register_forward_hook(after))
        if guesses and i + 1 < len(layers):
            def before(module, args, i=i):
                h = args[0]
                trace.guesses[i + 1].append(guess_experts(layers[i + 1], h).cpu().reshape(*h.shape[:-1], trace.k))
            handles.append(layer.register_forward_pre_hook(before))
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


def experts_touched(experts: torch.Tensor, num_experts: int, batch: int, *, samples: int = 200,
                    generator: torch.Generator | None = None) -> float:
    """Mean number of distinct experts that ``batch`` tokens drawn at random (without replacement) from
    ``experts: [N, k]`` (a trace's routing) use: the measured counterpart of
    :func:`moe_lab.calculator.expected_experts_touched`."""
    check_experts(experts, num_experts)
    n = experts.shape[0]
    if not n:
        raise ValueError("experts must hold at least one token, got shape (0, k)")
    check_int("batch", batch, 1, n)
    check_int("samples", samples, 1)
    picks = torch.stack([torch.randperm(n, generator=generator)[:batch] for _ in range(samples)])  # [S, B]
    used = torch.zeros(samples, num_experts, dtype=torch.bool)
    used.scatter_(1, experts[picks].reshape(samples, -1), True)
    return float(used.sum(1).float().mean())


@torch.no_grad()
def decode_step_seconds(model: nn.Module, batch: int, context: int, steps: int = 8, *,
                        generator: torch.Generator | None = None) -> float:
    """Wall-clock seconds of one decode step (one new token for each of ``batch`` sequences with ``context``
    tokens in the KV cache), averaged over ``steps`` steps after a prefill; eval mode. One measurement: take
    the median of several, interleaved with whatever it is compared with."""
    check_type("model", model, nn.Module, "a moe_lab.MoETransformer")
    for name, value in (("batch", batch), ("context", context), ("steps", steps)):
        check_int(name, value, 1)
    was_training = model.training
    model.eval()
    try:
        device = model.embed.weight.device
        prompt = torch.randint(model.cfg.vocab_size, (batch, context), generator=generator).to(device)
        cache = model.new_cache(batch, context + steps)
        token = model(prompt, cache)[0][:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, cache)[0][:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / steps
    finally:
        model.train(was_training)
