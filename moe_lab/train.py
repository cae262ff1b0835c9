"""One training loop for :class:`moe_lab.model.MoETransformer`, returning a :class:`History` that plots and
widgets read (losses, every auxiliary loss term, tokens per expert per MoE layer, drop rate, time per step).

Gradient accumulation (``grad_accum`` micro-batches per optimiser step) and hooks
(:class:`moe_lab.hooks.TrainHook`: schedules, NaN policies, checkpoints, the aux-loss-free bias update) plug
in without the loop knowing what they do."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import get_batch, val_windows
from .hooks import TrainHook, TrainState
from .metrics import max_violation_tensor
from .model import LOSS_TERMS, MoETransformer
from .validation import check_bool, check_int, check_number, check_tensor, check_type, reads_values


@dataclass
class History:
    """Per-step records of a training run (per optimiser step; losses are means over its micro-batches).
    ``aux``, ``z``, ``seq_aux``, ``device_aux``, ``comm_aux``: the unweighted loss terms summed over MoE layers;
    ``tokens_per_expert[s]``: ``[n_moe_layers, E]`` token-slots per expert at step ``s`` (all micro-batches);
    ``drop_rate[s]``: mean over MoE layers of the fraction of slots dropped by capacity (0 when dropless);
    ``val``: ``(step, validation cross-entropy)`` pairs; ``extra``: what hooks logged with :meth:`log`
    (e.g. ``extra["expert_bias"]``: ``[n_layers, E]`` per step from the bias balancer)."""

    loss: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    z: list[float] = field(default_factory=list)
    seq_aux: list[float] = field(default_factory=list)
    device_aux: list[float] = field(default_factory=list)
    comm_aux: list[float] = field(default_factory=list)
    drop_rate: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def log(self, name: str, value: Any) -> None:
        """Append ``value`` to ``extra[name]`` (for hooks: one entry per step, or whenever they like)."""
        self.extra.setdefault(name, []).append(value)

    def expert_load(self) -> torch.Tensor:
        """``[steps, n_moe_layers, E]`` token-slots per expert (empty for a dense model)."""
        if not self.tokens_per_expert or self.tokens_per_expert[0].numel() == 0:
            return torch.zeros(len(self.loss), 0, 0, dtype=torch.long)
        return torch.stack(self.tokens_per_expert)

    def max_violation(self) -> torch.Tensor:
        """``[steps, n_moe_layers]`` MaxVio of each step's load per layer (Wang et al.'s MaxVio_batch)."""
        return max_violation_tensor(self.expert_load())


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


EVAL_TOKENS = 65_536
"""Validation tokens scored per model in the course's comparisons (``evaluate(..., tokens=EVAL_TOKENS)``)."""


def _eval_windows(data: torch.Tensor, seq_len: int, tokens: int | None, batch_size: int, batches: int, seed: int):
    """``(x, y)`` batches: the fixed windows of :func:`moe_lab.data.val_windows` (``tokens`` given), else
    ``batches`` random batches drawn with ``seed`` (legacy)."""
    check_int("batch_size", batch_size, 1)
    if tokens is not None:
        x, y = val_windows(data, seq_len, tokens)
        yield from zip(x.split(batch_size), y.split(batch_size))
        return
    check_int("batches", batches, 1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        yield get_batch(data, batch_size, seq_len, g)


def _eval_outputs(model: MoETransformer, windows):
    """Yield ``(LossOutput, windows in the batch)`` for each ``(x, y)`` batch of ``windows``, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for x, y in windows:
                yield model.loss(x.to(device), y.to(device)), len(x)
    finally:
        model.train(was_training)


def evaluate(model: MoETransformer, data: torch.Tensor, *, seq_len: int, tokens: int | None = None,
             batch_size: int = 16, batches: int = 4, seed: int = 0) -> float:
    """Mean cross-entropy (nats per token) of ``model`` on ``data: [N]`` (eval mode, no gradients).

    With ``tokens`` (the course's validation; comparisons pass :data:`EVAL_TOKENS`): every window of
    :func:`moe_lab.data.val_windows(data, seq_len, tokens) <moe_lab.data.val_windows>`, each token weighted
    equally, ``batch_size`` windows per forward pass (the result does not depend on it beyond float rounding).
    Without ``tokens`` (legacy, for notebooks 08-13 until they move): the mean over ``batches`` batches of
    ``batch_size`` random windows drawn with ``seed``."""
    _check_run(model, data, batch_size, seq_len)
    total = count = 0.0
    for out, n in _eval_outputs(model, _eval_windows(data, seq_len, tokens, batch_size, batches, seed)):
        weight = n if tokens is not None else 1
        total, count = total + float(out.ce) * weight, count + weight
    return total / count


def evaluate_load(model: MoETransformer, data: torch.Tensor, *, seq_len: int, tokens: int | None = None,
                  batch_size: int = 16, batches: int = 4, seed: int = 0) -> torch.Tensor:
    """``[n_moe_layers, E]`` token-slots per expert over the same windows as :func:`evaluate` (eval mode):
    ``metrics.max_violation_tensor`` of it is Wang et al.'s MaxVio_global per layer."""
    _check_run(model, data, batch_size, seq_len)
    loads = [torch.stack([i.tokens_per_expert.cpu() for i in out.infos]) if out.infos
             else torch.zeros(0, dtype=torch.long)
             for out, _ in _eval_outputs(model, _eval_windows(data, seq_len, tokens, batch_size, batches, seed))]
    return torch.stack(loads).sum(0)


def _check_run(model: MoETransformer, data: torch.Tensor, batch_size: int, seq_len: int,
               val_data: torch.Tensor | None = None) -> None:
    """Raise (naming the argument) unless ``model`` is a model and ``data`` (and ``val_data``) 1-D token ids
    longer than ``seq_len``."""
    check_type("model", model, MoETransformer, "a moe_lab.model.MoETransformer")
    check_int("batch_size", batch_size, 1)
    check_int("seq_len", seq_len, 1)
    for name, tokens in (("data", data), ("val_data", val_data)):
        if tokens is None and name == "val_data":
            continue
        check_tensor(name, tokens, "[N] (token ids)", 1, kind="int")
        if tokens.numel() <= seq_len:
            raise ValueError(f"{name} must hold more than seq_len={seq_len} tokens (a window and its next token), "
                             f"got {tokens.numel()}")
        vocab = model.cfg.vocab_size
        if reads_values(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(f"{name} must hold token ids in 0..{vocab - 1} (the model's vocab_size={vocab}), got ids "
                             f"from {int(tokens.min())} to {int(tokens.max())}")


def _model_hooks(model: torch.nn.Module) -> list[TrainHook]:
    """The hooks a model asks for (``model.training_hooks()``, if it has that method)."""
    hooks = getattr(model, "training_hooks", None)
    return list(hooks()) if callable(hooks) else []


def _record(history: History, outputs: list, start: float) -> None:
    """Append one optimiser step (its micro-batches' outputs) to ``history``."""
    n = len(outputs)
    history.step_time.append(time.perf_counter() - start)
    history.loss.append(sum(out.total.item() for out in outputs) / n)
    history.ce.append(sum(out.ce.item() for out in outputs) / n)
    for term in LOSS_TERMS:
        getattr(history, term).append(sum(getattr(out, term).item() for out in outputs) / n)
    drops = [info.drop_rate for out in outputs for info in out.infos]
    history.drop_rate.append(sum(drops) / len(drops) if drops else 0.0)
    if outputs[0].infos:
        history.tokens_per_expert.append(sum(torch.stack([info.tokens_per_expert.cpu() for info in out.infos])
                                             for out in outputs))
    else:
        history.tokens_per_expert.append(torch.zeros(0, dtype=torch.long))


def train(model: MoETransformer, data: torch.Tensor, *, steps: int, batch_size: int = 16, seq_len: int = 64,
          lr: float = 3e-3, warmup: int = 10, weight_decay: float = 0.0, grad_clip: float = 1.0,
          grad_accum: int = 1, hooks: Sequence[TrainHook] = (), val_data: torch.Tensor | None = None,
          eval_every: int = 0, eval_tokens: int | None = None, seed: int = 0, progress: bool = True,
          desc: str | None = None) -> History:
    """Train ``model`` on random windows of ``data: [N]`` token ids with AdamW for ``steps`` optimiser steps.

    Each step draws ``grad_accum * batch_size`` windows (one draw from a generator seeded with ``seed``), runs
    them as ``grad_accum`` micro-batches of ``batch_size`` (loss / grad_accum each, gradients summed), clips
    the gradient norm to ``grad_clip`` (0 = off) and steps the optimizer. The loss is
    :meth:`MoETransformer.loss` (cross-entropy + weighted auxiliary losses). ``hooks``
    (:class:`moe_lab.hooks.TrainHook`) run after the model's own ``model.training_hooks()`` (e.g. the
    aux-loss-free bias balancer). With ``val_data`` and ``eval_every > 0`` the validation loss (:func:`evaluate`
    with ``tokens=eval_tokens``; None: its legacy random windows) is recorded every ``eval_every`` steps and at
    the end. A hook may end the run early (``state.stop = True``). ``progress`` shows a tqdm bar.
    Raises ``FloatingPointError`` as soon as the loss is NaN or infinite (unless a hook skipped that step).
    """
    _check_run(model, data, batch_size, seq_len, val_data)
    for name, value, low in (("steps", steps, 1), ("warmup", warmup, 0), ("grad_accum", grad_accum, 1),
                             ("eval_every", eval_every, 0), ("seed", seed, 0)):
        check_int(name, value, low)
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("grad_clip (0 = off)", grad_clip)):
        check_number(name, value, 0)
    check_bool("progress", progress)
    check_type("hooks", hooks, Sequence, "a sequence of moe_lab.hooks.TrainHook objects")
    hooks = [*_model_hooks(model), *hooks]
    for hook in hooks:
        if not isinstance(hook, TrainHook):
            raise ValueError(f"hooks must be moe_lab.hooks.TrainHook objects, got {type(hook).__name__}")
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    history = History()
    state = TrainState(model=model, optimizer=opt, history=history, steps=steps)
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
        _record(history, state.outputs, start)
        if not math.isfinite(history.loss[-1]) and not state.skip_step:
            raise FloatingPointError(f"the loss is {history.loss[-1]} at step {step}: training diverged "
                                     f"(try a learning rate below lr={lr}, gradient clipping or the z-loss)")
        if val_data is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            history.val.append((step + 1, evaluate(model, val_data, seq_len=seq_len, tokens=eval_tokens,
                                                   batch_size=batch_size)))
        bar.set_postfix(loss=f"{history.ce[-1]:.3f}")
        if state.stop:
            break
    for hook in hooks:
        hook.on_train_end(state)
    return history
