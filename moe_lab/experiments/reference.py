"""The course's reference runs (add yours here: a :class:`ReferenceRun` passed to :func:`register`, then
``python -m moe_lab.experiments run NAME`` to store its result; see the README, "Evidence")."""
from __future__ import annotations

import statistics

from ..model import toy_config
from .budget import Budget, matched_dense
from .claims import Claim, claim, compare
from .registry import ReferenceRun, register
from .results import metric_values
from .runner import Setup
from .stats import paired_difference

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


CAPSTONE_MOE = toy_config("mixtral", n_layers=2)
"""Notebook 13's MoE: ``d_model`` 64, 2 layers, 8 experts of width 128, top-2, dropless, aux loss 1e-2."""
CAPSTONE_ARMS = {"moe": CAPSTONE_MOE, "dense, equal FLOPs": matched_dense(CAPSTONE_MOE, "active_flops"),
                 "dense, equal params": matched_dense(CAPSTONE_MOE, "total_params")}
CAPSTONE_BUDGET = Budget.of("flops", CAPSTONE_ARMS["dense, equal FLOPs"], 800, batch_size=16, seq_len=64)
CAPSTONE_NAMES = {"moe": "the MoE model (8 experts, top-2)",
                  "dense, equal FLOPs": "the dense model with equal active FLOPs",
                  "dense, equal params": "the dense model with equal total parameters"}
"""How notebook 13 names the capstone's arms in sentences."""
CAPSTONE_LRS = (1e-3, 1e-2)
"""The learning rates of the capstone's sweep besides ``Setup``'s default 3e-3 (which the capstone run holds)."""
SWEEP_SEEDS = (0, 1, 2)


def capstone_claims(result: dict) -> dict[str, Claim]:
    """What notebook 13 states from ``capstone``: the MoE model against each dense baseline at the same training
    FLOPs (validation CE; Switch reports MoE ahead of the dense model with equal FLOPs per token), and the time
    per step of the MoE model against the dense model with equal FLOPs on this machine."""
    moe = CAPSTONE_NAMES["moe"]
    return {
        "moe vs equal flops": compare(result, "moe", "dense, equal FLOPs", subject=moe,
                                      other=CAPSTONE_NAMES["dense, equal FLOPs"], expected="lower", source=SWITCH),
        "moe vs equal params": compare(result, "moe", "dense, equal params", subject=moe,
                                       other=CAPSTONE_NAMES["dense, equal params"]),
        "step time": compare(result, "moe", "dense, equal FLOPs", "step_ms", subject=moe,
                             other=CAPSTONE_NAMES["dense, equal FLOPs"], digits=1),
    }


CAPSTONE = register(ReferenceRun(
    name="capstone",
    description="Notebook 13: an MoE model (8 experts of width 128, top-2) against the dense models with equal "
                "active FLOPs and with equal total parameters (widths from the calculator), each trained to the "
                "end of its own schedule within the training FLOPs of 800 steps of the equal-FLOPs dense model",
    arms=CAPSTONE_ARMS,
    budget=CAPSTONE_BUDGET,
    seeds=(0, 1, 2, 3, 4),
    setup=Setup(eval_points=4),
    claims=capstone_claims,
    notebooks=("13_capstone",),
))

CAPSTONE_SWEEP = {lr: register(ReferenceRun(
    name=f"capstone_lr_{lr:g}",
    description=f"Notebook 13's learning-rate sweep: the capstone's MoE model and its equal-FLOPs dense baseline "
                f"at peak learning rate {lr:g} (the capstone run holds 3e-3), same budget, seeds 0-2",
    arms={arm: CAPSTONE_ARMS[arm] for arm in ("moe", "dense, equal FLOPs")},
    budget=CAPSTONE_BUDGET,
    seeds=SWEEP_SEEDS,
    setup=Setup(lr=lr),
    notebooks=("13_capstone",),
)) for lr in CAPSTONE_LRS}
"""``{lr: ReferenceRun}``: the sweep that tunes the equal-FLOPs baseline as hard as the MoE model."""


def capstone_sweep(results: dict[float, dict]) -> tuple[dict[str, dict[float, float]], dict[str, float], Claim]:
    """The learning-rate sweep of notebook 13 from ``results`` (``{lr: result}``: the ``capstone_lr_*`` results and
    ``capstone`` at its 3e-3, whose seeds 0-2 are used): ``(mean validation CE {arm: {lr: value}}, the best lr of
    each arm, the claim)``; the claim compares the MoE model at its best learning rate with the equal-FLOPs dense
    model at its own best, paired over the seeds the sweep ran."""
    arms = ("moe", "dense, equal FLOPs")

    def val(lr: float, arm: str) -> list[float]:
        return [r["val_ce"] for r in results[lr]["runs"][arm] if r["seed"] in SWEEP_SEEDS]

    table = {arm: {lr: sum(val(lr, arm)) / len(SWEEP_SEEDS) for lr in sorted(results)} for arm in arms}
    best = {arm: min(table[arm], key=table[arm].get) for arm in arms}
    diff = paired_difference(val(best["moe"], "moe"), val(best["dense, equal FLOPs"], "dense, equal FLOPs"))
    text = claim(diff, subject=f"{CAPSTONE_NAMES['moe']} at its best learning rate ({best['moe']:g})",
                 other=f"{CAPSTONE_NAMES['dense, equal FLOPs']} at its own best ({best['dense, equal FLOPs']:g})",
                 quantity="validation cross-entropy", unit="nats", expected="lower", source=SWITCH)
    return table, best, text


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
