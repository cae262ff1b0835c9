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
from .data import get_batch, val_windows
from .hooks import History, TrainHook, TrainState
from .losses import AUX_LOSSES
from .model import LossOutput, MoETransformer
from .validation import check_bool, check_int, check_number, check_tensor, check_type, reads_values

__all__ = ["History", "evaluate", "evaluate_load", "lr_at", "train"]


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
    ``batches`` random batches drawn with ``seed`` (legacy). The callers have checked ``batch_size``."""
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
    Without ``tokens`` (legacy, for notebooks 09-11 until they move): the mean over ``batches`` batches of
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
    """The hooks the model's layers need: a :class:`moe_lab.bias_balancing.BiasBalancer` when a layer updates its
    selection bias (the bias is a model buffer; the update is training code)."""
    balancer = BiasBalancer(model)
    return [balancer] if balancer.layers else []


class _StepLog:
    """The loop's per-step records: the losses, the ``record`` terms (computed without gradients where the loss
    did not need them) and the drop rates of each step stay on the device until :meth:`flush` reads every pending
    step back in one transfer (a GPU waits for the device once per flush); the loads stay on the device."""

    def __init__(self, history: History, record: list[str], device: torch.device, lr: float):
        self.history, self.record, self.device, self.lr = history, record, device, lr
        self.pending: list[tuple[int, torch.Tensor, int, int, bool]] = []
        self.window_start = time.perf_counter()

    def add(self, step: int, outputs: list[LossOutput], skipped: bool) -> None:
        infos = [info for out in outputs for info in out.infos]
        with torch.no_grad():
            per_output = [torch.stack([out.total, out.ce, *(out.term(t) for t in self.record)]).detach().double()
                          for out in outputs]  # [n, 2 + len(record)]
            drops = [(~info.keep).float().mean().double() for info in infos if info.keep is not None]
            values = torch.cat([torch.stack(per_output).T.flatten(), torch.stack(drops) if drops else per_output[0][:0]])
        self.pending.append((step, values, len(outputs), len(infos), skipped))
        if outputs[0].infos:
            self.history.tokens_per_expert.append(sum(torch.stack([info.tokens_per_expert for info in out.infos])
                                                      for out in outputs))
        else:
            self.history.tokens_per_expert.append(torch.zeros(0, dtype=torch.long))

    def flush(self) -> None:
        """Read the pending steps into the history (times: the window's wall time shared equally); raise
        ``FloatingPointError`` at the first non-finite loss of a step no hook skipped."""
        if not self.pending:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        per_step = (now - self.window_start) / len(self.pending)
        values = torch.cat([v for _, v, _, _, _ in self.pending]).tolist()
        h, columns, offset = self.history, 2 + len(self.record), 0
        for step, _, n, n_infos, skipped in self.pending:
            means = [sum(values[offset + i * n:offset + (i + 1) * n]) / n for i in range(columns)]
            drops = values[offset + columns * n:offset + columns * n + n_infos]
            offset += columns * n + len(drops)
            h.step_time.append(per_step)
            h.loss.append(means[0])
            h.ce.append(means[1])
            for term, value in zip(self.record, means[2:]):
                h.terms.setdefault(term, []).append(value)
            h.drop_rate.append(sum(drops) / n_infos if n_infos else 0.0)  # dropless layers add 0
            if not math.isfinite(means[0]) and not skipped:
                self.pending = []
                raise FloatingPointError(f"the loss is {means[0]} at step {step}: training diverged (try a learning "
                                         f"rate below lr={self.lr}, gradient clipping or the z-loss)")
        self.pending, self.window_start = [], now


def train(model: MoETransformer, data: torch.Tensor, *, steps: int, batch_size: int = 16, seq_len: int = 64,
          lr: float = 3e-3, warmup: int = 10, weight_decay: float = 0.0, grad_clip: float = 1.0,
          grad_accum: int = 1, hooks: Sequence[TrainHook] = (), val_data: torch.Tensor | None = None,
          eval_every: int = 0, eval_tokens: int | None = None, seed: int = 0, progress: bool = True,
          desc: str | None = None, record: Sequence[str] = (), sync_every: int = 1) -> History:
    """Train ``model`` on random windows of ``data: [N]`` token ids with AdamW for ``steps`` optimiser steps.

    Each step draws ``grad_accum * batch_size`` windows (one draw from a generator seeded with ``seed``), runs
    them as ``grad_accum`` micro-batches of ``batch_size`` (loss / grad_accum each, gradients summed), clips
    the gradient norm to ``grad_clip`` (0 = off) and steps the optimizer. The loss is
    :meth:`MoETransformer.loss` (cross-entropy + the auxiliary losses with a non-zero weight). ``hooks``
    (:class:`moe_lab.hooks.TrainHook`) run after the ones the model's layers need (the aux-loss-free bias
    balancer). With ``val_data`` and ``eval_every > 0`` the validation loss (:func:`evaluate` with
    ``tokens=eval_tokens``; None: its legacy random windows) is recorded every ``eval_every`` steps and at the
    end. A hook may end the run early (``state.stop = True``). ``progress`` shows a tqdm bar. ``record``:
    auxiliary loss terms (names of :data:`moe_lab.losses.AUX_LOSSES`) to record in ``History.terms`` every step
    even at zero weight (the weighted ones are always recorded). ``sync_every``: read the step records back from
    the device every this many steps (and at the end, before an evaluation and when a hook stops the run), one
    transfer each time: on a GPU the loop then waits for the device once per ``sync_every`` steps;
    ``history.step_time`` gives each step of a window the window's mean, and the bar and ``history`` lag by up to
    ``sync_every - 1`` steps.
    Raises ``FloatingPointError`` when the loss of a step is NaN or infinite (unless a hook skipped that step),
    at the read that brings it back.
    """
    _check_run(model, data, batch_size, seq_len, val_data)
    for name, value, low in (("steps", steps, 1), ("warmup", warmup, 0), ("grad_accum", grad_accum, 1),
                             ("eval_every", eval_every, 0), ("seed", seed, 0), ("sync_every", sync_every, 1)):
        check_int(name, value, low)
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("grad_clip (0 = off)", grad_clip)):
        check_number(name, value, 0)
    check_bool("progress", progress)
    check_type("hooks", hooks, Sequence, "a sequence of moe_lab.hooks.TrainHook objects")
    hooks = [*_model_hooks(model), *hooks]
    for hook in hooks:
        if not isinstance(hook, TrainHook):
            raise ValueError(f"hooks must be moe_lab.hooks.TrainHook objects, got {type(hook).__name__}")
    cfg = getattr(model, "cfg", None)
    for term in record:
        if term not in AUX_LOSSES:
            raise ValueError(f"record must hold names of moe_lab.losses.AUX_LOSSES {tuple(AUX_LOSSES)}, got {term!r}")
        if getattr(cfg, "num_experts", 0) and not AUX_LOSSES[term].applies(cfg):
            raise ValueError(f"record={tuple(record)}: this model's layers do not define {term!r} "
                             f"({AUX_LOSSES[term].doc})")
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
    log = _StepLog(history, state.record, device, lr)
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
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
        log.add(step, state.outputs, state.skip_step)
        evaluating = val_data is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps)
        if (step + 1) % sync_every == 0 or step + 1 == steps or evaluating or state.stop:
            log.flush()
            bar.set_postfix(loss=f"{history.ce[-1]:.3f}")
        if evaluating:
            history.val.append((step + 1, evaluate(model, val_data, seq_len=seq_len, tokens=eval_tokens,
                                                   batch_size=batch_size)))
        if state.stop:
            break
    for hook in hooks:
        hook.on_train_end(state)
    return history
