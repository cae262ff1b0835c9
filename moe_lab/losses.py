"""Auxiliary losses on the router: load balancing and stability.

- Shazeer et al. 2017: ``CV(importance)^2`` and ``CV(load)^2`` with the smooth (differentiable) load estimate
  of noisy top-k gating, where ``CV^2 = variance / mean^2`` over experts (population variance).
- Switch Transformer (Fedus et al. 2021): ``N * sum_i f_i * P_i``.
- ST-MoE (Zoph et al. 2022): router z-loss ``mean_t logsumexp(logits_t)^2``.

Shapes: ``T`` tokens, ``E`` experts, ``k`` experts per token. All losses are float32 scalars returned
without their coefficient (multiply by ``w`` / ``alpha`` / ``c_z`` in the training loss).
"""
from __future__ import annotations

import torch

from .metrics import tokens_per_expert
from .routing import check_k


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var(v) / mean(v)^2`` of ``values: [E]`` (population variance).

    0 when all entries are equal (and for a single expert); ``eps`` keeps an all-zero input finite.
    """
    values = values.float()
    if values.numel() < 2:
        return values.sum() * 0
    return values.var(unbiased=False) / (values.mean().square() + eps)


def importance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. 2017 importance loss ``CV(Importance)^2`` with ``Importance_i = sum_t G(x_t)_i``.

    gates: ``[T, E]`` dense gate matrix ``G(x)`` (zeros for unselected experts, see
    :func:`moe_lab.routing.dense_gates`).
    """
    if gates.dim() != 2:
        raise ValueError(f"gates must be the dense [tokens, num_experts] matrix, got shape {tuple(gates.shape)}")
    return cv_squared(gates.float().sum(dim=0))


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
    num_experts = clean.shape[-1]
    check_k(k, num_experts)
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
    uniform routing; multiply by alpha (Switch: 1e-2) in the training loss.

    Args:
        probs: ``[T, E]`` softmax over all experts (not the renormalised top-k gates).
        experts: ``[T, k]`` selected expert indices.
    """
    if probs.dim() != 2 or experts.dim() != 2 or probs.shape[0] != experts.shape[0] or probs.shape[0] == 0:
        raise ValueError(f"probs must be [T, E] and experts [T, k] with the same T >= 1, got shapes "
                         f"{tuple(probs.shape)} and {tuple(experts.shape)}")
    num_experts = probs.shape[-1]
    f = tokens_per_expert(experts, num_experts).float() / experts.numel()
    p = probs.float().mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` (without the coefficient; ST-MoE: 1e-3).

    Args:
        logits: ``[T, E]`` router logits.
    """
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
