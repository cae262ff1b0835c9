"""The parameter / FLOP / memory calculator against published model sizes, exact published numbers, and direct
counts on moe_lab models (parameters: sum(p.numel()); FLOPs: torch's FlopCounterMode; KV cache: tensor sizes)."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_lab.calculator import (
    PRESETS, PUBLISHED, Arch, attention_flops_per_token, attention_params, count_params, dense_counterpart,
    expected_experts_touched, ffn_params, flops_per_token, inference_memory, kv_cache_bytes, moe_params,
    moe_schedule, training_memory,
)
from moe_lab.model import TOY_PRESETS, ModelConfig, MoETransformer, toy_config


def _within(value, published, rel=0.02):
    return abs(value / published - 1) <= rel


def _check_published(name):
    total, active, _source = PUBLISHED[name]
    count = count_params(PRESETS[name])
    assert _within(count.total, total), (count.total, total)
    assert _within(count.active, active), (count.active, active)


def test_mixtral_8x7b_published_size():
    """Mistral AI, "Mixtral of experts" release post (Dec 2023): 46.7B total, 12.9B active (the paper: 47B / 13B)."""
    _check_published("mixtral_8x7b")


def test_deepseek_moe_16b_published_size():
    """Dai et al. 2024, DeepSeekMoE, Sec. 5: 16.4B total, 2.8B active."""
    _check_published("deepseek_moe_16b")


def test_deepseek_v2_published_size():
    """DeepSeek-AI 2024, DeepSeek-V2, abstract: 236B total, 21B active per token."""
    _check_published("deepseek_v2")


def test_deepseek_v3_published_size():
    """DeepSeek-AI 2024, DeepSeek-V3, abstract: 671B total, 37B active (main model, MTP module excluded)."""
    _check_published("deepseek_v3")


def test_rasbt_example_exact():
    """rasbt, LLMs-from-scratch ch04/07_moe: d=7168, SwiGLU hidden 14336 split into 8 experts, top-2."""
    assert ffn_params(7168, 14336) == 308_281_344
    assert ffn_params(7168, 14336 // 8) == 38_535_168
    total, active = moe_params(7168, 14336 // 8, 8, 2)
    assert total - 8 * 38_535_168 == 57_344  # the router
    assert active == 77_127_680


def test_lecture_worked_example():
    """CS336 lecture 4: d=4096, d_ff=16384: attention 4d^2 ~ 67M, FFN 2 d d_ff ~ 134M; E=128 -> ~17.2B."""
    moe = PRESETS["lecture_example"]
    c = count_params(moe).components
    assert c["attention"][0] == 4 * 4096**2 == attention_params(4096, 32)
    assert count_params(dense_counterpart(moe)).total == 4 * 4096**2 + 2 * 4096 * 16384
    assert count_params(moe).total == 4 * 4096**2 + 4096 * 128 + 128 * 2 * 4096 * 16384
    # the lecture's "17 GB in fp32" is wrong: 4 bytes per parameter
    assert inference_memory(moe, 0, dtype="fp32")["weights"] == pytest.approx(69e9, rel=0.01)


@pytest.mark.parametrize("name", list(TOY_PRESETS))
def test_calculator_equals_model_parameters(name):
    cfg = toy_config(name)
    model = MoETransformer(cfg)
    assert count_params(cfg.arch()).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("overrides", [
    dict(n_kv_heads=2, tie_embeddings=True),
    dict(activation="gelu", num_experts=6, k=3, d_expert=40, moe_every=3, first_dense=1, n_shared=2),
    dict(num_experts=4, k=4, d_expert=24, n_layers=2, vocab_size=50, d_model=32, n_heads=8, n_kv_heads=1),
])
def test_calculator_equals_model_parameters_variants(overrides):
    cfg = ModelConfig(**overrides)
    model = MoETransformer(cfg)
    assert count_params(cfg.arch()).total == sum(p.numel() for p in model.parameters())


def test_active_parameters_match_what_a_token_touches():
    """Active = total minus the (E - k) unused experts in every MoE layer."""
    cfg = toy_config("glam")
    model = MoETransformer(cfg)
    unused = sum((cfg.num_experts - cfg.k) * layer.ffn.experts.w1[0].numel() * 3
                 for layer, moe in zip(model.blocks, cfg.moe_layers) if moe)
    assert count_params(cfg.arch()).active == sum(p.numel() for p in model.parameters()) - unused


@pytest.mark.parametrize("name", ["dense", "mixtral", "glam", "deepseek_v1", "deepseek_v3"])
def test_forward_flops_equal_counted_matmul_flops(name):
    cfg = toy_config(name, dispatch="loop")  # the loop dispatch runs plain matmuls the counter sees
    model = MoETransformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    # the counter does not see scaled_dot_product_attention on CPU: compare the context-free part
    assert counter.get_total_flops() == flops_per_token(cfg.arch(), context=0) * tokens.numel()


def test_attention_flops_equal_counted_score_and_mix_flops():
    h, qk, v, n = 4, 24, 16, 10
    q, k, val = torch.randn(h, n, qk), torch.randn(h, n, qk), torch.randn(h, n, v)
    with FlopCounterMode(display=False) as counter:
        torch.softmax(q @ k.transpose(1, 2), -1) @ val
    assert counter.get_total_flops() == attention_flops_per_token(h, qk, v, context=n) * n


def test_training_flops_are_three_forward_passes():
    arch = PRESETS["mixtral_8x7b"]
    assert flops_per_token(arch, 4096, training=True) == 3 * flops_per_token(arch, 4096)
    # ~2 FLOPs per active parameter (embedding lookup aside) when context is short
    assert flops_per_token(arch) == pytest.approx(2 * count_params(arch).active, rel=0.02)


def test_kv_cache_equals_model_key_value_tensors():
    cfg = ModelConfig(n_kv_heads=2)
    model = MoETransformer(cfg)
    sizes = []
    for block in model.blocks:
        for proj in (block.attn.k, block.attn.v):
            proj.register_forward_hook(lambda m, i, out: sizes.append(out.numel()))
    model(torch.randint(0, 256, (3, 20)))
    assert kv_cache_bytes(cfg.arch(), context=20, batch=3, dtype="bf16") == 2 * sum(sizes)


def test_mla_kv_cache_is_the_latent():
    """DeepSeek-V2: MLA caches (d_c + d_h^R) = 512 + 64 values per token and layer."""
    v2 = PRESETS["deepseek_v2"]
    assert kv_cache_bytes(v2, context=1, dtype="bf16") == 60 * 576 * 2


def test_training_memory_is_16_bytes_per_parameter_mixed_precision():
    """Rajbhandari et al. 2020 (ZeRO), Sec. 3.1: mixed-precision Adam holds 2 + 2 + 12 = 16 bytes per parameter."""
    assert training_memory(1000, "bf16")["total"] == 16_000
    assert training_memory(1000, "fp32")["total"] == 16_000  # fp32: no master copy, 4-byte gradients
    assert training_memory(1000, "fp32")["master_weights"] == 0


def test_training_memory_matches_adam_state():
    model = MoETransformer(toy_config("switch"))
    opt = torch.optim.Adam(model.parameters())
    model.loss(*torch.randint(0, 256, (2, 2, 8))).total.backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    n = sum(p.numel() for p in model.parameters())
    assert training_memory(n, "fp32")["adam_states"] == state


def test_moe_schedule():
    assert moe_schedule(4) == [True] * 4
    assert moe_schedule(6, every=2) == [False, True, False, True, False, True]  # GLaM
    assert moe_schedule(5, first_dense=2) == [False, False, True, True, True]  # DeepSeek
    assert moe_schedule(7, every=3, first_dense=1) == [False, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="every"):
        moe_schedule(4, every=0)


def test_expected_experts_touched_matches_simulation():
    g = torch.Generator().manual_seed(0)
    e, k, t, trials = 16, 2, 10, 4000
    touched = [len(set(torch.rand(t, e, generator=g).topk(k, -1).indices.flatten().tolist())) for _ in range(trials)]
    assert expected_experts_touched(e, k, t) == pytest.approx(sum(touched) / trials, rel=0.02)
    assert expected_experts_touched(e, k, 1) == pytest.approx(k)
    assert expected_experts_touched(e, e, 3) == e


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="dtype"):
        training_memory(10, "fp64")
    with pytest.raises(ValueError, match="attention"):
        Arch(n_layers=1, d_model=8, n_heads=2, vocab_size=4, attention="linear")
    with pytest.raises(ValueError, match="k must be"):
        Arch(n_layers=1, d_model=8, n_heads=2, vocab_size=4, num_experts=4, k=5, d_expert=8)
    with pytest.raises(ValueError, match="context"):
        flops_per_token(PRESETS["mixtral_8x7b"], -1)
    assert math.isclose(expected_experts_touched(8, 1, 0), 0.0)


def test_calculator_report_defaults_are_mixtral():
    from moe_lab.widgets import calculator_report

    report = calculator_report()
    mixtral = count_params(PRESETS["mixtral_8x7b"])
    assert (report.total, report.active) == (mixtral.total, mixtral.active)
    assert report.training_flops == 3 * report.forward_flops == flops_per_token(PRESETS["mixtral_8x7b"], 4096, training=True)
    assert report.inference["kv_cache"] == 32 * 2 * 8 * 128 * 4096 * 2


def test_calculator_dashboard_headless():
    from moe_lab.widgets import calculator_dashboard, calculator_report

    dash = calculator_dashboard()
    assert dash.png and "total parameters" in dash.text.value
    base = dash.last.total
    dash.controls["num_experts"].value = 16  # 8 more SwiGLU experts and 8 more router rows per layer
    assert dash.last.total - base == 32 * 8 * (3 * 4096 * 14336 + 4096)
    assert dash.last.active == calculator_report(num_experts=16).active
    dash.controls["k"].value = 16
    dash.controls["num_experts"].value = 4  # k follows E down
    assert (dash.last.arch.num_experts, dash.last.arch.k) == (4, 4)
    dash.controls["num_experts"].value = 0  # dense
    assert dash.last.total == dash.last.active
    dash.controls["dtype"].value = "fp32"
    assert dash.last.inference["weights"] == 4 * dash.last.total
    with pytest.raises(ValueError, match="d_model"):
        calculator_report(d_model=1000)
