"""Property-based tests of ``MoELayer`` / ``MoEConfig``: the layer's output against a per-token float64 loop over
its own weights (router, gating, capacity, experts, shared experts), random valid configs build, and every bad
option or input gets an error naming it."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from moe_lab import MoEConfig, MoELayer
from moe_lab.config import STRUCTURAL
from moe_lab.dispatch import expert_capacity
from tests.references import ref_gating, ref_queue_positions
from tests.strategies import (NOT_FLOAT_DTYPES, bad_ints, bad_positive_numbers, names, poisoned, raises_naming, randn,
                              seeds)


@st.composite
def layer_options(draw):
    """Sizes and options of a small valid layer."""
    num_experts = draw(st.integers(1, 6))
    score_func = draw(st.sampled_from(["softmax", "sigmoid"]))
    order = draw(st.sampled_from([("before_topk", True), ("before_topk", False)]
                                 + ([("after_topk", True)] if score_func == "softmax" else [])))
    capacity_factor = draw(st.none() | st.sampled_from([0.5, 1.0, 2.0]))
    return dict(d_model=draw(st.integers(1, 8)), d_ff=draw(st.integers(1, 8)), num_experts=num_experts,
                k=draw(st.integers(1, num_experts)), activation=draw(st.sampled_from(["gelu", "swiglu"])),
                score_func=score_func, softmax_order=order[0], renormalize=order[1],
                n_shared=draw(st.integers(0, 2)), capacity_factor=capacity_factor,
                drop_policy=draw(st.sampled_from(["position", "probability", "batch_priority"])),
                dispatch=draw(st.sampled_from(["sorted", "loop", "onehot"])),
                routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))


def ffn(x, w1, w3, w2, activation):
    """One expert on one token, float64: ``w2(act(x w1) [* x w3])``."""
    h = x @ w1
    h = F.silu(h) * (x @ w3) if activation == "swiglu" else F.gelu(h)
    return h @ w2


def ref_layer(layer, x):
    """Per-token loop: logits, gating (tests.references.ref_gating), capacity by the slow queue, the kept experts
    weighted by their gates, plus the shared experts."""
    c = layer.config
    tokens = x.reshape(-1, c.d_model).double()
    logits = tokens @ layer.router.weight.detach().double().T
    scores, gates, experts = ref_gating(logits.float(), c.k, c.score_func, c.renormalize, c.softmax_order,
                                        scale=c.routed_scaling_factor)
    keep = torch.ones_like(experts, dtype=torch.bool)
    if c.capacity_factor is not None:
        capacity = expert_capacity(tokens.shape[0], c.num_experts, c.capacity_factor, c.k)
        keep = ref_queue_positions(experts, scores.gather(1, experts), c.drop_policy) < capacity
    w = layer.experts
    w1, w2 = w.w1.detach().double(), w.w2.detach().double()
    w3 = None if w.w3 is None else w.w3.detach().double()
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(c.k):
            e = int(experts[t, j])
            if keep[t, j]:
                out[t] += gates[t, j] * ffn(tokens[t], w1[e], None if w3 is None else w3[e], w2[e], c.activation)
        if layer.shared is not None:
            s = layer.shared.experts
            out[t] += ffn(tokens[t], s.w1[0].detach().double(), None if s.w3 is None else s.w3[0].detach().double(),
                          s.w2[0].detach().double(), c.activation)
    return out.reshape(x.shape), experts, ~keep


@given(layer_options(), st.integers(1, 10), seeds, st.booleans())
def test_layer_matches_per_token_reference(options, num_tokens, seed, batched):
    torch.manual_seed(seed)
    layer = MoELayer(**options).eval()
    x = randn(seed, num_tokens, options["d_model"])
    if batched and num_tokens % 2 == 0:
        x = x.view(2, num_tokens // 2, -1)
    y, info = layer(x)
    ref, experts, dropped = ref_layer(layer, x)
    assert torch.equal(info.experts, experts) and torch.equal(info.dropped, dropped)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype


@given(layer_options())
def test_every_valid_config_builds_and_round_trips(options):
    config = MoEConfig(**options)
    layer = MoELayer.from_config(config)
    assert layer.config == config
    assert MoELayer(**{**config.options(), **{n: getattr(config, n) for n in ("d_model", "d_ff", "num_experts", "k")}}
                    ).config == config


# ------------------------------------------------------------------------------------------------- bad input
BAD_OPTIONS = {
    "d_model": bad_ints(1), "d_ff": bad_ints(1), "num_experts": bad_ints(1), "k": bad_ints(1, 4),
    "activation": st.text(max_size=6), "score_func": st.text(max_size=6), "router": st.text(max_size=6),
    "softmax_order": st.text(max_size=6), "drop_policy": st.text(max_size=6), "dispatch": st.text(max_size=6),
    "group_score": st.text(max_size=6), "router_dtype": st.sampled_from(["float64", "int8", torch.int32, None, 32]),
    "capacity_factor": bad_positive_numbers().filter(lambda v: v is not None),
    "eval_capacity_factor": bad_positive_numbers().filter(lambda v: v is not None),
    "routed_scaling_factor": bad_positive_numbers(), "jitter_eps": st.floats(1, 10) | st.floats(-10, -1e-9),
    "expert_dropout": st.floats(1, 10) | st.floats(-10, -1e-9), "bias_update_rate": bad_positive_numbers(zero_ok=True),
    "n_groups": bad_ints(1), "topk_groups": bad_ints(1), "n_shared": bad_ints(0), "d_shared": bad_ints(1),
    "renormalize": st.sampled_from(["yes", 1, 0, None]), "selection_bias": st.sampled_from(["no", 1, None]),
    "bias_update_centered": st.sampled_from(["no", 1, None]),
}
CHOICES = {"activation": ("gelu", "swiglu"), "score_func": ("softmax", "sigmoid"), "router": ("softmax", "noisy_topk"),
           "softmax_order": ("before_topk", "after_topk"), "drop_policy": ("position", "probability", "batch_priority"),
           "dispatch": ("sorted", "loop", "onehot"), "group_score": ("max", "top2_sum")}


@given(st.sampled_from(sorted(BAD_OPTIONS)), st.data())
def test_a_bad_option_names_itself(name, data):
    value = data.draw(BAD_OPTIONS[name].filter(lambda v: v not in CHOICES.get(name, ())))
    sizes = dict(d_model=8, d_ff=16, num_experts=4, k=2)
    raises_naming(name, MoELayer, **{**sizes, name: value})
    if name not in STRUCTURAL and name not in ("d_model", "d_ff", "num_experts"):
        raises_naming(name, MoELayer(**sizes).configure, **{name: value})


@given(st.text(min_size=1, max_size=12).filter(lambda s: s.isidentifier() and s not in MoEConfig.__dataclass_fields__))
def test_an_unknown_option_is_named_with_the_allowed_ones(name):
    with pytest.raises(TypeError, match="the options are") as info:
        MoELayer(8, 16, 4, 2, **{name: 1})
    assert repr(name) in str(info.value)


@st.composite
def layers_and_inputs(draw):
    d_model = draw(st.integers(1, 8))
    layer = MoELayer(d_model, 4, draw(st.integers(1, 4)), 1)
    return layer, randn(draw(seeds), draw(st.integers(1, 6)), d_model)


@given(layers_and_inputs(), st.sampled_from(NOT_FLOAT_DTYPES))
def test_layer_rejects_non_float_input(li, dtype):
    layer, x = li
    raises_naming("x", layer, x.to(dtype))


@given(layers_and_inputs(), st.data())
def test_layer_rejects_bad_shapes(li, data):
    layer, x = li
    d = layer.d_model
    bad = data.draw(st.sampled_from([torch.tensor(1.0), torch.zeros(3, d + 1), torch.zeros(0, d),
                                     torch.zeros(2, 0, d), x.tolist()]))
    raises_naming("x", layer, bad)


@given(layers_and_inputs(), st.data())
def test_layer_rejects_non_finite_input(li, data):
    layer, x = li
    raises_naming("x", layer, data.draw(poisoned(x)))


@given(layers_and_inputs(), st.floats(1.0, 1e37))
def test_layer_output_is_finite_or_the_error_names_x(li, scale):
    """However large a finite input, the layer never silently returns NaN or inf."""
    layer, x = li
    try:
        y, _ = layer(x * scale)
    except ValueError as e:
        assert names(str(e), "x"), str(e)
    else:
        assert torch.isfinite(y).all()
