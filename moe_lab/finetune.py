"""Fine-tuning helpers: parameter groups of an MoE model, freezing by group, and changing the MoE layers'
options (expert dropout, training / eval capacity factor) of a built model, and the constant learning rate that
continued training and fine-tuning use (ST-MoE fine-tunes at a constant rate).

Groups (ST-MoE, Zoph et al. 2022, fine-tune all parameters, only the non-MoE ones, or only the MoE ones):

- ``moe``: every parameter inside an :class:`moe_lab.MoELayer`: routed experts, router, shared experts;
- ``router``: the routers' parameters (a subset of ``moe``);
- ``non_moe``: everything else: embeddings, attention, norms, the dense FFNs, the output head.

:func:`set_trainable` freezes by group through ``requires_grad``; :func:`moe_lab.train.train`'s AdamW skips
parameters without a gradient, so a frozen tensor stays bit-identical (weight decay included).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields, replace

from torch import nn

from .config import STRUCTURAL, MoEConfig, MoEOptions
from .hooks import TrainHook, TrainState
from .layer import moe_layers, named_moe_layers
from .validation import check_bool, check_int, check_number, check_type

GROUPS = ("moe", "non_moe", "router")
"""Parameter group names (:func:`parameter_groups`); :func:`set_trainable` also accepts ``"all"``."""


def parameter_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """``{group: {parameter name: parameter}}`` for the :data:`GROUPS` (names as in ``model.named_parameters()``,
    in that order; ``router`` is a subset of ``moe``; ``moe`` and ``non_moe`` partition the parameters)."""
    check_type("model", model, nn.Module, "a torch.nn.Module (e.g. a moe_lab.MoETransformer)")
    moe_prefixes = tuple(f"{name}." for name in named_moe_layers(model))
    router_prefixes = tuple(f"{prefix}router." for prefix in moe_prefixes)
    groups: dict[str, dict[str, nn.Parameter]] = {name: {} for name in GROUPS}
    for name, p in model.named_parameters():
        groups["moe" if name.startswith(moe_prefixes) else "non_moe"][name] = p
        if name.startswith(router_prefixes):
            groups["router"][name] = p
    return groups


def _group_names(groups: str | Iterable[str]) -> list[str]:
    allowed = ("all", *GROUPS)
    if not isinstance(groups, (str, Iterable)):
        raise TypeError(f"groups must be a group name or names among {allowed}, got {type(groups).__name__}")
    names = [groups] if isinstance(groups, str) else list(groups)
    bad = [g for g in names if not isinstance(g, str) or g not in allowed]
    if bad or not names:
        raise ValueError(f"groups must name at least one of {allowed}, got {groups!r}")
    return list(GROUPS) if "all" in names else names


def set_trainable(model: nn.Module, groups: str | Iterable[str]) -> int:
    """Train only the parameters in ``groups`` (a name or names from ``("all", "moe", "non_moe", "router")``):
    set ``requires_grad`` True for them and False for every other parameter. Returns how many parameter
    elements are trainable now (e.g. ``set_trainable(model, "non_moe")``: ST-MoE's recommended recipe)."""
    names = _group_names(groups)
    chosen = parameter_groups(model)
    train = {id(p) for g in names for p in chosen[g].values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in train)
    return count_parameters(model, trainable=True)


def count_parameters(model: nn.Module, *, trainable: bool = False) -> int:
    """Number of parameter elements of ``model`` (only those with ``requires_grad`` when ``trainable``)."""
    check_type("model", model, nn.Module, "a torch.nn.Module")
    check_bool("trainable", trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def configure_moe(model: nn.Module, **changes) -> None:
    """Change options of every MoE layer of a built model in place, e.g. ``configure_moe(model,
    expert_dropout=0.2)`` or ``configure_moe(model, capacity_factor=1.25, eval_capacity_factor=None)``
    (:meth:`moe_lab.MoELayer.configure`: validated, weights untouched; ``k`` too, as there). ``model.cfg`` (if the
    model has one) is updated to match. Options that add or remove weights (:data:`moe_lab.config.STRUCTURAL`)
    are rejected."""
    allowed = sorted({f.name for f in fields(MoEConfig)} - set(STRUCTURAL))
    structural = sorted(set(changes) & set(STRUCTURAL))
    if structural:
        raise ValueError(f"{', '.join(structural)} cannot be changed on a built model (they decide its weights); "
                         "build a new model instead")
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} cannot be changed by configure_moe, which changes the MoE layers' "
                         f"options {', '.join(allowed)} (loss coefficients: model.loss_weights)")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model has no MoE layers to configure (got a {type(model).__name__} without MoELayer)")
    cfg = getattr(model, "cfg", None)
    new_cfg = replace(cfg, **changes) if isinstance(cfg, MoEOptions) else None  # validates before any change
    for layer in layers:
        layer.configure(**changes)
    if new_cfg is not None:
        model.cfg = new_cfg


class ConstantLR(TrainHook):
    """A :class:`moe_lab.hooks.TrainHook` that replaces :func:`moe_lab.train.train`'s cosine decay by a constant
    learning rate ``lr`` after ``warmup`` steps of linear warm-up (``lr * (step + 1) / warmup``), so that a run
    read at any step is at the same point of its schedule (pass ``hooks=[ConstantLR(lr)]``; the ``lr`` given
    to ``train`` is then ignored)."""

    def __init__(self, lr: float, warmup: int = 0):
        check_number("lr", lr, 0, low_open=True)
        check_int("warmup", warmup, 0)
        self.lr, self.warmup = float(lr), int(warmup)

    def on_step_start(self, state: TrainState) -> None:
        state.lr = self.lr * min(1.0, (state.step + 1) / self.warmup) if self.warmup else self.lr
        for group in state.optimizer.param_groups:
            group["lr"] = state.lr
