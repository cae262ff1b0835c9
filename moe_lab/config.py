"""The validated configuration of an MoE layer: :class:`MoEOptions` (how it routes, balances and computes) and
:class:`MoEConfig` (those options plus the layer's sizes), and the fine-grained segmentation helper.

A preset is data: ``MoELayer.from_config(MoEConfig(d_model=64, d_ff=32, num_experts=32, k=7, score_func="sigmoid",
...))``; the common case stays one line, ``MoELayer(d_model, d_ff, num_experts, k)``. Every bad value raises a
``ValueError`` that names the option and the allowed values when the config is built, not in the forward pass.
:class:`moe_lab.model.ModelConfig` inherits :class:`MoEOptions`, so a model preset carries the same fields.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch

from .dispatch import DISPATCH, DROP_POLICIES
from .experts import ACTIVATIONS
from .routing import GROUP_SCORES, SCORE_FUNCS, SOFTMAX_ORDERS, check_group_limits, check_k
from .validation import check_bool, check_choice, check_int, is_number

ROUTERS = ("softmax", "noisy_topk")
ROUTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAME = "same"
"""``eval_capacity_factor`` default: evaluate with the training ``capacity_factor``."""

STRUCTURAL = ("d_model", "d_ff", "num_experts", "activation", "router", "n_shared", "d_shared", "selection_bias")
"""Options that decide which parameters and buffers a layer has (:meth:`moe_lab.MoELayer.configure` rejects them)."""


def _fraction(name: str, value: Any) -> None:
    if not is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must satisfy 0 <= {name} < 1, got {value!r}")


def _capacity(name: str, value: Any) -> None:
    if value is not None and (not is_number(value) or value <= 0):
        raise ValueError(f"{name} must be a finite number > 0 (or None for dropless), got {value!r}")


def router_dtype_of(value: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` / ``bfloat16`` / ``float16`` or their names -> the torch dtype; else ``ValueError``."""
    if isinstance(value, str) and value in ROUTER_DTYPES:
        return ROUTER_DTYPES[value]
    if value in ROUTER_DTYPES.values():
        return value
    raise ValueError(f"router_dtype must be one of {tuple(ROUTER_DTYPES)} (or the torch dtypes), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class MoEOptions:
    """How an MoE layer routes, balances and computes (everything but its sizes). All fields have defaults:
    softmax over all experts in float32, top-k, renormalise, SwiGLU, dropless: Mixtral's block.

    Experts and gating:
        activation: ``"swiglu"`` or ``"gelu"`` experts.
        score_func: ``"softmax"`` (Mixtral, DeepSeek v1/v2) or ``"sigmoid"`` (DeepSeek-V3: ``s = sigmoid(u)``).
        softmax_order: ``"before_topk"`` / ``"after_topk"`` (softmax only), see :func:`moe_lab.routing.softmax_topk`.
        renormalize: rescale the selected gates to sum to 1 (softmax before top-k: Mixtral yes, Switch and
            DeepSeek v1/v2 no; sigmoid: V3 yes, applied when k > 1).
        routed_scaling_factor: multiplies the routed gates (DeepSeek-V3: 2.5; ``route_scale`` in its code).
    Selection-only bias and aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3):
        selection_bias: the layer holds a float32 ``expert_bias`` buffer ``b`` (``[E]``, never a parameter)
            added to the scores for *selection* only; gate weights come from the unbiased scores.
        bias_update_rate: ``gamma`` of the update ``b_i += gamma * sign(mean load - load_i)`` after each
            optimiser step (:class:`moe_lab.bias_balancing.BiasBalancer`; V3: 1e-3). 0 keeps ``b`` fixed.
        bias_update_centered: subtract the mean update so ``b`` keeps mean 0 (torchtitan's variant).
    Group-limited routing (DeepSeek-V2 device-limited, V3 node-limited), see
    :func:`moe_lab.routing.group_limited_topk`:
        n_groups: contiguous expert groups (1 = unrestricted).  topk_groups: groups a token may use.
        group_score: ``"max"`` (V2) or ``"top2_sum"`` (V3) of each group's selection scores.
    Shared experts (DeepSeekMoE shared-expert isolation):
        n_shared: always-on experts added to every token's output.  d_shared: width of each (None = ``d_ff``).
    Router:
        router: ``"softmax"`` (a linear router) or ``"noisy_topk"`` (Shazeer et al. 2017; noise in training only).
        router_dtype: dtype of the router matmul and the gating math: ``torch.float32`` (default; whatever the
            autocast dtype), ``torch.bfloat16`` or ``torch.float16`` for precision experiments (names accepted).
            The selection bias stays float32.
        jitter_eps: Switch multiplicative jitter ``U(1-eps, 1+eps)`` on the router input in training (0 = off).
    Capacity and dispatch:
        capacity_factor: None (dropless) or > 0: each expert takes at most
            :func:`moe_lab.dispatch.expert_capacity` ``(T, E, capacity_factor, k)`` slots per forward pass.
        eval_capacity_factor: the capacity factor in eval mode: ``"same"`` (default: ``capacity_factor``),
            None (dropless at eval) or > 0 (ST-MoE raises it at eval).
        drop_policy: ``"position"`` (Switch), ``"probability"`` (highest gating score first) or
            ``"batch_priority"`` (V-MoE: tokens by top-1 score, all first choices before any second choice).
        dispatch: ``"sorted"`` (fast, default), ``"loop"`` (reference) or ``"onehot"`` (GShard einsum).
        expert_dropout: dropout probability on the routed experts' hidden activations, training only
            (Switch's "expert dropout"; 0 = off).
    """

    activation: str = "swiglu"
    score_func: str = "softmax"
    softmax_order: str = "before_topk"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    selection_bias: bool = False
    bias_update_rate: float = 0.0
    bias_update_centered: bool = False
    n_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    n_shared: int = 0
    d_shared: int | None = None
    router: str = "softmax"
    router_dtype: torch.dtype | str = torch.float32
    jitter_eps: float = 0.0
    capacity_factor: float | None = None
    eval_capacity_factor: float | str | None = SAME
    drop_policy: str = "position"
    dispatch: str = "sorted"
    expert_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("score_func", self.score_func, SCORE_FUNCS)
        check_choice("softmax_order", self.softmax_order, SOFTMAX_ORDERS)
        check_bool("renormalize", self.renormalize)
        if self.score_func == "sigmoid" and self.softmax_order != "before_topk":
            raise ValueError("softmax_order applies to score_func='softmax' only; leave it at 'before_topk' "
                             f"with score_func='sigmoid', got softmax_order={self.softmax_order!r}")
        if self.softmax_order == "after_topk" and not self.renormalize:
            raise ValueError("renormalize=False only applies to softmax_order='before_topk': a softmax after "
                             "top-k already sums to 1 over the selected experts")
        if not is_number(self.routed_scaling_factor) or self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor must be a finite number > 0, got {self.routed_scaling_factor!r}")
        check_bool("selection_bias", self.selection_bias)
        if not is_number(self.bias_update_rate) or self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate (gamma) must be a finite number >= 0, got {self.bias_update_rate!r}")
        if self.bias_update_rate and not self.selection_bias:
            raise ValueError(f"bias_update_rate={self.bias_update_rate} needs selection_bias=True (there is no bias "
                             "to update)")
        check_bool("bias_update_centered", self.bias_update_centered)
        check_int("n_groups", self.n_groups, 1)
        check_int("topk_groups", self.topk_groups, 1)
        if self.topk_groups > self.n_groups:
            raise ValueError(f"topk_groups must satisfy 1 <= topk_groups <= n_groups={self.n_groups}, "
                             f"got {self.topk_groups}")
        check_choice("group_score", self.group_score, GROUP_SCORES)
        check_int("n_shared", self.n_shared, 0)
        if self.d_shared is not None:
            check_int("d_shared", self.d_shared, 1)
        check_choice("router", self.router, ROUTERS)
        object.__setattr__(self, "router_dtype", router_dtype_of(self.router_dtype))
        if self.router == "noisy_topk" and (self.score_func != "softmax" or self.router_dtype != torch.float32):
            raise ValueError("router='noisy_topk' needs score_func='softmax' and router_dtype=float32, got "
                             f"score_func={self.score_func!r}, router_dtype={self.router_dtype}")
        _fraction("jitter_eps", self.jitter_eps)
        _capacity("capacity_factor", self.capacity_factor)
        if self.eval_capacity_factor != SAME:
            _capacity("eval_capacity_factor", self.eval_capacity_factor)
        check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice("dispatch", self.dispatch, tuple(DISPATCH))
        _fraction("expert_dropout", self.expert_dropout)

    def options(self) -> dict[str, Any]:
        """The :class:`MoEOptions` fields of this object as a dict (``MoELayer(d, d_ff, E, k, **opts.options())``)."""
        return {f.name: getattr(self, f.name) for f in fields(MoEOptions)}


def check_option_names(names, allowed: tuple[str, ...] | None = None) -> None:
    """Raise ``TypeError`` naming every entry of ``names`` that is not an option (default: a :class:`MoEOptions`
    field), with the allowed names."""
    allowed = tuple(f.name for f in fields(MoEOptions)) if allowed is None else allowed
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))}; the options are {', '.join(allowed)}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig(MoEOptions):
    """An MoE layer: ``d_model``, ``d_ff`` (width of each routed expert), ``num_experts`` (``E``) and ``k``
    (routed experts per token), plus every :class:`MoEOptions` field. Checks that need the sizes: ``1 <= k <= E``,
    ``n_groups`` divides ``E``, ``k`` fits into the ``topk_groups`` kept groups, ``"top2_sum"`` groups hold
    at least 2 experts."""

    d_model: int
    d_ff: int
    num_experts: int
    k: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("d_model", "d_ff", "num_experts"):
            check_int(name, getattr(self, name), 1)
        check_k(self.k, self.num_experts)
        check_group_limits(self.num_experts, self.k, self.n_groups, self.topk_groups, self.group_score)

    @property
    def d_shared_each(self) -> int:
        """Width of each shared expert (``d_shared``, default ``d_ff``)."""
        return self.d_ff if self.d_shared is None else self.d_shared

    @property
    def capacity_factor_eval(self) -> float | None:
        """The capacity factor used in eval mode (``eval_capacity_factor`` with ``"same"`` resolved)."""
        return self.capacity_factor if self.eval_capacity_factor == SAME else self.eval_capacity_factor

    def fine_grained(self, granularity: int) -> "MoEConfig":
        """This layer with every routed expert split into ``granularity`` narrower ones (:func:`fine_grained`);
        ``d_shared`` (when set) is divided too, so a shared expert keeps the new expert width ratio."""
        sizes = fine_grained(self.num_experts, self.k, self.d_ff, granularity)._asdict()
        if self.d_shared is not None:
            if self.d_shared % granularity:
                raise ValueError(f"d_shared={self.d_shared} must be divisible by granularity={granularity} (each "
                                 "shared expert is split like the routed ones)")
            sizes["d_shared"] = self.d_shared // granularity
        return replace(self, **sizes)


class FineGrained(NamedTuple):
    """Sizes of a fine-grained MoE layer: ``num_experts`` experts of width ``d_ff``, ``k`` per token."""

    num_experts: int
    k: int
    d_ff: int


def fine_grained(num_experts: int, k: int, d_ff: int, granularity: int) -> FineGrained:
    """DeepSeekMoE fine-grained expert segmentation (Dai et al. 2024, Sec. 3.1): split each of ``num_experts``
    experts of width ``d_ff`` into ``m = granularity`` experts of width ``d_ff / m`` and route to ``k * m`` of
    them, so total and active parameters (and FLOPs) stay the same while the number of possible expert
    combinations grows. Returns ``(num_experts * m, k * m, d_ff // m)``; ``d_ff`` must be divisible by ``m``.
    """
    check_int("granularity", granularity, 1)
    check_int("num_experts", num_experts, 1)
    check_int("d_ff", d_ff, 1)
    check_k(k, num_experts)
    if d_ff % granularity:
        raise ValueError(f"d_ff={d_ff} must be divisible by granularity={granularity} (each expert is split "
                         "into granularity experts of width d_ff / granularity)")
    return FineGrained(num_experts * granularity, k * granularity, d_ff // granularity)
