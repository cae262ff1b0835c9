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
checkpoints of the hook's own state. Hooks run in list order: first the ones the model's layers need
(:class:`moe_lab.bias_balancing.BiasBalancer` when a layer has a bias update rate), then the ones passed to
``train(hooks=...)``. This module depends on no training code: the loop depends on it.
"""
from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layer import named_moe_layers
from .losses import AUX_LOSSES
from .metrics import max_violation_tensor
from .validation import check_choice, check_int, check_number, check_type

if TYPE_CHECKING:
    from .model import LossOutput


@dataclass
class History:
    """Per-step records of a training run (per optimiser step; losses are means over its micro-batches).

    ``terms[name]`` (also ``history.<name>``, e.g. ``history.aux``): the unweighted auxiliary loss ``name`` (a term
    of :data:`moe_lab.losses.AUX_LOSSES`) summed over the MoE layers, for the terms recorded in this run: those with a
    non-zero weight when training starts, those asked for with ``train(record=...)`` and those a hook added to
    ``TrainState.record`` (e.g. :class:`LossWeightSchedule`'s);
    ``tokens_per_expert[s]``: ``[n_moe_layers, E]`` token-slots per expert at step ``s`` (all micro-batches);
    ``drop_rate[s]``: mean over MoE layers of the fraction of slots dropped by capacity (0 when dropless);
    ``val``: ``(step, validation cross-entropy)`` pairs; ``extra``: what hooks logged with :meth:`log`
    (e.g. ``extra["expert_bias"]``: ``[n_layers, E]`` per step from the bias balancer)."""

    loss: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)
    drop_rate: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def __getattr__(self, attr: str):
        # ``history.aux`` etc. (only called when normal lookup fails)
        if attr in AUX_LOSSES and "terms" in self.__dict__:
            if attr in self.terms:
                return self.terms[attr]
            raise AttributeError(f"history.{attr} was not recorded (its weight was 0 and nothing asked for it): "
                                 f"train(..., record=({attr!r},)) records it")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    def log(self, name: str, value: Any) -> None:
        """Append ``value`` to ``extra[name]`` (for hooks: one entry per step, or whenever they like)."""
        self.extra.setdefault(name, []).append(value)

    def expert_load(self) -> torch.Tensor:
        """``[steps, n_moe_layers, E]`` token-slots per expert (empty for a dense model), on the CPU."""
        if not self.tokens_per_expert or self.tokens_per_expert[0].numel() == 0:
            return torch.zeros(len(self.loss), 0, 0, dtype=torch.long)
        return torch.stack(self.tokens_per_expert).cpu()

    def max_violation(self) -> torch.Tensor:
        """``[steps, n_moe_layers]`` MaxVio of each step's load per layer (Wang et al.'s MaxVio_batch)."""
        return max_violation_tensor(self.expert_load())


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
    stop: set True in any step event to end the run after this step (``on_train_end`` still runs); the
        learning-rate schedule is not shortened (e.g. replaying the first steps of a longer run).
    record: names of the auxiliary loss terms recorded in ``history.terms`` every step; a hook may add names in
        ``on_train_start``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: History
    steps: int
    step: int = 0
    lr: float = 0.0
    outputs: list["LossOutput"] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None
    skip_step: bool = False
    stop: bool = False
    record: list[str] = field(default_factory=list)


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


# ---------------------------------------------------------------------------------------------------------------
# Hooks for stable training: loss-weight schedules, router statistics, a NaN guard.

SCHEDULE_SHAPES = ("exponential", "linear", "cosine")
NAN_POLICIES = ("stop", "checkpoint")


@dataclass(frozen=True)
class Decay:
    """A coefficient that moves from ``start`` (step 0) to ``end`` over the first ``over`` fraction of a run,
    then stays at ``end``: ``Decay(1e-2, 1e-3)`` is the companion notes' z-loss schedule (0.01 early, 0.001
    late). ``shape``: ``"exponential"`` (geometric, constant ratio per step; needs ``start, end > 0``),
    ``"linear"`` or ``"cosine"``. Call it as ``decay(step, steps)``."""

    start: float
    end: float
    shape: str = "exponential"
    over: float = 1.0

    def __post_init__(self) -> None:
        check_choice("shape", self.shape, SCHEDULE_SHAPES)
        positive = self.shape == "exponential"  # a geometric schedule needs start, end > 0
        check_number("start", self.start, 0, low_open=positive)
        check_number("end", self.end, 0, low_open=positive)
        check_number("over", self.over, 0, 1, low_open=True)  # a fraction of the run

    def __call__(self, step: int, steps: int) -> float:
        check_int("steps", steps, 1)
        check_int("step", step, 0)  # past the run: the end value
        span = max(1.0, self.over * (steps - 1))
        t = min(1.0, step / span)
        if self.shape == "exponential":
            return self.start * (self.end / self.start) ** t
        if self.shape == "cosine":
            t = 0.5 * (1 - math.cos(math.pi * t))
        return self.start + (self.end - self.start) * t


def _check_schedule(term: str, schedule: Callable) -> None:
    """A ``TypeError`` naming ``term`` unless ``schedule`` can be called as ``schedule(step, steps)``."""
    try:
        signature = inspect.signature(schedule)
    except (TypeError, ValueError):  # a builtin without a signature: it is checked when called
        return
    try:
        signature.bind(0, 1)
    except TypeError as err:
        name = getattr(schedule, "__name__", type(schedule).__name__)
        raise TypeError(f"{term} must be a number or a schedule called as {term}(step, steps) -> coefficient (e.g. "
                        f"Decay(1e-2, 1e-3)), got {name}{signature}: {err}") from None


class LossWeightSchedule(TrainHook):
    """Sets auxiliary-loss coefficients on a schedule: ``LossWeightSchedule(z=Decay(1e-2, 1e-3))``.

    Each keyword names a term of ``model.loss_weights`` (``aux``, ``z``, ``seq_aux``, ``device_aux``,
    ``comm_aux``, ...) and gives ``schedule(step, steps) -> coefficient`` (e.g. a :class:`Decay`) or a constant. At
    the start of every step the term's weight is set and logged as ``history.extra["<term>_coef"]``; the term itself
    is recorded every step in ``history.terms``. The model keeps the last value after training.
    """

    def __init__(self, **schedules: Callable[[int, int], float] | float):
        if not schedules:
            raise ValueError("LossWeightSchedule needs at least one term, e.g. LossWeightSchedule(z=Decay(1e-2, 1e-3))")
        for term, schedule in schedules.items():
            if callable(schedule):
                _check_schedule(term, schedule)
            else:
                check_number(term, schedule, 0)
        self.schedules = schedules

    def on_train_start(self, state: TrainState) -> None:
        weights = getattr(state.model, "loss_weights", None)
        if not isinstance(weights, dict):
            raise ValueError("LossWeightSchedule needs a model with a loss_weights dict (moe_lab.MoETransformer)")
        unknown = sorted(set(self.schedules) - set(weights))
        if unknown:
            raise ValueError(f"LossWeightSchedule terms must be among {tuple(weights)}, got {unknown}")
        state.record.extend(term for term in self.schedules if term not in state.record)

    def on_step_start(self, state: TrainState) -> None:
        for term, schedule in self.schedules.items():
            value = float(schedule(state.step, state.steps)) if callable(schedule) else float(schedule)
            check_number(f"the {term} coefficient at step {state.step}", value, 0)
            state.model.loss_weights[term] = value
            state.history.log(f"{term}_coef", value)


def _logit_tensors(output: Any) -> list[torch.Tensor]:
    """The logits a router returned (a tensor, or every tensor of a noisy router's ``NoisyLogits``)."""
    return [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]


def grad_total_norm(model: nn.Module) -> torch.Tensor:
    """The 2-norm of all of ``model``'s gradients together (0 without gradients), as gradient clipping sees it."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class RouterMonitor(TrainHook):
    """Logs, after every step, what the stability notebook plots (``history.extra``):

    ``router_lse``: ``[n_moe_layers]`` mean over tokens of ``logsumexp`` of the router logits (what the z-loss
    squares), ``router_max_logit``: ``[n_moe_layers]`` largest ``|logit|``, ``grad_norm``: the total gradient norm
    before clipping (float), and with ``flips_dtype`` (e.g. ``torch.bfloat16``) ``router_flips``:
    ``[n_moe_layers]`` fraction of this step's tokens whose top-k experts would change if the router ran in that
    dtype (:func:`moe_lab.stability.routing_flips` on the real router inputs of the first micro-batch).
    """

    def __init__(self, flips_dtype: torch.dtype | None = None):
        if flips_dtype is not None and flips_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"flips_dtype must be None, torch.bfloat16 or torch.float16, got {flips_dtype!r}")
        self.flips_dtype = flips_dtype
        self._handles: list = []
        self._flips: dict[str, float] = {}

    def on_train_start(self, state: TrainState) -> None:
        if self.flips_dtype is None:
            return
        from .stability import routing_flips

        def record(name: str, k: int):
            def hook(router: nn.Module, args: tuple, output: Any) -> None:
                if router.training and name not in self._flips:
                    self._flips[name] = routing_flips(args[0], router.weight, k, self.flips_dtype).flip_rate
            return hook

        for name, layer in named_moe_layers(state.model).items():
            self._handles.append(layer.router.register_forward_hook(record(name, layer.k)))

    def on_step_start(self, state: TrainState) -> None:
        self._flips = {}

    def before_optimizer_step(self, state: TrainState) -> None:
        norm = state.grad_norm if state.grad_norm is not None else grad_total_norm(state.model)
        state.history.log("grad_norm", float(norm))

    def after_optimizer_step(self, state: TrainState) -> None:
        infos = [out.infos for out in state.outputs]
        if not infos or not infos[0]:
            return
        per_layer = list(zip(*infos))  # [n_layers][micro-batches]
        with torch.no_grad():
            lse = [sum(float(i.logits.float().logsumexp(-1).mean()) for i in layer) / len(layer) for layer in per_layer]
            top = [max(float(i.logits.detach().abs().max()) for i in layer) for layer in per_layer]
        state.history.log("router_lse", torch.tensor(lse))
        state.history.log("router_max_logit", torch.tensor(top))
        if self.flips_dtype is not None:
            state.history.log("router_flips", torch.tensor(list(self._flips.values())))

    def on_train_end(self, state: TrainState) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class NonFiniteError(FloatingPointError):
    """Raised by :class:`NaNGuard`: ``quantity`` (``"loss"``, ``"router logits"`` or ``"gradient norm"``) was
    NaN or infinite at optimiser step ``step``; ``checkpoint``: where the state was saved (None if not)."""

    def __init__(self, message: str, *, quantity: str, step: int, checkpoint: str | None = None):
        super().__init__(message)
        self.quantity, self.step, self.checkpoint = quantity, step, checkpoint


def first_nonfinite(router_logits: Sequence[torch.Tensor], loss: torch.Tensor,
                    grad_norm: torch.Tensor | None) -> str | None:
    """Which quantity of a training step is NaN or infinite, checked in the order the step computes them (the
    first bad one is closest to the cause): ``"router logits"`` (any of the layers' tensors), ``"loss"``,
    ``"gradient norm"`` (skipped when None); None if all are finite. Each check reads a value on the host (on a
    GPU, a sync)."""
    if any(not bool(torch.isfinite(t).all()) for t in router_logits):
        return "router logits"
    if not bool(torch.isfinite(loss).all()):
        return "loss"
    if grad_norm is not None and not bool(torch.isfinite(grad_norm).all()):
        return "gradient norm"
    return None


class NaNGuard(TrainHook):
    """Stops training at the first non-finite loss, router logits or gradient norm, before the optimizer
    applies anything, with a :class:`NonFiniteError` naming the step and the quantity.

    ``policy="stop"`` only raises; ``policy="checkpoint"`` first saves ``{"step", "quantity", "message",
    "model", "optimizer"}`` (the state dicts: the weights before this step's update) to ``path`` with
    ``torch.save`` (loadable with ``weights_only=True``). Router logits are checked as each router returns them
    (forward hooks on every :class:`moe_lab.MoELayer`'s router): at once on CPU, where the layer would
    otherwise stop with a ``ValueError``; on CUDA as one ``|logit|`` maximum per layer read with the loss in
    ``before_optimizer_step``. The loss and the gradient norm are checked there too (the norm is computed
    when clipping is off).
    """

    def __init__(self, policy: str = "stop", path: str | os.PathLike | None = None):
        check_choice("policy", policy, NAN_POLICIES)
        if (policy == "checkpoint") != (path is not None):
            raise ValueError(f"path is required with policy='checkpoint' and only then, got policy={policy!r}, "
                             f"path={path!r}")
        if path is not None:
            check_type("path", path, (str, os.PathLike), "a file path (str or os.PathLike)")
            folder = os.path.dirname(os.path.abspath(os.fspath(path)))
            if not os.path.isdir(folder):
                raise ValueError(f"path {os.fspath(path)!r}: its folder {folder!r} does not exist (create it first; "
                                 "the checkpoint is written only when training fails)")
        self.policy, self.path = policy, None if path is None else os.fspath(path)
        self._handles: list = []
        self._maxima: dict[str, torch.Tensor] = {}
        self._state: TrainState | None = None

    def on_train_start(self, state: TrainState) -> None:
        self._state = state
        for name, layer in named_moe_layers(state.model).items():
            self._handles.append(layer.router.register_forward_hook(self._router_hook(name)))

    def _router_hook(self, name: str):
        def hook(router: nn.Module, args: tuple, output: Any) -> None:
            if self._state is None:  # training has ended or failed
                return
            for logits in _logit_tensors(output):
                top = logits.detach().abs().amax() if logits.numel() else logits.new_zeros(())
                if logits.device.type == "cpu":
                    if not bool(torch.isfinite(top)):
                        bad = int((~torch.isfinite(logits)).sum())
                        self._fail("router logits", f"{bad} of {logits.numel()} router logits of MoE layer "
                                                    f"'{name}' are NaN or infinite")
                else:
                    self._maxima[name] = top if name not in self._maxima else torch.maximum(self._maxima[name], top)
        return hook

    def on_step_start(self, state: TrainState) -> None:
        self._maxima = {}

    def before_optimizer_step(self, state: TrainState) -> None:
        loss = torch.stack([out.total.detach() for out in state.outputs])
        norm = state.grad_norm if state.grad_norm is not None else grad_total_norm(state.model)
        quantity = first_nonfinite(list(self._maxima.values()), loss, norm)
        if quantity == "router logits":
            bad = [name for name, top in self._maxima.items() if not bool(torch.isfinite(top))]
            self._fail(quantity, f"router logits of MoE layer(s) {bad} are NaN or infinite")
        elif quantity == "loss":
            self._fail(quantity, f"the loss is {loss.tolist()} (per micro-batch)")
        elif quantity == "gradient norm":
            self._fail(quantity, f"the gradient norm is {float(norm)}")

    def _fail(self, quantity: str, detail: str) -> None:
        state = self._state
        self._release()
        message = f"non-finite {quantity} at step {state.step}: {detail}"
        saved, failure = None, None
        if self.policy == "checkpoint":
            try:
                torch.save({"step": state.step, "quantity": quantity, "message": message,
                            "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}, self.path)
                saved = self.path
                message += f"; checkpoint of the weights before this step saved to {self.path}"
            except Exception as err:  # the failure that matters is the non-finite value: report both
                failure = err
                message += f"; saving the checkpoint to {self.path} failed ({type(err).__name__}: {err})"
        raise NonFiniteError(message + " (try a lower learning rate, gradient clipping, the z-loss or a float32 "
                             "router)", quantity=quantity, step=state.step, checkpoint=saved) from failure

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._state = [], None

    def on_train_end(self, state: TrainState) -> None:
        self._release()
