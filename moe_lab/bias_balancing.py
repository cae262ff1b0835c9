"""Auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3 Sec. 2.1.2).

Each MoE layer with ``selection_bias=True`` selects experts by ``score + b`` and counts, in training forward
passes with gradients enabled, how many token-slots each expert got (``layer.load_counts``: every
micro-batch of an optimiser step). After the optimiser step, :class:`BiasBalancer` applies
:func:`moe_lab.losses.bias_update` with the layer's ``bias_update_rate`` (``b_i += gamma * sign(mean load -
load_i)``, optionally mean-centred), summing the counts over the ranks first when ``torch.distributed`` is
initialised (so every replica of a layer makes the same update), and resets the counts. No gradient is
involved: the bias is a buffer, and the gates never see it.

:func:`simulate_bias_balancing` runs the same update on a synthetic, skewed router without training (the
pure compute behind a bias-balancing widget).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from .hooks import TrainHook, TrainState
from .layer import moe_layers
from .losses import bias_update
from .metrics import max_violation_tensor, tokens_per_expert
from .routing import check_k, sigmoid_topk, softmax_topk
from .validation import check_bool, check_choice, check_int, check_number, check_type


class BiasBalancer(TrainHook):
    """Updates the selection bias of every :class:`moe_lab.MoELayer` in ``model`` that has one and a
    ``bias_update_rate > 0``, after each optimiser step.

    With :func:`moe_lab.train.train` it runs as a hook (``train`` adds it when a layer needs it); in a
    loop of your own, call :meth:`update` after ``optimizer.step()`` or :meth:`attach` it to the optimizer.
    ``group``: the process group to sum the counts over (default: the world, when initialised).
    After each update it logs the biases (``[n_layers, E]``) as ``history.log("expert_bias", ...)``.
    """

    def __init__(self, model: nn.Module, *, group: dist.ProcessGroup | None = None):
        check_type("model", model, nn.Module, "a torch.nn.Module with MoE layers (e.g. a moe_lab.MoETransformer)")
        self.layers = [m for m in moe_layers(model) if m.expert_bias is not None and m.config.bias_update_rate > 0]
        self.group = group

    @torch.no_grad()
    def update(self) -> None:
        """One bias update per layer from the loads counted since the last update; resets the counts."""
        for layer in self.layers:
            load = layer.load_counts.clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(load, group=self.group)
            c = layer.config
            layer.expert_bias.copy_(bias_update(layer.expert_bias, load, c.bias_update_rate,
                                                centered=c.bias_update_centered))
        self.reset()

    def reset(self) -> None:
        """Discard the counted loads (e.g. of a skipped step)."""
        for layer in self.layers:
            layer.load_counts.zero_()

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run :meth:`update` after every ``optimizer.step()`` (a step post-hook); returns its handle."""
        check_type("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer")
        return optimizer.register_step_post_hook(lambda *_: self.update())

    def on_train_start(self, state: TrainState) -> None:
        self.reset()  # loads counted before training (e.g. a forward pass outside the loop) are not a step's

    def after_optimizer_step(self, state: TrainState) -> None:
        if state.skip_step:
            self.reset()
            return
        self.update()
        if self.layers:
            state.history.log("expert_bias", torch.stack([layer.expert_bias.detach().cpu() for layer in self.layers]))


@dataclass
class BiasTrace:
    """A simulated bias-balancing run over ``S`` steps and ``E`` experts.

    load: ``[S, E]`` int64 token-slots per expert at each step (selected with the bias before that step's
    update).  bias: ``[S + 1, E]`` the bias before each step and after the last.  max_violation: ``[S]``
    MaxVio of each step's load.
    """

    load: torch.Tensor
    bias: torch.Tensor
    max_violation: torch.Tensor


def simulate_bias_balancing(*, num_experts: int = 16, k: int = 2, tokens: int = 512, steps: int = 100,
                            rate: float = 1e-2, centered: bool = False, skew: float = 1.0, noise: float = 1.0,
                            score_func: str = "sigmoid", seed: int = 0) -> BiasTrace:
    """Aux-loss-free balancing on a router that does not learn: each step draws ``tokens`` tokens' logits
    ``offset_e + noise * N(0, 1)`` with fixed per-expert offsets ``skew * N(0, 1)`` (some experts are
    popular), selects the top-``k`` of ``score + bias`` (``score_func`` ``"sigmoid"`` or ``"softmax"``),
    counts the loads and applies :func:`moe_lab.losses.bias_update` with ``rate`` (and ``centered``).
    Deterministic for a given ``seed``. A small ``rate`` balances slowly; a large one overshoots and the loads
    oscillate around the mean.
    """
    check_choice("score_func", score_func, ("sigmoid", "softmax"))
    check_int("num_experts", num_experts, 1)
    check_k(k, num_experts)
    for name, value in (("tokens", tokens), ("steps", steps)):
        check_int(name, value, 1)
    for name, value in (("rate", rate), ("skew", skew), ("noise", noise)):
        check_number(name, value, 0)
    check_bool("centered", centered)
    check_int("seed", seed, 0)
    gen = torch.Generator().manual_seed(seed)
    offsets = skew * torch.randn(num_experts, generator=gen)
    bias = torch.zeros(num_experts)
    biases, loads = [bias], []
    route = sigmoid_topk if score_func == "sigmoid" else softmax_topk
    for _ in range(steps):
        logits = offsets + noise * torch.randn(tokens, num_experts, generator=gen)
        _, _, experts = route(logits, k, bias=bias)
        loads.append(tokens_per_expert(experts, num_experts))
        bias = bias_update(bias, loads[-1], rate, centered=centered)
        biases.append(bias)
    load = torch.stack(loads)
    return BiasTrace(load=load, bias=torch.stack(biases), max_violation=max_violation_tensor(load))
