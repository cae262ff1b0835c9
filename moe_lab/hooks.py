"""Training hooks: how code plugs into :func:`moe_lab.train.train` without the loop knowing about it.

A hook subclasses :class:`TrainHook` and overrides the events it needs; each event gets the loop's
:class:`TrainState`. One optimiser step of ``train`` runs, in order::

    on_step_start(state)           # before the step's micro-batches: schedules (lr, loss weights, ...)
    (grad_accum micro-batches: forward, loss / grad_accum, backward; then gradient clipping)
    before_optimizer_step(state)   # gradients complete and clipped; set state.skip_step = True to skip it
    optimizer.step()               # unless skipped
    after_optimizer_step(state)    # e.g. the aux-loss-free bias update, logging into state.history.log(...)
    (the loop records the step in state.history, raises on a non-finite loss unless the step was skipped,
     and evaluates)

plus ``on_train_start`` / ``on_train_end`` around the whole run, and ``state_dict`` / ``load_state_dict`` for
checkpoints of the hook's own state. Hooks run in list order: first the model's own
(``model.training_hooks()``, e.g. :class:`moe_lab.bias_balancing.BiasBalancer` when a layer has a bias update
rate), then the ones passed to ``train(hooks=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import LossOutput
    from .train import History


@dataclass
class TrainState:
    """What the training loop shares with its hooks (hooks may read everything and change the marked fields).

    model, optimizer, history: the run's objects (``history`` holds the finished steps).
    step: index of the current optimiser step (0-based); steps: the run's total.
    lr: this step's learning rate (already set in the optimizer's param groups; a hook may overwrite those).
    outputs: the :class:`moe_lab.model.LossOutput` of each micro-batch of this step (graph already freed).
    grad_norm: total gradient norm before clipping (a 0-dim tensor; None when clipping is off).
    skip_step: set True in ``before_optimizer_step`` to skip ``optimizer.step()`` for this step (e.g. a
        NaN policy); the loop then does not raise on a non-finite loss. Reset to False every step.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: "History"
    steps: int
    step: int = 0
    lr: float = 0.0
    outputs: list["LossOutput"] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None
    skip_step: bool = False


class TrainHook:
    """Base class of training hooks: every event is a no-op; override the ones you need (see the module doc)."""

    def on_train_start(self, state: TrainState) -> None:
        """Once, after the optimizer is built and before the first step."""

    def on_step_start(self, state: TrainState) -> None:
        """Before the micro-batches of step ``state.step``."""

    def before_optimizer_step(self, state: TrainState) -> None:
        """Gradients are complete (and clipped); may set ``state.skip_step``."""

    def after_optimizer_step(self, state: TrainState) -> None:
        """After ``optimizer.step()`` (also called when the step was skipped: check ``state.skip_step``)."""

    def on_train_end(self, state: TrainState) -> None:
        """Once, after the last step."""

    def state_dict(self) -> dict[str, Any]:
        """The hook's own state for a checkpoint (model buffers such as the expert bias live in the model's)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
