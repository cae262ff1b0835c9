"""Auxiliary losses on the router: load balancing and stability.

- Shazeer et al. 2017: ``CV(importance)^2`` and ``CV(load)^2`` with the smooth (differentiable) load estimate
  of noisy top-k gating, where ``CV^2 = variance / mean^2`` over experts (population variance).
- Switch Transformer (Fedus et al. 2021): ``N * sum_i f_i * P_i``.
- ST-MoE (Zoph et al. 2022): router z-loss ``mean_t logsumexp(logits_t)^2``.
- DeepSeek-V2 (2024, Sec. 2.2.3): expert-level (= Switch), device-level and communication balance losses.
- DeepSeek-V3 (2024, Sec. 2.1.2): the complementary sequence-wise balance loss.
- Wang et al. 2024 (auxiliary-loss-free balancing; DeepSeek-V3 Sec. 2.1.2): the selection-bias update
  :func:`bias_update`, which is not a loss but replaces one.

Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token. All losses are float32 scalars returned
without their coefficient (multiply by ``w`` / ``alpha`` / ``c_z`` in the training loss).

:data:`AUX_LOSSES` is the registry of the terms an MoE layer offers: each entry computes its loss from a
:class:`moe_lab.RoutingInfo`, when asked (``info.loss(name)``, or ``MoETransformer.loss`` for the terms with a
non-zero coefficient ``<name>_coef``). A new auxiliary loss is one entry there.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .metrics import _tokens_per_expert, check_groups, expert_groups
from .routing import check_experts, check_k, dense_gates
from .validation import check_finite, check_int, check_number, check_tensor, reads_values


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var(v) / mean(v)^2`` of ``values: [E]`` (population variance).

    0 when all entries are equal (and for a single expert); ``eps`` keeps an all-zero input finite. ``values``
    may be counts (an integer tensor).
    """
    check_tensor("values", values, "[num_experts]", 1, kind="real")
    check_finite("values", values)
    check_number("eps", eps, 0)
    return _cv_squared(values, eps)


def _cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    values = values.float()
    if values.numel() < 2:
        return values.sum() * 0
    return values.var(unbiased=False) / (values.mean().square() + eps)


def importance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. 2017 importance loss ``CV(Importance)^2`` with ``Importance_i = sum_t G(x_t)_i``.

    gates: ``[T, E]`` dense gate matrix ``G(x)`` (zeros for unselected experts, see
    :func:`moe_lab.routing.dense_gates`).
    """
    check_tensor("gates", gates, "[tokens, num_experts] (the dense matrix)", 2)
    check_finite("gates", gates)
    return _cv_squared(gates.float().sum(dim=0))


def prob_in_topk(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer et al. 2017 smooth load estimator ``P(x, i)``: the probability that expert ``i`` stays in the
    top k when only its own noise is re-drawn.

    ``P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i)``, where ``kth_excluding(H, k, i)`` is
    the k-th largest noisy logit among the *other* experts: the (k+1)-th largest of ``H`` if ``i`` is in the
    top k, else the k-th largest. ``Phi`` is the standard normal CDF.

    Args:
        clean: ``[T, E]`` clean logits ``x W_g``.  noisy: ``[T, E]`` the noisy logits ``H`` used for
        selection.  noise_std: ``[T, E]`` ``softplus(x W_noise)`` (> 0).  k: experts per token.
    Returns:
        ``[T, E]`` float32 probabilities (all 1 when ``k = E``: every expert is always selected).
    """
    for name, t in (("clean", clean), ("noisy", noisy), ("noise_std", noise_std)):
        check_tensor(name, t, "[tokens, num_experts]", 2)
        if t.shape != clean.shape:
            raise ValueError(f"clean, noisy and noise_std must have the same shape [tokens, num_experts], got "
                             f"{tuple(clean.shape)}, {tuple(noisy.shape)} and {tuple(noise_std.shape)}")
        check_finite(name, t)
    if reads_values(noise_std) and noise_std.numel() and not bool((noise_std > 0).all()):
        raise ValueError(f"noise_std must be > 0 everywhere (softplus of the noise logits), got a minimum of "
                         f"{float(noise_std.min()):.3g}")
    check_k(k, clean.shape[-1])
    return _prob_in_topk(clean, noisy, noise_std, k)


def _prob_in_topk(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, k: int) -> torch.Tensor:
    num_experts = clean.shape[-1]
    clean, noisy, noise_std = clean.float(), noisy.float(), noise_std.float()
    if k == num_experts:
        return torch.ones_like(clean) + 0 * clean
    top = noisy.topk(k + 1, dim=-1).values  # [T, k+1]
    threshold_if_in, threshold_if_out = top[:, k : k + 1], top[:, k - 1 : k]
    is_in = noisy > threshold_if_in
    normal = torch.distributions.Normal(torch.zeros((), device=clean.device), torch.ones((), device=clean.device))
    prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
    prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out)


def load_loss(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer et al. 2017 load loss ``CV(Load)^2`` with the smooth ``Load_i = sum_t P(x_t, i)``.

    Arguments as :func:`prob_in_topk`. Differentiable in ``clean`` and ``noise_std``, unlike token counts.
    """
    return cv_squared(prob_in_topk(clean, noisy, noise_std, k).sum(dim=0))


def switch_aux_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``N * sum_i f_i * P_i`` (without the coefficient alpha).

    ``f_i`` is the fraction of token-slots dispatched to expert ``i`` (counts, not differentiable) and
    ``P_i`` the mean full-softmax probability of expert ``i`` (differentiable). Equals 1 at perfectly
    uniform routing; multiply by alpha (Switch: 1e-2) in the training loss. It is also DeepSeek-V2's
    expert-level balance loss ``sum_i f_i P_i`` with ``f_i = N / (K T) * count_i`` (alpha_1 = 0.003).

    Args:
        probs: ``[T, E]`` softmax over all experts (not the renormalised top-k gates).
        experts: ``[T, k]`` selected expert indices.
    """
    _check_probs_experts(probs, experts, 2, "[T, ")
    return _switch_aux(probs, _tokens_per_expert(experts.long(), probs.shape[-1]), experts.numel())


def _switch_aux(probs: torch.Tensor, counts: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``N * sum_i f_i P_i`` from ``probs: [T, E]`` and the slots per expert ``counts: [E]`` (unchecked)."""
    f = counts.float() / num_slots
    p = probs.float().mean(dim=0)
    return probs.shape[-1] * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` (without the coefficient; ST-MoE: 1e-3).

    Args:
        logits: ``[T, E]`` router logits (``T, E >= 1``).
    """
    check_tensor("logits", logits, "[tokens, num_experts]", 2)
    if 0 in logits.shape:
        raise ValueError(f"logits must have shape [tokens >= 1, num_experts >= 1], got shape {tuple(logits.shape)}")
    check_finite("logits", logits)
    return _z_loss(logits)


def _z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def _check_probs_experts(probs: torch.Tensor, experts: torch.Tensor, dims: int, what: str) -> None:
    """``probs: {what}E]`` finite floats and ``experts: {what}k]`` ids in ``0 .. E - 1``, same leading sizes (>= 1)."""
    check_tensor("probs", probs, f"{what}E]", dims)
    check_tensor("experts", experts, f"{what}k]", dims, kind=None)
    if probs.shape[:-1] != experts.shape[:-1] or 0 in probs.shape or experts.shape[-1] == 0:
        raise ValueError(f"probs must be {what}E] and experts {what}k] with the same {what[1:-2]} >= 1 and E, k >= 1, "
                         f"got shapes {tuple(probs.shape)} and {tuple(experts.shape)}")
    check_experts(experts.reshape(-1, experts.shape[-1]), probs.shape[-1])
    check_finite("probs", probs)


def sequence_balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss (Sec. 2.1.2), without its coefficient alpha.

    For each sequence of ``T`` tokens: ``f_i = N / (K T) * sum_t 1[i in TopK(t)]`` and ``P_i = mean_t s'_{t,i}``,
    with ``s'`` the gating scores normalised over all experts per token
    (:func:`moe_lab.routing.normalized_scores`; the softmax probabilities for softmax gating);
    ``L = sum_i f_i P_i``. Returns the mean of ``L`` over the sequences: 1 when every sequence is balanced.
    V3 multiplies it by a tiny alpha (1e-4): it only stops single sequences from going extremely unbalanced.

    Args:
        probs: ``[B, T, E]`` normalised scores ``s'``.  experts: ``[B, T, k]`` selected experts.
    """
    _check_probs_experts(probs, experts, 3, "[B, T, ")
    return _sequence_balance(probs, experts)


def _sequence_balance(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    batch, seq_len, num_experts = probs.shape
    k = experts.shape[-1]
    flat = experts.reshape(batch, -1).long()
    ones = torch.ones(flat.shape, device=probs.device)
    counts = torch.zeros(batch, num_experts, device=probs.device).scatter_add_(1, flat, ones)  # [B, E]
    f = counts * (num_experts / (k * seq_len))
    p = probs.float().mean(dim=1)
    return (f * p).sum(dim=-1).mean()


def device_balance_loss(probs: torch.Tensor, experts: torch.Tensor, n_devices: int) -> torch.Tensor:
    """DeepSeek-V2 device-level balance loss (Sec. 2.2.3), without its coefficient alpha_2 (0.05).

    The ``N`` routed experts are split into ``D = n_devices`` contiguous groups ``E_1 .. E_D``;
    ``f'_i = (1 / |E_i|) sum_{j in E_i} f_j`` and ``P'_i = sum_{j in E_i} P_j`` with the expert-level
    ``f_j = N / (K T) * (tokens selecting j)`` and ``P_j = mean_t s_{t,j}``; ``L = sum_i f'_i P'_i``
    (1 when balanced). It balances the computation per device, not per expert.

    Args:
        probs: ``[T, E]`` gating scores normalised over all experts.  experts: ``[T, k]``.
        n_devices: ``D``, dividing ``E``.
    """
    _check_probs_experts(probs, experts, 2, "[T, ")
    check_groups(probs.shape[-1], n_devices, "n_devices")
    return _device_balance(probs, _tokens_per_expert(experts.long(), probs.shape[-1]), experts.shape[-1], n_devices)


def _device_balance(probs: torch.Tensor, counts: torch.Tensor, k: int, n_devices: int) -> torch.Tensor:
    num_tokens, num_experts = probs.shape
    group = expert_groups(num_experts, n_devices, probs.device)
    f = counts.float() * (num_experts / (k * num_tokens))
    p = probs.float().mean(dim=0)
    f_dev = torch.zeros(n_devices, device=probs.device).index_add_(0, group, f) / (num_experts // n_devices)
    p_dev = torch.zeros(n_devices, device=probs.device).index_add_(0, group, p)
    return (f_dev * p_dev).sum()


def communication_balance_loss(probs: torch.Tensor, experts: torch.Tensor, n_devices: int,
                               max_devices: int) -> torch.Tensor:
    """DeepSeek-V2 communication balance loss (Sec. 2.2.3), without its coefficient alpha_3 (0.02).

    ``f''_i = D / (M T) * sum_t 1[token t is sent to device i]`` and ``P''_i = sum_{j in E_i} P_j``;
    ``L = sum_i f''_i P''_i``, with ``D = n_devices`` contiguous expert groups and ``M = max_devices`` the
    device limit of the routing (1 when every device receives the same number of tokens, ``M T / D``).
    It balances what each device *receives*, which device-limited routing alone does not.

    Args:
        probs: ``[T, E]`` gating scores normalised over all experts.  experts: ``[T, k]``.
        n_devices: ``D``, dividing ``E``.  max_devices: ``M`` (the layer's ``topk_groups``), ``1 <= M <= D``.
    """
    _check_probs_experts(probs, experts, 2, "[T, ")
    check_groups(probs.shape[-1], n_devices, "n_devices")
    check_int("max_devices", max_devices, 1, n_devices)
    return _communication_balance(probs, experts.long(), n_devices, max_devices)


def _communication_balance(probs: torch.Tensor, experts: torch.Tensor, n_devices: int,
                           max_devices: int) -> torch.Tensor:
    num_tokens, num_experts = probs.shape
    group = expert_groups(num_experts, n_devices, probs.device)
    sent = torch.zeros(num_tokens, n_devices, dtype=torch.bool, device=probs.device)
    sent = sent.scatter(1, group[experts], True).float().sum(dim=0)  # [D] tokens each device receives
    f = sent * (n_devices / (max_devices * num_tokens))
    p_dev = torch.zeros(n_devices, device=probs.device).index_add_(0, group, probs.float().mean(dim=0))
    return (f * p_dev).sum()


def bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float, *, centered: bool = False) -> torch.Tensor:
    """One auxiliary-loss-free balancing step (Wang et al. 2024; DeepSeek-V3 Sec. 2.1.2):
    ``b_i + rate * sign(mean load - load_i)``: an overloaded expert's bias goes down by ``rate``, an underloaded
    one's up, an expert exactly at the mean keeps it.

    ``centered=True`` subtracts the mean of the update (torchtitan), so the biases keep summing to what they
    summed to; without it (the papers, Megatron-Core) the sum drifts when more experts are under- than
    overloaded. Centring never changes routing: adding the same constant to every bias changes neither the top-k
    nor the group scores' order (max and top-2 sums shift by the same amount in every group); it only keeps the
    bias values readable.

    Args:
        bias: ``[E]`` selection bias (float32).  load: ``[E]`` token-slots per expert over one optimiser step.
        rate: ``gamma >= 0`` (V3 and Wang et al.: 1e-3).
    Returns:
        the new ``[E]`` float32 bias (``bias`` is not modified).
    """
    check_number("rate (gamma, bias_update_rate)", rate, 0)
    check_tensor("bias", bias, "[num_experts]", 1)
    check_tensor("load", load, "[num_experts]", 1, kind="real")
    if load.shape != bias.shape:
        raise ValueError(f"bias and load must both have shape [num_experts], got {tuple(bias.shape)} and "
                         f"{tuple(load.shape)}")
    check_finite("bias", bias)
    check_finite("load", load)
    load = load.float()
    delta = rate * torch.sign(load.mean() - load)
    if centered:
        delta = delta - delta.mean()
    return bias.float() + delta


@dataclass(frozen=True)
class AuxLoss:
    """One entry of :data:`AUX_LOSSES`: ``compute(info)`` gives the unweighted loss of one layer's
    :class:`moe_lab.RoutingInfo` (a 0-dim float32 tensor, differentiable where the loss is; None where the term is
    not defined for that layer); ``applies(config)`` says whether a layer with that
    :class:`moe_lab.config.MoEConfig` (or model config) defines it; ``doc`` names it."""

    compute: Callable[[Any], torch.Tensor | None]  # (RoutingInfo) -> loss; the layer imports this module
    doc: str
    applies: Callable[[Any], bool] = lambda config: True


def _sequences(info) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs [B, L, E]`` and ``experts [B, L, k]`` per sequence (``x: [B, L, d]``; ``[T, d]`` is one sequence)."""
    seq_len = info.batch_shape[-1] if len(info.batch_shape) >= 2 else info.experts.shape[0]
    return (info.probs.view(-1, seq_len, info.probs.shape[-1]),
            info.experts.view(-1, seq_len, info.experts.shape[-1]))


AUX_LOSSES: dict[str, AuxLoss] = {
    "aux": AuxLoss(lambda i: _switch_aux(i.probs, i.tokens_per_expert, i.experts.numel()),
                   "Switch load-balancing loss N * sum_i f_i P_i (= DeepSeek-V2's expert-level loss; 1 when uniform)"),
    "z": AuxLoss(lambda i: _z_loss(i.logits), "ST-MoE router z-loss mean_t logsumexp(logits_t)^2"),
    "seq_aux": AuxLoss(lambda i: _sequence_balance(*_sequences(i)),
                       "DeepSeek-V3 sequence-wise balance loss over the sequences of x"),
    "device_aux": AuxLoss(lambda i: _device_balance(i.probs, i.tokens_per_expert, i.experts.shape[-1],
                                                    i.config.n_groups),
                          "DeepSeek-V2 device-level balance loss, the n_groups expert groups as devices"),
    "comm_aux": AuxLoss(lambda i: _communication_balance(i.probs, i.experts, i.config.n_groups,
                                                         i.config.topk_groups),
                        "DeepSeek-V2 communication balance loss with M = topk_groups"),
    "importance": AuxLoss(lambda i: _cv_squared(dense_gates(i.gates, i.experts, i.config.num_experts).sum(dim=0)),
                          "Shazeer et al.'s importance loss CV(sum_t G(x_t))^2"),
    "load": AuxLoss(lambda i: None if i.clean_logits is None else
                    _cv_squared(_prob_in_topk(i.clean_logits, i.logits, i.noise_std, i.config.k).sum(dim=0)),
                    "Shazeer et al.'s smooth load loss CV(Load)^2 (router='noisy_topk' only)",
                    applies=lambda config: config.router == "noisy_topk"),
}
"""The auxiliary loss terms of an MoE layer by name (``info.loss(name)``, ``info.<name>_loss``; the model's
coefficient of term ``name`` is ``ModelConfig.<name>_coef``)."""
