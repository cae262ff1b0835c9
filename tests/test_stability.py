"""Float-format facts against torch.nextafter and published numbers (IEEE 754, ST-MoE), routing flips against
a per-token reading of two MoELayers, and Switch's initialisation against the truncated normal's moments."""
import math

import pytest
import torch

from moe_lab import MoELayer
from moe_lab.model import MoETransformer, toy_config
from moe_lab.dispatch import capacity_mask, expert_capacity
from moe_lab.metrics import tokens_per_expert
from moe_lab.stability import (FLOAT_FORMATS, expert_utilisation, float_formats, routing_flips, spacing, switch_init_,
                               topk_flips)


def next_up(value: float, dtype: torch.dtype) -> float:
    """The next representable number above ``value`` (exactly representable in ``dtype``)."""
    t = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)) - t)


@pytest.mark.parametrize("dtype", FLOAT_FORMATS)
def test_spacing_is_the_gap_to_the_next_number(dtype):
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(200, generator=gen) * 10.0 ** torch.randint(-4, 5, (200,), generator=gen)
    values = values.to(dtype).float().tolist()  # representable, so nextafter is the neighbour of the value itself
    values += [1.0, 2.0, 0.5, info.smallest_normal, 1.5 * info.smallest_normal, info.max / 2]
    for v in values:
        expected = next_up(abs(v), dtype)  # above |v|: the gap of |v|'s own binade, also at a power of two
        assert spacing(v, dtype) == expected, v
    subnormal = next_up(0.0, dtype)
    assert spacing(0.0, dtype) == subnormal == spacing(info.smallest_normal / 4, dtype)


def test_published_float_facts():
    assert spacing(2.0, torch.bfloat16) == spacing(3.99, torch.bfloat16) == 0.015625  # ST-MoE: 0.0156 in [2, 4)
    assert spacing(1024.0, torch.bfloat16) == spacing(2000.0, torch.bfloat16) == 8.0  # 8.0 in [1024, 2048)
    rows = {row["dtype"]: row for row in float_formats()}
    assert rows["float16"]["max"] == 65504.0 and rows["float16"]["smallest normal"] == 2.0**-14
    assert (rows["bfloat16"]["exponent bits"], rows["bfloat16"]["mantissa bits"]) == (8, 7)
    assert (rows["float16"]["exponent bits"], rows["float16"]["mantissa bits"]) == (5, 10)
    assert (rows["float32"]["exponent bits"], rows["float32"]["mantissa bits"]) == (8, 23)
    assert rows["float32"]["eps (spacing at 1)"] == 2.0**-23 and rows["bfloat16"]["spacing at 1000"] == 4.0
    assert rows["bfloat16"]["smallest normal"] == rows["float32"]["smallest normal"]  # same exponent range


def test_spacing_rejects_bad_input():
    with pytest.raises(ValueError, match="value must be finite"):
        spacing(math.inf, torch.float32)
    with pytest.raises(ValueError, match="float16 range"):
        spacing(70000.0, torch.float16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        spacing(1.0, torch.float64)


def slow_flips(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    changed = [set(a[t].topk(k).indices.tolist()) != set(b[t].topk(k).indices.tolist()) for t in range(len(a))]
    return sum(changed) / len(changed)


def test_topk_flips_counts_changed_sets_not_orders():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=gen)
    b = a + 0.3 * torch.randn(500, 8, generator=gen)
    for k in (1, 2, 3):
        assert topk_flips(a, b, k) == pytest.approx(slow_flips(a, b, k))
    swapped = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    assert topk_flips(swapped, torch.tensor([[2.0, 3.0, 0.0, -1.0]]), 2) == 0.0  # same set, other order
    assert topk_flips(swapped, torch.tensor([[2.0, 3.0, 0.0, -1.0]]), 1) == 1.0
    assert topk_flips(a, b, 8) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        topk_flips(a, b, 9)
    with pytest.raises(ValueError, match="shape"):
        topk_flips(a, b[:, :4], 1)


def test_routing_flips_measure_what_a_low_precision_layer_does():
    torch.manual_seed(0)
    layer32 = MoELayer(32, 16, 8, 2)
    layer16 = MoELayer(32, 16, 8, 2, router_dtype="bfloat16")
    with torch.no_grad():
        layer32.router.weight.mul_(20)  # large logits: bf16 rounding matters
        layer16.load_state_dict(layer32.state_dict())
    x = torch.randn(1000, 32)
    with torch.no_grad():
        _, info32 = layer32(x)
        _, info16 = layer16(x)
    changed = [set(a.tolist()) != set(b.tolist()) for a, b in zip(info32.experts, info16.experts)]
    stats = routing_flips(x, layer32.router.weight, 2, torch.bfloat16)
    assert stats.flip_rate == pytest.approx(sum(changed) / len(changed)) and stats.flip_rate > 0
    assert stats.top1_flip_rate == pytest.approx(float((info32.experts[:, 0] != info16.experts[:, 0]).float().mean()))
    assert stats.prob_error == pytest.approx(float((info16.probs.float() - info32.probs).abs().amax(-1).mean()))
    assert stats.mean_lse == pytest.approx(float(info32.logits.double().exp().sum(-1).log().mean()), rel=1e-5)
    assert stats.max_abs_logit == pytest.approx(float(info32.logits.abs().max()))
    same = routing_flips(x, layer32.router.weight, 2, torch.float32)
    assert same.flip_rate == same.prob_error == 0.0


def test_a_common_offset_is_rounded_in_the_low_precision():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(500, 16, generator=gen), torch.randn(8, 16, generator=gen)
    ref = x @ weight.T
    low = (x.bfloat16() @ weight.bfloat16().T) + torch.tensor(300.0, dtype=torch.bfloat16)  # rounded again
    stats = routing_flips(x, weight, 2, torch.bfloat16, offset=300.0)
    assert stats.flip_rate == pytest.approx(slow_flips(ref + 300.0, low.float(), 2))
    assert stats.flip_rate > 10 * routing_flips(x, weight, 2, torch.bfloat16).flip_rate  # spacing 2 at 300
    assert stats.mean_lse == pytest.approx(float((ref.double() + 300).exp().sum(-1).log().mean()), rel=1e-6)


def test_switch_init_matches_a_truncated_normal():
    torch.manual_seed(0)
    model = MoETransformer(toy_config("mixtral", d_model=64, n_layers=2, n_heads=4, d_ff=128))
    embed, norm = model.embed.weight.clone(), model.norm.weight.clone()
    switch_init_(model, 0.1)
    # a normal truncated at +-2 std keeps sqrt(1 - 4 phi(2) / (2 Phi(2) - 1)) of its std
    phi = math.exp(-2) / math.sqrt(2 * math.pi)
    shrink = math.sqrt(1 - 4 * phi / math.erf(2 / math.sqrt(2)))
    block = model.blocks[0]
    for weight, fan_in in ((block.attn.q.weight, 64), (block.ffn.router.weight, 64), (block.ffn.experts.w1, 64),
                           (block.ffn.experts.w2, 128), (model.lm_head.weight, 64)):
        std = math.sqrt(0.1 / fan_in)
        assert float(weight.detach().std()) == pytest.approx(shrink * std, rel=0.05)
        assert float(weight.detach().abs().max()) <= 2 * std + 1e-7
    assert torch.equal(model.embed.weight, embed) and torch.equal(model.norm.weight, norm)
    with pytest.raises(ValueError, match="scale must be"):
        switch_init_(model, 0.0)


def test_expert_utilisation_is_the_share_kept_at_capacity_factor_one():
    gen = torch.Generator().manual_seed(0)
    for t, e, k in ((64, 8, 2), (40, 4, 1), (96, 16, 3)):
        experts = torch.multinomial(torch.rand(e, generator=gen) ** 3, t * k, replacement=True, generator=gen)
        experts = experts.view(t, k)  # skewed and possibly repeated per token: only the counts matter here
        keep = capacity_mask(experts, e, expert_capacity(t, e, 1.0, k))
        load = tokens_per_expert(experts, e)
        assert float(expert_utilisation(load)) == pytest.approx(float(keep.float().mean()))
    assert float(expert_utilisation(torch.tensor([5, 5, 5, 5]))) == 1.0
    assert float(expert_utilisation(torch.tensor([12, 0, 0, 0]))) == 0.25
    torch.testing.assert_close(expert_utilisation(torch.tensor([[2, 2], [4, 0]])), torch.tensor([1.0, 0.5]))
