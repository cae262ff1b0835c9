"""One training loop for :class:`moe_lab.model.MoETransformer`, returning a :class:`History` that plots and
widgets read (losses, aux / z-losses, tokens per expert per MoE layer, drop rate, time per step)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .data import get_batch
from .model import MoETransformer


@dataclass
class History:
    """Per-step records of a training run. ``tokens_per_expert[s]``: ``[n_moe_layers, E]`` token-slots per
    expert at step ``s``; ``drop_rate[s]``: mean over MoE layers of the fraction of slots dropped by capacity
    (0 when dropless); ``val``: ``(step, validation cross-entropy)`` pairs."""

    loss: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    z: list[float] = field(default_factory=list)
    drop_rate: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)

    def expert_load(self) -> torch.Tensor:
        """``[steps, n_moe_layers, E]`` token-slots per expert (empty for a dense model)."""
        if not self.tokens_per_expert or self.tokens_per_expert[0].numel() == 0:
            return torch.zeros(len(self.loss), 0, 0, dtype=torch.long)
        return torch.stack(self.tokens_per_expert)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: MoETransformer, data: torch.Tensor, *, batch_size: int, seq_len: int, batches: int = 4,
             seed: int = 0) -> float:
    """Mean cross-entropy (nats per token) over ``batches`` random windows of ``data`` (eval mode)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = []
    for _ in range(batches):
        x, y = get_batch(data, batch_size, seq_len, g)
        losses.append(float(model.loss(x.to(device), y.to(device)).ce))
    model.train(was_training)
    return sum(losses) / len(losses)


def train(model: MoETransformer, data: torch.Tensor, *, steps: int, batch_size: int = 16, seq_len: int = 64,
          lr: float = 3e-3, warmup: int = 10, weight_decay: float = 0.0, grad_clip: float = 1.0,
          val_data: torch.Tensor | None = None, eval_every: int = 0, seed: int = 0, progress: bool = True,
          desc: str | None = None) -> History:
    """Train ``model`` on random windows of ``data: [N]`` token ids with AdamW for ``steps`` steps.

    The loss is :meth:`MoETransformer.loss` (cross-entropy + weighted aux and z-losses). Batches come from a
    generator seeded with ``seed``; with ``val_data`` and ``eval_every > 0`` the validation loss is recorded
    every ``eval_every`` steps and at the end. ``progress`` shows a tqdm bar (a widget in notebooks).
    Raises ``FloatingPointError`` as soon as the loss is NaN or infinite.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    history = History()
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x, y = get_batch(data, batch_size, seq_len, g)
        out = model.loss(x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        history.step_time.append(time.perf_counter() - start)
        history.loss.append(out.total.item())
        if not math.isfinite(history.loss[-1]):
            raise FloatingPointError(f"the loss is {history.loss[-1]} at step {step}: training diverged "
                                     f"(try a learning rate below lr={lr}, gradient clipping or the z-loss)")
        history.ce.append(out.ce.item())
        history.aux.append(out.aux.item())
        history.z.append(out.z.item())
        drops = [info.drop_rate for info in out.infos]
        history.drop_rate.append(sum(drops) / len(drops) if drops else 0.0)
        history.tokens_per_expert.append(
            torch.stack([info.tokens_per_expert.cpu() for info in out.infos]) if out.infos
            else torch.zeros(0, dtype=torch.long))
        if val_data is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            history.val.append((step + 1, evaluate(model, val_data, batch_size=batch_size, seq_len=seq_len)))
        bar.set_postfix(loss=f"{history.ce[-1]:.3f}")
    return history
