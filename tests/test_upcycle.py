"""Sparse upcycling: the upcycled model equals the dense one at initialisation (forward and loss, any router
weights), granular upcycling with its weight scaling, the stated list of gating variants that break equality,
expert divergence, and bad input. The reference is always the dense model itself (a different code path: one
dense FFN instead of routing, dispatch and combining)."""
import math

import pytest
import torch

from moe_lab.calculator import count_params
from moe_lab.config import MoEConfig
from moe_lab.experts import FFN
from moe_lab.layer import moe_layers
from moe_lab.model import ModelConfig, MoETransformer
from moe_lab.train import train
from moe_lab.upcycle import (DivergenceLog, expert_distance, mean_pairwise_distance, upcycle, upcycle_ffn,
                             upcycled_expert_weights, upcycled_router_weight, why_not_exact)

TOKENS = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(5))


def dense_model(**overrides) -> MoETransformer:
    return MoETransformer(ModelConfig(d_model=32, n_layers=3, n_heads=4, d_ff=64, **overrides))


def randomise_routers(model: MoETransformer, granularity: int = 1, std: float = 3.0) -> None:
    """Any router weights (tied within each copy for granular upcycling), far from the small default init."""
    with torch.no_grad():
        for layer in moe_layers(model):
            e, d = layer.router.weight.shape
            layer.router.weight.copy_(upcycled_router_weight(e, d, granularity, std=std))
            if layer.expert_bias is not None:
                layer.expert_bias.copy_(torch.randn(e) * 0.5)


def max_differences(dense: MoETransformer, moe: MoETransformer, training: bool = False) -> tuple[float, float]:
    dense.train(training)
    moe.train(training)
    x, y = TOKENS[:, :-1], TOKENS[:, 1:]
    with torch.no_grad():
        logits = (moe(x)[0] - dense(x)[0]).abs().max().item()
        ce = abs(moe.loss(x, y).ce.item() - dense.loss(x, y).ce.item())
    return logits, ce


EXACT = [
    ("mixtral top-2 of 4", {}, dict(num_experts=4, k=2)),
    ("top-1 renormalised", {}, dict(num_experts=8, k=1)),
    ("k = E", {}, dict(num_experts=4, k=4)),
    ("every other layer", {}, dict(num_experts=4, k=2, moe_every=2)),
    ("first layer dense", {}, dict(num_experts=4, k=2, first_dense=1)),
    ("gelu, tied embeddings, GQA", dict(activation="gelu", tie_embeddings=True, n_kv_heads=2),
     dict(num_experts=4, k=2)),
    ("softmax after top-k", {}, dict(num_experts=8, k=2, softmax_order="after_topk")),
    ("no renormalisation at k = E", {}, dict(num_experts=4, k=4, renormalize=False)),
    ("sigmoid, renormalised, routed scaling 2.5", {},
     dict(num_experts=8, k=2, score_func="sigmoid", routed_scaling_factor=2.5)),
    ("selection bias, groups, top2 sums", {},
     dict(num_experts=8, k=2, score_func="sigmoid", selection_bias=True, n_groups=4, topk_groups=2,
          group_score="top2_sum")),
    ("loop dispatch", {}, dict(num_experts=4, k=2, dispatch="loop")),
    ("one-hot dispatch, aux and z losses", {}, dict(num_experts=4, k=2, dispatch="onehot", aux_coef=1e-2,
                                                   z_coef=1e-3)),
    ("granular g=2, E=8, k=4", {}, dict(num_experts=8, k=4, granularity=2)),
    ("granular g=4, E=k=4", {}, dict(num_experts=4, k=4, granularity=4)),
    ("granular g=2, sigmoid x2.5", {},
     dict(num_experts=8, k=2, granularity=2, score_func="sigmoid", routed_scaling_factor=2.5)),
    ("granular g=2, groups of whole copies", {},
     dict(num_experts=8, k=2, granularity=2, n_groups=2, topk_groups=1)),
    ("granular g=4, copies of whole groups", {},
     dict(num_experts=8, k=4, granularity=4, n_groups=4, topk_groups=2, group_score="top2_sum")),
    ("granular gelu g=4, E=8, k=4", dict(activation="gelu"), dict(num_experts=8, k=4, granularity=4)),
]


@pytest.mark.parametrize("name, dense_overrides, options", EXACT, ids=[e[0] for e in EXACT])
def test_upcycled_model_equals_dense_for_any_router(name, dense_overrides, options):
    dense = dense_model(**dense_overrides)
    moe = upcycle(dense, **options)
    granularity = options.get("granularity", 1)
    assert why_not_exact(moe.cfg.layer_config(), granularity) == []
    for router_std in (None, 3.0):  # the default small init, then large random routers
        if router_std:
            randomise_routers(moe, granularity, router_std)
        logits, ce = max_differences(dense, moe)
        assert logits < 1e-5 and ce < 1e-5, (name, router_std, logits, ce)


TRAINING_EXACT = [
    ("jitter", dict(num_experts=4, k=2, jitter_eps=0.1)),
    ("noisy top-k router (coarse)", dict(num_experts=4, k=2, router="noisy_topk")),
    ("dropless eval capacity is irrelevant in training", dict(num_experts=4, k=2, eval_capacity_factor=1.0)),
    ("expert dropout is off in eval", dict(num_experts=4, k=2, expert_dropout=0.5)),
]


@pytest.mark.parametrize("name, options", TRAINING_EXACT, ids=[e[0] for e in TRAINING_EXACT])
def test_exact_in_the_mode_that_matters(name, options):
    dense = dense_model()
    moe = upcycle(dense, **options)
    training = "dropout" not in name
    assert why_not_exact(moe.cfg.layer_config(), training=training) == []
    randomise_routers(moe)
    assert max(max_differences(dense, moe, training=training)) < 1e-5


BREAKERS = [
    ("softmax before top-k, no renormalisation", dict(num_experts=4, k=2, renormalize=False), False, "renormalisation"),
    ("Switch top-1 gate", dict(num_experts=4, k=1, renormalize=False), False, "renormalisation"),
    ("sigmoid at k=1", dict(num_experts=4, k=1, score_func="sigmoid"), False, "sigmoid"),
    ("sigmoid without renormalisation", dict(num_experts=4, k=2, score_func="sigmoid", renormalize=False), False,
     "sigmoid"),
    ("shared expert", dict(num_experts=4, k=2, n_shared=1), False, "shared"),
    ("capacity", dict(num_experts=4, k=1, capacity_factor=0.5), False, "capacity"),
    ("eval capacity", dict(num_experts=4, k=1, eval_capacity_factor=0.5), False, "capacity"),
    ("expert dropout in training", dict(num_experts=4, k=2, expert_dropout=0.5), True, "dropout"),
    ("bfloat16 router", dict(num_experts=4, k=2, router_dtype="bfloat16"), False, "router_dtype"),
    ("granular noisy top-k in training", dict(num_experts=8, k=2, granularity=2, router="noisy_topk"), True, "noise"),
    ("granular groups straddling copies", dict(num_experts=12, k=2, granularity=2, n_groups=4, topk_groups=1), False,
     "groups"),
]


@pytest.mark.parametrize("name, options, training, reason", BREAKERS, ids=[b[0] for b in BREAKERS])
def test_stated_breakers_break_equality(name, options, training, reason):
    dense = dense_model()
    moe = upcycle(dense, **options)
    granularity = options.get("granularity", 1)
    reasons = why_not_exact(moe.cfg.layer_config(), granularity, training=training)
    assert len(reasons) == 1 and reason in reasons[0], reasons
    randomise_routers(moe, granularity)
    logits, _ = max_differences(dense, moe, training=training)
    assert logits > 1e-3, (name, logits)


def test_upcycle_copies_weights_and_leaves_the_dense_model_alone():
    dense = dense_model()
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    moe = upcycle(dense, 4, 2, moe_every=2)
    assert [b.ffn.__class__.__name__ for b in moe.blocks] == ["FFN", "MoELayer", "FFN"]
    for layer in moe_layers(moe):
        assert layer.experts.w1.data_ptr() != dense.blocks[1].ffn.experts.w1.data_ptr()
    train(moe, torch.randint(0, 256, (2000,)), steps=2, batch_size=2, seq_len=16, progress=False)
    for n, p in dense.named_parameters():
        assert torch.equal(p, before[n]), n
    assert moe.embed.weight.data_ptr() != dense.embed.weight.data_ptr()
    assert count_params(moe.cfg.arch()).total == sum(p.numel() for p in moe.parameters())


def test_upcycle_keeps_the_dtype():
    dense = dense_model().double()
    moe = upcycle(dense, 4, 2)
    assert all(p.dtype == torch.float64 for p in moe.parameters())
    randomise_routers(moe)
    assert max(max_differences(dense, moe)) < 1e-6  # the gates are float32 (the router's dtype)


def test_expert_weights_against_a_slow_slicing_reference():
    d, f, E, g = 6, 12, 6, 3
    w1, w3, w2 = torch.randn(d, f), torch.randn(d, f), torch.randn(f, d)
    W1, W3, W2 = upcycled_expert_weights(w1, w3, w2, E, g, scale=2.5)
    width = f // g
    for e in range(E):
        j = e % g
        cols = list(range(j * width, (j + 1) * width))
        assert torch.equal(W1[e], w1[:, cols]) and torch.equal(W3[e], w3[:, cols])
        assert torch.allclose(W2[e], 2.5 * w2[cols, :])
    W1[0].add_(1.0)  # new tensors, not views
    assert torch.equal(w1, w1.clone()) and not torch.equal(W1[0], W1[g])
    assert upcycled_expert_weights(w1, None, w2, 2)[1] is None


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("num_experts, k, granularity", [(2, 2, 2), (4, 2, 2), (8, 4, 4), (12, 6, 3), (5, 2, 1)])
def test_granular_layer_equals_ffn_and_needs_its_scaling(activation, num_experts, k, granularity):
    ffn = FFN(16, 24, activation)
    x = torch.randn(40, 16)
    layer = upcycle_ffn(ffn, num_experts, k, granularity=granularity, router_std=2.0)
    with torch.no_grad():
        expected = ffn(x)
        assert (layer(x)[0] - expected).abs().max() < 1e-5
        layer.experts.w2.div_(granularity)  # without the scaling the layer computes FFN(x) / g
        assert (layer(x)[0] - expected / granularity).abs().max() < 1e-5


def test_spreading_the_scale_over_all_three_matrices_is_not_exact():
    ffn = FFN(16, 24, "swiglu")
    x = torch.randn(40, 16)
    layer = upcycle_ffn(ffn, 4, 4, granularity=4, router_std=1.0)
    with torch.no_grad():
        cube = 4 ** (1 / 3)
        layer.experts.w2.div_(4).mul_(cube)
        layer.experts.w1.mul_(cube)
        layer.experts.w3.mul_(cube)
        assert (layer(x)[0] - ffn(x)).abs().max() > 1e-3


def test_router_weight_is_tied_within_copies():
    w = upcycled_router_weight(8, 5, 2, std=1.0)
    assert torch.equal(w[0::2], w[1::2]) and not torch.equal(w[0], w[2])
    assert torch.equal(upcycled_router_weight(4, 3, std=0), torch.zeros(4, 3))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(upcycled_router_weight(4, 3, generator=g1), upcycled_router_weight(4, 3, generator=g2))


def test_experts_start_identical_and_diverge():
    dense = dense_model()
    moe = upcycle(dense, 4, 2, aux_coef=1e-2, router_std=0.5)
    for layer in moe_layers(moe):
        assert expert_distance(layer.experts).abs().max() == 0 and mean_pairwise_distance(layer.experts) == 0
    log = DivergenceLog()
    history = train(moe, torch.randint(0, 256, (4000,)), steps=3, batch_size=4, seq_len=16, lr=1e-2,
                    progress=False, hooks=[log])
    distances, entropy = history.extra["expert_distance"], history.extra["routing_entropy"]
    assert len(distances) == len(entropy) == 3 and all(len(row) == 3 for row in distances)
    assert all(d > 0 for d in distances[-1])
    assert all(0 < h <= math.log(4) + 1e-6 for h in entropy[-1])
    d = expert_distance(moe_layers(moe)[0].experts)
    assert torch.allclose(d, d.T) and torch.all(d.diagonal() == 0)


def test_granular_copies_of_a_slice_are_identical():
    layer = upcycle_ffn(FFN(8, 16), 6, 2, granularity=2)
    d = expert_distance(layer.experts)
    assert d[0, 2] == 0 and d[1, 5] == 0 and d[0, 1] > 0


def test_bad_input_names_the_argument():
    dense = dense_model()
    cases = [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=4, k=5), "k must be"),
        (dict(num_experts=4, granularity=3), "granularity"),  # 3 does not divide d_ff = 64
        (dict(num_experts=6, k=4, granularity=4), "num_experts"),
        (dict(num_experts=8, k=3, granularity=2), "k=3"),
        (dict(num_experts=8, k=2, granularity=2, router_std=0.0), "router_std"),
        (dict(num_experts=4, router_std=-1.0), "router_std"),
        (dict(num_experts=4, moe_every=4), "no FFN to upcycle"),
        (dict(num_experts=4, first_dense=3), "no FFN to upcycle"),
        (dict(num_experts=4, d_model=64), "options"),
        (dict(num_experts=4, bogus=1), "options"),
        (dict(num_experts=4, capacity_factor=0), "capacity_factor"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            upcycle(dense, **kwargs)
    with pytest.raises(ValueError, match="model must be a dense"):
        upcycle(upcycle(dense, 4, 2), 4, 2)
    with pytest.raises(ValueError, match="model must be a dense"):
        upcycle(FFN(8, 16), 4, 2)
    with pytest.raises(TypeError, match="ffn must be"):
        upcycle_ffn(dense, 4, 2)
    with pytest.raises(ValueError, match="activation"):
        upcycle_ffn(FFN(8, 16), 4, 2, activation="gelu")
    with pytest.raises(ValueError, match="w1, w3 must be"):
        upcycled_expert_weights(torch.randn(4, 8), None, torch.randn(4, 8), 2)
    with pytest.raises(TypeError, match="config must be"):
        why_not_exact({"num_experts": 4, "k": 2})
    with pytest.raises(ValueError, match="config must describe"):
        why_not_exact(ModelConfig())
    assert why_not_exact(ModelConfig(num_experts=4, k=2, n_shared=1)) == why_not_exact(
        ModelConfig(num_experts=4, k=2, n_shared=1).layer_config()) != []
    assert why_not_exact(MoEConfig(d_model=8, d_ff=8, num_experts=4, k=2)) == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_upcycle_on_cuda():
    dense = dense_model().cuda()
    moe = upcycle(dense, 4, 2)
    assert next(moe.parameters()).is_cuda
    x = TOKENS.cuda()
    with torch.no_grad():
        assert (moe(x)[0] - dense(x)[0]).abs().max() < 1e-4
