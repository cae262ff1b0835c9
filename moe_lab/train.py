"""One training loop for :class:`moe_lab.model.MoETransformer`, returning a :class:`History` that plots and
widgets read (losses, the auxiliary loss terms in use, tokens per expert per MoE layer, drop rate, time per step).

Gradient accumulation (``grad_accum`` micro-batches per optimiser step) and hooks
(:class:`moe_lab.hooks.TrainHook`: schedules, NaN policies, checkpoints, the aux-loss-free bias update) plug
in without the loop knowing what they do. Per step the loop reads one small tensor back from the device (the
losses, the recorded terms and the drop rates: one host sync on a GPU); auxiliary losses nobody weights or asks
for are never computed."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .bias_balancing import BiasBalancer
from .data import get_batch
from .hooks import History, TrainHook, TrainState
from .losses import AUX_LOSSES
from .model import LossOutput, MoETransformer

__all__ = ["History", "evaluate", "evaluate_load", "lr_at", "train"]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _eval_batches(model: MoETransformer, data: torch.Tensor, batch_size: int, seq_len: int, batches: int,
                  seed: int):
    """Yield the :class:`moe_lab.model.LossOutput` of ``batches`` random windows of ``data`` in eval mode."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for _ in range(batches):
                x, y = get_batch(data, batch_size, seq_len, g)
                yield model.loss(x.to(device), y.to(device))
    finally:
        model.train(was_training)


def evaluate(model: MoETransformer, data: torch.Tensor, *, batch_size: int, seq_len: int, batches: int = 4,
             seed: int = 0) -> float:
    """Mean cross-entropy (nats per token) over ``batches`` random windows of ``data`` (eval mode)."""
    losses = [float(out.ce) for out in _eval_batches(model, data, batch_size, seq_len, batches, seed)]
    return sum(losses) / len(losses)


def evaluate_load(model: MoETransformer, data: torch.Tensor, *, batch_size: int, seq_len: int, batches: int = 4,
                  seed: int = 0) -> torch.Tensor:
    """``[n_moe_layers, E]`` token-slots per expert over the same windows as :func:`evaluate` (eval mode):
    ``metrics.max_violation_tensor`` of it is Wang et al.'s MaxVio_global per layer."""
    loads = [torch.stack([i.tokens_per_expert.cpu() for i in out.infos]) if out.infos
             else torch.zeros(0, dtype=torch.long)
             for out in _eval_batches(model, data, batch_size, seq_len, batches, seed)]
    return torch.stack(loads).sum(0)


def _model_hooks(model: torch.nn.Module) -> list[TrainHook]:
    """The hooks the model's layers need: a :class:`moe_lab.bias_balancing.BiasBalancer` when a layer updates its
    selection bias (the bias is a model buffer; the update is training code)."""
    balancer = BiasBalancer(model)
    return [balancer] if balancer.layers else []


def _record(history: History, outputs: list[LossOutput], start: float, record: list[str]) -> None:
    """Append one optimiser step (its micro-batches' outputs) to ``history``: the losses, the ``record`` terms
    (computed now, without gradients, where the loss did not need them) and the drop rates come back in one
    read; the loads stay on their device."""
    history.step_time.append(time.perf_counter() - start)
    infos = [info for out in outputs for info in out.infos]
    with torch.no_grad():
        per_output = [torch.stack([out.total, out.ce, *(out.term(t) for t in record)]).detach().double()
                      for out in outputs]  # [n, 2 + len(record)]
        drops = [(~info.keep).float().mean().double() for info in infos if info.keep is not None]  # dropless layers: 0
        values = torch.cat([torch.stack(per_output).T.flatten(), torch.stack(drops) if drops else per_output[0][:0]])
        values = values.tolist()
    n = len(outputs)
    means = [sum(values[i * n:(i + 1) * n]) / n for i in range(2 + len(record))]
    history.loss.append(means[0])
    history.ce.append(means[1])
    for term, value in zip(record, means[2:]):
        history.terms.setdefault(term, []).append(value)
    history.drop_rate.append(sum(values[(2 + len(record)) * n:]) / len(infos) if infos else 0.0)
    if outputs[0].infos:
        history.tokens_per_expert.append(sum(torch.stack([info.tokens_per_expert for info in out.infos])
                                             for out in outputs))
    else:
        history.tokens_per_expert.append(torch.zeros(0, dtype=torch.long))


def train(model: MoETransformer, data: torch.Tensor, *, steps: int, batch_size: int = 16, seq_len: int = 64,
          lr: float = 3e-3, warmup: int = 10, weight_decay: float = 0.0, grad_clip: float = 1.0,
          grad_accum: int = 1, hooks: Sequence[TrainHook] = (), val_data: torch.Tensor | None = None,
          eval_every: int = 0, seed: int = 0, progress: bool = True, desc: str | None = None,
          record: Sequence[str] = ()) -> History:
    """Train ``model`` on random windows of ``data: [N]`` token ids with AdamW for ``steps`` optimiser steps.

    Each step draws ``grad_accum * batch_size`` windows (one draw from a generator seeded with ``seed``), runs
    them as ``grad_accum`` micro-batches of ``batch_size`` (loss / grad_accum each, gradients summed), clips
    the gradient norm to ``grad_clip`` (0 = off) and steps the optimizer. The loss is
    :meth:`MoETransformer.loss` (cross-entropy + the auxiliary losses with a non-zero weight). ``hooks``
    (:class:`moe_lab.hooks.TrainHook`) run after the ones the model's layers need (the aux-loss-free bias
    balancer). With ``val_data`` and ``eval_every > 0`` the validation loss is recorded every ``eval_every``
    steps and at the end. ``progress`` shows a tqdm bar (a widget in notebooks). ``record``: auxiliary loss
    terms (names of :data:`moe_lab.losses.AUX_LOSSES`) to record in ``History.terms`` every step even at zero
    weight (the weighted ones are always recorded).
    Raises ``FloatingPointError`` as soon as the loss is NaN or infinite (unless a hook skipped that step).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not isinstance(grad_accum, int) or isinstance(grad_accum, bool) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an integer >= 1, got {grad_accum!r}")
    hooks = [*_model_hooks(model), *hooks]
    for hook in hooks:
        if not isinstance(hook, TrainHook):
            raise ValueError(f"hooks must be moe_lab.hooks.TrainHook objects, got {type(hook).__name__}")
    for term in record:
        if term not in AUX_LOSSES:
            raise ValueError(f"record must hold names of moe_lab.losses.AUX_LOSSES {tuple(AUX_LOSSES)}, got {term!r}")
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    history = History()
    weights = getattr(model, "loss_weights", {})
    state = TrainState(model=model, optimizer=opt, history=history, steps=steps,
                       record=[t for t in AUX_LOSSES if weights.get(t) or t in record])
    model.train()
    for hook in hooks:
        hook.on_train_start(state)
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        start = time.perf_counter()
        state.step, state.lr, state.skip_step, state.outputs = step, lr_at(step, steps, lr, warmup), False, []
        for group in opt.param_groups:
            group["lr"] = state.lr
        for hook in hooks:
            hook.on_step_start(state)
        x, y = get_batch(data, batch_size * grad_accum, seq_len, g)
        opt.zero_grad(set_to_none=True)
        for xm, ym in zip(x.split(batch_size), y.split(batch_size)):
            out = model.loss(xm.to(device), ym.to(device))
            (out.total / grad_accum if grad_accum > 1 else out.total).backward()
            state.outputs.append(out)
        state.grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
        for hook in hooks:
            hook.before_optimizer_step(state)
        if not state.skip_step:
            opt.step()
        for hook in hooks:
            hook.after_optimizer_step(state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        _record(history, state.outputs, start, state.record)
        if not math.isfinite(history.loss[-1]) and not state.skip_step:
            raise FloatingPointError(f"the loss is {history.loss[-1]} at step {step}: training diverged "
                                     f"(try a learning rate below lr={lr}, gradient clipping or the z-loss)")
        if val_data is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            history.val.append((step + 1, evaluate(model, val_data, batch_size=batch_size, seq_len=seq_len)))
        bar.set_postfix(loss=f"{history.ce[-1]:.3f}")
    for hook in hooks:
        hook.on_train_end(state)
    return history
