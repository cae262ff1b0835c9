"""Routing: turn router logits into (scores, top-k gates, selected experts).

Softmax gating (:func:`softmax_topk`: before / after top-k, renormalisation) and DeepSeek-V3's sigmoid gating
with a selection-only bias (:func:`sigmoid_topk`), both optionally group-limited (:func:`group_limited_topk`:
DeepSeek-V2 device-limited, V3 node-limited routing) and scaled (``routed_scaling_factor``).

Also the two classic sources of routing noise: Shazeer et al. 2017's noisy top-k (a learned, per-expert
Gaussian noise scale) and the Switch Transformer's multiplicative jitter on the router input. Both are
for training only: evaluation routing is deterministic.

Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token.
Router math runs in float32 by default, whatever the input dtype or autocast setting (``dtype`` / the
layer's ``router_dtype`` lowers it for precision experiments; a selection bias always stays float32).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from .validation import all_finite, check_bool, check_finite, check_int, check_number, check_tensor, is_int, reads_values

SoftmaxOrder = Literal["before_topk", "after_topk"]
SOFTMAX_ORDERS = ("before_topk", "after_topk")
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


def check_k(k: int, num_experts: int) -> None:
    """Raise ``ValueError`` unless ``1 <= k <= num_experts``."""
    check_int("num_experts", num_experts, 0)
    if not is_int(k) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an integer with 1 <= k <= num_experts={num_experts}, got k={k!r}")


def check_experts(experts: torch.Tensor, num_experts: int) -> None:
    """Raise ``ValueError`` unless ``experts`` is an integer (not bool) ``[T, k]`` tensor of ids in
    ``0 .. num_experts - 1`` (``TypeError`` if it is not a tensor).

    The range is checked where :func:`reads_values` allows (on CUDA an id out of range otherwise fails in the
    indexing kernel).
    """
    check_int("num_experts", num_experts, 1)
    if not isinstance(experts, torch.Tensor):
        raise TypeError(f"experts must be an integer tensor of shape [tokens, k], got {type(experts).__name__}")
    if experts.dim() != 2 or experts.is_floating_point() or experts.is_complex() or experts.dtype == torch.bool:
        raise ValueError(f"experts must be an integer (int64, not bool) tensor of shape [tokens, k], got "
                         f"{experts.dtype} of shape {tuple(experts.shape)}")
    if reads_values(experts) and experts.numel():
        low, high = (int(v) for v in torch.aminmax(experts))
        if low < 0 or high >= num_experts:
            raise ValueError(f"experts must hold expert ids in 0..{num_experts - 1} (num_experts={num_experts}), "
                             f"got ids from {low} to {high}")


def check_finite_logits(logits: torch.Tensor) -> None:
    """Raise ``ValueError`` if router logits contain NaN or +-inf (a sign of a diverging router).

    Checked where :func:`reads_values` allows, so a CUDA forward pass never waits for the GPU; there a diverged
    router shows up as a NaN loss (or, under anomaly detection, as this error).
    """
    if reads_values(logits) and not all_finite(logits):
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(
            f"router logits contain {bad} non-finite value(s) (NaN or inf): the router has diverged "
            "or its input is broken; check the learning rate, use the z-loss, keep the router in float32"
        )


def check_group_limits(num_experts: int, k: int, n_groups: int, topk_groups: int, group_score: str = "max") -> None:
    """Raise ``ValueError`` (naming the argument) unless group-limited top-k is well defined: ``n_groups``
    divides ``num_experts``, ``1 <= topk_groups <= n_groups``, ``group_score`` is known (``"top2_sum"`` needs
    groups of at least 2 experts) and ``k`` fits into the experts of the ``topk_groups`` kept groups."""
    for name, value in (("n_groups", n_groups), ("topk_groups", topk_groups)):
        check_int(name, value, 1)
    if num_experts % n_groups:
        raise ValueError(f"n_groups={n_groups} must divide num_experts={num_experts} (groups are contiguous and equal)")
    if topk_groups > n_groups:
        raise ValueError(f"topk_groups must satisfy 1 <= topk_groups <= n_groups={n_groups}, got {topk_groups}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    size = num_experts // n_groups
    if n_groups > 1 and group_score == "top2_sum" and size < 2:
        raise ValueError(f"group_score='top2_sum' needs groups of >= 2 experts, got num_experts={num_experts} "
                         f"in n_groups={n_groups}")
    if n_groups > 1 and k > topk_groups * size:
        raise ValueError(f"k={k} is larger than the {topk_groups * size} experts left after group masking "
                         f"(topk_groups={topk_groups} groups of {size} experts)")


def check_bias(bias: torch.Tensor | None, num_experts: int) -> None:
    """Raise ``ValueError`` unless ``bias`` is None or a finite floating-point ``[num_experts]`` tensor."""
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (num_experts,)
                             or not bias.is_floating_point()):
        shape = f"{bias.dtype} of shape {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be a floating-point tensor of shape [num_experts]=[{num_experts}], got {shape}")
    if bias is not None:
        check_finite("bias", bias)


def check_gating_dtype(dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``dtype`` (of the gating math) is a real floating-point torch dtype."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, torch.float16, "
                         f"torch.float64), got {dtype!r}")


def _router_math_input(logits: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Validate ``[T, E]`` logits and ``k``; return the logits in the gating dtype (float32 by default)."""
    check_tensor("logits", logits, "[tokens, num_experts]", 2)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [tokens, num_experts >= 1], got shape {tuple(logits.shape)}")
    check_k(k, logits.shape[-1])
    check_gating_dtype(dtype)
    check_finite_logits(logits)
    out = logits.to(dtype)
    if (out.dtype != logits.dtype and torch.finfo(logits.dtype).max > torch.finfo(dtype).max
            and reads_values(out) and not all_finite(out)):
        raise ValueError(f"router logits exceed the {dtype} range (|logit| <= {torch.finfo(dtype).max:.3g}) that "
                         f"the gating math runs in, got |logit| up to {float(logits.abs().max()):.3g}")
    return out


def _group_scores(sel: torch.Tensor, n_groups: int, group_score: str, log_space: bool) -> torch.Tensor:
    """``[T, n_groups]`` score of each contiguous group of ``sel: [T, E]``: its max, or the sum of its top-2
    (``log_space``: ``sel`` holds log-scores, so the sum is a ``logsumexp``)."""
    grouped = sel.view(sel.shape[0], n_groups, sel.shape[1] // n_groups)
    if group_score == "max":
        return grouped.amax(dim=-1)
    top2 = grouped.topk(2, dim=-1).values
    return top2.logsumexp(dim=-1) if log_space else top2.sum(dim=-1)


def _limited_topk(sel: torch.Tensor, k: int, n_groups: int, topk_groups: int, group_score: str,
                  group_sel: torch.Tensor | None = None, log_space: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``sel: [T, E]`` among the experts of each token's best ``topk_groups`` groups, the groups scored
    on ``group_sel`` (default ``sel``); the other experts are masked with ``-inf``."""
    if n_groups > 1 and topk_groups < n_groups:
        size = sel.shape[1] // n_groups
        scores = _group_scores(sel if group_sel is None else group_sel, n_groups, group_score, log_space)
        kept = scores.topk(topk_groups, dim=-1).indices  # [T, topk_groups]
        masked = torch.ones_like(scores, dtype=torch.bool).scatter(1, kept, False)  # [T, n_groups]
        grouped = sel.view(sel.shape[0], n_groups, size).masked_fill(masked.unsqueeze(-1), float("-inf"))
        sel = grouped.view_as(sel)
    values, experts = sel.topk(k, dim=-1)
    return values, experts


def group_limited_topk(scores: torch.Tensor, k: int, *, n_groups: int, topk_groups: int,
                       group_score: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k (DeepSeek-V2 device-limited routing, DeepSeek-V3 node-limited routing).

    The ``E`` experts form ``n_groups`` contiguous groups of ``E / n_groups`` (group ``g`` holds experts
    ``g * E/n_groups ... (g + 1) * E/n_groups - 1``: a device or a node). Each token scores every group
    (``"max"``: its largest score, V2; ``"top2_sum"``: the sum of its two largest scores, V3), keeps its best
    ``topk_groups`` groups and takes the top-k of the experts in those groups: the experts of the other groups
    are masked with ``-inf``, so they can never win (masking with 0 is a bug in published code: with a negative
    selection bias every kept score can be below 0). With softmax gating (V2) pass the probabilities.

    Args:
        scores: ``[T, E]`` float32 selection scores (a selection bias already added).
        k: experts per token, ``1 <= k <= topk_groups * E / n_groups``.
        n_groups: number of groups, dividing ``E``.  topk_groups: groups kept, ``1 <= topk_groups <= n_groups``.
        group_score: ``"max"`` or ``"top2_sum"``.
    Returns:
        ``(values [T, k], experts [T, k] int64)``: the selected scores and experts, largest first.
    """
    check_tensor("scores", scores, "[tokens, num_experts]", 2)
    check_k(k, scores.shape[-1])
    check_group_limits(scores.shape[-1], k, n_groups, topk_groups, group_score)
    check_finite("scores", scores)
    return _limited_topk(scores, k, n_groups, topk_groups, group_score)


def _normalize(gates: torch.Tensor) -> torch.Tensor:
    """Rescale ``[T, k]`` gates to sum to 1 per token (a zero sum stays finite)."""
    return gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)


def _scaled(gates: torch.Tensor, routed_scaling_factor: float) -> torch.Tensor:
    return gates if routed_scaling_factor == 1 else gates * routed_scaling_factor


def _selection(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Selection scores ``s + b`` in float32 (the bias never reaches the gates)."""
    return scores.float() + bias.float()


def _check_gating(logits: torch.Tensor, k: int, renormalize: bool, bias: torch.Tensor | None, n_groups: int,
                  topk_groups: int, group_score: str, routed_scaling_factor: float, dtype: torch.dtype
                  ) -> torch.Tensor:
    """The checks :func:`softmax_topk` and :func:`sigmoid_topk` share; returns the logits in ``dtype``."""
    check_bool("renormalize", renormalize)
    logits = _router_math_input(logits, k, dtype)
    check_group_limits(logits.shape[-1], k, n_groups, topk_groups, group_score)
    check_bias(bias, logits.shape[-1])
    check_number("routed_scaling_factor", routed_scaling_factor, 0, low_open=True)
    return logits


def softmax_topk(
    logits: torch.Tensor,
    k: int,
    *,
    softmax_order: SoftmaxOrder = "before_topk",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    routed_scaling_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax gating with top-k selection (Mixtral, Switch, DeepSeek v1/v2).

    Without a bias, experts are selected by their logits (the same order as the probabilities, which may
    underflow to 0 for far-behind experts); with ``bias``, by ``probs + bias`` (Wang et al. 2024 with softmax),
    and the gates still come from the unbiased probabilities / logits.

    Args:
        logits: ``[T, E]`` router logits (any float dtype; the math runs in ``dtype``).
        k: experts per token, ``1 <= k <= E``.
        softmax_order: ``"before_topk"``: softmax over all ``E`` experts, then keep the top k
            (Mixtral, DeepSeek v1/v2, Switch); ``"after_topk"``: keep the top-k logits, softmax over them.
        renormalize: with ``"before_topk"``, rescale the kept probabilities to sum to 1 (Mixtral: yes;
            Switch k=1 and DeepSeek v1/v2: no). Softmax after top-k always sums to 1, so it requires True.
        bias: optional ``[E]`` float32 selection-only bias.
        n_groups, topk_groups, group_score: group-limited selection (:func:`group_limited_topk`; V2:
            ``n_groups`` devices, ``topk_groups = M``); the default 1 group is unrestricted.
        routed_scaling_factor: multiplies the gates (DeepSeek's ``route_scale``; 1 = off).
        dtype: dtype of the gating math: float32 (default) or bfloat16 / float16 for precision experiments.

    Returns:
        probs: ``[T, E]`` softmax over all experts (what the Switch aux loss uses), in ``dtype``.
        gates: ``[T, k]`` weights of the selected experts, best first, in ``dtype``.
        experts: ``[T, k]`` int64 indices of the selected experts.
    """
    if softmax_order not in SOFTMAX_ORDERS:
        raise ValueError(f"softmax_order must be one of {SOFTMAX_ORDERS}, got {softmax_order!r}")
    logits = _check_gating(logits, k, renormalize, bias, n_groups, topk_groups, group_score, routed_scaling_factor,
                           dtype)
    if softmax_order == "after_topk" and not renormalize:
        raise ValueError(
            "renormalize=False only applies to softmax_order='before_topk': a softmax after top-k "
            "already sums to 1 over the selected experts"
        )
    return _softmax_topk(logits, k, softmax_order, renormalize, bias, n_groups, topk_groups, group_score,
                         routed_scaling_factor)


def _softmax_topk(logits: torch.Tensor, k: int, softmax_order: str, renormalize: bool, bias: torch.Tensor | None,
                  n_groups: int, topk_groups: int, group_score: str, routed_scaling_factor: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`softmax_topk` without its checks, on logits already in the gating dtype (the layer's path, after
    :class:`moe_lab.config.MoEConfig` validated the options)."""
    probs = logits.softmax(dim=-1)
    if bias is None:  # logits order experts like probs; groups' top-2 sums compare as logsumexp of logits
        _, experts = _limited_topk(logits, k, n_groups, topk_groups, group_score, log_space=True)
    else:
        _, experts = _limited_topk(_selection(probs, bias), k, n_groups, topk_groups, group_score)
    if softmax_order == "before_topk":
        gates = probs.gather(1, experts)
        if renormalize:
            gates = _normalize(gates)
    else:
        gates = logits.gather(1, experts).softmax(dim=-1)
    return probs, _scaled(gates, routed_scaling_factor), experts


def sigmoid_topk(
    logits: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
    n_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    routed_scaling_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
    renormalize_single: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 sigmoid gating with a selection-only bias.

    Scores ``s = sigmoid(logits)``; experts are *selected* by the top-k of ``s + bias`` (group-limited when
    ``n_groups > 1``); the gate of a selected expert is its *unbiased* ``s_i``, divided by the sum of the
    selected ``s`` when ``renormalize`` and ``k > 1`` (this course's convention: at ``k = 1`` the gate stays
    ``s_i``; ``renormalize_single=True`` gives the official V3 gate), times ``routed_scaling_factor`` (V3:
    2.5). So the bias decides which experts a token uses, never how much of an expert it takes: a token whose
    selected set is unchanged gets the same gates for any bias (with renormalisation a *different* set changes
    the denominator; without it an expert that stays selected keeps its gate exactly). Without a bias, experts
    are selected by their logits (the same order as ``s``, without sigmoid's saturation ties).

    Args:
        logits: ``[T, E]`` router logits (any float dtype; the math runs in ``dtype``).
        k: experts per token.  bias: optional ``[E]`` float32 selection bias.
        renormalize: normalise the selected gates when ``k > 1`` (V3: yes). At ``k = 1`` this course keeps the
            gate ``s_i`` (times the scaling factor), so the router keeps a gradient through the gates.
        renormalize_single: with ``renormalize``, normalise at ``k = 1`` too, as DeepSeek-V3's official
            ``Gate`` (``weights /= weights.sum(-1)`` for sigmoid scores at every k) and transformers'
            ``DeepseekV3TopkRouter`` (``norm_topk_prob=True``) do: the single gate is then exactly
            ``routed_scaling_factor`` for every token (and the router gets no gradient through it). Same
            result as the default for ``k > 1``.
        n_groups, topk_groups, group_score: see :func:`group_limited_topk` (V3: 8, 4, ``"top2_sum"``).
        routed_scaling_factor: multiplies the gates.  dtype: dtype of the gating math (float32 default).

    Returns:
        scores: ``[T, E]`` sigmoid scores (unbiased) in ``dtype``.  gates: ``[T, k]`` gate weights, best first.
        experts: ``[T, k]`` int64 selected experts.
    """
    check_bool("renormalize_single", renormalize_single)
    logits = _check_gating(logits, k, renormalize, bias, n_groups, topk_groups, group_score, routed_scaling_factor,
                           dtype)
    return _sigmoid_topk(logits, k, bias, renormalize, n_groups, topk_groups, group_score, routed_scaling_factor,
                         renormalize_single)


def _sigmoid_topk(logits: torch.Tensor, k: int, bias: torch.Tensor | None, renormalize: bool, n_groups: int,
                  topk_groups: int, group_score: str, routed_scaling_factor: float, renormalize_single: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sigmoid_topk` without its checks (the layer's path; see :func:`_softmax_topk`)."""
    scores = logits.sigmoid()
    if bias is None:
        group_sel = F.logsigmoid(logits) if group_score == "top2_sum" else logits
        _, experts = _limited_topk(logits, k, n_groups, topk_groups, group_score, group_sel, log_space=True)
    else:
        _, experts = _limited_topk(_selection(scores, bias), k, n_groups, topk_groups, group_score)
    if renormalize and (k > 1 or renormalize_single):
        # s_i / sum_j s_j as a softmax of log s_i: exact where every selected s_i underflows
        gates = F.logsigmoid(logits.gather(1, experts)).softmax(dim=-1)
    else:
        gates = scores.gather(1, experts)
    return scores, _scaled(gates, routed_scaling_factor), experts


def normalized_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores normalised over all experts per token, ``s'_{t,i} = s_{t,i} / sum_j s_{t,j}`` (``[T, E]``):
    DeepSeek-V3's ``s'`` in the sequence-wise balance loss; equal to the probabilities for softmax scores."""
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def check_router_input(x: torch.Tensor, d_model: int) -> None:
    """Raise unless ``x`` is a floating-point ``[..., d_model]`` tensor."""
    check_tensor("x", x, f"[tokens, d_model={d_model}]", kind="float")
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape [tokens, d_model={d_model}], got shape {tuple(x.shape)}")


class Router(nn.Module):
    """A linear router ``logits = x @ W^T`` computed in float32 (or ``dtype``), autocast off.

    ``weight`` is ``[E, d_model]`` like ``nn.Linear(d_model, E, bias=False)``.
    """

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("num_experts", num_experts, 1)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default init

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x: ``[T, d_model]`` -> logits ``[T, E]`` in ``dtype`` (the matmul runs in it)."""
        check_router_input(x, self.weight.shape[1])
        check_gating_dtype(dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype))


def dense_gates(gates: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter the top-k gates into a dense ``[T, E]`` matrix ``G(x)`` (zeros for unselected experts).

    gates: ``[T, k]``, experts: ``[T, k]`` -> ``[T, E]`` float32 (differentiable in ``gates``).
    """
    check_experts(experts, num_experts)
    check_tensor("gates", gates, "[tokens, k]", 2)
    if gates.shape != experts.shape:
        raise ValueError(f"gates and experts must have the same shape [tokens, k], got {tuple(gates.shape)} and "
                         f"{tuple(experts.shape)}")
    out = torch.zeros(gates.shape[0], num_experts, dtype=torch.float32, device=gates.device)
    return out.scatter(1, experts, gates.float())


def multiplicative_jitter(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Switch Transformer jitter: multiply the router input by ``U(1 - eps, 1 + eps)`` elementwise.

    Applied to the copy of ``x: [T, d_model]`` that the router sees, in training only (the experts get the
    clean ``x``). ``eps = 0`` returns ``x`` unchanged; Switch used ``eps = 1e-2``.
    """
    check_number("eps (jitter_eps)", eps, 0, 1, high_open=True)
    check_tensor("x", x, "[tokens, d_model]", kind="float")
    if eps == 0:
        return x
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return x * (1 - eps + 2 * eps * noise).to(x.dtype)


class NoisyLogits(NamedTuple):
    """Output of :class:`NoisyTopKRouter` (all ``[T, E]`` float32).

    clean: ``x W_g``.  noise_std: ``softplus(x W_noise)``.  noisy: ``clean + N(0, 1) * noise_std`` in
    training, ``clean`` in evaluation (``H(x)`` in Shazeer et al. 2017, eq. 4).
    """

    clean: torch.Tensor
    noise_std: torch.Tensor
    noisy: torch.Tensor


def add_gating_noise(
    clean: torch.Tensor, noise_std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``H = clean + N(0, 1) * noise_std`` for ``[T, E]`` logits (Shazeer et al. 2017, eq. 4)."""
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=torch.float32)
    return clean.float() + noise * noise_std.float()


class NoisyTopKRouter(nn.Module):
    """Shazeer et al. 2017 noisy top-k router: ``H(x) = x W_g + N(0, 1) * softplus(x W_noise)``.

    ``weight`` (``W_g``) and ``noise_weight`` (``W_noise``) are ``[E, d_model]`` and start at zero, as in
    the paper: at initialisation every expert has the same clean logit and a noise scale of
    ``softplus(0) = log 2``, so the noise alone picks the experts. Noise is sampled only in training mode.
    Use :func:`softmax_topk` on ``noisy`` for the gates; the paper's form (softmax over the kept top-k
    noisy logits) equals ``softmax_order="before_topk", renormalize=True``.
    """

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("num_experts", num_experts, 1)
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> NoisyLogits:
        """x: ``[T, d_model]`` -> :class:`NoisyLogits` of ``[T, E]`` float32 tensors."""
        check_router_input(x, self.weight.shape[1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            clean = F.linear(x, self.weight.float())
            noise_std = F.softplus(F.linear(x, self.noise_weight.float()))
        noisy = add_gating_noise(clean, noise_std, generator) if self.training else clean
        return NoisyLogits(clean, noise_std, noisy)
