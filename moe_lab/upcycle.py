"""Sparse upcycling (Komatsuzaki et al. 2022): turn a trained dense model into an MoE model that starts out
computing exactly what the dense model computed, then keeps training.

Every chosen dense FFN becomes ``E`` experts that copy it and a new router; attention, norms, embeddings and
the FFNs that stay dense are copied. Why the copy is exact: the layer outputs ``y = sum_{i in top-k} g_i E_i(x)``;
with every ``E_i = FFN`` that is ``(sum_i g_i) FFN(x)``, and top-k gates renormalised to sum to 1 make it
``FFN(x)``, whatever the router weights (and whichever experts the router picks).

**Granular upcycling** (He et al. 2024) splits each FFN's hidden units into ``g`` slices of width
``d_ff / g``; an expert is one slice and the ``E`` experts are ``E / g`` copies of the ``g`` slices (expert
``e`` is slice ``e % g`` of copy ``e // g``). Hidden units act independently, so ``FFN(x) = sum_j slice_j(x)``
exactly (GELU and SwiGLU alike). With ``k`` a multiple of ``g`` and a router whose rows are equal within each
copy (what :func:`upcycled_router_weight` builds), the experts of a copy tie and top-k selects whole copies.
A selected copy ``c`` then contributes ``g_c FFN(x)`` while its ``g`` equal gates count ``g`` times towards the
renormalised sum of 1, so the layer computes ``FFN(x) / g``; scaling each expert's output matrix ``w2`` by ``g``
makes it equal ``FFN(x)`` again. ``routed_scaling_factor`` is compensated the same way: ``w2`` is scaled
by ``g / routed_scaling_factor`` (:func:`expert_scale`). Scaling ``w2`` alone is exact because the expert is
linear in ``w2``; spreading the factor over ``w1``, ``w3`` and ``w2`` (``s^(1/3)`` each) is not, since GELU and
SiLU are not homogeneous.

What breaks the equality (:func:`why_not_exact` lists it for a config): softmax before top-k without
renormalisation (the gates sum to the selected probability mass, < 1 and different per token; He et al.
scale by ``E / k``, exact only for a uniform router), sigmoid gates that are not normalised (``k = 1`` or
``renormalize=False``), shared experts (a new FFN is added), expert capacity (dropped tokens get 0 from the
branch), expert dropout in training, a router dtype below float32 (rounded gates do not sum to exactly 1);
for granular upcycling also per-expert router noise (``router="noisy_topk"`` in training) and expert groups
that straddle copies (neither the group size nor ``g`` divides the other), both of which can select parts of
copies. Jitter, a selection bias (zero at upcycling), other group-limited routing, softmax after top-k and every
dispatch path keep it exact.
"""
from __future__ import annotations

from dataclasses import fields, replace

import torch

from .config import MoEConfig, MoEOptions
from .validation import check_bool, check_int, check_number, check_tensor, check_type
from .experts import FFN, Experts
from .hooks import TrainHook, TrainState
from .layer import MoELayer, moe_layers
from .metrics import routing_entropy
from .model import ModelConfig, MoETransformer

ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "activation",
               "tie_embeddings", "rope_base")
""":class:`ModelConfig` fields an upcycled model inherits from the dense one (they decide the copied weights)."""
SET_BY_UPCYCLE = ("num_experts", "k", "d_expert", "moe_every", "first_dense")


def check_granularity(num_experts: int, granularity: int, *, d_ff: int | None = None, k: int | None = None) -> None:
    """Raise ``ValueError`` (naming the argument) unless ``g = granularity`` divides ``num_experts`` (whole
    copies of the ``g`` slices) and, when given, ``d_ff`` and ``k`` (top-k selects whole copies)."""
    check_int("num_experts", num_experts, 1)
    check_int("granularity", granularity, 1)
    if d_ff is not None and d_ff % granularity:
        raise ValueError(f"granularity={granularity} must divide d_ff={d_ff} (each expert is a slice of "
                         f"d_ff / granularity hidden units)")
    if num_experts % granularity:
        raise ValueError(f"num_experts={num_experts} must be a multiple of granularity={granularity} (the experts "
                         "are whole copies of the granularity slices)")
    if k is not None and k % granularity:
        raise ValueError(f"k={k} must be a multiple of granularity={granularity} (each token must use whole copies "
                         "of the FFN for the upcycled layer to equal it)")


def upcycled_expert_weights(w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor, num_experts: int,
                            granularity: int = 1, *, scale: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Stacked expert weights from one dense FFN's matrices (new tensors, never views of the inputs).

    Args:
        w1, w3: ``[d_model, d_ff]`` (``w3`` None for GELU).  w2: ``[d_ff, d_model]``.
        num_experts: ``E``, a multiple of ``granularity``.  granularity: ``g`` slices of ``d_ff / g`` hidden
            units per copy (1 = every expert a full copy).  scale: multiplies ``w2`` (granular upcycling: ``g``).
    Returns:
        ``(w1 [E, d_model, d_ff / g], w3 [E, d_model, d_ff / g] or None, w2 [E, d_ff / g, d_model])``; expert
        ``e`` holds hidden units ``[j * d_ff / g, (j + 1) * d_ff / g)`` with ``j = e % g``.
    """
    for name, w in (("w1", w1), ("w2", w2)) + ((("w3", w3),) if w3 is not None else ()):
        check_tensor(name, w, "[d_model, d_ff]" if name != "w2" else "[d_ff, d_model]", 2)
    check_number("scale", scale, 0, low_open=True)
    if w2.shape != w1.shape[::-1] or (w3 is not None and w3.shape != w1.shape):
        raise ValueError(f"w1, w3 must be [d_model, d_ff] and w2 [d_ff, d_model], got w1 {tuple(w1.shape)}, "
                         f"w3 {None if w3 is None else tuple(w3.shape)}, w2 {tuple(w2.shape)}")
    check_granularity(num_experts, granularity, d_ff=w1.shape[1])
    copies = num_experts // granularity

    def columns(w: torch.Tensor) -> torch.Tensor:  # [d, d_ff] -> [E, d, d_ff / g], slice-minor order
        return w.reshape(w.shape[0], granularity, -1).transpose(0, 1).repeat(copies, 1, 1)

    w2_slices = (w2 * scale).reshape(granularity, -1, w2.shape[1]).repeat(copies, 1, 1)
    return columns(w1), None if w3 is None else columns(w3), w2_slices


def upcycled_router_weight(num_experts: int, d_model: int, granularity: int = 1, *, std: float = 0.02,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """``[E, d_model]`` router weights for an upcycled layer: ``N(0, std^2)``, one row per copy repeated for its
    ``g`` slices (so the slices of a copy tie and top-k picks whole copies). ``std=0``: a zero router
    (uniform gates; every expert ties, so with ``g > 1`` top-k's tie-breaking may pick parts of copies)."""
    check_int("d_model", d_model, 1)
    check_granularity(num_experts, granularity)
    check_number("std (router_std)", std, 0)
    check_type("generator", generator, (torch.Generator, type(None)), "None or a torch.Generator")
    rows = torch.randn(num_experts // granularity, d_model, generator=generator) * std
    return rows.repeat_interleave(granularity, dim=0)


def expert_scale(config: MoEOptions, granularity: int = 1) -> float:
    """The factor on each expert's ``w2`` that keeps an upcycled layer equal to the dense FFN:
    ``granularity / routed_scaling_factor``."""
    check_type("config", config, MoEOptions, "a moe_lab.config.MoEOptions (a MoEConfig or ModelConfig)")
    check_int("granularity", granularity, 1)
    return granularity / config.routed_scaling_factor


def why_not_exact(config: MoEConfig, granularity: int = 1, *, training: bool = False) -> list[str]:
    """Why a layer with ``config`` (an :class:`MoEConfig`, or an MoE :class:`ModelConfig`: its
    :meth:`~ModelConfig.layer_config`), upcycled with ``granularity``, would *not* equal the dense FFN at
    initialisation for every router (in training mode when ``training``): ``[]`` when it does (float32, up to
    rounding). A granularity :func:`upcycle` rejects raises its ``ValueError``."""
    check_type("config", config, (MoEConfig, ModelConfig), "a moe_lab.config.MoEConfig (or an MoE ModelConfig)")
    if isinstance(config, ModelConfig):
        if not config.num_experts:
            raise ValueError("config must describe an MoE layer, got a dense ModelConfig (num_experts=0)")
        config = config.layer_config()
    check_granularity(config.num_experts, granularity, k=config.k)  # what upcycle itself accepts
    check_bool("training", training)
    c, reasons = config, []
    if c.score_func == "softmax" and c.softmax_order == "before_topk" and not c.renormalize and c.k < c.num_experts:
        reasons.append("softmax before top-k without renormalisation: the gates sum to the selected probability "
                       "mass (< 1, different per token)")
    if c.score_func == "sigmoid" and (not c.renormalize or c.k == 1):
        reasons.append("sigmoid gates are not normalised (renormalize=False or k=1): the output is scaled by the "
                       "sum of the selected sigmoid scores")
    if c.n_shared:
        reasons.append("shared experts add a freshly initialised FFN to every token")
    if (c.capacity_factor if training else c.capacity_factor_eval) is not None:
        reasons.append("expert capacity: tokens over an expert's capacity get 0 from the MoE branch")
    if training and c.expert_dropout:
        reasons.append("expert dropout zeroes hidden units in training")
    if c.router_dtype != torch.float32:
        reasons.append(f"router_dtype={c.router_dtype}: rounded gates do not sum to exactly 1")
    if granularity > 1 and training and c.router == "noisy_topk":
        reasons.append("noisy top-k adds independent noise per expert, so top-k can pick parts of a copy")
    group = c.num_experts // c.n_groups
    if granularity > 1 and c.n_groups > 1 and group % granularity and granularity % group:
        reasons.append("expert groups straddle the copies of the FFN, so group-limited top-k can pick parts of a copy")
    return reasons


@torch.no_grad()
def _fill_from_ffn(layer: MoELayer, ffn: FFN, granularity: int, router_std: float,
                   generator: torch.Generator | None) -> None:
    """Write the upcycled experts and a fresh router into ``layer`` (in place, through ``w1`` / ``w3`` / ``w2``)."""
    dense, c = ffn.experts, layer.config
    w1, w3, w2 = upcycled_expert_weights(dense.w1[0], None if dense.w3 is None else dense.w3[0], dense.w2[0],
                                         c.num_experts, granularity, scale=expert_scale(c, granularity))
    experts = layer.experts
    experts.w1.copy_(w1)
    experts.w2.copy_(w2)
    if w3 is not None:
        experts.w3.copy_(w3)
    router = upcycled_router_weight(c.num_experts, c.d_model, granularity, std=router_std, generator=generator)
    layer.router.weight.copy_(router)


def _check_router_std(router_std: float, granularity: int, num_experts: int, k: int) -> None:
    check_number("router_std", router_std, 0)
    if router_std == 0 and granularity > 1 and k < num_experts:
        raise ValueError(f"router_std=0 with granularity={granularity} and k={k} < num_experts={num_experts}: a zero "
                         "router ties every expert and top-k may then pick parts of copies; use router_std > 0")


def upcycle_ffn(ffn: FFN, num_experts: int, k: int = 2, *, granularity: int = 1, router_std: float = 0.02,
                generator: torch.Generator | None = None, **options) -> MoELayer:
    """An :class:`moe_lab.MoELayer` of ``num_experts`` experts upcycled from the dense ``ffn``.

    Experts: copies of ``ffn`` (``granularity`` g > 1: slices, see the module doc), ``w2`` scaled by
    :func:`expert_scale`. Router: :func:`upcycled_router_weight` (``N(0, router_std^2)`` per copy; 0 = a zero
    router: every token then ties and picks the same experts, and only the aux loss or router noise breaks that
    symmetry; not allowed with ``granularity > 1`` and ``k < num_experts``). ``options``: any
    :class:`moe_lab.config.MoEOptions` field (the activation comes from ``ffn``). With the defaults
    (renormalised top-k) ``layer(x)[0]`` equals ``ffn(x)`` for any router weights; :func:`why_not_exact` says
    which options break that. Same device and dtype as ``ffn``.
    """
    check_type("ffn", ffn, FFN, "a dense moe_lab.experts.FFN to upcycle")
    dense = ffn.experts
    if "activation" in options:
        raise ValueError("activation comes from the dense ffn; do not pass it")
    check_granularity(num_experts, granularity, d_ff=dense.d_ff, k=k)
    _check_router_std(router_std, granularity, num_experts, k)
    config = MoEConfig(d_model=dense.d_model, d_ff=dense.d_ff // granularity, num_experts=num_experts, k=k,
                       activation=dense.activation, **options)
    layer = MoELayer.from_config(config).to(dense.w1.device, dense.w1.dtype)
    _fill_from_ffn(layer, ffn, granularity, router_std, generator)
    return layer


def upcycle(model: MoETransformer, num_experts: int, k: int = 2, *, moe_every: int = 1, first_dense: int = 0,
            granularity: int = 1, router_std: float = 0.02, generator: torch.Generator | None = None,
            **options) -> MoETransformer:
    """An MoE copy of the dense ``model``: the FFN of every layer the schedule picks (``moe_every=1``: all,
    ``2``: every other layer, after ``first_dense`` dense layers, as in :class:`moe_lab.model.ModelConfig`)
    becomes an upcycled MoE layer (:func:`upcycle_ffn`); every other weight is copied. ``options``: the
    MoE and loss fields of :class:`moe_lab.model.ModelConfig` (``capacity_factor``, ``aux_coef``,
    ``expert_dropout``, ...). With renormalised top-k gates (the default) the new model's logits and
    cross-entropy equal ``model``'s for any router weights (float32, up to rounding). ``model`` is unchanged.
    """
    if not isinstance(model, MoETransformer) or model.cfg.num_experts:
        detail = (f"a model with {model.cfg.num_experts} experts" if isinstance(model, MoETransformer)
                  else type(model).__name__)
        raise ValueError(f"model must be a dense moe_lab.model.MoETransformer (num_experts=0) with FFNs to "
                         f"upcycle, got {detail}")
    allowed = {f.name for f in fields(ModelConfig)} - set(ARCH_FIELDS) - set(SET_BY_UPCYCLE)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"options {unknown} cannot be set by upcycle; allowed: {sorted(allowed)} (the "
                         f"architecture {ARCH_FIELDS} comes from model)")
    check_granularity(num_experts, granularity, d_ff=model.cfg.d_ff, k=k)
    _check_router_std(router_std, granularity, num_experts, k)
    cfg = replace(model.cfg, num_experts=num_experts, k=k, d_expert=model.cfg.d_ff // granularity,
                  moe_every=moe_every, first_dense=first_dense, **options)
    moe_layers = [i for i, moe in enumerate(cfg.moe_layers) if moe]
    if not moe_layers:
        raise ValueError(f"moe_every={moe_every} and first_dense={first_dense} pick no layer of the "
                         f"{cfg.n_layers}-layer model: there is no FFN to upcycle")
    weight = next(model.parameters())
    new = MoETransformer(cfg).to(weight.device, weight.dtype)
    prefixes = tuple(f"blocks.{i}.ffn." for i in moe_layers)
    kept = {name: t for name, t in model.state_dict().items() if not name.startswith(prefixes)}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    if unexpected or any(not name.startswith(prefixes) for name in missing):
        raise RuntimeError(f"upcycle could not copy the dense weights: missing {missing}, unexpected {unexpected}")
    for i in moe_layers:
        _fill_from_ffn(new.blocks[i].ffn, model.blocks[i].ffn, granularity, router_std, generator)
    return new


def expert_distance(experts: Experts) -> torch.Tensor:
    """``[E, E]`` pairwise distances between the experts' weights (``w1``, ``w3``, ``w2`` flattened), relative to
    the mean expert norm: 0 between identical experts (every pair right after coarse upcycling; with granular
    upcycling, the copies of one slice)."""
    check_type("experts", experts, Experts, "a moe_lab.Experts (layer.experts)")
    with torch.no_grad():
        flat = torch.cat([w.detach().reshape(experts.num_experts, -1).float()
                          for w in (experts.w1, experts.w3, experts.w2) if w is not None], dim=1)
        return torch.cdist(flat[None], flat[None])[0] / flat.norm(dim=1).mean().clamp_min(1e-30)


def mean_pairwise_distance(experts: Experts) -> float:
    """Mean of :func:`expert_distance` over the ``E (E - 1) / 2`` pairs (0 for a single expert)."""
    check_type("experts", experts, Experts, "a moe_lab.Experts (layer.experts)")
    if experts.num_experts < 2:
        return 0.0
    i, j = torch.triu_indices(experts.num_experts, experts.num_experts, offset=1)
    return float(expert_distance(experts)[i, j].mean())


class DivergenceLog(TrainHook):
    """Logs, after every optimiser step, how far the experts of each MoE layer have moved apart and how
    decided the router is: ``history.extra["expert_distance"]`` and ``["routing_entropy"]``, each a list (one
    entry per step) of per-MoE-layer floats (:func:`mean_pairwise_distance`; mean router entropy in nats over
    the step's tokens, ``log E`` = uniform, :func:`moe_lab.metrics.routing_entropy`)."""

    def after_optimizer_step(self, state: TrainState) -> None:
        layers = moe_layers(state.model)
        state.history.log("expert_distance", [mean_pairwise_distance(layer.experts) for layer in layers])
        entropy = [sum(routing_entropy(out.infos[i].probs.detach()) for out in state.outputs) / len(state.outputs)
                   for i in range(len(layers))]
        state.history.log("routing_entropy", entropy)
