"""Property-based tests of the parameter / FLOP / memory calculator against formulas written out layer by layer,
and of the errors a bad architecture or size must get."""
from dataclasses import replace

import pytest
from hypothesis import given, strategies as st

from moe_lab.calculator import (Arch, attention_params, count_params, ffn_params, flops_per_token, kv_cache_bytes,
                                moe_params, training_memory)
from tests.strategies import bad_ints, names

MULT = {"gelu": 2, "swiglu": 3}


@st.composite
def archs(draw, attention=st.sampled_from(["gqa", "mla"])):
    """A valid :class:`Arch`, dense or MoE, GQA or MLA, any schedule."""
    n_heads = draw(st.integers(1, 8))
    kind = draw(attention)
    kw = dict(n_layers=draw(st.integers(1, 6)), d_model=n_heads * draw(st.integers(1, 16)), n_heads=n_heads,
              vocab_size=draw(st.integers(0, 500)), activation=draw(st.sampled_from(["gelu", "swiglu"])),
              tie_embeddings=draw(st.booleans()), norms=draw(st.booleans()), attention=kind)
    if kind == "gqa":
        kw["n_kv_heads"] = draw(st.sampled_from([None] + [d for d in range(1, n_heads + 1) if n_heads % d == 0]))
        kw["head_dim"] = draw(st.none() | st.integers(1, 32))
    else:
        kw.update(q_lora_rank=draw(st.integers(0, 16)), kv_lora_rank=draw(st.integers(1, 16)),
                  qk_nope_dim=draw(st.integers(0, 8)), qk_rope_dim=draw(st.integers(1, 8)),
                  v_head_dim=draw(st.integers(1, 8)))
    if draw(st.booleans()):  # MoE
        num_experts = draw(st.integers(1, 16))
        kw.update(num_experts=num_experts, k=draw(st.integers(1, num_experts)), d_expert=draw(st.integers(1, 64)),
                  n_shared=draw(st.integers(0, 2)), d_shared=draw(st.none() | st.integers(1, 64)),
                  moe_every=draw(st.integers(1, 3)), first_dense=draw(st.integers(0, 2)))
        schedule = [i >= kw["first_dense"] and (i - kw["first_dense"] + 1) % kw["moe_every"] == 0
                    for i in range(kw["n_layers"])]
        kw["d_ff"] = draw(st.integers(0 if all(schedule) else 1, 128))
    else:
        kw["d_ff"] = draw(st.integers(0, 128))
    return Arch(**kw)


def slow_count(a: Arch) -> tuple[int, int]:
    """(total, active) written out layer by layer, straight from the architecture's definition."""
    total = active = 0
    embedding = a.vocab_size * a.d_model
    total += embedding + (0 if a.tie_embeddings else embedding)
    active += embedding + (0 if a.tie_embeddings else embedding)
    for i in range(a.n_layers):
        if a.attention == "gqa":
            heads, kv = a.n_heads, a.n_heads if a.n_kv_heads is None else a.n_kv_heads
            hd = a.d_model // a.n_heads if a.head_dim is None else a.head_dim
            attn = a.d_model * heads * hd + 2 * a.d_model * kv * hd + heads * hd * a.d_model  # q, k, v, o
            attn_norm = 0
        else:
            qk = a.qk_nope_dim + a.qk_rope_dim
            q = (a.d_model * a.q_lora_rank + a.q_lora_rank * a.n_heads * qk) if a.q_lora_rank else a.d_model * a.n_heads * qk
            kv = a.d_model * (a.kv_lora_rank + a.qk_rope_dim) + a.kv_lora_rank * a.n_heads * (a.qk_nope_dim + a.v_head_dim)
            attn = q + kv + a.n_heads * a.v_head_dim * a.d_model
            attn_norm = a.q_lora_rank + a.kv_lora_rank
        total += attn
        active += attn
        is_moe = a.num_experts > 0 and i >= a.first_dense and (i - a.first_dense + 1) % a.moe_every == 0
        if is_moe:
            expert = MULT[a.activation] * a.d_model * a.d_expert
            shared = a.n_shared * MULT[a.activation] * a.d_model * (a.d_expert if a.d_shared is None else a.d_shared)
            router = a.d_model * a.num_experts
            total += a.num_experts * expert + shared + router
            active += a.k * expert + shared + router
        elif a.d_ff:
            total += MULT[a.activation] * a.d_model * a.d_ff
            active += MULT[a.activation] * a.d_model * a.d_ff
        if a.norms:
            total += 2 * a.d_model + attn_norm
            active += 2 * a.d_model + attn_norm
    if a.norms:
        total += a.d_model
        active += a.d_model
    return total, active


@given(archs())
def test_count_params_matches_a_layer_by_layer_count(arch):
    count = count_params(arch)
    assert (count.total, count.active) == slow_count(arch)


@given(archs(), st.integers(0, 4096), st.booleans())
def test_flops_are_two_per_active_matmul_weight_plus_attention(arch, context, training):
    total, active = slow_count(arch)
    embedding = arch.vocab_size * arch.d_model
    norms = (arch.n_layers * 2 * arch.d_model + arch.d_model
             + arch.n_layers * (arch.q_lora_rank + arch.kv_lora_rank if arch.attention == "mla" else 0)) if arch.norms else 0
    matmul = active - embedding - norms + (embedding if arch.tie_embeddings else 0)  # the output head always runs
    if arch.attention == "gqa":
        qk = v = arch.d_model // arch.n_heads if arch.head_dim is None else arch.head_dim
    else:
        qk, v = arch.qk_nope_dim + arch.qk_rope_dim, arch.v_head_dim
    forward = 2 * matmul + arch.n_layers * 2 * arch.n_heads * (qk + v) * context
    assert flops_per_token(arch, context, training=training) == (3 * forward if training else forward)


@given(archs(attention=st.just("gqa")), st.integers(0, 10_000), st.integers(0, 64),
       st.sampled_from([("fp32", 4), ("bf16", 2), ("fp8", 1)]))
def test_kv_cache_is_keys_and_values_per_token_and_layer(arch, context, batch, dtype):
    kv = arch.n_heads if arch.n_kv_heads is None else arch.n_kv_heads
    hd = arch.d_model // arch.n_heads if arch.head_dim is None else arch.head_dim
    assert kv_cache_bytes(arch, context, batch, dtype[0]) == arch.n_layers * 2 * kv * hd * context * batch * dtype[1]


@given(st.integers(0, 10**12) | st.floats(0, 1e12), st.sampled_from([("fp32", 16), ("bf16", 16), ("fp8", 14)]))
def test_training_memory_is_bytes_per_parameter(num_params, dtype):
    # fp32: 4 + 4 + 0 + 8; bf16: 2 + 2 + 4 + 8; fp8: 1 + 1 + 4 + 8 bytes per parameter
    assert training_memory(num_params, dtype[0])["total"] == pytest.approx(num_params * dtype[1])


@given(st.integers(1, 10**5), st.integers(1, 10**5), st.sampled_from(["gelu", "swiglu"]), st.integers(1, 64),
       st.data())
def test_layer_formulas(d_model, d_ff, activation, num_experts, data):
    k = data.draw(st.integers(1, num_experts))
    assert ffn_params(d_model, d_ff, activation) == MULT[activation] * d_model * d_ff
    expert = MULT[activation] * d_model * d_ff
    assert moe_params(d_model, d_ff, num_experts, k, activation) == (num_experts * expert + d_model * num_experts,
                                                                      k * expert + d_model * num_experts)


@given(st.integers(1, 64), st.integers(1, 16), st.data())
def test_attention_params_mha_is_four_d_squared(head_size, n_heads, data):
    d = head_size * n_heads
    assert attention_params(d, n_heads) == 4 * d * d
    kv = data.draw(st.sampled_from([g for g in range(1, n_heads + 1) if n_heads % g == 0]))
    assert attention_params(d, n_heads, kv) == 2 * d * d + 2 * d * kv * head_size


# ------------------------------------------------------------------------------------------------- bad input
SIZE_FIELDS = {"n_layers": 1, "d_model": 1, "n_heads": 1, "vocab_size": 0, "d_ff": 0, "num_experts": 0, "k": 0,
               "d_expert": 0, "n_shared": 0, "moe_every": 1, "first_dense": 0}


@given(archs(attention=st.just("gqa")), st.sampled_from(sorted(SIZE_FIELDS)), st.data())
def test_arch_rejects_bad_sizes(arch, field, data):
    value = data.draw(bad_ints(SIZE_FIELDS[field]))
    with pytest.raises((ValueError, TypeError)) as info:
        replace(arch, **{field: value})
    assert names(str(info.value), field), str(info.value)


@given(archs(attention=st.just("gqa")).filter(lambda a: a.n_heads > 1), st.data())
def test_arch_rejects_kv_heads_that_do_not_divide_the_heads(arch, data):
    kv = data.draw(st.integers(1, 2 * arch.n_heads).filter(lambda g: arch.n_heads % g))
    with pytest.raises(ValueError, match="n_kv_heads"):
        replace(arch, n_kv_heads=kv)


@given(archs().filter(lambda a: a.num_experts and not all(a.moe_layers)))
def test_arch_with_dense_layers_needs_d_ff(arch):
    with pytest.raises(ValueError, match="d_ff must be >= 1"):
        replace(arch, d_ff=0)


@given(st.sampled_from(["ffn_params", "attention_params"]), st.integers(0, 1), bad_ints(1))
def test_layer_formulas_reject_bad_sizes(fn, position, value):
    call = {"ffn_params": ffn_params, "attention_params": attention_params}[fn]
    args = [64, 8]
    args[position] = value
    name = {"ffn_params": ("d_model", "d_ff"), "attention_params": ("d_model", "n_heads")}[fn][position]
    with pytest.raises((ValueError, TypeError)) as info:
        call(*args)
    assert names(str(info.value), name), str(info.value)
