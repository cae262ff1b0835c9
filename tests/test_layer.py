"""MoELayer: reproduces Hugging Face's Mixtral sparse MoE block and DeepSeek-V3 MoE block (routed + shared,
forward and gradients), reports routing info, validates its config, keeps its selection bias float32."""
import pytest
import torch

from moe_lab import MoELayer
from moe_lab.config import MoEConfig, fine_grained
from moe_lab.losses import router_z_loss, sequence_balance_loss, switch_aux_loss
from moe_lab.routing import sigmoid_topk


def hf_mixtral_block(d_model, d_ff, num_experts, k):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(hidden_size=d_model, intermediate_size=d_ff, num_local_experts=num_experts,
                                        num_experts_per_tok=k, router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(config).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def load_from_hf(layer, block):
    """Copy HF Mixtral weights into moe_lab's stacked layout (HF stores [out, in]; moe_lab [in, out])."""
    state = dict(block.named_parameters())
    d_ff = layer.experts.d_ff
    with torch.no_grad():
        layer.router.weight.copy_(state["gate.weight"])
        if "experts.gate_up_proj" in state:  # transformers >= 5: fused expert tensors
            gate_up = state["experts.gate_up_proj"]  # [E, 2*d_ff, d]
            layer.experts.w1.copy_(gate_up[:, :d_ff].transpose(1, 2))
            layer.experts.w3.copy_(gate_up[:, d_ff:].transpose(1, 2))
            layer.experts.w2.copy_(state["experts.down_proj"].transpose(1, 2))
        else:  # transformers 4.x: one nn.Linear per expert
            for e, expert in enumerate(block.experts):
                layer.experts.w1[e].copy_(expert.w1.weight.T)
                layer.experts.w3[e].copy_(expert.w3.weight.T)
                layer.experts.w2[e].copy_(expert.w2.weight.T)


@pytest.mark.parametrize("dispatch", ["sorted", "loop", "onehot"])
@pytest.mark.parametrize("num_experts,k", [(8, 2), (4, 1), (6, 3)])
def test_matches_huggingface_mixtral_block(dispatch, num_experts, k):
    block = hf_mixtral_block(32, 48, num_experts, k)
    layer = MoELayer(32, 48, num_experts, k, dispatch=dispatch)
    load_from_hf(layer, block)
    x = torch.randn(3, 11, 32)
    y, info = layer(x)
    y_ref = block(x.clone())
    y_ref = y_ref[0] if isinstance(y_ref, tuple) else y_ref
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # same gradients w.r.t. the input and the router
    weights = torch.randn_like(y)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.autograd.grad((layer(x1)[0] * weights).sum(), [x1, layer.router.weight])
    out = block(x2)
    out = out[0] if isinstance(out, tuple) else out
    g_ref = torch.autograd.grad((out * weights).sum(), [x2, block.gate.weight])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_routing_info_contents():
    layer = MoELayer(16, 32, 8, 2)
    x = torch.randn(4, 5, 16)
    y, info = layer(x)
    assert y.shape == x.shape
    assert info.logits.shape == info.probs.shape == (20, 8)
    assert info.experts.shape == info.gates.shape == (20, 2)
    assert info.logits.dtype == info.probs.dtype == info.gates.dtype == torch.float32
    assert info.tokens_per_expert.sum() == 40
    torch.testing.assert_close(info.logits, x.reshape(-1, 16) @ layer.router.weight.T)
    torch.testing.assert_close(info.gates.sum(-1), torch.ones(20))
    torch.testing.assert_close(info.aux_loss, switch_aux_loss(info.probs, info.experts))
    torch.testing.assert_close(info.z_loss, router_z_loss(info.logits))


def test_aux_and_z_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    experts = probs.argmax(-1, keepdim=True)  # loads 2, 1, 1 of 4
    f = [2 / 4, 1 / 4, 1 / 4]
    p = [(0.7 + 0.1 + 0.5 + 0.2) / 4, (0.2 + 0.6 + 0.25 + 0.2) / 4, (0.1 + 0.3 + 0.25 + 0.6) / 4]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, p))
    assert switch_aux_loss(probs, experts).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.full((6, 3), 1 / 3)
    assert switch_aux_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]])).item() == pytest.approx(1.0)
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [torch.log(torch.exp(torch.tensor([1.0, 2.0, 3.0])).sum()).item(), torch.log(torch.tensor(3.0)).item()]
    assert router_z_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)


def test_layer_runs_on_device_and_in_bf16(device):
    layer = MoELayer(16, 32, 4, 2).to(device)
    x = torch.randn(10, 16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y, info = layer(x)
    assert y.dtype == torch.bfloat16 and info.logits.dtype == torch.float32
    y_ref, _ = layer(x)
    torch.testing.assert_close(y.float(), y_ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must be"),
    (dict(k=9), "k must be"),
    (dict(dispatch="fast"), "dispatch must be one of"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(softmax_order="sideways"), "softmax_order must be one of"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELayer(16, 32, 8, **{"k": 2, **kwargs})


def test_wrong_width_and_non_finite_input_rejected():
    layer = MoELayer(16, 32, 4, 2)
    with pytest.raises(ValueError, match="d_model=16"):
        layer(torch.randn(3, 8))
    x = torch.randn(3, 16)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(x)


def test_empty_and_integer_input_rejected():
    layer = MoELayer(16, 32, 4, 2)
    with pytest.raises(ValueError, match="at least one token"):
        layer(torch.randn(0, 16))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(3, 16, dtype=torch.long))


def test_switch_aux_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same T"):
        switch_aux_loss(torch.full((10, 4), 0.25), torch.zeros(3, 2, dtype=torch.long))


# ---------------------------------------------------------------- DeepSeek-V3 block: Hugging Face reference
def hf_deepseek_v3_block(d_model, d_ff, num_experts, k, n_groups, topk_groups, n_shared, scale):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(
        hidden_size=d_model, moe_intermediate_size=d_ff, n_routed_experts=num_experts, num_experts_per_tok=k,
        n_group=n_groups, topk_group=topk_groups, n_shared_experts=n_shared, routed_scaling_factor=scale,
        norm_topk_prob=True, hidden_act="silu")
    block = DeepseekV3MoE(config).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        block.gate.e_score_correction_bias.normal_(0, 0.1)  # a trained-looking, non-zero selection bias
    return block


def load_from_hf_deepseek(layer, block):
    """Copy HF DeepseekV3MoE weights into moe_lab's layout (HF stores [out, in]; moe_lab [in, out])."""
    d_ff = layer.experts.d_ff
    shared = block.shared_experts
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        layer.expert_bias.copy_(block.gate.e_score_correction_bias)
        gate_up = block.experts.gate_up_proj  # [E, 2 * d_ff, d]: gate rows, then up rows
        layer.experts.w1.copy_(gate_up[:, :d_ff].transpose(1, 2))
        layer.experts.w3.copy_(gate_up[:, d_ff:].transpose(1, 2))
        layer.experts.w2.copy_(block.experts.down_proj.transpose(1, 2))
        layer.shared.experts.w1[0].copy_(shared.gate_proj.weight.T)
        layer.shared.experts.w3[0].copy_(shared.up_proj.weight.T)
        layer.shared.experts.w2[0].copy_(shared.down_proj.weight.T)


HF_PAIRS = [  # (moe_lab parameter, HF parameter, how HF stores it relative to moe_lab)
    ("router.weight", "gate.weight", lambda g, d_ff: g),
    ("experts.w1", "experts.gate_up_proj", lambda g, d_ff: g[:, :d_ff].transpose(1, 2)),
    ("experts.w3", "experts.gate_up_proj", lambda g, d_ff: g[:, d_ff:].transpose(1, 2)),
    ("experts.w2", "experts.down_proj", lambda g, d_ff: g.transpose(1, 2)),
    ("shared.experts.w1", "shared_experts.gate_proj.weight", lambda g, d_ff: g.T[None]),
    ("shared.experts.w3", "shared_experts.up_proj.weight", lambda g, d_ff: g.T[None]),
    ("shared.experts.w2", "shared_experts.down_proj.weight", lambda g, d_ff: g.T[None]),
]


@pytest.mark.parametrize("dispatch", ["sorted", "loop"])
@pytest.mark.parametrize("num_experts,k,n_groups,topk_groups,n_shared", [
    (16, 4, 4, 2, 1),   # V3-like: node-limited, 1 shared
    (32, 8, 8, 4, 2),   # V3's 8 groups / 4 kept / top-8, 2 shared
    (8, 2, 1, 1, 1),    # no group limit
])
def test_matches_huggingface_deepseek_v3_moe(dispatch, num_experts, k, n_groups, topk_groups, n_shared):
    """Routed + shared output and every gradient equal transformers' DeepseekV3MoE with the same weights.

    HF follows the official gate on these inputs: sigmoid scores, a selection-only bias, top-2-sum group
    scores, -inf group masking, gates from the unbiased scores (since transformers #41647; earlier versions
    took them from the biased scores), normalised and scaled. Where HF differs from the official gate (so not
    tested here): it always scores groups by the top-2 sum (the official gate uses the max without a bias),
    has no softmax (V2) path, and adds 1e-20 to the normaliser (ours clamps it to the smallest normal float).
    """
    d_model, d_ff = 32, 16
    block = hf_deepseek_v3_block(d_model, d_ff, num_experts, k, n_groups, topk_groups, n_shared, 2.5)
    layer = MoELayer(d_model, d_ff, num_experts, k, score_func="sigmoid", selection_bias=True, n_groups=n_groups,
                     topk_groups=topk_groups, group_score="top2_sum", routed_scaling_factor=2.5, n_shared=n_shared,
                     dispatch=dispatch)
    load_from_hf_deepseek(layer, block)
    x = torch.randn(3, 11, d_model)
    weights = torch.randn(3, 11, d_model)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, info = layer(x1)
    y_ref = block(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    _, _, hf_experts = block.gate(x)
    assert torch.equal(info.experts.sort(-1).values, hf_experts.sort(-1).values)
    # the inputs exercise the bias and the group limit: without either, some decisions change
    limits = dict(n_groups=n_groups, topk_groups=topk_groups, group_score="top2_sum")
    for other in (sigmoid_topk(info.logits, k, **limits)[2],
                  sigmoid_topk(info.logits, k, bias=layer.expert_bias)[2] if n_groups > 1 else None):
        if other is not None:
            assert not torch.equal(other.sort(-1).values, info.experts.sort(-1).values)
    (y * weights).sum().backward()
    (y_ref * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    ours, theirs = dict(layer.named_parameters()), dict(block.named_parameters())
    for name, hf_name, view in HF_PAIRS:
        torch.testing.assert_close(ours[name].grad, view(theirs[hf_name].grad, d_ff), rtol=1e-5, atol=1e-5)
    assert layer.expert_bias.grad is None and "expert_bias" not in ours


# ---------------------------------------------------------------- config, options, buffers
@pytest.mark.parametrize("kwargs,match", [
    (dict(score_func="relu"), "score_func must be one of"),
    (dict(score_func="sigmoid", softmax_order="after_topk"), "softmax_order applies to score_func='softmax'"),
    (dict(n_groups=3), "n_groups=3 must divide num_experts=8"),
    (dict(n_groups=0), "n_groups must be an integer >= 1"),
    (dict(n_groups=4, topk_groups=5), "topk_groups must satisfy"),
    (dict(n_groups=4, topk_groups=1, k=3), "k=3 is larger than the 2 experts left after group masking"),
    (dict(n_groups=8, group_score="top2_sum"), "group_score='top2_sum' needs groups of >= 2"),
    (dict(group_score="mean"), "group_score must be one of"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(bias_update_rate=-1e-3, selection_bias=True), "bias_update_rate"),
    (dict(bias_update_rate=1e-3), "needs selection_bias=True"),
    (dict(selection_bias=1), "selection_bias must be True or False"),
    (dict(n_shared=-1), "n_shared must be an integer >= 0"),
    (dict(n_shared=1, d_shared=0), "d_shared must be an integer >= 1"),
    (dict(router_dtype=torch.float64), "router_dtype must be one of"),
    (dict(router_dtype="int8"), "router_dtype must be one of"),
    (dict(router="noisy_topk", router_dtype=torch.bfloat16), "router='noisy_topk' needs"),
    (dict(router="noisy_topk", score_func="sigmoid"), "router='noisy_topk' needs"),
    (dict(eval_capacity_factor=0), "eval_capacity_factor must be"),
    (dict(eval_capacity_factor="train"), "eval_capacity_factor must be"),
    (dict(capacity_factor=-1.0), "capacity_factor must be"),
    (dict(expert_dropout=1.0), "expert_dropout must satisfy"),
    (dict(expert_dropout=-0.1), "expert_dropout must satisfy"),
    (dict(drop_policy="random"), "drop_policy must be one of"),
])
def test_bad_deepseek_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELayer(16, 32, 8, **{"k": 2, **kwargs})


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="n_group"):
        MoELayer(16, 32, 8, 2, n_group=2)


def test_config_round_trip_and_configure():
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=8, k=2, score_func="sigmoid", n_groups=4, topk_groups=2,
                    router_dtype="bfloat16", capacity_factor=1.25)
    layer = MoELayer.from_config(cfg)
    assert layer.config == cfg and cfg.router_dtype == torch.bfloat16
    assert MoELayer(16, 32, 8, 2).config == MoEConfig(d_model=16, d_ff=32, num_experts=8)
    layer.capacity_factor = None  # attribute setters go through configure: validated
    assert layer.config.capacity_factor is None and layer.config.n_groups == 4
    with pytest.raises(ValueError, match="capacity_factor must be"):
        layer.capacity_factor = 0
    layer.configure(k=3, expert_dropout=0.5)
    assert layer.k == 3 and layer.experts.dropout == 0.5
    with pytest.raises(ValueError, match="num_experts, selection_bias cannot change"):
        layer.configure(num_experts=16, selection_bias=True)
    with pytest.raises(AttributeError):
        layer.num_experts = 4
    with pytest.raises(ValueError, match="MoEConfig"):
        MoELayer.from_config(dict(d_model=16))
    assert "score_func='sigmoid'" in repr(layer) and "n_groups=4" in repr(layer)


def test_fine_grained_segmentation():
    assert fine_grained(8, 2, 128, 4) == (32, 8, 32)
    assert fine_grained(8, 2, 128, 1) == (8, 2, 128)
    cfg = MoEConfig(d_model=16, d_ff=128, num_experts=8, k=2, n_shared=1, d_shared=64).fine_grained(4)
    assert (cfg.num_experts, cfg.k, cfg.d_ff, cfg.d_shared) == (32, 8, 32, 16)
    with pytest.raises(ValueError, match="d_ff=100 must be divisible by granularity=3"):
        fine_grained(8, 2, 100, 3)
    with pytest.raises(ValueError, match="granularity must be an integer >= 1"):
        fine_grained(8, 2, 128, 0)
    with pytest.raises(ValueError, match="k must be"):
        fine_grained(8, 9, 128, 2)
    # the same parameters: 8 x (3 d 128) = 32 x (3 d 32)
    coarse, fine = MoELayer(16, 128, 8, 2), MoELayer.from_config(MoEConfig(d_model=16, d_ff=128, num_experts=8,
                                                                           k=2).fine_grained(4))
    assert coarse.experts.w1.numel() == fine.experts.w1.numel()


def test_shared_experts_are_one_always_on_ffn():
    layer = MoELayer(16, 8, 4, 2, n_shared=3, d_shared=6)
    assert layer.shared.experts.d_ff == 18
    x = torch.randn(2, 5, 16)
    y, info = layer(x)
    routed = layer._run_experts(x.reshape(-1, 16), info.experts, info.gates, None, None).reshape(x.shape)
    # three separate SwiGLU experts, summed, equal the one FFN of width 18
    w1, w3, w2 = (getattr(layer.shared.experts, n)[0] for n in ("w1", "w3", "w2"))
    shared = sum((torch.nn.functional.silu(x @ w1[:, s]) * (x @ w3[:, s])) @ w2[s]
                 for s in (slice(0, 6), slice(6, 12), slice(12, 18)))
    torch.testing.assert_close(y, routed + shared, rtol=1e-5, atol=1e-6)


def test_selection_bias_is_a_float32_buffer_that_survives_casts_and_checkpoints():
    layer = MoELayer(16, 32, 8, 2, score_func="sigmoid", selection_bias=True)
    assert "expert_bias" not in dict(layer.named_parameters()) and "expert_bias" in dict(layer.named_buffers())
    value = torch.arange(8) * 1e-3 + 1.0  # bf16 spacing at 1.0 is 2**-7: a cast would round these to 1.0
    layer.expert_bias.copy_(value)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(), lambda m: m.float()):
        cast(layer)
        assert layer.expert_bias.dtype == torch.float32 and torch.equal(layer.expert_bias, value)
    assert layer.load_counts.dtype == torch.int64
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, info = layer(torch.randn(10, 16))
    assert layer.expert_bias.dtype == torch.float32 and info.logits.dtype == torch.float32
    state = layer.state_dict()
    assert torch.equal(state["expert_bias"], value) and "load_counts" not in state
    restored = MoELayer(16, 32, 8, 2, score_func="sigmoid", selection_bias=True)
    restored.load_state_dict(state)
    assert torch.equal(restored.expert_bias, value)
    x = torch.randn(20, 16)
    assert torch.equal(restored(x)[1].experts, layer(x)[1].experts)
    assert MoELayer(16, 32, 8, 2).expert_bias is None and MoELayer(16, 32, 8, 2).load_counts is None


def test_loads_are_counted_in_training_with_grad_only():
    layer = MoELayer(16, 32, 8, 2, score_func="sigmoid", selection_bias=True)
    x1, x2 = torch.randn(12, 16), torch.randn(7, 16)
    c1, c2 = layer(x1)[1].tokens_per_expert, layer(x2)[1].tokens_per_expert
    assert torch.equal(layer.load_counts, c1 + c2) and int(layer.load_counts.sum()) == (12 + 7) * 2
    with torch.no_grad():
        layer(x1)
    layer.eval()
    layer(x1)
    assert torch.equal(layer.load_counts, c1 + c2)


def test_the_bias_selects_but_never_weights():
    layer = MoELayer(16, 32, 8, 2, score_func="sigmoid", selection_bias=True, renormalize=False)
    x = torch.randn(50, 16)
    _, before = layer(x)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([2.0, 0, 0, 0, 0, 0, 0, -2.0]))
    _, after = layer(x)
    assert (after.experts == 0).any(-1).all() and not (after.experts == 7).any()  # the bias decides selection
    torch.testing.assert_close(after.gates, after.scores.gather(1, after.experts))  # weights: unbiased scores
    torch.testing.assert_close(before.scores, after.scores)


def test_eval_capacity_factor():
    x = torch.randn(64, 16)
    layer = MoELayer(16, 32, 8, 2, capacity_factor=0.5)
    layer.eval()
    assert layer(x)[1].capacity == 8  # "same": the training factor
    layer.configure(eval_capacity_factor=None)
    _, info = layer(x)
    assert info.capacity is None and not info.dropped.any()
    layer.configure(eval_capacity_factor=2.0)
    assert layer(x)[1].capacity == 32 and layer.current_capacity_factor == 2.0
    layer.train()
    assert layer(x)[1].capacity == 8 and layer.current_capacity_factor == 0.5


def test_expert_dropout_in_training_only():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 1, 1, expert_dropout=0.5, dispatch="loop")  # E = k = 1: gate 1, one expert
    x = torch.randn(30, 8)
    layer.eval()
    w1, w3, w2 = layer.experts.w1[0], layer.experts.w3[0], layer.experts.w2[0]
    hidden = torch.nn.functional.silu(x @ w1) * (x @ w3)
    torch.testing.assert_close(layer(x)[0], hidden @ w2)
    layer.train()
    torch.manual_seed(3)
    y = layer(x)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(y, torch.nn.functional.dropout(hidden, 0.5, training=True) @ w2)
    assert not torch.allclose(y, hidden @ w2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_dtype_runs_the_router_in_low_precision(dtype):
    layer = MoELayer(16, 32, 8, 2, router_dtype=dtype)
    x = torch.randn(40, 16)
    _, info = layer(x)
    assert info.logits.dtype == info.probs.dtype == info.gates.dtype == dtype
    assert layer.router.weight.dtype == torch.float32  # the parameter stays float32; the matmul is low precision
    torch.testing.assert_close(info.logits, x.to(dtype) @ layer.router.weight.to(dtype).T)
    torch.testing.assert_close(info.probs, info.logits.softmax(-1))
    ref = MoELayer(16, 32, 8, 2)
    ref.load_state_dict(layer.state_dict())
    assert not torch.equal(info.probs.float(), ref(x)[1].probs)  # really rounded
    torch.testing.assert_close(info.probs.float(), ref(x)[1].probs, rtol=0.05, atol=0.01)


def test_sequence_structure_is_kept_for_the_sequence_wise_loss():
    layer = MoELayer(16, 32, 8, 2, score_func="sigmoid")
    x = torch.randn(3, 10, 16)
    _, info = layer(x)
    assert info.batch_shape == (3, 10)
    per_sequence = [sequence_balance_loss(info.probs.view(3, 10, 8)[b:b + 1], info.experts.view(3, 10, 2)[b:b + 1])
                    for b in range(3)]
    torch.testing.assert_close(info.seq_aux_loss, sum(per_sequence) / 3)
    _, flat = layer(x.reshape(30, 16))  # [T, d]: one sequence of 30 tokens
    torch.testing.assert_close(flat.seq_aux_loss, sequence_balance_loss(flat.probs[None], flat.experts[None]))
    torch.testing.assert_close(flat.probs, flat.scores / flat.scores.sum(-1, keepdim=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deepseek_v3_layer_and_bias_update_do_not_sync_on_cuda():
    """Sigmoid gating with a bias, group limits, shared experts, load counting, the new losses and the bias
    update never wait for the GPU (as the plain layer in tests/test_cuda.py)."""
    from moe_lab.bias_balancing import BiasBalancer

    cuda = torch.device("cuda")
    layer = MoELayer(64, 96, 16, 4, score_func="sigmoid", selection_bias=True, bias_update_rate=1e-3, n_groups=4,
                     topk_groups=2, group_score="top2_sum", routed_scaling_factor=2.5, n_shared=1).to(cuda)
    layer.experts.to(torch.bfloat16)
    x = torch.randn(4, 64, 64, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    balancer = BiasBalancer(layer)
    layer(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, info = layer(x)
        (y.float().square().mean() + info.seq_aux_loss + info.device_aux_loss + info.comm_aux_loss).backward()
        balancer.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.expert_bias.dtype == torch.float32 and layer.load_counts.sum() == 0
