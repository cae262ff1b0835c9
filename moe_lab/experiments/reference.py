"""The course's reference runs (add yours here: a :class:`ReferenceRun` passed to :func:`register`, then
``python -m moe_lab.experiments run NAME`` to store its result; see the README, "Evidence")."""
from __future__ import annotations

import statistics

from ..model import toy_config
from .budget import Budget
from .claims import Claim, compare
from .registry import ReferenceRun, register
from .results import metric_values
from .runner import Setup

SWITCH = "Fedus et al. 2021 (Switch Transformer)"
MOE_FAMILY = {"switch": ("the Switch preset (top-1, capacity factor 1.0)", SWITCH),
              "glam": ("the GLaM preset (top-2, MoE every other layer)", "Du et al. 2021 (GLaM)"),
              "st_moe": ("the ST-MoE preset (top-2, capacity factor 1.25, z-loss)", "Zoph et al. 2022 (ST-MoE)"),
              "mixtral": ("the Mixtral preset (top-2, dropless)", "Jiang et al. 2024 (Mixtral)")}
"""Notebook 07's MoE presets: ``arm: (how the notebook names it, the paper that reports MoE beating dense)``."""
DENSE = "the dense model (equal active FLOPs)"


def switch_family_claims(result: dict) -> dict[str, Claim]:
    """What notebook 07 states from ``switch_family``: each MoE preset against the dense model at equal active
    FLOPs (validation CE), the aux-loss control for Switch (end-of-run MaxVio, dropped slots, validation CE), the
    slots Switch drops at capacity factor 1.0 against ST-MoE's 1.25, and the time per step on this machine."""
    claims = {f"{arm} vs dense": compare(result, arm, "dense", subject=label, other=DENSE, expected="lower",
                                         source=source)
              for arm, (label, source) in MOE_FAMILY.items()}
    switch, no_aux = "Switch with its aux loss", "Switch without it"
    claims["aux: max_vio"] = compare(result, "switch", "switch, aux 0", "max_vio", subject=switch, other=no_aux,
                                     digits=2, expected="lower", source=SWITCH)
    claims["aux: drop_rate"] = compare(result, "switch", "switch, aux 0", "drop_rate", subject=switch, other=no_aux,
                                       digits=1, scale=100, unit="percentage points")
    claims["aux: val_ce"] = compare(result, "switch", "switch, aux 0", subject=switch, other=no_aux)
    claims["drops: switch vs st_moe"] = compare(result, "switch", "st_moe", "drop_rate",
                                                subject=MOE_FAMILY["switch"][0], other=MOE_FAMILY["st_moe"][0],
                                                digits=1, scale=100, unit="percentage points")
    claims["step time"] = compare(result, "mixtral", "dense", "step_ms", subject="the Mixtral preset", other=DENSE,
                                  digits=1)
    return claims


SWITCH_FAMILY = register(ReferenceRun(
    name="switch_family",
    description="Notebook 07: the toy Switch, GLaM, ST-MoE and Mixtral presets against the dense preset, all with "
                "the same active FFN width, each trained to the end of its own schedule within the training FLOPs "
                "of 800 dense steps; plus Switch without its aux loss (the control)",
    arms={"dense": toy_config("dense"), "switch": toy_config("switch"),
          "switch, aux 0": toy_config("switch", aux_coef=0.0), "glam": toy_config("glam"),
          "st_moe": toy_config("st_moe"), "mixtral": toy_config("mixtral")},
    budget=Budget.of("flops", toy_config("dense"), 800, batch_size=16, seq_len=64),
    seeds=(0, 1, 2, 3, 4),
    setup=Setup(eval_points=3),
    claims=switch_family_claims,
    notebooks=("07_switch_glam_stmoe",),
))


V3_SOURCE = "Wang et al. 2024 (auxiliary-loss-free balancing)"
V3_GAMMAS = (1e-3, 1e-2, 3e-2)
V3_ALPHAS = (1e-3, 1e-2, 1e-1)
"""Notebook 12's sweeps: the bias update rate gamma (aux-loss-free) and the aux-loss weight alpha, each tuned."""


def _v3(**overrides):
    # the toy DeepSeek-V3 preset at the notebook's CPU size, sequence-wise loss off: only the balancing differs
    return toy_config("deepseek_v3", n_layers=2, seq_aux_coef=0.0, **overrides)


def v3_arm(kind: str, value: float) -> str:
    """Arm name of one sweep point of ``deepseek_v3_balancing``: ``kind`` ``"gamma"`` or ``"alpha"``."""
    return f"{kind} {value:g}"


def tuned(result: dict, kind: str) -> str:
    """The arm of sweep ``kind`` (``"gamma"`` / ``"alpha"``) with the lowest mean validation CE: each method's
    rate tuned on the same seeds, the same way."""
    values = V3_GAMMAS if kind == "gamma" else V3_ALPHAS
    arms = [v3_arm(kind, v) for v in values]
    return min(arms, key=lambda a: sum(r["val_ce"] for r in result["runs"][a]) / len(result["runs"][a]))


def deepseek_v3_balancing_claims(result: dict) -> dict[str, Claim]:
    """What notebook 12 states from ``deepseek_v3_balancing``: the cause of the imbalance without balancing
    (sigmoid against softmax scores, both unbalanced), each tuned method against the control, and the tuned
    aux-loss-free rate against the tuned aux loss (MaxVio and validation CE)."""
    gamma, alpha = tuned(result, "gamma"), tuned(result, "alpha")
    none, soft = "the sigmoid router without balancing", "the same router with softmax scores and no balancing either"
    g_name, a_name = f"aux-loss-free balancing (tuned: {gamma})", f"the aux loss (tuned: {alpha})"
    claims = {"sigmoid vs softmax: max_vio": compare(result, "none", "softmax, none", "max_vio", subject=none,
                                                      other=soft, digits=2)}
    for key, arm, name in (("gamma", gamma, g_name), ("alpha", alpha, a_name)):
        claims[f"{key} vs none: max_vio"] = compare(result, arm, "none", "max_vio", subject=name,
                                                    other="no balancing", digits=2, expected="lower",
                                                    source=V3_SOURCE)
        claims[f"{key} vs none: val_ce"] = compare(result, arm, "none", subject=name, other="no balancing")
    claims["gamma vs alpha: max_vio"] = compare(result, gamma, alpha, "max_vio", subject=g_name, other=a_name,
                                                digits=2, expected="lower", source=V3_SOURCE)
    claims["gamma vs alpha: val_ce"] = compare(result, gamma, alpha, subject=g_name, other=a_name)
    # the other reading of "tuned": the aux loss as balanced as the bias, and what that costs in loss
    strongest = min((v3_arm("alpha", a) for a in V3_ALPHAS),
                    key=lambda a: statistics.fmean(metric_values(result, a, "max_vio")))
    s_name = f"the most balancing aux loss ({strongest})"
    claims["gamma vs most balancing alpha: max_vio"] = compare(result, gamma, strongest, "max_vio", subject=g_name,
                                                               other=s_name, digits=2)
    claims["gamma vs most balancing alpha: val_ce"] = compare(result, gamma, strongest, subject=g_name, other=s_name,
                                                              expected="lower", source=V3_SOURCE)
    return claims


DEEPSEEK_V3_BALANCING = register(ReferenceRun(
    name="deepseek_v3_balancing",
    description="Notebook 12: the toy DeepSeek-V3 preset (2 layers, sequence-wise loss off) without balancing, "
                "with softmax instead of sigmoid scores (the control for the cause of the imbalance), with the aux "
                "loss at three weights alpha and aux-loss-free at three bias update rates gamma; every arm 300 "
                "steps of 16 x 64 bytes from the same initialisation per seed",
    arms={"none": _v3(bias_update_rate=0.0),
          "softmax, none": _v3(score_func="softmax", selection_bias=False, bias_update_rate=0.0),
          **{v3_arm("alpha", a): _v3(bias_update_rate=0.0, aux_coef=a) for a in V3_ALPHAS},
          **{v3_arm("gamma", g): _v3(bias_update_rate=g) for g in V3_GAMMAS}},
    budget=Budget.of("steps", _v3(), 300, batch_size=16, seq_len=64),
    seeds=(0, 1, 2),
    setup=Setup(eval_points=0),
    claims=deepseek_v3_balancing_claims,
    notebooks=("12_deepseek_moe",),
))
