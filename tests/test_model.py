"""The toy MoE transformer: presets, attention against a slow reference, causality, RoPE, schedules, losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe_lab.calculator import PRESETS, PUBLISHED_ROUTING
from moe_lab.config import MoEOptions
from moe_lab.losses import importance_loss, router_z_loss
from moe_lab.routing import dense_gates
from moe_lab.layer import MoELayer
from moe_lab.model import TOY_PRESETS, Attention, ModelConfig, MoETransformer, rope, toy_config


def test_presets_build_and_run():
    tokens = torch.randint(0, 256, (2, 12))
    for name in TOY_PRESETS:
        cfg = toy_config(name, d_model=32, n_heads=2)
        model = MoETransformer(cfg)
        logits, infos = model(tokens)
        assert logits.shape == (2, 12, 256)
        assert len(infos) == sum(cfg.moe_layers)
        for info in infos:
            assert info.experts.shape == (24, cfg.k)


def test_preset_schedules_and_routing_options():
    assert toy_config("dense").moe_layers == [False] * 4
    assert toy_config("glam").moe_layers == [False, True, False, True]
    assert toy_config("deepseek_v1").moe_layers == [False, True, True, True]
    switch, st_moe, mixtral = toy_config("switch"), toy_config("st_moe"), toy_config("mixtral")
    assert (switch.k, switch.capacity_factor, switch.renormalize) == (1, 1.0, False)
    assert (st_moe.k, st_moe.capacity_factor, st_moe.z_coef) == (2, 1.25, 1e-3)
    assert (mixtral.k, mixtral.capacity_factor, mixtral.activation) == (2, None, "swiglu")
    with pytest.raises(ValueError, match="name must be one of"):
        toy_config("gshard")
    with pytest.raises(ValueError, match="name must be one of"):  # retired: deepseek_v1 / _v2 / _v3
        toy_config("deepseek")


# toy preset -> the published model it is a small copy of
DEEPSEEK = {"deepseek_v1": "deepseek_moe_16b", "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3"}


@pytest.mark.parametrize("toy,real", DEEPSEEK.items())
def test_deepseek_presets_agree_with_calculator_presets(toy, real):
    cfg, arch = toy_config(toy), PRESETS[real]
    toy_arch = cfg.arch()
    assert toy_arch.n_shared == arch.n_shared and toy_arch.activation == arch.activation == "swiglu"
    assert toy_arch.first_dense >= 1 and arch.first_dense >= 1 and toy_arch.moe_every == arch.moe_every == 1
    assert toy_arch.d_shared is None and arch.d_shared is None  # shared experts as wide as routed ones
    assert toy_arch.d_expert < toy_arch.d_ff and arch.d_expert < arch.d_ff  # fine-grained
    if real != "deepseek_moe_16b":  # V2 / V3: routed + shared active width = the dense FFN width, as in the toy
        assert (arch.k + arch.n_shared) * arch.d_expert == arch.d_ff
    routing = dict(PUBLISHED_ROUTING[real])
    scale = routing.pop("routed_scaling_factor")
    assert {name: getattr(cfg, name) for name in routing} == routing
    assert cfg.routed_scaling_factor == (1.0 if real == "deepseek_v2" else scale)  # toy V2 keeps V1's 1.0
    if real == "deepseek_v3":  # aux-loss-free, gamma 1e-3, tiny sequence-wise loss
        assert (cfg.bias_update_rate, cfg.aux_coef, cfg.seq_aux_coef) == (1e-3, 0.0, 1e-4)
    if real == "deepseek_v2":  # the paper's alpha_1, alpha_2, alpha_3
        assert (cfg.aux_coef, cfg.device_aux_coef, cfg.comm_aux_coef) == (3e-3, 0.05, 0.02)


def test_model_config_forwards_layer_options():
    cfg = toy_config("deepseek_v3", capacity_factor=1.5, eval_capacity_factor=None, router_dtype="bfloat16")
    layer = MoETransformer(cfg).blocks[1].ffn
    assert isinstance(layer, MoELayer) and layer.config == cfg.layer_config()
    assert {f: getattr(layer.config, f) for f in MoEOptions().options()} == cfg.options()
    assert (layer.config.d_ff, layer.config.num_experts, layer.config.k) == (32, 32, 7)
    assert layer.config.router_dtype == torch.bfloat16 and layer.expert_bias.dtype == torch.float32
    with pytest.raises(ValueError, match="n_groups=5 must divide num_experts=32"):  # at config time
        toy_config("deepseek_v3", n_groups=5)
    with pytest.raises(ValueError, match="bias_update_rate"):
        toy_config("deepseek_v3", bias_update_rate=-1e-3)
    ModelConfig(n_groups=5)  # a dense model has no MoE layer to check it against


def test_presets_have_equal_active_ffn_width():
    for name in TOY_PRESETS:
        cfg = toy_config(name)
        if cfg.num_experts:
            assert (cfg.k + cfg.n_shared) * cfg.d_expert == cfg.d_ff, name


def _slow_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    h, kv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = rope(attn.q(x).view(b, n, h, hd).transpose(1, 2))
    k = rope(attn.k(x).view(b, n, kv, hd).transpose(1, 2))
    v = attn.v(x).view(b, n, kv, hd).transpose(1, 2)
    out = torch.zeros(b, h, n, hd)
    for head in range(h):
        g = head // (h // kv)  # query head -> its key/value group
        scores = q[:, head] @ k[:, g].transpose(1, 2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[:, head] = scores.softmax(-1) @ v[:, g]
    return attn.o(out.transpose(1, 2).reshape(b, n, h * hd))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_slow_reference(kv_heads):
    attn = Attention(32, 4, kv_heads)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(attn(x), _slow_attention(attn, x), rtol=1e-5, atol=1e-5)


def test_model_is_causal():
    model = MoETransformer(toy_config("mixtral", d_model=32, n_heads=2)).eval()
    a = torch.randint(0, 256, (1, 16))
    b = a.clone()
    b[0, 10:] = torch.randint(0, 256, (6,))
    with torch.no_grad():
        la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[:, :10], lb[:, :10])


def test_rope_is_a_rotation_with_relative_positions():
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 8, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 8, 16)
    rq, rk = rope(q.contiguous()), rope(k.contiguous())
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    dots = (rq[0, 0, :, None] * rk[0, 0, None, :]).sum(-1)  # [8, 8], depends only on i - j
    torch.testing.assert_close(dots[3, 1], dots[6, 4])
    torch.testing.assert_close(dots[0, 0], (q[0, 0, 0] * k[0, 0, 0]).sum())


def test_single_expert_moe_equals_dense_model():
    """E=1, k=1, renormalised: the gate is 1 and the MoE FFN is the dense FFN with the same weights."""
    dense = MoETransformer(ModelConfig())
    moe = MoETransformer(ModelConfig(num_experts=1, k=1))
    missing = moe.load_state_dict(dense.state_dict(), strict=False)  # same names: ffn.experts.w1, ...
    assert all(name.endswith("router.weight") for name in missing.missing_keys) and not missing.unexpected_keys
    tokens = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(moe(tokens)[0], dense(tokens)[0], rtol=1e-5, atol=1e-5)


def test_shared_experts_live_in_the_moe_layer():
    model = MoETransformer(toy_config("deepseek_v1"))
    block = model.blocks[1]
    layer = block.ffn
    assert not hasattr(block, "shared") and layer.shared.experts.d_ff == 2 * 32  # 2 shared experts of width 32
    x = torch.randn(2, 5, 64)
    attended = x + block.attn(block.attn_norm(x))
    h = block.ffn_norm(attended)
    routed = layer._run_experts(h.reshape(-1, 64), *[getattr(layer(h)[1], f) for f in ("experts", "gates")],
                                None, None).reshape(h.shape)
    torch.testing.assert_close(block(x)[0], attended + routed + layer.shared(h))


def test_loss_weights_all_terms_and_can_change():
    model = MoETransformer(toy_config("deepseek_v2", seq_aux_coef=0.5))
    x, y = torch.randint(0, 256, (2, 2, 16))
    out = model.loss(x, y)
    infos = out.infos
    for term, field in (("aux", "aux_loss"), ("seq_aux", "seq_aux_loss"), ("device_aux", "device_aux_loss"),
                        ("comm_aux", "comm_aux_loss"), ("z", "z_loss")):
        torch.testing.assert_close(getattr(out, term), sum(getattr(i, field) for i in infos))
    expected = out.ce + 3e-3 * out.aux + 0.5 * out.seq_aux + 0.05 * out.device_aux + 0.02 * out.comm_aux
    torch.testing.assert_close(out.total, expected)
    model.loss_weights["z"] = 2.0  # e.g. a schedule hook
    torch.testing.assert_close(model.loss(x, y).total, expected + 2.0 * out.z)


def test_loss_combines_cross_entropy_aux_and_z():
    cfg = toy_config("st_moe")
    model = MoETransformer(cfg)
    x, y = torch.randint(0, 256, (2, 2, 16))
    out = model.loss(x, y)
    logits, infos = model(x)
    torch.testing.assert_close(out.ce, F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)))
    torch.testing.assert_close(out.aux, sum(i.aux_loss for i in infos))
    torch.testing.assert_close(out.z, sum(i.z_loss for i in infos))
    torch.testing.assert_close(out.total, out.ce + 1e-2 * out.aux + 1e-3 * out.z)


def test_loss_computes_only_the_weighted_and_the_requested_terms():
    model = MoETransformer(toy_config("mixtral", n_layers=2))  # aux_coef 1e-2, nothing else weighted
    x, y = torch.randint(0, 256, (2, 2, 16))
    out = model.loss(x, y)
    assert list(out.terms) == ["aux"] and all(set(i.computed) <= {"probs", "aux"} for i in out.infos)
    out = model.loss(x, y, terms=("z", "importance"))
    assert list(out.terms) == ["aux", "z", "importance"]
    torch.testing.assert_close(out.z, sum(router_z_loss(i.logits) for i in out.infos))
    torch.testing.assert_close(out.term("importance"),
                               sum(importance_loss(dense_gates(i.gates, i.experts, 8)) for i in out.infos))
    assert MoETransformer(toy_config("dense", n_layers=1)).loss(x, y, terms=("z",)).z == 0
    with pytest.raises(ValueError, match="terms must be names"):
        model.loss(x, y, terms=("zloss",))
    with pytest.raises(ValueError, match="load_coef=0.1 needs a layer that defines it"):
        toy_config("mixtral", load_coef=0.1)  # Shazeer's smooth load loss needs the noisy router
    with pytest.raises(ValueError, match="z_coef must be a finite number >= 0"):
        toy_config("mixtral", z_coef=-1.0)


def test_switch_capacity_drops_tokens_and_tied_embeddings():
    model = MoETransformer(toy_config("switch", tie_embeddings=True))
    assert model.lm_head is None
    _, infos = model(torch.randint(0, 256, (4, 32)))
    assert all(0.0 <= i.drop_rate < 1.0 for i in infos)
    assert any(i.drop_rate > 0 for i in infos)  # capacity factor 1.0 with an untrained router overflows


def test_bad_input_raises():
    model = MoETransformer(ModelConfig(n_layers=1))
    with pytest.raises(ValueError, match="idx"):
        model(torch.randint(0, 256, (8,)))
    with pytest.raises(ValueError, match="n_kv_heads"):
        Attention(32, 4, 3)


@pytest.mark.parametrize("d_model,n_heads,n_kv_heads", [(60, 4, None), (64, 4, 0), (64, 0, None), (64, 4, 3)])
def test_bad_attention_shapes_rejected(d_model, n_heads, n_kv_heads):
    from moe_lab.model import Attention

    with pytest.raises(ValueError, match="n_heads"):
        Attention(d_model, n_heads, n_kv_heads)
