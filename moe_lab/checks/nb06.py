"""Exercises of 06_param_flop_memory_math: parameters of Mixtral- and DeepSeek-style models, FLOPs, memory."""
from __future__ import annotations

import random

from ..calculator import (
    DTYPE_BYTES, Arch, attention_flops_per_token, count_params, expected_experts_touched, kv_cache_bytes,
    training_memory,
)
from .core import Case, exercise


def mixtral_style_params(n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                         vocab_size: int, num_experts: int, k: int, d_expert: int) -> tuple[int, int]:
    """Reference for 06.1: ``(total, active)`` parameters of a Mixtral-style model (see the notebook)."""
    arch = Arch(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                vocab_size=vocab_size, num_experts=num_experts, k=k, d_expert=d_expert)
    count = count_params(arch)
    return count.total, count.active


def _mixtral_variant(*, kv_heads=True, untied=True, norms=True):
    def params(n_layers, d_model, n_heads, n_kv_heads, head_dim, vocab_size, num_experts, k, d_expert):
        arch = Arch(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads if kv_heads else None,
                    head_dim=head_dim, vocab_size=vocab_size, num_experts=num_experts, k=k, d_expert=d_expert,
                    tie_embeddings=not untied, norms=norms)
        count = count_params(arch)
        return count.total, count.active
    return params


@exercise("06.1", function="mixtral_style_params", title="Total and active parameters of a Mixtral-style model",
          points=3, reference=mixtral_style_params,
          hint="add up what every layer holds (attention, router, experts, norms) and what the model holds once "
               "(embedding, output head, final norm); a token uses all of it except the experts it was not sent to",
          hints=("grouped-query attention: W_q and W_o are d_model x (n_heads * head_dim), W_k and W_v only "
                 "d_model x (n_kv_heads * head_dim); each SwiGLU expert has 3 * d_model * d_expert weights; the "
                 "router d_model * E; two RMSNorm vectors of d_model per layer",
                 "once: an input embedding and a separate output head (vocab_size * d_model each) and a final "
                 "norm (d_model); active = total minus (E - k) experts in every layer; with Mixtral's numbers you "
                 "get about 46.7B and 12.9B"),
          mistakes={"keys and values with n_heads heads (in GQA they have n_kv_heads)": _mixtral_variant(kv_heads=False),
                    "one vocab x d_model matrix (Mixtral's embedding and output head are separate)":
                    _mixtral_variant(untied=False),
                    "leaving out the RMSNorm weights (2 per layer and a final one, d_model each)":
                    _mixtral_variant(norms=False)})
def _mixtral_cases(hidden: bool) -> list[Case]:
    configs = [(32, 4096, 32, 8, 128, 32000, 8, 2, 14336), (2, 64, 4, 2, 16, 256, 4, 1, 128)]
    if hidden:
        configs += [(56, 6144, 48, 8, 128, 32768, 8, 2, 16384), (1, 8, 1, 1, 8, 1, 1, 1, 1),
                    (4, 128, 8, 8, 16, 1000, 64, 8, 32),
                    (random.randint(1, 40), 256, 4, 2, 64, random.randint(10, 50000), 16, random.randint(1, 16), 512)]
    return [Case(f"layers={c[0]}, d={c[1]}, heads={c[2]}/{c[3]}, vocab={c[5]}, E={c[6]}, k={c[7]}, d_expert={c[8]}", c)
            for c in configs]


DEEPSEEK_ARGS = ("n_layers", "first_dense", "d_model", "vocab_size", "d_ff", "num_experts", "n_shared", "k",
                 "d_expert", "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_head_dim")


def deepseek_style_params(n_layers: int, first_dense: int, d_model: int, vocab_size: int, d_ff: int,
                          num_experts: int, n_shared: int, k: int, d_expert: int, n_heads: int, q_lora_rank: int,
                          kv_lora_rank: int, qk_nope_dim: int, qk_rope_dim: int, v_head_dim: int) -> tuple[int, int]:
    """Reference for 06.2: ``(total, active)`` of a DeepSeek-V2/V3-style model (MLA, dense first layers,
    shared and routed SwiGLU experts), by the library's calculator."""
    arch = Arch(n_layers=n_layers, first_dense=first_dense, d_model=d_model, vocab_size=vocab_size, d_ff=d_ff,
                num_experts=num_experts, n_shared=n_shared, k=k, d_expert=d_expert, n_heads=n_heads,
                attention="mla", q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_nope_dim=qk_nope_dim,
                qk_rope_dim=qk_rope_dim, v_head_dim=v_head_dim)
    count = count_params(arch)
    return count.total, count.active


def deepseek_formula(n_layers, first_dense, d_model, vocab_size, d_ff, num_experts, n_shared, k, d_expert, n_heads,
                     q_lora_rank, kv_lora_rank, qk_nope_dim, qk_rope_dim, v_head_dim, *, dense_layers=True,
                     shared_active=True, lora_norms=True, rope_key=True) -> tuple[int, int]:
    """06.2 written out as the notebook states it (a test checks it equals the reference); the keyword flags
    switch off one piece each, giving the known mistakes."""
    d, h, qk = d_model, n_heads, qk_nope_dim + qk_rope_dim
    q = d * q_lora_rank + q_lora_rank * h * qk if q_lora_rank else d * h * qk
    kv = d * (kv_lora_rank + (qk_rope_dim if rope_key else 0)) + kv_lora_rank * h * (qk_nope_dim + v_head_dim)
    attention = q + kv + h * v_head_dim * d
    norms = 2 * d + ((q_lora_rank + kv_lora_rank) if lora_norms else 0)
    n_dense = min(first_dense, n_layers) if dense_layers else 0
    n_moe = n_layers - n_dense
    expert = 3 * d * d_expert
    common = n_layers * (attention + norms) + n_dense * 3 * d * d_ff + n_moe * d * num_experts + 2 * vocab_size * d + d
    shared = n_moe * n_shared * expert
    routed = n_moe * num_experts * expert
    return common + shared + routed, common + (shared if shared_active else 0) + n_moe * k * expert


def _deepseek_variant(**flag):
    def params(*args):
        return deepseek_formula(*args, **flag)
    return params


V3 = (61, 3, 7168, 129280, 18432, 256, 1, 8, 2048, 128, 1536, 512, 128, 64, 128)
V2 = (60, 1, 5120, 102400, 12288, 160, 2, 6, 1536, 128, 1536, 512, 128, 64, 128)
V2_LITE = (27, 1, 2048, 102400, 10944, 64, 2, 6, 1408, 16, 0, 512, 128, 64, 128)  # no query compression


@exercise("06.2", function="deepseek_style_params", title="DeepSeek-V2/V3: MLA, dense first layers, shared experts",
          points=5, reference=deepseek_style_params,
          hint="the same bookkeeping as 06.1 with three new pieces: attention through low-rank bottlenecks (MLA), a "
               "few dense layers before the MoE layers, and shared experts that every token uses",
          hints=("MLA per layer: queries go d_model -> q_lora_rank -> n_heads * (qk_nope_dim + qk_rope_dim) (or "
                 "straight from d_model when q_lora_rank is 0); keys and values share one down-projection "
                 "d_model -> kv_lora_rank plus a rope key of qk_rope_dim, then kv_lora_rank -> n_heads * "
                 "(qk_nope_dim + v_head_dim); the output is n_heads * v_head_dim -> d_model",
                 "norm weights per layer: 2 * d_model plus one RMSNorm on each low-rank latent (q_lora_rank when "
                 "there is one, and kv_lora_rank); the first first_dense layers (all of them if first_dense >= "
                 "n_layers) have a dense SwiGLU FFN of width d_ff and no router",
                 "every MoE layer: a router d_model * num_experts, n_shared + num_experts SwiGLU experts of width "
                 "d_expert; active keeps the shared experts and k routed ones; embedding and output head are "
                 "untied; the visible cases should land near 671B / 37B (V3) and 236B / 21B (V2)"),
          mistakes={"every layer an MoE layer (the first first_dense layers are dense)":
                    _deepseek_variant(dense_layers=False),
                    "the shared experts left out of the active count (every token uses them)":
                    _deepseek_variant(shared_active=False),
                    "MLA without the RMSNorms of its low-rank latents (q_lora_rank + kv_lora_rank per layer)":
                    _deepseek_variant(lora_norms=False),
                    "the key/value down-projection without the shared rope key (it is d_model x (kv_lora_rank + "
                    "qk_rope_dim))": _deepseek_variant(rope_key=False)})
def _deepseek_cases(hidden: bool) -> list[Case]:
    configs = [("DeepSeek-V3", V3), ("DeepSeek-V2", V2)]
    if hidden:
        configs += [("DeepSeek-V2-Lite (no query compression)", V2_LITE),
                    ("all layers dense", (3, 3, 64, 100, 256, 8, 1, 2, 32, 4, 32, 16, 8, 4, 8)),
                    ("no dense layer, no shared expert", (4, 0, 64, 100, 256, 8, 0, 2, 32, 4, 0, 16, 8, 4, 8)),
                    ("more dense layers than layers", (2, 5, 32, 10, 64, 4, 1, 1, 16, 2, 8, 8, 4, 2, 4)),
                    ("random", (random.randint(2, 30), random.randint(0, 3), 256, random.randint(10, 50000), 512,
                                random.randint(2, 64), random.randint(0, 2), 2, 64, 8, random.choice([0, 64]), 32,
                                16, 8, 16))]
    return [Case(name, args) for name, args in configs]


def training_flops(matmul_params: int, n_layers: int, n_heads: int, head_dim: int, context: int,
                   tokens: int) -> int:
    """Reference for 06.3: training FLOPs for ``tokens`` tokens, ``3 x`` (2 FLOPs per active matmul weight plus
    attention's ``q k^T`` and ``softmax V`` over ``context`` keys in every layer)."""
    forward = 2 * matmul_params + n_layers * attention_flops_per_token(n_heads, head_dim, head_dim, context)
    return 3 * forward * tokens


@exercise("06.3", function="training_flops", title="Training FLOPs with the attention term", points=2,
          reference=training_flops,
          hint="per token the forward pass pays 2 FLOPs per active weight plus, in every layer, attention's work "
               "over the context (scores and the weighted sum of values); the backward pass costs about twice the "
               "forward",
          hints=("attention per layer and token: q.k^T is 2 * n_heads * head_dim * context FLOPs and the weighted sum "
                 "of V costs the same again",
                 "training = 3 x forward, times the number of tokens; return an int"),
          mistakes={"only the q.k^T term (the weighted sum of the values costs as much)":
                    lambda matmul_params, n_layers, n_heads, head_dim, context, tokens:
                    3 * (2 * matmul_params + 2 * n_layers * n_heads * head_dim * context) * tokens,
                    "the forward pass only (training costs about 3x the forward)":
                    lambda matmul_params, n_layers, n_heads, head_dim, context, tokens:
                    training_flops(matmul_params, n_layers, n_heads, head_dim, context, tokens) // 3,
                    "the 6N rule without the attention term":
                    lambda matmul_params, n_layers, n_heads, head_dim, context, tokens: 6 * matmul_params * tokens})
def _flops_cases(hidden: bool) -> list[Case]:
    configs = [(12_600_000_000, 32, 32, 128, 2048, 1000), (1000, 1, 1, 4, 3, 1)]
    if hidden:
        configs += [(37_000_000_000, 61, 128, 128, 4096, 10**12), (5, 2, 3, 7, 11, 13), (1000, 1, 1, 4, 0, 1),
                    (random.randint(10**6, 10**9), 24, 16, 64, random.randint(1, 8192), random.randint(1, 10**6))]
    return [Case(f"N={n}, layers={nl}, heads={h}, head_dim={hd}, context={c}, tokens={t}", (n, nl, h, hd, c, t))
            for n, nl, h, hd, c, t in configs]


def memory_bytes(num_params: int, dtype: str, n_layers: int, n_kv_heads: int, head_dim: int, context: int,
                 batch: int) -> tuple[float, float]:
    """Reference for 06.4: ``(training, serving)`` bytes: Adam training (weights, gradients, fp32 master copy
    unless fp32, fp32 moments) and serving (all weights in ``dtype`` plus the GQA KV cache in ``dtype``)."""
    arch = Arch(n_layers=n_layers, d_model=n_kv_heads * head_dim, n_heads=n_kv_heads, head_dim=head_dim, vocab_size=0)
    return (training_memory(num_params, dtype)["total"],
            num_params * DTYPE_BYTES[dtype] + kv_cache_bytes(arch, context, batch, dtype))


def _memory_variant(*, master=True, kv_values=True, kv=True):
    def memory(num_params, dtype, n_layers, n_kv_heads, head_dim, context, batch):
        b = DTYPE_BYTES[dtype]
        fp32_master = 4.0 if master and dtype != "fp32" else 0.0
        training = num_params * (2 * b + fp32_master + 8.0)
        cache = (2 if kv_values else 1) * n_layers * n_kv_heads * head_dim * context * batch * b
        return float(training), float(num_params * b + (cache if kv else 0))
    return memory


@exercise("06.4", function="memory_bytes", title="Training vs serving memory", points=2, reference=memory_bytes,
          hint="training keeps per parameter the weights, their gradients, an fp32 master copy in mixed precision "
               "and Adam's two fp32 moments; serving keeps every weight plus the keys and values of every cached "
               "token",
          hints=("bytes per number: fp32 4, bf16 and fp16 2; mixed precision (bf16 / fp16) adds a 4-byte master "
                 "copy; the two Adam moments are fp32 (8 bytes) whatever the dtype",
                 "KV cache: per layer, per token, per sequence, a key and a value of n_kv_heads * head_dim numbers "
                 "in dtype; return two floats"),
          mistakes={"no fp32 master copy (mixed precision keeps one)": _memory_variant(master=False),
                    "a KV cache of keys only (the values are cached too)": _memory_variant(kv_values=False),
                    "serving without the KV cache (it grows with batch x context)": _memory_variant(kv=False)})
def _memory_cases(hidden: bool) -> list[Case]:
    configs = [(46_700_000_000, "bf16", 32, 8, 128, 32768, 1), (1000, "fp32", 2, 1, 4, 10, 3)]
    if hidden:
        configs += [(671_000_000_000, "fp16", 61, 128, 128, 4096, 8), (1, "bf16", 1, 1, 1, 0, 1),
                    (random.randint(1, 10**9), "fp32", random.randint(1, 100), 4, 64, random.randint(1, 10**5),
                     random.randint(1, 32))]
    return [Case(f"params={n}, {t}, layers={l}, kv_heads={h}, head_dim={d}, context={c}, batch={b}",
                 (n, t, l, h, d, c, b)) for n, t, l, h, d, c, b in configs]


@exercise("06.5", function="experts_touched", title="How many experts does a batch touch?", points=2,
          reference=expected_experts_touched, rtol=1e-9,
          hint="by symmetry every expert has the same chance of being used by nobody in the batch; the expected "
               "number used is E times the chance that a given expert is used at all",
          hints=("one token picks k distinct experts out of E, so it misses a given expert with probability 1 - k/E; "
                 "tokens route independently",
                 "T tokens all miss it with probability (1 - k/E)^T; return E * (1 - (1 - k/E)^T) as a float"),
          mistakes={"k independent picks per token, with replacement (a token's k experts are distinct)":
                    lambda num_experts, k, tokens: num_experts * (1 - (1 - 1 / num_experts) ** (k * tokens)),
                    "min(E, k T): as if tokens never shared an expert":
                    lambda num_experts, k, tokens: float(min(num_experts, k * tokens))})
def _touched_cases(hidden: bool) -> list[Case]:
    configs = [(8, 2, 1), (64, 6, 32), (256, 8, 0), (8, 2, 16)]
    if hidden:
        configs += [(8, 8, 5), (2048, 1, 4096), (random.randint(2, 300), 1, random.randint(1, 1000)), (160, 6, 7)]
    return [Case(f"E={e}, k={k}, T={t}", (e, k, t)) for e, k, t in configs]
