"""Exercises of 11_finetuning_upcycling: copying an FFN into experts, when upcycling is exact, granular
upcycling with its scaling, parameter groups, trainable parameters under a freezing recipe, and a granular
upcycled MoE layer's forward pass."""
from __future__ import annotations

import random

import torch

from ..finetune import GROUPS
from ..layer import MoELayer, named_moe_layers
from ..model import TOY_PRESETS, MoETransformer, toy_config
from ..routing import sigmoid_topk, softmax_topk
from ..upcycle import upcycle, upcycled_expert_weights, upcycled_router_weight
from .core import Case, exercise, with_weights


def _ffn_weights(d: int, f: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(d, f) / d**0.5, torch.randn(d, f) / d**0.5, torch.randn(f, d) / f**0.5


# ------------------------------------------------------------------------------------------------ 11.1


def copy_ffn_into_experts(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, num_experts: int):
    """Reference for 11.1: ``E`` copies of a SwiGLU FFN, stacked ``[E, d, d_ff]`` / ``[E, d_ff, d]``."""
    return upcycled_expert_weights(w1, w3, w2, num_experts)


def _divided_by_e(w1, w3, w2, num_experts):
    W1, W3, W2 = copy_ffn_into_experts(w1, w3, w2, num_experts)
    return W1, W3, W2 / num_experts


def _w1_for_w3(w1, w3, w2, num_experts):
    return copy_ffn_into_experts(w1, w1, w2, num_experts)


@exercise("11.1", function="copy_ffn_into_experts", title="Copy a dense FFN into E experts", points=1,
          reference=copy_ffn_into_experts, new_tensors=True,
          hint="every expert is the dense FFN itself: stack num_experts copies of each matrix along a new first "
               "dimension, unscaled",
          hints=("the output shapes are [E, d_model, d_ff], [E, d_model, d_ff] and [E, d_ff, d_model]; each expert "
                 "needs memory of its own (w[None].expand(E, ...) only makes E views of one matrix)",
                 "torch.stack([w] * num_experts) (or w.repeat(num_experts, 1, 1) on w[None]) for each of w1, w3, w2"),
          mistakes={"experts scaled by 1/E (the gates already sum to 1)": _divided_by_e,
                    "w1 copied into w3": _w1_for_w3})
def _copy_cases(hidden: bool) -> list[Case]:
    configs = [(4, 8, 4), (3, 6, 1)] + ([(16, 32, 8), (5, 10, 3), (8, 4, random.randint(2, 16))] if hidden else [])
    return [Case(f"d={d}, d_ff={f}, E={e}", (*_ffn_weights(d, f), e)) for d, f, e in configs]


# ------------------------------------------------------------------------------------------------ 11.2


def upcycled_output_scale(logits: torch.Tensor, k: int, score_func: str, renormalize: bool) -> torch.Tensor:
    """Reference for 11.2: ``s [T]`` with ``MoE(x) = s(x) FFN(x)`` for a coarse upcycled layer: the sum of the
    ``k`` gates (float32)."""
    if score_func == "softmax":
        _, gates, _ = softmax_topk(logits, k, renormalize=renormalize)
    else:
        _, gates, _ = sigmoid_topk(logits, k, renormalize=renormalize)
    return gates.sum(dim=-1)


def _sigmoid_always_renormalised(logits, k, score_func, renormalize):
    if score_func == "sigmoid" and renormalize and k == 1:
        return torch.ones(logits.shape[0])
    return upcycled_output_scale(logits, k, score_func, renormalize)


def _ignores_renormalize(logits, k, score_func, renormalize):
    return upcycled_output_scale(logits, k, score_func, True)


def _all_experts(logits, k, score_func, renormalize):
    scores = logits.float().softmax(-1) if score_func == "softmax" else logits.float().sigmoid()
    return scores.sum(-1)


@exercise("11.2", function="upcycled_output_scale", title="When is upcycling exact? The output scale", points=2,
          reference=upcycled_output_scale,
          hint="with identical experts MoE(x) = (sum of the token's k gates) * FFN(x): compute the gates of the "
               "selected experts exactly as the router would, and add them up",
          hints=("softmax: probabilities over all E experts, keep the top k, divide by their sum only if "
                 "renormalize; sigmoid: sigmoid(logits), keep the top k, divide by their sum only if renormalize "
                 "and k > 1 (this course's convention: a top-1 sigmoid gate stays s_i; DeepSeek-V3 itself routes "
                 "to 8 experts and always normalises)",
                 "work in float32: logits.float()"),
          mistakes={"the top-1 sigmoid gate renormalised to 1": _sigmoid_always_renormalised,
                    "renormalize ignored (always renormalised)": _ignores_renormalize,
                    "summed over all experts, not the top k": _all_experts})
def _scale_cases(hidden: bool) -> list[Case]:
    configs = [(6, 4, 2, "softmax", True), (5, 8, 2, "sigmoid", False), (6, 4, 2, "softmax", False),
               (5, 8, 2, "sigmoid", True),
               (5, 8, 1, "sigmoid", True)]
    if hidden:
        configs += [(32, 16, 4, "softmax", False), (10, 8, 1, "softmax", False), (7, 6, 3, "sigmoid", False),
                    (9, 4, 4, "softmax", False), (3, 64, 8, "sigmoid", True), (4, 5, 1, "softmax", True)]
    cases = [Case(f"T={t}, E={e}, k={k}, {fn}, renormalize={r}", (2 * torch.randn(t, e), k, fn, r))
             for t, e, k, fn, r in configs]
    bf16 = (2 * torch.randn(4, 8)).bfloat16()
    cases.append(Case("bfloat16 logits (compute in float32)", (bf16, 2, "softmax", False)))
    return cases


# ------------------------------------------------------------------------------------------------ 11.3


def granular_expert_weights(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, num_experts: int,
                            granularity: int):
    """Reference for 11.3: expert ``e`` = hidden-unit slice ``e % g`` of copy ``e // g``, ``w2`` times ``g``."""
    return upcycled_expert_weights(w1, w3, w2, num_experts, granularity, scale=granularity)


def _unscaled(w1, w3, w2, num_experts, granularity):
    return upcycled_expert_weights(w1, w3, w2, num_experts, granularity)


def _slice_major(w1, w3, w2, num_experts, granularity):
    W1, W3, W2 = granular_expert_weights(w1, w3, w2, num_experts, granularity)
    copies = num_experts // granularity
    order = [(e % copies) * granularity + e // copies for e in range(num_experts)]
    return W1[order], W3[order], W2[order]


def _cube_root_everywhere(w1, w3, w2, num_experts, granularity):
    c = granularity ** (1 / 3)
    return upcycled_expert_weights(w1 * c, w3 * c, w2 * c, num_experts, granularity)


@exercise("11.3", function="granular_expert_weights", title="Granular upcycling: slices and the weight scaling",
          points=2, reference=granular_expert_weights,
          hint="split the d_ff hidden units into g contiguous slices (hidden units act independently, so the "
               "slices sum to the FFN); expert e holds slice e % g of copy e // g; the gates of a copy's g slices "
               "sum to 1/g of the copy's weight, so multiply w2 (only w2: the expert is linear in it) by g",
          hints=("slice j holds hidden units j*d_ff/g ... (j+1)*d_ff/g - 1: columns of w1 and w3, rows of w2",
                 "w1.reshape(d, g, d_ff // g).transpose(0, 1) gives the g slices of w1 as [g, d, d_ff/g]; repeat "
                 "it num_experts // g times along dim 0"),
          mistakes={"w2 not multiplied by g": _unscaled,
                    "slice-major expert order (expert e = slice e // copies)": _slice_major,
                    "g^(1/3) on each of w1, w3 and w2 (not exact: SiLU is not linear)": _cube_root_everywhere})
def _granular_cases(hidden: bool) -> list[Case]:
    configs = [(4, 8, 4, 2), (3, 12, 3, 3)]
    if hidden:
        configs += [(8, 16, 8, 4), (5, 10, 5, 1), (6, 24, 12, 4), (4, 8, 8, 8), (2, 6, random.choice([2, 4, 6]), 2)]
    return [Case(f"d={d}, d_ff={f}, E={e}, g={g}", (*_ffn_weights(d, f), e, g)) for d, f, e, g in configs]


# ------------------------------------------------------------------------------------------------ 11.4


def _split_names(names: list[str], moe_modules: list[str], end: str = "."):
    """``(moe, non_moe, router)`` names; a parameter belongs to module ``m`` when it starts with ``m + end``."""
    moe, non_moe, router = [], [], []
    for name in names:
        owner = next((m for m in moe_modules if name.startswith(m + end)), None)
        (non_moe if owner is None else moe).append(name)
        if owner is not None and name.startswith(owner + ".router."):
            router.append(name)
    return moe, non_moe, router


def group_parameters(names: list[str], moe_modules: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Reference for 11.4 (a slow obvious reading of :func:`moe_lab.finetune.parameter_groups` on names):
    ``(moe, non_moe, router)`` name lists, each in the order of ``names``."""
    return _split_names(names, moe_modules)


def _prefix_without_dot(names, moe_modules):
    return _split_names(names, moe_modules, end="")


def _router_outside_moe(names, moe_modules):
    moe, _, router = group_parameters(names, moe_modules)
    moe = [n for n in moe if n not in router]
    return moe, [n for n in names if n not in moe], router


def _any_ffn_is_moe(names, moe_modules):
    return group_parameters(names, sorted({n.split(".ffn.")[0] + ".ffn" for n in names if ".ffn." in n}))


def model_names(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """``(parameter names, names of the MoELayer modules)`` of ``model``: the inputs of 11.4."""
    return ([n for n, _ in model.named_parameters()],
            list(named_moe_layers(model)))


def _named_model(name: str, n_layers: int, **overrides) -> tuple[str, MoETransformer]:
    model = MoETransformer(toy_config(name, d_model=16, n_heads=2, n_layers=n_layers, **overrides))
    return f"{name}, {n_layers} layers", model


def _random_model() -> tuple[str, torch.nn.Module]:
    """A toy model drawn at random: any preset, 1 to 12 layers, every layer or every other one MoE; or a dense
    model upcycled on a random schedule."""
    name, layers = random.choice(sorted(TOY_PRESETS)), random.randint(1, 12)
    if name == "dense" and random.random() < 0.5:
        every = random.randint(1, min(3, layers))
        model = upcycle(_named_model("dense", layers)[1], random.choice([2, 4, 8]), 2, moe_every=every)
        return f"dense with {layers} layers upcycled every {every}", model
    if name == "dense":
        return _named_model(name, layers)
    every = random.choice([1, 2])
    return f"{name}, {layers} layers, MoE every {every}", _named_model(name, layers, moe_every=every)[1]


@exercise("11.4", function="group_parameters", title="Parameter groups: moe, non_moe, router", points=2,
          reference=group_parameters,
          hint="a parameter is in `moe` when it lives inside an MoE layer (its name starts with that layer's name "
               "followed by a dot), in `router` when it lives inside that layer's router, else in `non_moe`",
          hints=("the router is a subset of the MoE group; return (moe, non_moe, router), each list in the order "
                 "of `names`",
                 "'blocks.1.ffn' must not claim 'blocks.1.ffn_norm.weight': compare with the prefix module_name + '.'"),
          mistakes={"prefix without the dot ('blocks.1.ffn' also matches 'blocks.1.ffn_norm')": _prefix_without_dot,
                    "router left out of the moe group": _router_outside_moe,
                    "every FFN counted as MoE, dense ones too": _any_ffn_is_moe})
def _group_cases(hidden: bool) -> list[Case]:
    models = [_named_model("glam", 4), _named_model("deepseek_v1", 3)]
    if hidden:
        models += [_named_model("dense", 2), _named_model("mixtral", 11, router="noisy_topk", moe_every=2),
                   *(_random_model() for _ in range(4))]
    return [Case(name, model_names(model)) for name, model in models]


# ------------------------------------------------------------------------------------------------ 11.5


def trainable_count(sizes: dict[str, int], groups: dict[str, list[str]], recipe: list[str]) -> int:
    """Reference for 11.5: elements trainable when only the groups in ``recipe`` train (``"all"``: every
    parameter); overlapping groups count once (what :func:`moe_lab.finetune.set_trainable` returns)."""
    chosen = set(GROUPS) if "all" in recipe else set(recipe)
    train = {name for g in chosen for name in groups[g]}
    return sum(size for name, size in sizes.items() if name in train)


def _overlaps_twice(sizes, groups, recipe):
    chosen = GROUPS if "all" in recipe else recipe
    return sum(sizes[name] for g in chosen for name in groups[g])


def _counts_tensors(sizes, groups, recipe):
    return trainable_count({name: 1 for name in sizes}, groups, recipe)


def _sizes_and_groups(model: torch.nn.Module) -> tuple[dict[str, int], dict[str, list[str]]]:
    groups = dict(zip(GROUPS, group_parameters(*model_names(model))))
    return {n: p.numel() for n, p in model.named_parameters()}, groups


@exercise("11.5", function="trainable_count", title="Trainable parameters under a freezing recipe", points=1,
          reference=trainable_count,
          hint="collect the names of every parameter in the recipe's groups into one set (the router is inside "
               "moe: a parameter trains once however many chosen groups hold it) and add up their sizes",
          hints=("'all' means every group",),
          mistakes={"a parameter in two chosen groups counted twice": _overlaps_twice,
                    "counted parameter tensors instead of their elements": _counts_tensors})
def _count_cases(hidden: bool) -> list[Case]:
    recipes = [["non_moe"], ["moe"], ["all"]]
    models = [_named_model("deepseek_v1", 3)]
    cases = [Case(f"{name}, recipe {recipe}", (*_sizes_and_groups(model), recipe)) for name, model in models
             for recipe in recipes]
    if hidden:  # random models and random recipes (a group may repeat, "all" may come with others)
        for _ in range(6):
            name, model = _random_model()
            recipe = random.sample([*GROUPS, "all", random.choice(GROUPS)], random.randint(1, 3))
            cases.append(Case(f"{name}, recipe {recipe}", (*_sizes_and_groups(model), recipe)))
    return cases


# ------------------------------------------------------------------------------------------------ 11.6


def _moe_forward(x: torch.Tensor, router_weight: torch.Tensor, experts: tuple, k: int, **options) -> torch.Tensor:
    """``MoELayer`` (loop dispatch) with the given router and stacked expert weights ``(W1, W3, W2)`` on ``x``."""
    W1, W3, W2 = experts
    layer = MoELayer(W1.shape[1], W1.shape[2], W1.shape[0], k, dispatch="loop", **options)
    with_weights(layer, router__weight=router_weight, experts__w1=W1, experts__w3=W3, experts__w2=W2)
    return layer(x)[0]


def granular_upcycled_forward(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                              router_weight: torch.Tensor, granularity: int, k: int) -> torch.Tensor:
    """Reference for 11.6: the MoE layer granular-upcycled from a SwiGLU FFN (``E = router_weight.shape[0]``
    experts from :func:`granular_expert_weights`, softmax -> top-k -> renormalise in float32)."""
    experts = granular_expert_weights(w1, w3, w2, router_weight.shape[0], granularity)
    return _moe_forward(x, router_weight, experts, k)


def _forward_unscaled(x, w1, w3, w2, router_weight, granularity, k):
    return granular_upcycled_forward(x, w1, w3, w2 / granularity, router_weight, granularity, k)


def _forward_slice_major(x, w1, w3, w2, router_weight, granularity, k):
    return _moe_forward(x, router_weight, _slice_major(w1, w3, w2, router_weight.shape[0], granularity), k)


def _forward_not_renormalised(x, w1, w3, w2, router_weight, granularity, k):
    experts = granular_expert_weights(w1, w3, w2, router_weight.shape[0], granularity)
    return _moe_forward(x, router_weight, experts, k, renormalize=False)


@exercise("11.6", function="granular_upcycled_forward", title="A granular upcycled MoE layer, end to end",
          points=4, reference=granular_upcycled_forward, rtol=1e-4, atol=1e-5,
          hint="build the experts with granular_expert_weights, route in float32 (logits = x @ router_weight.T, "
               "softmax over all experts, top-k, renormalise the k gates), run each selected expert "
               "(silu(x w1_e) * (x w3_e)) w2_e on its tokens and add the gate-weighted outputs",
          hints=("with a router whose rows are equal within each copy (the first visible case) the output must "
                 "equal the dense FFN silu(x w1) * (x w3) @ w2: use that to test your code",
                 "a loop over experts: tokens = (experts == e).any(-1); gate of e per token = "
                 "(gates * (experts == e)).sum(-1); out[tokens] += gate[tokens, None] * expert_e(x[tokens]) "
                 "(use index_add or build the sum without in-place writes to keep gradients)"),
          mistakes={"w2 not multiplied by g": _forward_unscaled,
                    "slice-major expert order": _forward_slice_major,
                    "gates not renormalised": _forward_not_renormalised})
def _forward_cases(hidden: bool) -> list[Case]:
    # (T, d, d_ff, copies, g, k, tied router)
    configs = [(10, 8, 16, 2, 2, 2, True), (12, 8, 12, 2, 3, 3, False)]
    if hidden:
        configs += [(33, 16, 32, 4, 4, 8, False), (9, 8, 16, 4, 1, 2, False), (16, 8, 16, 1, 4, 4, False),
                    (1, 8, 8, 3, 2, 2, False), (20, 4, 8, 2, 4, 4, True), (24, 8, 24, 3, 2, 6, False)]
    cases = []
    for t, d, f, copies, g, k, tied in configs:
        router = (upcycled_router_weight(copies * g, d, g, std=1.0) if tied
                  else torch.randn(copies * g, d))
        args = (torch.randn(t, d), *_ffn_weights(d, f), router, g, k)
        router_kind = "router tied within copies" if tied else "any router"
        name = f"T={t}, d={d}, d_ff={f}, E={copies * g}, g={g}, k={k}, {router_kind}"
        cases.append(Case(name, args, grad_wrt=(0, 1, 4)))
    return cases
