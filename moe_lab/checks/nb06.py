"""Exercises of 06_param_flop_memory_math: parameters, FLOPs and memory of MoE transformers."""
from __future__ import annotations

import random

from ..calculator import (
    Arch, attention_flops_per_token, attention_params, count_params, expected_experts_touched, kv_cache_bytes,
    training_memory,
)
from .core import Case, exercise


@exercise("06.1", function="attention_params", title="Parameters of grouped-query attention", points=1,
          reference=attention_params,
          hint="W_q and W_o are d_model x (n_heads*head_dim); W_k and W_v are d_model x (n_kv_heads*head_dim)")
def _attention_cases(hidden: bool) -> list[Case]:
    configs = [(4096, 32, 8, 128), (512, 8, 8, 64)]
    if hidden:
        configs += [(2048, 16, 16, 128), (7168, 56, 1, 128), (96, 3, 1, 40)]
        configs += [(random.randint(1, 64) * 64, h, random.choice([1, h]), 64) for h in (4, 12)]
    return [Case(f"d_model={d}, heads={h}, kv_heads={kv}, head_dim={hd}", (d, h, kv, hd)) for d, h, kv, hd in configs]


def mixtral_style_params(n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                         vocab_size: int, num_experts: int, k: int, d_expert: int) -> tuple[int, int]:
    """Reference for 06.2: ``(total, active)`` parameters of a Mixtral-style model (see the notebook)."""
    arch = Arch(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                vocab_size=vocab_size, num_experts=num_experts, k=k, d_expert=d_expert)
    count = count_params(arch)
    return count.total, count.active


@exercise("06.2", function="mixtral_style_params", title="Total and active parameters of a Mixtral-style model",
          points=3, reference=mixtral_style_params,
          hint="per layer: attention + router (d_model*E) + E SwiGLU experts (3*d_model*d_expert each) + 2 RMSNorm "
               "vectors (d_model each); plus input embedding and output head (vocab*d_model each) and a final "
               "norm; active replaces E experts by k experts")
def _mixtral_cases(hidden: bool) -> list[Case]:
    configs = [(32, 4096, 32, 8, 128, 32000, 8, 2, 14336), (2, 64, 4, 2, 16, 256, 4, 1, 128)]
    if hidden:
        configs += [(56, 6144, 48, 8, 128, 32768, 8, 2, 16384), (1, 8, 1, 1, 8, 1, 1, 1, 1),
                    (4, 128, 8, 8, 16, 1000, 64, 8, 32),
                    (random.randint(1, 40), 256, 4, 2, 64, random.randint(10, 50000), 16, random.randint(1, 16), 512)]
    return [Case(f"layers={c[0]}, d={c[1]}, heads={c[2]}/{c[3]}, vocab={c[5]}, E={c[6]}, k={c[7]}, d_expert={c[8]}", c)
            for c in configs]


def training_flops(matmul_params: int, n_layers: int, n_heads: int, head_dim: int, context: int,
                   tokens: int) -> int:
    """Reference for 06.3: training FLOPs for ``tokens`` tokens, ``3 x`` (2 FLOPs per active matmul weight plus
    attention's ``q k^T`` and ``softmax V`` over ``context`` keys in every layer)."""
    forward = 2 * matmul_params + n_layers * attention_flops_per_token(n_heads, head_dim, head_dim, context)
    return 3 * forward * tokens


@exercise("06.3", function="training_flops", title="Training FLOPs with the attention term", points=2,
          reference=training_flops,
          hint="forward per token = 2*matmul_params + n_layers * (2*n_heads*head_dim*context for q.k^T + the same "
               "for the weighted sum of V); training = 3 x forward; multiply by tokens")
def _flops_cases(hidden: bool) -> list[Case]:
    configs = [(12_600_000_000, 32, 32, 128, 2048, 1000), (1000, 1, 1, 4, 0, 1)]
    if hidden:
        configs += [(37_000_000_000, 61, 128, 128, 4096, 10**12), (5, 2, 3, 7, 11, 13),
                    (random.randint(10**6, 10**9), 24, 16, 64, random.randint(1, 8192), random.randint(1, 10**6))]
    return [Case(f"N={n}, layers={nl}, heads={h}, head_dim={hd}, context={c}, tokens={t}", (n, nl, h, hd, c, t))
            for n, nl, h, hd, c, t in configs]


def adam_training_bytes(num_params: int, dtype: str) -> float:
    """Reference for 06.4: bytes for weights, gradients, fp32 master copy (unless fp32) and Adam's moments."""
    return training_memory(num_params, dtype)["total"]


@exercise("06.4", function="adam_training_bytes", title="Training memory with Adam", points=1,
          reference=adam_training_bytes,
          hint="weights and gradients take the dtype's bytes each; mixed precision adds a 4-byte fp32 master copy; "
               "Adam keeps two fp32 moments (8 bytes); return a float")
def _memory_cases(hidden: bool) -> list[Case]:
    configs = [(46_700_000_000, "bf16"), (1000, "fp32")]
    if hidden:
        configs += [(671_000_000_000, "fp16"), (1, "bf16"), (random.randint(1, 10**9), "fp32")]
    return [Case(f"params={n}, dtype={d}", (n, d)) for n, d in configs]


def kv_cache_size(n_layers: int, n_kv_heads: int, head_dim: int, context: int, batch: int, dtype: str) -> float:
    """Reference for 06.5: KV-cache bytes of grouped-query attention."""
    arch = Arch(n_layers=n_layers, d_model=n_kv_heads * head_dim, n_heads=n_kv_heads, head_dim=head_dim,
                vocab_size=0)
    return kv_cache_bytes(arch, context, batch, dtype)


@exercise("06.5", function="kv_cache_size", title="KV-cache size", points=1, reference=kv_cache_size,
          hint="every layer stores a key and a value vector of n_kv_heads*head_dim numbers per token, for every "
               "token of every sequence; bytes per number: fp32 4, bf16/fp16 2, fp8 1; return a float")
def _kv_cases(hidden: bool) -> list[Case]:
    configs = [(32, 8, 128, 32768, 1, "bf16"), (2, 1, 4, 10, 3, "fp32")]
    if hidden:
        configs += [(80, 8, 128, 4096, 64, "fp8"), (1, 32, 128, 0, 5, "bf16"),
                    (random.randint(1, 100), 4, 64, random.randint(1, 10**5), random.randint(1, 32), "fp16")]
    return [Case(f"layers={l}, kv_heads={h}, head_dim={d}, context={c}, batch={b}, {t}", (l, h, d, c, b, t))
            for l, h, d, c, b, t in configs]


@exercise("06.6", function="experts_touched", title="How many experts does a batch touch?", points=2,
          reference=expected_experts_touched, rtol=1e-9,
          hint="one token misses a given expert with probability 1 - k/E; T independent tokens all miss it with "
               "probability (1 - k/E)^T; sum over the E experts")
def _touched_cases(hidden: bool) -> list[Case]:
    configs = [(8, 2, 1), (64, 6, 32), (256, 8, 0)]
    if hidden:
        configs += [(8, 8, 5), (2048, 1, 4096), (random.randint(2, 300), 1, random.randint(1, 1000)), (160, 6, 7)]
    return [Case(f"E={e}, k={k}, T={t}", (e, k, t)) for e, k, t in configs]
