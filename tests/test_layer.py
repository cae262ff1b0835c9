"""MoELayer: reproduces Hugging Face's Mixtral sparse MoE block, reports routing info, validates arguments."""
import pytest
import torch

from moe_lab import MoELayer
from moe_lab.losses import router_z_loss, switch_aux_loss


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
