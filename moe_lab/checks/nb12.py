"""Exercises of 12_deepseek_moe: fine-grained sizing, sigmoid gating with a selection-only bias, group-limited
top-k, devices per token, the bias update, the sequence-wise balance loss, and a whole DeepSeek-V3 MoE block."""
from __future__ import annotations

import math
import random

import torch

from ..config import fine_grained
from ..layer import MoELayer
from ..losses import bias_update, sequence_balance_loss
from ..metrics import devices_per_token
from ..routing import group_limited_topk, normalized_scores, sigmoid_topk
from .core import Case, exercise, with_weights


def fine_grained_sizes(num_experts: int, k: int, d_ff: int, granularity: int, n_shared: int = 0
                       ) -> tuple[int, int, int, int]:
    """Reference for 12.1: DeepSeekMoE sizing at equal total and active parameters: split every expert into
    ``granularity`` experts of width ``d_ff / granularity``, route ``k * granularity`` of them, then turn
    ``n_shared`` of the routed ones into always-on shared experts. Returns ``(routed experts, routed per token,
    expert width, number of possible routed expert combinations)``."""
    sizes = fine_grained(num_experts, k, d_ff, granularity)
    routed, active = sizes.num_experts - n_shared, sizes.k - n_shared
    return routed, active, sizes.d_ff, math.comb(routed, active)


def _sizes_without_shared_k(num_experts, k, d_ff, granularity, n_shared=0):
    routed, _, width, _ = fine_grained_sizes(num_experts, k, d_ff, granularity, 0)
    return routed - n_shared, k * granularity, width, math.comb(routed - n_shared, k * granularity)


def _sizes_not_split(num_experts, k, d_ff, granularity, n_shared=0):
    routed, active, _, combinations = fine_grained_sizes(num_experts, k, d_ff, granularity, n_shared)
    return routed, active, d_ff, combinations


@exercise("12.1", function="fine_grained_sizes", title="Fine-grained and shared experts: sizing", points=2,
          reference=fine_grained_sizes,
          hint="fine-grained segmentation keeps total and active parameters: m times more experts, each m times "
               "narrower, m times more of them per token; a shared expert replaces one routed expert in both counts",
          hints=("(E, k, d_ff) -> (E*m, k*m, d_ff // m) first; then subtract n_shared from the experts and from the "
                 "experts per token", "the combinations are math.comb(routed experts, routed per token)"),
          mistakes={"the shared experts were not taken out of the experts per token": _sizes_without_shared_k,
                    "the expert width was not divided by the granularity": _sizes_not_split})
def _sizing_cases(hidden: bool) -> list[Case]:
    configs = [(16, 2, 4096, 4, 0), (8, 2, 256, 4, 1)]
    if hidden:
        configs += [(16, 2, 4096, 4, 1), (8, 1, 64, 1, 0), (16, 2, 2816, 8, 2), (4, 4, 12, 3, 0),
                    (random.randint(2, 16), 1, 96, random.choice([2, 3, 4]), 1)]
    return [Case(f"E={e}, k={k}, d_ff={f}, granularity={m}, n_shared={s}", (e, k, f, m, s))
            for e, k, f, m, s in configs]


def sigmoid_gating(logits: torch.Tensor, bias: torch.Tensor, k: int, routed_scaling_factor: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 12.2: DeepSeek-V3 gating, ``(gates [T, k], experts [T, k])`` (:func:`sigmoid_topk`)."""
    _, gates, experts = sigmoid_topk(logits, k, bias=bias, routed_scaling_factor=routed_scaling_factor)
    return gates, experts


def _gates_from_biased_scores(logits, bias, k, routed_scaling_factor):
    selection = logits.float().sigmoid() + bias
    values, experts = selection.topk(k, dim=-1)
    gates = values / values.sum(-1, keepdim=True) if k > 1 else values
    return gates * routed_scaling_factor, experts


def _gates_not_normalized(logits, bias, k, routed_scaling_factor):
    scores = logits.float().sigmoid()
    experts = (scores + bias).topk(k, dim=-1).indices
    return scores.gather(1, experts) * routed_scaling_factor, experts


def _selection_without_bias(logits, bias, k, routed_scaling_factor):
    return sigmoid_gating(logits, torch.zeros_like(bias), k, routed_scaling_factor)


def _normalised_at_k1(logits, bias, k, routed_scaling_factor):
    _, gates, experts = sigmoid_topk(logits, k, bias=bias, routed_scaling_factor=routed_scaling_factor,
                                     renormalize_single=True)
    return gates, experts


def _softmax_instead_of_sigmoid(logits, bias, k, routed_scaling_factor):
    probs = logits.float().softmax(-1)
    experts = (probs + bias).topk(k, dim=-1).indices
    gates = probs.gather(1, experts)
    return gates / gates.sum(-1, keepdim=True) * routed_scaling_factor, experts


@exercise("12.2", function="sigmoid_gating", title="Sigmoid gating with a selection-only bias", points=2,
          reference=sigmoid_gating,
          hint="the bias decides WHICH experts a token uses, never HOW MUCH: select with sigmoid scores + bias, "
               "weigh with the unbiased sigmoid scores",
          hints=("s = sigmoid(logits) in float32; experts = top-k of (s + bias); gates = s of those experts",
                 "with k > 1 divide the gates by their sum, then multiply by routed_scaling_factor; at k = 1 keep "
                 "s (this course's convention: a normalised single gate is always 1 and the router gets no "
                 "gradient through it; DeepSeek-V3's official Gate normalises at every k)"),
          mistakes={"the gates come from the biased scores s + b (vLLM #12002)": _gates_from_biased_scores,
                    "the gates are not normalised over the selected experts": _gates_not_normalized,
                    "the bias was not used to select the experts": _selection_without_bias,
                    "softmax instead of sigmoid scores": _softmax_instead_of_sigmoid,
                    "the single gate is normalised at k = 1 (DeepSeek-V3's official Gate does that; this exercise "
                    "keeps s at k = 1, the course's convention)": _normalised_at_k1})
def _sigmoid_cases(hidden: bool) -> list[Case]:
    configs = [(6, 8, 2, 1.0, 0.1), (5, 4, 1, 2.5, 0.5)]
    if hidden:
        configs += [(64, 32, 8, 2.5, 0.05), (3, 6, 6, 1.0, 0.2), (1, 5, 3, 16.0, 1.0), (40, 16, 4, 1.0, 0.0)]
    cases = [Case(f"T={t}, E={e}, k={k}, scale={s}, bias scale={b}",
                  (torch.randn(t, e), b * torch.randn(e), k, s), grad_wrt=(0,)) for t, e, k, s, b in configs]
    cases.append(Case("bfloat16 logits (compute in float32)", ((2 * torch.randn(4, 6)).bfloat16(),
                                                               0.3 * torch.randn(6), 2, 1.0)))
    if hidden:
        cases.append(Case("negative biases", (torch.randn(8, 8), -1.0 - torch.rand(8), 3, 2.5), grad_wrt=(0,)))
    return cases


def _kept_groups(grouped, topk_groups, group_score):
    """``[T, G]`` bool: the best ``topk_groups`` groups of ``grouped: [T, G, E/G]`` (for the mistakes below)."""
    g = grouped.amax(-1) if group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
    return torch.zeros_like(g, dtype=torch.bool).scatter(1, g.topk(topk_groups, dim=-1).indices, True)


def _masked_with_zero(scores, k, n_groups, topk_groups, group_score):
    grouped = scores.view(scores.shape[0], n_groups, -1)
    keep = _kept_groups(grouped, topk_groups, group_score)
    return grouped.masked_fill(~keep.unsqueeze(-1), 0.0).view_as(scores).topk(k, dim=-1)


def _strided_groups(scores, k, n_groups, topk_groups, group_score):
    grouped = scores.view(scores.shape[0], -1, n_groups).transpose(1, 2)  # expert e in group e % n_groups
    keep = _kept_groups(grouped, topk_groups, group_score)
    masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).transpose(1, 2).reshape(scores.shape)
    return masked.topk(k, dim=-1)


def _groups_by_max(scores, k, n_groups, topk_groups, group_score):
    return tuple(group_limited_topk(scores, k, n_groups=n_groups, topk_groups=topk_groups, group_score="max"))


def group_topk(scores: torch.Tensor, k: int, n_groups: int, topk_groups: int, group_score: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 12.3: :func:`moe_lab.routing.group_limited_topk` as a tuple ``(values, experts)``."""
    return tuple(group_limited_topk(scores, k, n_groups=n_groups, topk_groups=topk_groups, group_score=group_score))


@exercise("12.3", function="group_limited_topk", title="Group-limited top-k with -inf masking", points=2,
          reference=group_topk,
          hint="score each contiguous group, keep the best topk_groups groups per token, and make every expert of "
               "the other groups impossible to pick (-inf, not 0: scores can be negative) before the final top-k",
          hints=("scores.view(T, n_groups, E // n_groups) puts experts g*E/n_groups ... (g+1)*E/n_groups - 1 in group "
                 "g; the group score is its max, or the sum of its two largest scores for 'top2_sum'",
                 "kept = group_scores.topk(topk_groups).indices; build a [T, n_groups] mask, masked_fill the other "
                 "groups with float('-inf'), view back to [T, E] and take topk(k)"),
          mistakes={"the other groups are masked with 0 instead of -inf (vLLM #13474, DeepSeek-V3 #741)":
                    _masked_with_zero,
                    "groups are strided (expert e in group e % n_groups) instead of contiguous": _strided_groups,
                    "the groups are scored by their max whatever group_score says": _groups_by_max})
def _group_cases(hidden: bool) -> list[Case]:
    configs = [(6, 8, 2, 4, 2, "top2_sum", 0.0), (5, 8, 2, 4, 2, "max", -2.0)]
    if hidden:
        configs += [(32, 32, 8, 8, 4, "top2_sum", -1.5), (10, 12, 3, 3, 1, "max", 0.0),
                    (7, 16, 8, 4, 4, "top2_sum", 0.0), (9, 6, 2, 1, 1, "max", -3.0), (4, 16, 8, 4, 2, "top2_sum", -1.0),
                    (20, 64, 6, 8, 3, random.choice(["max", "top2_sum"]), -0.5)]
    return [Case(f"T={t}, E={e}, k={k}, n_groups={g}, topk_groups={m}, {s}, scores {'negative' if o else 'in (0, 1)'}",
                 (torch.rand(t, e) + o, k, g, m, s)) for t, e, k, g, m, s, o in configs]


def _devices_strided(experts, num_experts, n_devices):
    device = experts.long() % n_devices
    return torch.zeros(experts.shape[0], n_devices, dtype=torch.bool).scatter(1, device, True).sum(-1)


def _devices_not_deduplicated(experts, num_experts, n_devices):
    return torch.full((experts.shape[0],), experts.shape[1], dtype=torch.int64)


@exercise("12.4", function="devices_per_token", title="How many devices does a token visit?", points=1,
          reference=devices_per_token,
          hint="expert e lives on device e // (num_experts / n_devices) (contiguous blocks); count the DISTINCT "
               "devices among each token's k experts",
          hints=("device = experts // (num_experts // n_devices); scatter True into a [T, n_devices] bool matrix "
                 "and sum each row (int64)",),
          mistakes={"devices are strided (expert e on device e % n_devices) instead of contiguous blocks":
                    _devices_strided,
                    "the k experts were counted, not the distinct devices": _devices_not_deduplicated})
def _device_cases(hidden: bool) -> list[Case]:
    configs = [(8, 16, 4, 4), (6, 8, 2, 8)]
    if hidden:
        configs += [(100, 256, 8, 8), (5, 4, 1, 2), (12, 64, 6, 1), (30, 32, 8, 32)]
    cases = [Case(f"T={t}, E={e}, k={k}, n_devices={d}", (torch.rand(t, e).topk(k, dim=-1).indices, e, d))
             for t, e, k, d in configs]
    if hidden:  # device-limited routing: every token within 2 of 8 devices
        _, experts = group_limited_topk(torch.rand(20, 32), 6, n_groups=8, topk_groups=2)
        cases.append(Case("device-limited experts (M = 2 of 8)", (experts, 32, 8)))
    return cases


def bias_update_step(bias: torch.Tensor, load: torch.Tensor, rate: float, centered: bool) -> torch.Tensor:
    """Reference for 12.5: :func:`moe_lab.losses.bias_update`."""
    return bias_update(bias, load, rate, centered=centered)


def _update_sign_flipped(bias, load, rate, centered):
    return bias_update(bias, 2 * load.float().mean() - load.float(), rate, centered=centered)


def _update_proportional(bias, load, rate, centered):
    load = load.float()
    delta = rate * (load.mean() - load) / load.mean()
    return bias.float() + (delta - delta.mean() if centered else delta)


def _update_never_centered(bias, load, rate, centered):
    return bias_update(bias, load, rate, centered=False)


@exercise("12.5", function="bias_update_step", title="One aux-loss-free bias update", points=1,
          reference=bias_update_step,
          hint="an overloaded expert's bias goes down by gamma, an underloaded one's up by gamma, an expert exactly "
               "at the mean load keeps its bias: only the sign of (mean load - load) matters",
          hints=("delta = rate * sign(load.float().mean() - load.float()); centred: subtract delta.mean(); "
                 "return bias.float() + delta (a new tensor)",),
          mistakes={"the sign is flipped (overloaded experts get a larger bias)": _update_sign_flipped,
                    "the update is proportional to the imbalance instead of its sign": _update_proportional,
                    "centered=True was ignored": _update_never_centered})
def _bias_cases(hidden: bool) -> list[Case]:
    cases = [Case("E=8, gamma=1e-3", (torch.zeros(8), torch.randint(0, 50, (8,)), 1e-3, False)),
             Case("E=6, gamma=0.01, centred", (0.1 * torch.randn(6), torch.randint(0, 30, (6,)), 1e-2, True)),
             Case("an expert exactly at the mean keeps its bias",
                  (torch.zeros(4), torch.tensor([1, 2, 3, 2]), 0.1, False))]
    if hidden:
        cases += [Case("E=256, gamma=1e-3", (0.01 * torch.randn(256), torch.randint(0, 4096, (256,)), 1e-3, False)),
                  Case("balanced load: no change", (torch.randn(5), torch.full((5,), 7), 0.5, True)),
                  Case("gamma = 0", (torch.randn(3), torch.tensor([0, 5, 1]), 0.0, False)),
                  Case("float loads, centred",
                       (torch.randn(16), 100 * torch.rand(16), random.choice([1e-3, 1e-2]), True)),
                  Case("one expert takes everything", (torch.zeros(8), torch.tensor([800, 0, 0, 0, 0, 0, 0, 0]), 1e-3,
                                                       True))]
    return cases


def sequence_wise_loss(scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Reference for 12.6: DeepSeek-V3's sequence-wise balance loss from the raw sigmoid ``scores: [B, T, E]``
    (normalised per token first) and ``experts: [B, T, k]``, mean over the B sequences."""
    return sequence_balance_loss(normalized_scores(scores.float()), experts)


def _loss_pooled_over_batch(scores, experts):
    return sequence_balance_loss(normalized_scores(scores.float()).flatten(0, 1)[None], experts.flatten(0, 1)[None])


def _loss_unnormalized(scores, experts):
    return sequence_balance_loss(scores.float(), experts)


def _loss_without_n_over_k(scores, experts):
    return sequence_wise_loss(scores, experts) * experts.shape[-1] / scores.shape[-1]


@exercise("12.6", function="sequence_wise_loss", title="DeepSeek-V3 sequence-wise balance loss", points=2,
          reference=sequence_wise_loss,
          hint="the same f_i * P_i product as the Switch loss, but computed inside each sequence separately "
               "(f and P from that sequence's tokens only) and then averaged over the sequences",
          hints=("s' = scores / scores.sum(-1, keepdim=True); P = s'.mean(dim=1): [B, E]",
                 "f[b, i] = N / (K * T) * (number of tokens of sequence b that selected i); "
                 "loss = (f * P).sum(-1).mean()"),
          mistakes={"f and P were pooled over the whole batch (a batch-wise loss)": _loss_pooled_over_batch,
                    "the scores were not normalised over the experts (s' = s / sum s)": _loss_unnormalized,
                    "f is missing the factor N / K": _loss_without_n_over_k})
def _sequence_cases(hidden: bool) -> list[Case]:
    configs = [(2, 6, 8, 2), (3, 4, 4, 1)]
    if hidden:
        configs += [(4, 64, 32, 8), (1, 1, 6, 3), (8, 16, 16, 16)]
    cases = []
    for b, t, e, k in configs:
        scores = (torch.randn(b, t, e) + torch.randn(b, 1, e)).sigmoid()  # each sequence prefers some experts
        cases.append(Case(f"B={b}, T={t}, E={e}, k={k}", (scores, scores.topk(k, dim=-1).indices), grad_wrt=(0,)))
    if hidden:  # balanced over the batch, each sequence on its own half of the experts: only per sequence it shows
        experts = torch.stack([torch.arange(4).repeat(4, 1), 4 + torch.arange(4).repeat(4, 1)])  # [2, 4, 4]
        scores = torch.full((2, 4, 8), 0.1)
        scores[0, :, :4] = scores[1, :, 4:] = 0.9
        cases.append(Case("each sequence on half the experts", (scores, experts)))
    return cases


def deepseek_v3_moe(x: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor, w1: torch.Tensor,
                    w3: torch.Tensor, w2: torch.Tensor, shared_w1: torch.Tensor, shared_w3: torch.Tensor,
                    shared_w2: torch.Tensor, k: int, n_groups: int, topk_groups: int,
                    routed_scaling_factor: float, **options) -> torch.Tensor:
    """Reference for 12.7: a DeepSeek-V3 MoE block (sigmoid gating, selection-only bias, node-limited routing
    with top-2-sum group scores, normalised and scaled gates, SwiGLU experts, one shared expert): ``MoELayer``
    with the student's weights (``options``: other layer options, for the known mistakes). x: ``[T, d]``;
    w1, w3: ``[E, d, f]``; w2: ``[E, f, d]``; shared_w1, shared_w3: ``[d, f_s]``; shared_w2: ``[f_s, d]`` ->
    ``[T, d]``."""
    num_experts, d_model, d_ff = w1.shape
    layer = MoELayer(d_model, d_ff, num_experts, k, **{
        **dict(score_func="sigmoid", selection_bias=True, n_groups=n_groups, topk_groups=topk_groups,
               group_score="top2_sum", routed_scaling_factor=routed_scaling_factor, n_shared=1,
               d_shared=shared_w1.shape[1], dispatch="loop"), **options}).eval()
    layer.expert_bias.copy_(bias)
    with_weights(layer, router__weight=router_weight, experts__w1=w1, experts__w3=w3, experts__w2=w2,
                 shared__experts__w1=shared_w1[None], shared__experts__w3=shared_w3[None],
                 shared__experts__w2=shared_w2[None])
    return layer(x)[0]


def _moe_without_shared(x, router_weight, bias, w1, w3, w2, shared_w1, shared_w3, shared_w2, *routing):
    return deepseek_v3_moe(x, router_weight, bias, w1, w3, w2, 0 * shared_w1, shared_w3, shared_w2, *routing)


def _moe_not_normalized(*args):
    return deepseek_v3_moe(*args, renormalize=False)


def _moe_without_scaling(*args):
    return deepseek_v3_moe(*args[:-1], 1.0)


@exercise("12.7", function="deepseek_v3_moe", title="A DeepSeek-V3 MoE block", points=3, reference=deepseek_v3_moe,
          rtol=1e-4, atol=1e-5,
          hint="route (sigmoid scores, bias for selection only, node-limited top-k), run each selected SwiGLU "
               "expert on its tokens, add the gate-weighted outputs, then add the shared expert for every token",
          hints=("scores = sigmoid(x @ router_weight.T) in float32; experts from your group_limited_topk(scores + "
                 "bias, k, n_groups, topk_groups, 'top2_sum'); gates = scores.gather(1, experts), normalised when "
                 "k > 1, times routed_scaling_factor",
                 "expert e on rows h: (silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]; loop over the experts and use "
                 "index_add_ (or a loop over the k slots) to add gate * output to y; shared: the same SwiGLU with "
                 "shared_w1, shared_w3, shared_w2 on every token"),
          mistakes={"the shared expert is missing": _moe_without_shared,
                    "the gates are not normalised over the selected experts": _moe_not_normalized,
                    "the routed gates are not multiplied by routed_scaling_factor": _moe_without_scaling})
def _moe_cases(hidden: bool) -> list[Case]:
    configs = [(10, 8, 16, 8, 2, 4, 2, 2.5, 12), (6, 4, 8, 4, 1, 1, 1, 1.0, 8)]
    if hidden:
        configs += [(33, 16, 8, 16, 4, 4, 2, 2.5, 16), (1, 8, 4, 8, 3, 2, 2, 1.0, 4), (20, 8, 8, 32, 8, 8, 4, 2.5, 8),
                    (12, 4, 4, 6, 6, 3, 3, 1.5, 4)]
    cases = []
    for t, d, f, e, k, groups, kept, scale, fs in configs:
        x = torch.randn(t, d)
        weights = (torch.randn(e, d, f) / d**0.5, torch.randn(e, d, f) / d**0.5, torch.randn(e, f, d) / f**0.5)
        shared = (torch.randn(d, fs) / d**0.5, torch.randn(d, fs) / d**0.5, torch.randn(fs, d) / fs**0.5)
        args = (x, torch.randn(e, d) / d**0.5, 0.3 * torch.randn(e), *weights, *shared, k, groups, kept, scale)
        cases.append(Case(f"T={t}, d={d}, d_ff={f}, E={e}, k={k}, groups {kept} of {groups}, scale={scale}, "
                          f"shared width {fs}", args, grad_wrt=(0, 1, 3, 6)))
    return cases

