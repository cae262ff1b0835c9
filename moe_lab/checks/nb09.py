"""Exercises of 09_inference: weight bytes per decode token, an expert-cache simulator (LRU / LFU),
int8 per-channel and int4 group-wise quantization, one decode step of attention with a KV cache."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..calculator import expected_experts_touched
from ..offload import ExpertCache
from ..quantize import fake_quantize, quantize
from .core import Case, exercise


def decode_bytes_per_token(other_params: int, expert_params: int, num_experts: int, k: int, n_moe_layers: int,
                           batch: int, bytes_per_param: float) -> float:
    """Reference for 09.1: weight bytes read per generated token when ``batch`` sequences decode together."""
    touched = expected_experts_touched(num_experts, k, batch)
    return (other_params + n_moe_layers * touched * expert_params) * bytes_per_param / batch


def _bytes_only_k_experts(other_params, expert_params, num_experts, k, n_moe_layers, batch, bytes_per_param):
    return (other_params + n_moe_layers * k * expert_params) * bytes_per_param / batch


def _bytes_per_step(other_params, expert_params, num_experts, k, n_moe_layers, batch, bytes_per_param):
    return decode_bytes_per_token(other_params, expert_params, num_experts, k, n_moe_layers, batch,
                                  bytes_per_param) * batch


def _bytes_k_times_batch(other_params, expert_params, num_experts, k, n_moe_layers, batch, bytes_per_param):
    touched = min(num_experts, k * batch)
    return (other_params + n_moe_layers * touched * expert_params) * bytes_per_param / batch


@exercise("09.1", function="decode_bytes_per_token", title="Weight bytes per generated token", points=2,
          reference=decode_bytes_per_token, rtol=1e-9,
          hint="a decode step reads every non-expert weight once for the whole batch, and in each MoE layer only "
               "the experts some token of the batch was routed to; the expected number of those is the "
               "experts-touched formula; a step makes one token per sequence",
          hints=("per step: other_params + n_moe_layers * E * (1 - (1 - k/E)^batch) * expert_params weights, times "
                 "bytes_per_param; divide by batch for one token",),
          mistakes={"counting only k experts per layer, whatever the batch": _bytes_only_k_experts,
                    "the bytes of a whole step, not of one token (divide by batch)": _bytes_per_step,
                    "assuming the batch's tokens never share an expert (min(E, k * batch))": _bytes_k_times_batch})
def _bytes_cases(hidden: bool) -> list[Case]:
    # (other, per-expert, E, k, MoE layers, batch, bytes): Mixtral-like in bf16, a toy in fp32
    configs = [(1_600_000_000, 176_160_768, 8, 2, 32, 1, 2.0), (30_000, 24_576, 8, 2, 4, 16, 4.0)]
    if hidden:
        configs += [(1_600_000_000, 176_160_768, 8, 2, 32, 64, 0.5), (10, 3, 1, 1, 1, 7, 2.0),
                    (5_000_000_000, 44_040_192, 256, 8, 58, random.randint(1, 512), 1.0),
                    (random.randint(1, 10**6), random.randint(1, 10**5), 64, 6, 27, random.randint(1, 100), 2.0)]
    return [Case(f"other={o}, expert={x}, E={e}, k={k}, moe_layers={n}, batch={b}, bytes={by}", (o, x, e, k, n, b, by))
            for o, x, e, k, n, b, by in configs]


def simulate_expert_cache(steps: list[list[int]], num_experts: int, capacity: int, policy: str) -> list[bool]:
    """Reference for 09.2: hit (True) or miss of every access, step by step, in sorted order within a step."""
    cache = ExpertCache(num_experts, capacity, policy)
    out = []
    for needed in steps:
        loaded = {e for e, _, load in cache.step(needed) if load}
        out += [e not in loaded for e in sorted(set(needed))]
    return out


def _cache_variant(steps, num_experts, capacity, policy, *, protect=True, hits_first=True, lfu_tie="recency",
                   keep_counts=True):
    """A simulator written from the rules with one of them changed (the known mistakes of 09.2)."""
    resident, last, freq, clock, out = set(), {}, [0] * num_experts, 0, []
    for needed in steps:
        needed = sorted(set(needed))
        hits = {e for e in needed if e in resident}
        order = sorted(hits) + [e for e in needed if e not in hits] if hits_first else needed
        result = {}
        for e in order:
            result[e] = e in resident if not hits_first else e in hits
            if not result[e]:
                if len(resident) == capacity:
                    others = [x for x in resident if not protect or x not in needed] or list(resident)
                    if policy == "lru":
                        victim = min(others, key=lambda x: last[x])
                    elif lfu_tie == "recency":
                        victim = min(others, key=lambda x: (freq[x], last[x]))
                    else:
                        victim = min(others, key=lambda x: (freq[x], x))
                    resident.remove(victim)
                    if not keep_counts:
                        freq[victim] = 0
                resident.add(e)
            clock += 1
            last[e] = clock
            freq[e] += 1
        out += [result[e] for e in needed]
    return out


@exercise("09.2", function="simulate_expert_cache", title="An expert cache simulator (LRU and LFU)", points=4,
          reference=simulate_expert_cache,
          hint="decide a step's hits before loading anything; a miss with no free slot evicts by the policy, "
               "sparing the experts the current step uses whenever another resident expert can go",
          hints=("serve a step in two passes: first its resident experts (update their last use and count), then "
                 "its missing ones in increasing id, each one loaded and then used",
                 "the victim is min(candidates, key=last_use) for LRU and min(candidates, key=(count, last_use)) "
                 "for LFU, where candidates are the resident experts not in the current step, or all resident "
                 "experts if that list is empty; counts are kept for evicted experts too"),
          mistakes={"evicting an expert the current step uses while another could go": (
                        lambda s, n, c, p: _cache_variant(s, n, c, p, protect=False)),
                    "serving a step in id order, so a miss can evict a hit before it is used": (
                        lambda s, n, c, p: _cache_variant(s, n, c, p, hits_first=False, protect=False)),
                    "breaking LFU ties by expert id instead of by recency": (
                        lambda s, n, c, p: _cache_variant(s, n, c, p, lfu_tie="id")),
                    "forgetting an expert's count when it is evicted": (
                        lambda s, n, c, p: _cache_variant(s, n, c, p, keep_counts=False))})
def _cache_cases(hidden: bool) -> list[Case]:
    def routed(n_steps, e, k, skew):  # top-k of skewed random scores: a few popular experts
        bias = torch.linspace(skew, 0, e)
        return [sorted((torch.randn(e) + bias).topk(k).indices.tolist()) for _ in range(n_steps)]

    cases = [Case("LRU, E=4, S=2", ([[0, 1], [0, 2], [1, 2], [3, 0], [0, 1]], 4, 2, "lru")),
             Case("LFU, E=4, S=2", ([[0], [0], [0], [1], [2], [0], [1, 3]], 4, 2, "lfu")),
             Case("LFU, a tie", ([[2], [1], [0], [1]], 4, 2, "lfu")),
             Case("LRU, E=8, S=3, routed", (routed(30, 8, 2, 1.5), 8, 3, "lru")),
             Case("LFU, E=8, S=3, routed", (routed(30, 8, 2, 1.5), 8, 3, "lfu"))]
    if hidden:
        cases += [Case("LFU, a step larger than the cache", ([[0, 1], [1, 5], [0, 1, 5], [1, 3]], 8, 2, "lfu")),
                  Case("LRU, S=1", ([[2], [2, 3], [3], [1, 2]], 4, 1, "lru")),
                  Case("LFU, S=E", (routed(20, 6, 2, 1.0), 6, 6, "lfu")),
                  Case("LFU, ties", ([[0, 1], [2, 3], [0, 2], [1, 4], [3, 4], [0, 5]], 6, 3, "lfu")),
                  Case("LRU, no steps", ([], 4, 2, "lru")),
                  Case("LRU, E=16, S=5, routed", (routed(60, 16, 4, 2.0), 16, 5, "lru")),
                  Case("LFU, E=16, S=5, routed", (routed(60, 16, 4, 2.0), 16, 5, "lfu")),
                  Case("LFU, E=8, S=2, random", ([random.sample(range(8), random.randint(1, 3))
                                                  for _ in range(40)], 8, 2, "lfu"))]
    return cases


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for 09.3: int8 codes ``[d_in, d_out]`` and float32 scales ``[d_out]`` (one per output column)."""
    q = quantize(w, 8, scale_dtype=torch.float32)
    return q.codes(), q.scale.reshape(w.shape[-1])


def _symmetric(w, dim, divisor, low, high, rounding=torch.round):
    """Codes and scales of a symmetric quantizer with its constants exposed (to build the known mistakes)."""
    scale = (w.abs().amax(dim=dim, keepdim=True) / divisor).clamp(min=torch.finfo(torch.float32).tiny)
    return rounding(w / scale).clamp(low, high), scale


def _int8_per_row(w):
    codes, scale = _symmetric(w, 1, 127, -127, 127)
    return codes.to(torch.int8), scale.reshape(-1)


def _int8_128(w):
    codes, scale = _symmetric(w, 0, 128, -128, 127)
    return codes.to(torch.int8), scale.reshape(-1)


def _int8_truncate(w):
    codes, scale = _symmetric(w, 0, 127, -127, 127, torch.trunc)
    return codes.to(torch.int8), scale.reshape(-1)


@exercise("09.3", function="quantize_int8_per_channel", title="int8 per-channel quantization", points=2,
          reference=quantize_int8_per_channel, rtol=1e-6, atol=0.0,
          hint="symmetric: each output column j gets one scale s_j = max_i |w_ij| / 127, and each weight the "
               "nearest integer code round(w_ij / s_j) in [-127, 127]",
          hints=("reduce over the input dimension (dim 0) for the scale; clamp the scale to at least "
                 "torch.finfo(torch.float32).tiny so an all-zero column gets codes 0, not NaN",),
          mistakes={"one scale per row (input channel) instead of per output column": _int8_per_row,
                    "dividing by 128 (the int8 range is asymmetric; symmetric quantization uses 127)": _int8_128,
                    "truncating toward zero instead of rounding to the nearest code": _int8_truncate})
def _int8_cases(hidden: bool) -> list[Case]:
    shapes = [(16, 4), (64, 32)] + ([(1, 1), (128, 7), (33, 65)] if hidden else [])
    cases = [Case(f"w [{a}, {b}]", (torch.randn(a, b) * torch.logspace(-2, 0, b),)) for a, b in shapes]
    if hidden:
        w = torch.randn(8, 5)
        w[:, 2] = 0.0  # an all-zero column
        w[3, 4] = 40.0  # an outlier
        cases.append(Case("w [8, 5] with a zero column and an outlier", (w,)))
    return cases


def fake_quantize_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reference for 09.4: ``w [d_in, d_out]`` after int4 group-wise quantization and back (float32 scales)."""
    return fake_quantize(w, 4, group_size, scale_dtype=torch.float32)


def _int4_groups_along_output(w, group_size):
    return fake_quantize(w.T.contiguous(), 4, group_size if w.shape[1] % group_size == 0 else None,
                         scale_dtype=torch.float32).T


def _int4_range_8(w, group_size):
    codes, scale = _symmetric(w.reshape(-1, group_size, w.shape[1]), 1, 8, -8, 7)
    return (codes * scale).reshape(w.shape)


def _int4_per_channel(w, group_size):
    return fake_quantize(w, 4, None, scale_dtype=torch.float32)


@exercise("09.4", function="fake_quantize_int4", title="int4 group-wise quantize and dequantize", points=2,
          reference=fake_quantize_int4, rtol=1e-6, atol=1e-7,
          hint="split the input dimension into groups of group_size consecutive rows; each group of each output "
               "column gets its own scale max|w| / 7; codes round(w / s) in [-7, 7]; return s * code",
          hints=("w.reshape(d_in // group_size, group_size, d_out): reduce over dim 1 for the scales, keep the "
                 "dimension to broadcast, then reshape back to [d_in, d_out]",),
          mistakes={"groups along the output dimension instead of the input dimension": _int4_groups_along_output,
                    "dividing by 8 (use the symmetric range [-7, 7])": _int4_range_8,
                    "one scale per whole column (group_size ignored)": _int4_per_channel})
def _int4_cases(hidden: bool) -> list[Case]:
    configs = [(32, 8, 8), (64, 16, 32)] + ([(128, 3, 128), (16, 16, 1), (96, 40, 32)] if hidden else [])
    return [Case(f"w [{a}, {b}], group_size={g}", (torch.randn(a, b) * torch.rand(a, 1), g)) for a, b, g in configs]


def cached_attention_step(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for 09.5: append the new key/value to the cache, then one query attends to every position."""
    k_all, v_all = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
    repeat = q.shape[1] // k_all.shape[1]
    out = F.scaled_dot_product_attention(q, k_all.repeat_interleave(repeat, 1), v_all.repeat_interleave(repeat, 1))
    return out, k_all, v_all


def _attend_past_only(q, k_new, v_new, k_cache, v_cache):
    _, k_all, v_all = cached_attention_step(q, k_new, v_new, k_cache, v_cache)
    if k_cache.shape[2] == 0:
        return cached_attention_step(q, k_new, v_new, k_cache, v_cache)
    repeat = q.shape[1] // k_cache.shape[1]
    out = F.scaled_dot_product_attention(q, k_cache.repeat_interleave(repeat, 1), v_cache.repeat_interleave(repeat, 1))
    return out, k_all, v_all


def _no_scaling(q, k_new, v_new, k_cache, v_cache):
    return cached_attention_step(q * math.sqrt(q.shape[-1]), k_new, v_new, k_cache, v_cache)


def _heads_tiled(q, k_new, v_new, k_cache, v_cache):
    k_all, v_all = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)
    repeat = q.shape[1] // k_all.shape[1]
    out = F.scaled_dot_product_attention(q, k_all.repeat(1, repeat, 1, 1), v_all.repeat(1, repeat, 1, 1))
    return out, k_all, v_all


@exercise("09.5", function="cached_attention_step", title="One decode step of attention with a KV cache", points=3,
          reference=cached_attention_step,
          hint="the new token's key and value join the cache first, then its query attends to every cached "
               "position (no mask is needed: nothing in the cache lies in the future); query head h uses "
               "key/value head h // (n_heads / n_kv_heads)",
          hints=("k_all = torch.cat([k_cache, k_new], dim=2); scores = q @ k^T / sqrt(head_dim) with the kv heads "
                 "repeated with repeat_interleave along dim 1; softmax over positions; times v",),
          mistakes={"attending only to the cached positions (the new key is appended after attention)": _attend_past_only,
                    "no 1/sqrt(head_dim) scaling of the scores": _no_scaling,
                    "tiling the kv heads with repeat instead of repeat_interleave (wrong head groups)": _heads_tiled})
def _attention_cases(hidden: bool) -> list[Case]:
    configs = [(1, 2, 2, 5, 8), (2, 4, 2, 7, 4)]
    if hidden:
        configs += [(3, 8, 1, 16, 16), (1, 4, 4, 0, 8), (2, 6, 3, 1, 2), (1, 8, 2, random.randint(2, 40), 8)]
    cases = []
    for b, h, kv, t, hd in configs:
        args = (torch.randn(b, h, 1, hd), torch.randn(b, kv, 1, hd), torch.randn(b, kv, 1, hd),
                torch.randn(b, kv, t, hd), torch.randn(b, kv, t, hd))
        cases.append(Case(f"B={b}, heads={h}, kv_heads={kv}, cached={t}, head_dim={hd}", args, grad_wrt=(0, 1)))
    return cases
