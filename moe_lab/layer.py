"""``MoELayer``: router -> gating -> (capacity) -> dispatch to experts -> combine, plus always-on shared experts.
Its options live in a validated :class:`moe_lab.config.MoEConfig`; what it decided, in a :class:`RoutingInfo`, from
which the auxiliary losses (:data:`moe_lab.losses.AUX_LOSSES`) are computed when asked for."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from .config import STRUCTURAL, MoEConfig, MoEOptions, check_option_names
from .dispatch import capacity_mask, expert_capacity, run_dispatch
from .experts import FFN, Experts
from .losses import AUX_LOSSES
from .metrics import _tokens_per_expert, drop_rate
from .routing import (NoisyTopKRouter, Router, _sigmoid_topk, _softmax_topk, check_finite_logits,
                      multiplicative_jitter, normalized_scores)
from .validation import all_finite, check_finite, check_tensor, check_type, reads_values


@dataclass(eq=False)
class RoutingInfo:
    """What the router decided for one forward pass (``T`` tokens, ``E`` experts, ``k`` per token).

    logits: ``[T, E]`` logits the gating used (noisy in training with ``router="noisy_topk"``), in the
        router dtype (float32 by default).
    scores: ``[T, E]`` gating scores: the softmax probabilities, or DeepSeek-V3's unbiased ``sigmoid(logits)``.
    experts: ``[T, k]`` selected experts (selected with the selection bias, if any).  gates: ``[T, k]`` their
        weights (from the unbiased scores, times ``routed_scaling_factor``).
    tokens_per_expert: ``[E]`` token-slots routed to each expert (before capacity dropping).
    keep: ``[T, k]`` bool, the slots that fit into the expert capacity (None when dropless).
    capacity: slots per expert (None when dropless).
    batch_shape: the leading shape of ``x`` (``x.shape[:-1]``), to view ``[T, ...]`` fields per sequence.
    config: the layer's :class:`moe_lab.config.MoEConfig` when it routed.
    clean_logits, noise_std: ``[T, E]`` ``x W_g`` and ``softplus(x W_noise)`` (noisy router only, else None).

    Computed when first read (and then kept): ``probs`` (``[T, E]`` the scores normalised over all experts, the
    ``P_i`` of every balance loss), ``dropped`` (``[T, k]`` bool, all False when dropless), ``drop_rate`` (fraction
    of slots dropped; reads a value, a sync on a GPU), and the auxiliary losses of :data:`moe_lab.losses.AUX_LOSSES`:
    ``info.loss("aux")`` or ``info.aux_loss`` (Switch, unweighted, 1 when uniform), ``z_loss``, ``seq_aux_loss``
    (DeepSeek-V3's sequence-wise loss over the sequences of ``x``: ``[B, L, d]`` has B sequences, ``[T, d]`` one),
    ``device_aux_loss``, ``comm_aux_loss`` (DeepSeek-V2's, with the ``n_groups`` groups as devices and
    ``M = topk_groups``), ``importance_loss`` (Shazeer's ``CV(sum_t G(x_t))^2``) and ``load_loss`` (Shazeer's smooth
    ``CV(Load)^2``; None without the noisy router).
    """

    logits: torch.Tensor
    scores: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor
    tokens_per_expert: torch.Tensor
    keep: torch.Tensor | None
    capacity: int | None
    batch_shape: tuple[int, ...]
    config: MoEConfig
    clean_logits: torch.Tensor | None = None
    noise_std: torch.Tensor | None = None
    computed: dict = field(default_factory=dict, repr=False)
    """What was computed so far (``probs`` and losses by name); pre-filled where a layer knows them (e.g. zeros)."""

    @property
    def probs(self) -> torch.Tensor:
        if "probs" not in self.computed:
            softmax = self.config.score_func == "softmax"
            self.computed["probs"] = self.scores if softmax else normalized_scores(self.scores)
        return self.computed["probs"]

    @property
    def dropped(self) -> torch.Tensor:
        return torch.zeros_like(self.experts, dtype=torch.bool) if self.keep is None else ~self.keep

    @property
    def drop_rate(self) -> float:
        return 0.0 if self.keep is None else drop_rate(self.dropped)  # no GPU sync when dropless

    def loss(self, name: str) -> torch.Tensor | None:
        """The unweighted auxiliary loss ``name`` (a key of :data:`moe_lab.losses.AUX_LOSSES`), computed once."""
        if name not in self.computed:
            if name not in AUX_LOSSES:
                raise ValueError(f"name must be one of {tuple(AUX_LOSSES)} (moe_lab.losses.AUX_LOSSES), got {name!r}")
            self.computed[name] = AUX_LOSSES[name].compute(self)
        return self.computed[name]

    def __getattr__(self, attr: str):
        # ``info.aux_loss`` etc.: the registry's terms as attributes (only called when normal lookup fails)
        if attr.endswith("_loss") and attr[: -len("_loss")] in AUX_LOSSES and "computed" in self.__dict__:
            return self.loss(attr[: -len("_loss")])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")


def _option(name: str, settable: bool = True) -> property:
    """A layer attribute that reads ``layer.config.<name>`` and, if settable, changes it via ``configure``."""

    def get(self: "MoELayer"):
        return getattr(self.config, name)

    def set_(self: "MoELayer", value) -> None:
        self.configure(**{name: value})

    return property(get, set_ if settable else None, doc=f"``config.{name}``")


class MoELayer(nn.Module):
    """A token-choice Mixture-of-Experts FFN layer, from Mixtral's block to a DeepSeek-V3 MoE block.

    ``MoELayer(d_model, d_ff, num_experts, k, **options)`` with ``d_ff`` the width of each routed expert and
    ``options`` any :class:`moe_lab.config.MoEOptions` field (gating and score function, selection bias and its
    update rate, group-limited routing, routed scaling, shared experts, router dtype, jitter, capacity factor
    in training and eval, drop policy, dispatch, expert dropout); or ``MoELayer.from_config(config)``.
    The validated config is ``layer.config``; change options that do not add or remove weights with
    :meth:`configure` (or by setting ``layer.capacity_factor`` etc.).

    ``forward(x)`` takes ``x: [..., d_model]`` (``[B, L, d_model]`` keeps the sequences for the sequence-wise
    loss) and returns ``(y, info)`` with ``y`` shaped like ``x``: the gate-weighted routed experts plus the
    ``n_shared`` shared experts (one FFN of width ``n_shared * d_shared``, which equals the sum of the
    ``n_shared`` experts), and ``info`` a :class:`RoutingInfo` over the flattened ``T`` tokens. Dropped slots
    add exactly zero to ``y``: wrap the layer in a residual connection so dropped tokens pass through.

    Buffers: with ``selection_bias``, ``expert_bias: [E]`` float32 (saved in ``state_dict``; ``.to(dtype)``
    and ``.half()`` move it but keep it float32; autocast never touches it) and ``load_counts: [E]`` int64
    (not saved), the token-slots routed per expert by training forward passes with gradients enabled since
    the last bias update (all micro-batches of a step; an activation-checkpointed layer, whose forward runs
    twice, counts twice). :class:`moe_lab.bias_balancing.BiasBalancer` reads and resets it after each
    optimiser step. Without ``selection_bias`` both are None.
    """

    d_model = _option("d_model", settable=False)
    num_experts = _option("num_experts", settable=False)
    router_type = _option("router", settable=False)
    k = _option("k")
    softmax_order = _option("softmax_order")
    renormalize = _option("renormalize")
    dispatch = _option("dispatch")
    jitter_eps = _option("jitter_eps")
    capacity_factor = _option("capacity_factor")
    drop_policy = _option("drop_policy")

    def __init__(self, d_model: int, d_ff: int, num_experts: int, k: int = 2, **options):
        super().__init__()
        check_option_names(options)
        self.config = c = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, k=k, **options)
        self.router = Router(d_model, num_experts) if c.router == "softmax" else NoisyTopKRouter(d_model, num_experts)
        self.experts = Experts(self._num_local_experts(num_experts), d_model, d_ff, c.activation,
                               dropout=c.expert_dropout)
        self.shared = FFN(d_model, c.n_shared * c.d_shared_each, c.activation) if c.n_shared else None
        bias = torch.zeros(num_experts, dtype=torch.float32) if c.selection_bias else None
        self.register_buffer("expert_bias", bias)
        self.register_buffer("load_counts", None if bias is None else torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)

    @classmethod
    def from_config(cls, config: MoEConfig, **extra) -> "MoELayer":
        """The layer described by ``config`` (``extra``: constructor arguments of a subclass, e.g. ``group``)."""
        if not isinstance(config, MoEConfig):
            raise ValueError(f"config must be a moe_lab.config.MoEConfig, got {type(config).__name__}")
        return cls(config.d_model, config.d_ff, config.num_experts, config.k, **config.options(), **extra)

    def configure(self, **changes) -> None:
        """Change options in place, validated (e.g. ``layer.configure(eval_capacity_factor=2.0, k=3)``).
        Options that decide the layer's weights and buffers (:data:`moe_lab.config.STRUCTURAL`) cannot change:
        build a new layer for those."""
        check_option_names(changes, tuple(f.name for f in fields(MoEConfig)))
        fixed = sorted(set(changes) & set(STRUCTURAL))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change on a built layer (they decide its weights); "
                             "build a new MoELayer instead")
        self.config = replace(self.config, **changes)
        self.experts.dropout = self.config.expert_dropout

    @property
    def current_capacity_factor(self) -> float | None:
        """The capacity factor in force: ``capacity_factor`` in training, ``eval_capacity_factor`` in eval."""
        return self.config.capacity_factor if self.training else self.config.capacity_factor_eval

    def _num_local_experts(self, num_experts: int) -> int:
        """How many experts this process holds (all; expert parallelism holds a shard)."""
        return num_experts

    def _apply(self, fn, recurse: bool = True):
        # ``.to(dtype)`` / ``.half()`` cast floating buffers; the selection bias must stay float32 (in bf16 its
        # small updates round away, Megatron-LM #1482), so it only follows the device.
        bias = self.expert_bias
        out = super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self._buffers["expert_bias"] = bias.to(self.expert_bias.device)
        return out

    def _capacity_keep(self, experts: torch.Tensor, chosen_probs: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Capacity and ``keep: [T, k]`` for this batch; ``chosen_probs: [T, k]`` ranks slots for the policy."""
        capacity = expert_capacity(experts.shape[0], self.num_experts, self.current_capacity_factor, self.k)
        return capacity, capacity_mask(experts, self.num_experts, capacity, chosen_probs, self.drop_policy)

    def _run_experts(self, tokens: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor,
                     keep: torch.Tensor | None, capacity: int | None) -> torch.Tensor:
        """Dispatch the kept slots, run the experts, combine: ``[T, d_model]``."""
        return run_dispatch(self.dispatch, tokens, experts, gates, self.experts, keep, capacity)

    def _gate(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[T, E]`` logits in the router dtype -> ``(scores, gates, experts)`` (see :class:`RoutingInfo`); the
        options were validated by the config, so the gating runs without re-checking them."""
        c = self.config
        groups = (c.n_groups, c.topk_groups, c.group_score, c.routed_scaling_factor)
        if c.score_func == "softmax":
            return _softmax_topk(logits, c.k, c.softmax_order, c.renormalize, self.expert_bias, *groups)
        return _sigmoid_topk(logits, c.k, self.expert_bias, c.renormalize, *groups)

    def _check_input_values(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Raise unless ``tokens`` are finite and small enough for finite router logits, and the router itself is
        finite (where :func:`reads_values` allows). One reduction over the logits when all is well: a non-finite
        input always makes its logits non-finite."""
        if not reads_values(logits) or all_finite(logits):
            return
        check_finite("x", tokens)
        if all_finite(self.router.weight):
            raise ValueError(f"x is too large: |x| up to {float(tokens.detach().abs().max()):.3g} overflows the router "
                             f"logits in {logits.dtype} (largest finite value {torch.finfo(logits.dtype).max:.3g}); "
                             "normalise x")
        check_finite_logits(logits)

    def _check_output(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Raise where a finite ``x`` gave a NaN or infinite output (checked where :func:`reads_values` allows)."""
        if reads_values(y) and not all_finite(y):
            raise ValueError(
                f"the layer's output has {int((~torch.isfinite(y.detach())).sum())} non-finite value(s) for a finite x "
                f"(|x| up to {float(x.detach().abs().max()):.3g}): the expert FFNs overflowed {y.dtype} (largest "
                f"finite value {torch.finfo(y.dtype).max:.3g}); normalise x, or check the expert weights for NaN")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        c = self.config
        check_tensor("x", x, f"[..., d_model={c.d_model}]", kind=None)
        if x.dim() == 0 or x.shape[-1] != c.d_model:
            raise ValueError(f"x must have last dimension d_model={c.d_model}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"x must contain at least one token, got shape {tuple(x.shape)}")
        if x.device != self.router.weight.device:
            raise ValueError(f"x must be on the layer's device {self.router.weight.device}, got x on {x.device}")
        tokens = x.reshape(-1, c.d_model)
        router_in = multiplicative_jitter(tokens, c.jitter_eps) if self.training else tokens
        clean = noise_std = None
        if c.router == "noisy_topk":
            clean, noise_std, logits = self.router(router_in)
        else:
            logits = self.router(router_in, c.router_dtype)
        self._check_input_values(tokens, logits)  # after the router, so a router hook sees its output first
        scores, gates, experts = self._gate(logits)
        counts = _tokens_per_expert(experts, c.num_experts)
        if self.load_counts is not None and self.training and torch.is_grad_enabled():
            self.load_counts += counts
        capacity = keep = None
        if self.current_capacity_factor is not None:
            capacity, keep = self._capacity_keep(experts, scores.gather(1, experts))
        y = self._run_experts(tokens, experts, gates, keep, capacity)
        if self.shared is not None:
            y = y + self.shared(tokens)
        self._check_output(x, y)
        info = RoutingInfo(logits=logits, scores=scores, experts=experts, gates=gates, tokens_per_expert=counts,
                           keep=keep, capacity=capacity, batch_shape=tuple(x.shape[:-1]), config=c,
                           clean_logits=clean, noise_std=noise_std)
        return y.reshape(*x.shape[:-1], c.d_model), info

    def extra_repr(self) -> str:
        c, default = self.config, MoEOptions()
        text = (f"k={c.k}, softmax_order={c.softmax_order!r}, renormalize={c.renormalize}, "
                f"dispatch={c.dispatch!r}, router={c.router!r}")
        shown = {"softmax_order", "renormalize", "dispatch", "router", "activation"}  # activation: see experts
        for f in fields(MoEOptions):
            value = getattr(c, f.name)
            if f.name not in shown and value != getattr(default, f.name):
                text += f", {f.name}={value!r}"
        return text


def named_moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """``{module name: layer}`` of every :class:`MoELayer` in ``model``, in registration (forward) order."""
    check_type("model", model, nn.Module, "a torch.nn.Module (e.g. a moe_lab.MoETransformer)")
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The :class:`MoELayer` modules of ``model``, in registration (forward) order."""
    return list(named_moe_layers(model).values())
