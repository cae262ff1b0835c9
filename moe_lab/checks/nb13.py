"""Exercises of 13_capstone: token classes, class x expert statistics, router saturation, MoE vs dense at equal
FLOPs, and a trainable MoE block."""
from __future__ import annotations

import keyword
import random
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..data import stdlib_corpus
from ..layer import MoELayer
from ..specialisation import TOKEN_CLASSES, class_expert_counts, class_expert_stats, router_saturation, token_classes
from .calls import train_block
from .core import Case, exercise

# ---------------------------------------------------------------------------------------------------------- 13.1


def _bytes_case(name: str, text: bytes) -> Case:
    return Case(name, (torch.tensor(list(text), dtype=torch.int64),))


def _substring_keywords(tokens: torch.Tensor) -> torch.Tensor:
    """Mistake: a keyword found anywhere, also inside longer identifiers (``classify`` -> ``class``)."""
    classes, text = token_classes(tokens), bytes(tokens.tolist())
    for word in keyword.kwlist:
        for m in re.finditer(re.escape(word.encode()), text):
            classes[m.start():m.end()] = TOKEN_CLASSES.index("keyword")
    return classes


def _underscore_letter(tokens: torch.Tensor) -> torch.Tensor:
    """Mistake: ``_`` counted as a letter."""
    classes = token_classes(tokens)
    classes[(tokens == ord("_")) & (classes != TOKEN_CLASSES.index("keyword"))] = TOKEN_CLASSES.index("letter")
    return classes


def _soft_keywords(tokens: torch.Tensor) -> torch.Tensor:
    """Mistake: soft keywords (``match``, ``case``, ``type``, ``_``) counted as keywords too."""
    classes = token_classes(tokens)
    for m in re.finditer(rb"[A-Za-z0-9_]+", bytes(tokens.tolist())):
        if m.group().decode() in keyword.softkwlist:
            classes[m.start():m.end()] = TOKEN_CLASSES.index("keyword")
    return classes


@exercise("13.1", function="token_classes", title="Token classes of Python source bytes", points=3,
          reference=token_classes,
          hint="classify each byte by a lookup (letters, digits, whitespace, punctuation, other), then find every "
               "maximal run of identifier bytes [A-Za-z0-9_] and mark all its bytes 'keyword' when the whole run "
               "is a Python keyword",
          hints=("string.ascii_letters, string.digits, string.whitespace and string.punctuation give the byte "
                 "sets; keyword.kwlist the keywords (soft keywords such as match/case are not keywords here)",
                 "a regular expression over bytes(tokens.tolist()), re.finditer(rb'[A-Za-z0-9_]+', text), yields "
                 "the maximal runs with their start and end: 'classify', '_if' and 'if2' are not keywords"),
          mistakes={"a keyword matched inside a longer identifier": _substring_keywords,
                    "'_' counted as a letter": _underscore_letter,
                    "soft keywords (match, case, type, _) counted as keywords": _soft_keywords})
def _class_cases(hidden: bool) -> list[Case]:
    cases = [_bytes_case("a short snippet", b"def f(x1, _if):\n    return x1 if x1 else None\n"),
             _bytes_case("keywords inside identifiers", b"classify = elif_ or if2; elif True: match = None")]
    if hidden:
        corpus = stdlib_corpus(200_000)
        start = random.randint(0, len(corpus) - 3000)
        cases += [Case("2000 bytes of standard-library source", (corpus[start:start + 2000].clone(),)),
                  _bytes_case("a keyword at both ends", b"import os as\tnot"),
                  _bytes_case("soft keywords are not keywords", b"match x:\n case _: type = 1"),
                  _bytes_case("non-ASCII bytes", "café = 'naïve' # ü\r\n".encode()),
                  _bytes_case("one byte", b"_"), Case("empty", (torch.zeros(0, dtype=torch.int64),))]
    return cases


# ---------------------------------------------------------------------------------------------------------- 13.2


def _first_choice_only(classes, experts, n_classes, num_experts):
    """Mistake: only each token's first expert counted."""
    return class_expert_stats(classes, experts[:, :1], n_classes, num_experts)


def _columns_normalised(classes, experts, n_classes, num_experts):
    """Mistake: P(class | expert) (columns normalised) instead of P(expert | class)."""
    counts = class_expert_counts(classes, experts, n_classes, num_experts).float()
    return torch.nan_to_num(counts / counts.sum(0, keepdim=True)), class_expert_stats(classes, experts, n_classes,
                                                                                     num_experts)[1]


def _bits(classes, experts, n_classes, num_experts):
    """Mistake: mutual information in bits (log2) instead of nats."""
    given, mi = class_expert_stats(classes, experts, n_classes, num_experts)
    return given, mi / float(torch.log(torch.tensor(2.0)))


def _routing_case(name: str, n: int, c: int, e: int, k: int, skew: float) -> Case:
    classes = torch.randint(c, (n,))
    logits = torch.randn(n, e) + skew * torch.randn(c, e)[classes]  # classes lean towards some experts
    return Case(name, (classes, logits.topk(k, dim=-1).indices, c, e))


@exercise("13.2", function="class_expert_stats", title="P(expert | class) and the mutual information", points=2,
          reference=class_expert_stats, rtol=1e-4, atol=1e-6,
          hint="count token-slots per (class, expert) pair, every one of a token's k choices counts; normalise each "
               "row to get P(expert | class) (an empty class keeps a zero row); the mutual information is "
               "sum p(c,e) log(p(c,e) / (p(c) p(e))) over the non-zero joint probabilities, in nats",
          hints=("pair id = class * E + expert, then torch.bincount(pair.flatten(), minlength=C * E).view(C, E)",
                 "p(c,e) = counts / counts.sum(); p(c) and p(e) are its row and column sums"),
          mistakes={"only the first of the k experts counted": _first_choice_only,
                    "P(class | expert) (columns normalised) instead of P(expert | class)": _columns_normalised,
                    "mutual information in bits instead of nats": _bits})
def _stats_cases(hidden: bool) -> list[Case]:
    cases = [_routing_case("N=200, C=4, E=4, k=2, classes lean to experts", 200, 4, 4, 2, 2.0),
             _routing_case("N=50, C=3, E=8, k=1, no preference", 50, 3, 8, 1, 0.0)]
    if hidden:
        cases += [_routing_case("N=1000, C=6, E=8, k=2", 1000, 6, 8, 2, 3.0),
                  _routing_case("N=5, C=6, E=16, k=4 (some classes empty)", 5, 6, 16, 4, 1.0),
                  Case("every class on its own expert (MI = log 4)", (torch.arange(40) % 4, (torch.arange(40) % 4)[:, None],
                                                                     4, 4)),
                  _routing_case("one token", 1, 3, 4, 2, 0.0)]
    return cases


# ---------------------------------------------------------------------------------------------------------- 13.3


def _positionwise(experts: torch.Tensor, final: torch.Tensor) -> float:
    """Mistake: slot i compared with slot i only (the order within the top-k matters)."""
    return float((experts == final).float().mean())


def _per_token_all(experts: torch.Tensor, final: torch.Tensor) -> float:
    """Mistake: a token counts only when its whole top-k set is unchanged."""
    same = (experts[:, :, None] == final[:, None, :]).any(-1).all(-1)
    return float(same.float().mean())


def _saturation_case(name: str, n: int, e: int, k: int, changed: float) -> Case:
    final = torch.rand(n, e).topk(k, dim=-1).indices
    early = final.clone()
    redo = torch.rand(n) < changed
    early[redo] = torch.rand(int(redo.sum()), e).topk(k, dim=-1).indices
    perm = torch.rand(n, k).argsort(-1)  # the same set in another order is the same routing
    return Case(name, (early.gather(1, perm), final))


@exercise("13.3", function="router_saturation", title="OLMoE router saturation", points=1,
          reference=router_saturation,
          hint="for each token, count how many of its k experts at the checkpoint are also among its k experts in "
               "the final model, divide by k, and average over tokens; the order inside the top-k does not matter",
          hints=("(experts[:, :, None] == final[:, None, :]) is [N, k, k]: .any(-1) says which early choices "
                 "survive",),
          mistakes={"slots compared position by position (order within the top-k matters)": _positionwise,
                    "a token counted only when its whole top-k set is unchanged": _per_token_all})
def _sat_cases(hidden: bool) -> list[Case]:
    cases = [_saturation_case("N=100, E=8, k=2, 30% re-routed", 100, 8, 2, 0.3),
             _saturation_case("N=20, E=4, k=1, half re-routed", 20, 4, 1, 0.5)]
    if hidden:
        cases += [_saturation_case("N=500, E=64, k=8", 500, 64, 8, 0.6),
                  _saturation_case("identical", 30, 8, 2, 0.0), _saturation_case("k = E", 10, 4, 4, 1.0),
                  _saturation_case("one token", 1, 8, 3, 1.0)]
    return cases


# ---------------------------------------------------------------------------------------------------------- 13.4


def budget_matched_comparison(budget: int, moe_flops_per_step: int, dense_flops_per_step: int,
                              moe_final: torch.Tensor, dense_final: torch.Tensor) -> tuple[int, int, float, float, int]:
    """Reference for 13.4: ``(moe steps, dense steps, mean, sd, agree)``. Each model gets the most whole steps
    within ``budget`` training FLOPs (``budget // flops_per_step``; its schedule ends there); ``moe_final``,
    ``dense_final: [seeds]`` are the final losses of those runs, paired by seed; ``mean`` and ``sd`` (sample, n - 1;
    0.0 for one seed) of the per-seed differences ``moe - dense``; ``agree``: seeds whose difference has the sign of
    the mean."""
    for name, flops in (("moe_flops_per_step", moe_flops_per_step), ("dense_flops_per_step", dense_flops_per_step)):
        if flops < 1 or budget < flops:
            raise ValueError(f"{name} must be >= 1 and at most budget={budget}, got {flops}")
    if moe_final.dim() != 1 or moe_final.shape != dense_final.shape or not len(moe_final):
        raise ValueError("moe_final and dense_final must be [seeds] tensors of the same length >= 1")
    diff = (moe_final - dense_final).double()
    mean = float(diff.mean())
    sd = float(diff.std()) if len(diff) > 1 else 0.0
    agree = int((diff * (1 if mean > 0 else -1) > 0).sum())
    return budget // moe_flops_per_step, budget // dense_flops_per_step, mean, sd, agree


def _rounded_up(budget, moe_flops_per_step, dense_flops_per_step, moe_final, dense_final):
    """Mistake: steps rounded up (the schedule runs past the budget)."""
    _, _, *rest = budget_matched_comparison(budget, moe_flops_per_step, dense_flops_per_step, moe_final, dense_final)
    return (-(-budget // moe_flops_per_step), -(-budget // dense_flops_per_step), *rest)


def _population_sd(budget, moe_flops_per_step, dense_flops_per_step, moe_final, dense_final):
    """Mistake: population standard deviation (n) instead of the sample one (n - 1)."""
    out = list(budget_matched_comparison(budget, moe_flops_per_step, dense_flops_per_step, moe_final, dense_final))
    out[3] = float((moe_final - dense_final).double().std(correction=0))
    return tuple(out)


def _other_way(budget, moe_flops_per_step, dense_flops_per_step, moe_final, dense_final):
    """Mistake: the difference taken the other way (dense - moe)."""
    out = list(budget_matched_comparison(budget, moe_flops_per_step, dense_flops_per_step, moe_final, dense_final))
    out[2] = -out[2]
    return tuple(out)


def _moe_wins(budget, moe_flops_per_step, dense_flops_per_step, moe_final, dense_final):
    """Mistake: seeds where the MoE is lower counted, whatever the sign of the mean."""
    out = list(budget_matched_comparison(budget, moe_flops_per_step, dense_flops_per_step, moe_final, dense_final))
    out[4] = int((moe_final < dense_final).sum())
    return tuple(out)


@exercise("13.4", function="budget_matched_comparison", title="A budget-matched comparison", points=2,
          reference=budget_matched_comparison,
          hint="each model's schedule ends at its own budget: it runs the most whole steps whose FLOPs fit "
               "(integer division, rounded down); then the comparison is paired: one difference moe - dense per "
               "seed, their mean, their sample standard deviation (0.0 for one seed), and how many seeds have a "
               "difference of the mean's sign",
          hints=("d = moe_final - dense_final; d.std() is the sample SD (n - 1); (d * sign(mean) > 0).sum() "
                 "counts the seeds that agree",),
          mistakes={"steps rounded up (the schedule runs past the budget)": _rounded_up,
                    "population standard deviation (n) instead of the sample one (n - 1)": _population_sd,
                    "the difference taken the other way (dense - moe)": _other_way,
                    "seeds where the MoE is lower counted, whatever the sign of the mean": _moe_wins})
def _budget_cases(hidden: bool) -> list[Case]:
    configs = [(1000, 12, 10, 3, -0.05), (95, 10, 7, 5, -0.02)]  # budget, MoE FLOPs/step, dense ..., seeds, shift
    if hidden:
        configs += [(30, 1, 30, 2, -0.04), (300, 30, 30, 1, 0.03), (257, 256, 1, 4, 0.02),
                    (800 * 335_544_320, 336_068_608, 335_544_320, 6, -0.047)]
    cases = []
    for budget, moe, dense, seeds, shift in configs:
        dense_final = 1.65 + 0.02 * torch.randn(seeds)
        moe_final = dense_final + shift + 0.01 * torch.randn(seeds)
        cases.append(Case(f"budget {budget}, MoE {moe} FLOPs/step, dense {dense} FLOPs/step, {seeds} seeds, "
                          f"MoE {shift:+} on average", (budget, moe, dense, moe_final, dense_final)))
    return cases


# ---------------------------------------------------------------------------------------------------------- 13.5


class _LayerBlock(nn.Module):
    """The library's ``MoELayer`` (GELU experts, softmax -> top-k -> renormalise, Switch aux loss) as a block with
    the exercise's interface: ``forward(x) -> (y, aux)``."""

    def __init__(self, router_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, k: int):
        super().__init__()
        num_experts, d_model, d_ff = w1.shape
        self.layer = MoELayer(d_model, d_ff, num_experts, k, activation="gelu", dispatch="loop")
        with torch.no_grad():
            self.layer.router.weight.copy_(router_weight)
            self.layer.experts.w1.copy_(w1)
            self.layer.experts.w2.copy_(w2)

    def forward(self, x: torch.Tensor):
        y, info = self.layer(x)
        return y, info.aux_loss


def train_moe_block(x: torch.Tensor, target: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor,
                    w2: torch.Tensor, k: int, aux_coef: float, lr: float, steps: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for 13.5: what the checker's loop (:func:`moe_lab.checks.calls.train_block`) returns for a correct
    ``MoEBlock``, here the library's ``MoELayer``: ``(losses [steps], router weight [E, d], output [T, d])`` after
    ``steps`` SGD steps on ``mse(y, target) + aux_coef * aux``."""
    return train_block(_LayerBlock, x, target, router_weight, w1, w2, k, aux_coef, lr, steps)


class _SlowBlock(nn.Module):
    """A slow obvious MoE block, with the variants the mistakes need."""

    def __init__(self, router_weight, w1, w2, k, *, renormalize=True, aux="probs"):
        super().__init__()
        self.router_weight, self.w1, self.w2 = (nn.Parameter(t.detach().clone()) for t in (router_weight, w1, w2))
        self.k, self.renormalize, self.aux = k, renormalize, aux

    def forward(self, x):
        num_experts = self.w1.shape[0]
        probs = torch.softmax(x @ self.router_weight.T, dim=-1)
        gates, experts = probs.topk(self.k, dim=-1)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for slot in range(self.k):
            for e in range(num_experts):
                rows = experts[:, slot] == e
                y[rows] = y[rows] + gates[rows, slot, None] * (F.gelu(x[rows] @ self.w1[e]) @ self.w2[e])
        f = torch.bincount(experts.flatten(), minlength=num_experts).float() / experts.numel()
        p = probs.mean(0) if self.aux == "probs" else torch.zeros(x.shape[0], num_experts).scatter(
            1, experts, gates).mean(0)
        return y, num_experts * (f * p).sum()


def _slow_block(*args, **variant):
    """:func:`train_block` of :class:`_SlowBlock` (``variant``: its options)."""
    return train_block(lambda *a: _SlowBlock(*a, **variant), *args)


def _no_renormalize(*args):
    """Mistake: the top-k gates not renormalised."""
    return _slow_block(*args, renormalize=False)


def _aux_from_gates(*args):
    """Mistake: P_i of the aux loss from the top-k gates instead of the full softmax."""
    return _slow_block(*args, aux="gates")


def _no_aux(x, target, router_weight, w1, w2, k, aux_coef, lr, steps):
    """Mistake: the aux loss left out of the loss the block returns."""
    return train_block(_SlowBlock, x, target, router_weight, w1, w2, k, 0.0, lr, steps)


@exercise("13.5", function="MoEBlock", title="A trainable MoE block", points=4, reference=train_moe_block,
          drive="train_block", rtol=1e-4, atol=1e-5,
          hint="an nn.Module that stores the three given tensors as nn.Parameter copies and whose forward routes "
               "(logits = x W_r^T, softmax over all experts, top-k, renormalise the k gates), runs each expert on "
               "its tokens (w2(gelu(x w1))), sums gate x expert output, and returns (y, the Switch aux loss "
               "N * sum_i f_i P_i); the checker builds it, checks its parameters and trains it with SGD",
          hints=("f_i counts token-slots (all k choices, no gradient), P_i is the mean full-softmax probability "
                 "(with gradient): the aux loss reaches the router only through P",
                 "nn.Parameter(router_weight.detach().clone()) registers a trainable copy; a tensor kept as a plain "
                 "attribute is not a parameter, so the optimiser would never update it"),
          mistakes={"the top-k gates not renormalised": _no_renormalize,
                    "P_i of the aux loss from the top-k gates instead of the full softmax": _aux_from_gates,
                    "the aux loss left out (forward returns 0 for it)": _no_aux})
def _block_cases(hidden: bool) -> list[Case]:
    configs = [(32, 8, 16, 4, 2, 0.1, 0.2, 5), (16, 4, 8, 3, 1, 0.5, 0.1, 4)]
    if hidden:
        configs += [(64, 8, 8, 8, 2, 1e-2, 0.3, 6), (10, 6, 4, 4, 4, 0.2, 0.1, 3), (1, 4, 4, 2, 1, 0.1, 0.1, 2)]
    cases = []
    for t, d, f, e, k, aux, lr, steps in configs:
        x = torch.randn(t, d)
        x[: t // 2] += torch.randn(d)  # half the tokens share a direction: the router prefers some experts
        target = torch.randn(t, d) * 0.5
        args = (x, target, torch.randn(e, d), torch.randn(e, d, f) / d**0.5, torch.randn(e, f, d) / f**0.5, k, aux,
                lr, steps)
        cases.append(Case(f"T={t}, d={d}, d_ff={f}, E={e}, k={k}, aux_coef={aux}, lr={lr}, steps={steps}", args))
    return cases
