"""A tiny, fast load-balancing experiment: train one ``MoELayer`` on a synthetic regression task and watch
its expert load, with or without balancing losses (notebook 04).

The task: tokens ``x ~ N(0, I)`` and a fixed random teacher ``y = tanh(x A) B``. Nothing in the task favours
any expert, so whatever imbalance appears is made by training itself: an expert that is picked a little
more often learns a little faster, the router then likes it more ("rich get richer"), and routing
collapses onto a few experts unless a balancing loss pushes back.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .layer import MoELayer
from .metrics import drop_rate, max_over_mean, max_violation


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block. The experiment's matmuls are tiny: extra threads only add
    synchronisation, and on a busy shared CPU they can make a step 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class BalanceConfig:
    """Sizes and knobs of the experiment (defaults run 100 steps in about a second on a laptop CPU).

    alpha: Switch aux-loss coefficient.  w_importance / w_load: Shazeer loss weights (``w_load`` needs
    ``router="noisy_topk"``).  jitter_eps: Switch multiplicative jitter on the router input.
    capacity_factor: expert capacity during training (None: dropless).
    """

    num_experts: int = 8
    k: int = 1
    d_model: int = 16
    d_ff: int = 16
    tokens: int = 256
    lr: float = 3e-2
    alpha: float = 0.0
    w_importance: float = 0.0
    w_load: float = 0.0
    router: str = "softmax"
    jitter_eps: float = 0.0
    capacity_factor: float | None = None
    seed: int = 0


@dataclass
class BalanceHistory:
    """Per-step records: losses (floats) and ``load``: tokens per expert (a list of ``[E]`` int lists)."""

    task_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    max_vio: list[float] = field(default_factory=list)
    load: list[list[int]] = field(default_factory=list)


class BalanceExperiment:
    """A router + tiny MoE trained step by step (so a widget can animate it).

    ``step(n)`` runs ``n`` Adam steps on fresh batches and appends to ``history``; ``evaluate()`` measures the
    load on a held-out batch in eval mode (no noise).
    """

    def __init__(self, config: BalanceConfig | None = None):
        self.config = c = config or BalanceConfig()
        if c.w_load and c.router != "noisy_topk":
            raise ValueError("w_load needs router='noisy_topk' (the smooth load estimate uses its noise)")
        gen = torch.Generator().manual_seed(c.seed)
        self.teacher_a = torch.randn(c.d_model, 4 * c.d_model, generator=gen) / c.d_model**0.5
        self.teacher_b = torch.randn(4 * c.d_model, c.d_model, generator=gen) / (4 * c.d_model) ** 0.5
        self.data = torch.Generator().manual_seed(c.seed + 1)
        torch.manual_seed(c.seed)
        self.layer = MoELayer(c.d_model, c.d_ff, c.num_experts, c.k, activation="gelu", renormalize=c.k > 1,
                              router=c.router, jitter_eps=c.jitter_eps, capacity_factor=c.capacity_factor)
        self.optimizer = torch.optim.Adam(self.layer.parameters(), lr=c.lr)
        self.history = BalanceHistory()

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh training batch ``(x, y)``, each ``[tokens, d_model]``."""
        x = torch.randn(self.config.tokens, self.config.d_model, generator=self.data)
        return x, torch.tanh(x @ self.teacher_a) @ self.teacher_b

    def step(self, n: int = 1) -> BalanceHistory:
        """Run ``n`` training steps; returns the (growing) history."""
        self.layer.train()
        with one_thread():
            for _ in range(n):
                self._train_step()
        return self.history

    def _train_step(self) -> None:
        c = self.config
        x, y = self.batch()
        out, info = self.layer(x)
        task = (out - y).square().mean()
        loss = task + c.alpha * info.aux_loss + c.w_importance * info.importance_loss
        if c.w_load:
            loss = loss + c.w_load * info.load_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        load = info.tokens_per_expert
        self.history.task_loss.append(float(task.detach()))
        self.history.aux_loss.append(float(info.aux_loss.detach()))
        self.history.max_vio.append(max_violation(load))
        self.history.load.append(load.tolist())

    @torch.no_grad()
    def evaluate(self, tokens: int = 2048, *, group_size: int | None = None, seed: int = 12345) -> dict[str, float | list[int]]:
        """Held-out task loss, load statistics and drop rate in eval mode (deterministic routing).

        The batch comes from its own generator (the same batch at every call with the same ``seed``). With
        ``group_size`` it is routed in groups of that many tokens, so expert capacity applies per group (as
        per device batch in Switch / GShard); the load is summed over groups.
        """
        self.layer.eval()
        x = torch.randn(tokens, self.config.d_model, generator=torch.Generator().manual_seed(seed))
        y = torch.tanh(x @ self.teacher_a) @ self.teacher_b
        outs, drops, load = [], [], torch.zeros(self.config.num_experts, dtype=torch.long)
        with one_thread():
            for group in torch.split(x, group_size or tokens):
                out, info = self.layer(group)
                outs.append(out)
                drops.append(info.dropped)
                load += info.tokens_per_expert
        out = torch.cat(outs)
        return {"task_loss": float((out - y).square().mean()), "max_over_mean": max_over_mean(load),
                "max_vio": max_violation(load), "drop_rate": drop_rate(torch.cat(drops)), "load": load.tolist()}


def train_router(config: BalanceConfig, steps: int) -> dict[str, float | list[int]]:
    """Train for ``steps`` steps and return :meth:`BalanceExperiment.evaluate`'s numbers."""
    experiment = BalanceExperiment(config)
    experiment.step(steps)
    return experiment.evaluate()
