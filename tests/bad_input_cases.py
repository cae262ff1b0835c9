"""A catalogue of bad (and borderline) inputs to the public API, each with what it must give: an error whose
message names the argument (``error``: a regex), or a result equal to an independent reference (``expect``).

``tests/test_bad_input.py`` runs every case. The catalogue covers issue 16 section 3: wrong types, shapes and
dtypes (integer, bool, complex, float64 beyond the float32 range), NaN / inf, 0-D and empty inputs, negative / zero
/ NaN sizes, strings and floats for integers, k > E, ids >= E and float ids; ``tests/bad_input_newer.py`` the same for
the modules added since (issue 23). :func:`counts` gives the numbers of the README's table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from moe_lab import MoEConfig, MoELayer
from moe_lab.calculator import (Arch, PRESETS, attention_flops_per_token, attention_params, count_params,
                                expected_experts_touched, ffn_params, flops_per_token, inference_memory,
                                kv_cache_bytes, moe_flops_per_token, moe_params, moe_schedule, training_memory)
from moe_lab.dispatch import capacity_mask, expert_capacity, queue_positions
from moe_lab.losses import (bias_update, communication_balance_loss, cv_squared, device_balance_loss,
                            importance_loss, load_loss, prob_in_topk, router_z_loss, sequence_balance_loss,
                            switch_aux_loss)
from moe_lab.metrics import (devices_per_token, drop_rate, expert_groups, max_over_mean, max_violation,
                             max_violation_tensor, routing_entropy, tokens_per_expert, unrouted_fraction)
from moe_lab.model import ModelConfig, MoETransformer
from moe_lab.routing import (NoisyTopKRouter, Router, dense_gates, group_limited_topk, multiplicative_jitter,
                             sigmoid_topk, softmax_topk)


@dataclass
class Case:
    """``call()`` must raise ``ValueError`` / ``TypeError`` (or ``raises``, for a failure that is not a bad
    argument) whose message names ``error`` (a whole word), or return ``expect()``."""

    id: str
    call: Callable[[], Any]
    error: str | None = None
    expect: Callable[[], Any] | None = None
    raises: tuple[type[Exception], ...] = (ValueError, TypeError)


def same(a: Any, b: Any) -> bool:
    """Equal results: tensors of the same shape and close values (float32 tolerance), tuples elementwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if a.shape != b.shape:
            return False
        if a.is_floating_point() or b.is_floating_point():
            return bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6, equal_nan=False))
        return bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return type(a) is type(b) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


T, E, K, D = 6, 4, 2, 8
LOGITS = torch.randn(T, E, generator=_gen(1))
PROBS = LOGITS.softmax(-1)
IDS = PROBS.topk(K, dim=-1).indices  # [T, k] int64
CHOSEN = PROBS.gather(1, IDS)
X = torch.randn(T, D, generator=_gen(2))
LOAD = torch.tensor([3, 1, 0, 8])


def with_value(t: torch.Tensor, value: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = t.clone() if dtype is None else t.clone().to(dtype)
    out.view(-1)[1] = value
    return out


def bad_ints(prefix: str, name: str, call: Callable[[Any], Any], valid: int, low: int = 1) -> list[Case]:
    """An integer argument: below ``low``, a float, a string, a bool, None, NaN."""
    values = [low - 1, valid + 0.5, str(valid), True, None, math.nan]
    return [Case(f"{prefix}: {name}={v!r}", lambda v=v: call(v), error=name) for v in values]


def bad_positive_numbers(prefix: str, name: str, call: Callable[[Any], Any], zero_ok: bool = False) -> list[Case]:
    """A number argument that must be > 0 (or >= 0): negative (and 0), NaN, inf, a string, a bool, None."""
    values = [-1.0, math.nan, math.inf, "1.0", True, None] + ([] if zero_ok else [0.0])
    return [Case(f"{prefix}: {name}={v!r}", lambda v=v: call(v), error=name) for v in values]


def bad_float_tensors(prefix: str, name: str, call: Callable[[Any], Any], good: torch.Tensor,
                      finite: bool = True, dims: bool = True) -> list[Case]:
    """A floating-point tensor argument: not a tensor, wrong number of dimensions, integer / bool / complex dtypes,
    NaN / +inf / -inf values (``finite``)."""
    variants: list[tuple[str, Any]] = [("a list", good.tolist()), ("a numpy array", good.numpy())]
    if dims:
        variants += [("0-D", torch.tensor(1.0)), ("one dim more", good[None]), ("one dim fewer", good[0])]
    variants += [(str(dt), good.to(dt)) for dt in (torch.int64, torch.int32, torch.bool, torch.uint8)]
    variants += [(str(dt), good.to(dt)) for dt in (torch.complex64, torch.complex128)]
    if finite:
        variants += [(f"holding {v}", with_value(good, v)) for v in (math.nan, math.inf, -math.inf)]
    return [Case(f"{prefix}: {name} {what}", lambda v=v: call(v), error=name) for what, v in variants]


def bad_id_tensors(prefix: str, name: str, call: Callable[[Any], Any], good: torch.Tensor, num_experts: int,
                   dims: bool = True) -> list[Case]:
    """An expert-id tensor: not a tensor, float (0.9 must not truncate to 0) / bool / complex ids, ids >= E and
    < 0, wrong number of dimensions."""
    variants: list[tuple[str, Any]] = [("a list", good.tolist()), ("float32", good.float()),
                                       ("float ids 0.9", good.float() + 0.9), ("float64", good.double()),
                                       ("bool", good.bool()), ("complex64", good.to(torch.complex64)),
                                       (f"id = E = {num_experts}", with_value(good, num_experts)),
                                       ("id = -1", with_value(good, -1)),
                                       ("id = 10 E", with_value(good, 10 * num_experts))]
    if dims:
        variants += [("0-D", torch.tensor(0)), ("one dim more", good[None]), ("one dim fewer", good.reshape(-1))]
    return [Case(f"{prefix}: {name} {what}", lambda v=v: call(v), error=name) for what, v in variants]


# ---------------------------------------------------------------------------------------------------- references
def naive_softmax_topk(logits: torch.Tensor, k: int, renormalize: bool = True):
    """Per-token float64 softmax, selection by logits (exact even where the probabilities underflow)."""
    probs, gates, experts = [], [], []
    for row in logits.double().tolist():
        m = max(row)
        e = [math.exp(v - m) for v in row]
        p = [v / sum(e) for v in e]
        idx = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        g = [p[i] for i in idx]
        if renormalize:
            g = [v / sum(g) for v in g]
        probs.append(p), gates.append(g), experts.append(idx)
    return (torch.tensor(probs, dtype=torch.float64).reshape(-1, logits.shape[1]),
            torch.tensor(gates, dtype=torch.float64).reshape(-1, k), torch.tensor(experts).reshape(-1, k))


def naive_sigmoid_topk(logits: torch.Tensor, k: int):
    scores, gates, experts = [], [], []
    for row in logits.double().tolist():
        s = [1 / (1 + math.exp(-v)) for v in row]
        idx = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        g = [s[i] / sum(s[j] for j in idx) for i in idx] if k > 1 else [s[idx[0]]]
        scores.append(s), gates.append(g), experts.append(idx)
    return (torch.tensor(scores, dtype=torch.float64).reshape(-1, logits.shape[1]),
            torch.tensor(gates, dtype=torch.float64).reshape(-1, k), torch.tensor(experts).reshape(-1, k))


def naive_queue_positions(experts: torch.Tensor) -> torch.Tensor:
    """Position priority: first choices of all tokens in token order, then second choices, ..."""
    used: dict[int, int] = {}
    pos = torch.zeros(experts.shape, dtype=torch.int64)
    for j in range(experts.shape[1]):
        for t in range(experts.shape[0]):
            e = int(experts[t, j])
            pos[t, j] = used.get(e, 0)
            used[e] = used.get(e, 0) + 1
    return pos


def naive_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    counts = [0] * num_experts
    for e in experts.reshape(-1).tolist():
        counts[int(e)] += 1
    return torch.tensor(counts)


def naive_switch_aux(probs: torch.Tensor, experts: torch.Tensor) -> float:
    num_tokens, num_experts = probs.shape
    counts = naive_counts(experts, num_experts).tolist()
    mean_p = [sum(probs[t, i].item() for t in range(num_tokens)) / num_tokens for i in range(num_experts)]
    return num_experts * sum(c / experts.numel() * p for c, p in zip(counts, mean_p))


# ---------------------------------------------------------------------------------------------------- the cases
def routing_cases() -> list[Case]:
    cases: list[Case] = []
    for fn, ref in (("softmax_topk", naive_softmax_topk), ("sigmoid_topk", naive_sigmoid_topk)):
        gate = softmax_topk if fn == "softmax_topk" else sigmoid_topk
        cases += bad_float_tensors(fn, "logits", lambda v, g=gate: g(v, K), LOGITS)
        cases += [Case(f"{fn}: logits [T, 0]", lambda g=gate: g(torch.zeros(3, 0), 1), error="logits"),
                  Case(f"{fn}: float64 logits 1e39", lambda g=gate: g(with_value(LOGITS, 1e39, torch.float64), K),
                       error="logits"),
                  Case(f"{fn}: float64 logits -1e39", lambda g=gate: g(with_value(LOGITS, -1e39, torch.float64), K),
                       error="logits")]
        cases += [Case(f"{fn}: k={v!r}", lambda v=v, g=gate: g(LOGITS, v), error="k")
                  for v in (0, -1, E + 1, 2.0, "2", True, None, math.nan)]
        cases += [Case(f"{fn}: renormalize={v!r}", lambda v=v, g=gate: g(LOGITS, K, renormalize=v), error="renormalize")
                  for v in ("yes", None, 1)]
        cases += [Case(f"{fn}: bias {what}", lambda v=v, g=gate: g(LOGITS, K, bias=v), error="bias")
                  for what, v in (("a list", [0.0] * E), ("[E-1]", torch.zeros(E - 1)), ("[1, E]", torch.zeros(1, E)),
                                  ("int64", torch.zeros(E, dtype=torch.long)), ("bool", torch.zeros(E, dtype=torch.bool)),
                                  ("complex", torch.zeros(E, dtype=torch.complex64)),
                                  ("NaN", with_value(torch.zeros(E), math.nan)),
                                  ("inf", with_value(torch.zeros(E), math.inf)))]
        cases += bad_positive_numbers(fn, "routed_scaling_factor",
                                      lambda v, g=gate: g(LOGITS, K, routed_scaling_factor=v))
        cases += [Case(f"{fn}: dtype={v!r}", lambda v=v, g=gate: g(LOGITS, K, dtype=v), error="dtype")
                  for v in (torch.int64, torch.complex64, "float32", None)]
        cases += [Case(f"{fn}: n_groups={v!r}", lambda v=v, g=gate: g(LOGITS, 1, n_groups=v, topk_groups=1),
                       error="n_groups") for v in (3, 0, "2", 2.0)]
        cases += [Case(f"{fn}: topk_groups={v!r}", lambda v=v, g=gate: g(LOGITS, 1, n_groups=2, topk_groups=v),
                       error="topk_groups") for v in (0, 3)]
        cases += [Case(f"{fn}: group_score='sum'", lambda g=gate: g(LOGITS, 1, n_groups=2, group_score="sum"),
                       error="group_score"),
                  Case(f"{fn}: k larger than the kept groups", lambda g=gate: g(LOGITS, 3, n_groups=4, topk_groups=2),
                       error="k")]
        # borderline inputs with a well-defined answer
        cases += [Case(f"{fn}: float64 logits in range", lambda g=gate: g(LOGITS.double() * 30, K),
                       expect=lambda r=ref: r(LOGITS.float() * 30, K)),
                  Case(f"{fn}: bfloat16 logits", lambda g=gate: g(LOGITS.bfloat16(), K),
                       expect=lambda r=ref: r(LOGITS.bfloat16().float(), K)),
                  Case(f"{fn}: float16 logits", lambda g=gate: g(LOGITS.half(), K),
                       expect=lambda r=ref: r(LOGITS.half().float(), K)),
                  Case(f"{fn}: empty [0, E] logits", lambda g=gate: tuple(t.shape for t in g(torch.zeros(0, E), K)),
                       expect=lambda: (torch.Size([0, E]), torch.Size([0, K]), torch.Size([0, K]))),
                  Case(f"{fn}: k = E", lambda g=gate: g(LOGITS, E), expect=lambda r=ref: r(LOGITS, E)),
                  Case(f"{fn}: numpy k", lambda g=gate: g(LOGITS, np.int64(K)), expect=lambda r=ref: r(LOGITS, K)),
                  Case(f"{fn}: non-contiguous logits", lambda g=gate: g(LOGITS.T.contiguous().T, K),
                       expect=lambda r=ref: r(LOGITS, K)),
                  Case(f"{fn}: large logits 1e30", lambda g=gate: g(LOGITS * 1e30, K)[2],
                       expect=lambda r=ref: r(LOGITS, K)[2])]
    cases += [Case("softmax_topk: tail probabilities underflow", lambda: softmax_topk(torch.tensor([[0., 100., 300.]]), 2)[2],
                   expect=lambda: torch.tensor([[2, 1]])),
              Case("softmax_topk: softmax_order='before'", lambda: softmax_topk(LOGITS, K, softmax_order="before"),
                   error="softmax_order"),
              Case("softmax_topk: after_topk without renormalize",
                   lambda: softmax_topk(LOGITS, K, softmax_order="after_topk", renormalize=False), error="renormalize")]
    # group-limited top-k
    scores = PROBS.repeat(1, 2)  # [T, 8]
    glt = group_limited_topk
    cases += bad_float_tensors("group_limited_topk", "scores", lambda v: glt(v, 2, n_groups=2, topk_groups=1),
                               scores)
    cases += [Case(f"group_limited_topk: k={v!r}", lambda v=v: glt(scores, v, n_groups=2, topk_groups=1), error="k")
              for v in (0, 9, 5, "2")]
    cases += [Case(f"group_limited_topk: n_groups={v!r}", lambda v=v: glt(scores, 2, n_groups=v, topk_groups=1),
                   error="n_groups") for v in (3, 0, "2", True)]
    cases += [Case(f"group_limited_topk: topk_groups={v!r}", lambda v=v: glt(scores, 2, n_groups=2, topk_groups=v),
                   error="topk_groups") for v in (0, 3, 1.0)]
    cases += [Case("group_limited_topk: group_score='mean'",
                   lambda: glt(scores, 2, n_groups=2, topk_groups=1, group_score="mean"), error="group_score"),
              Case("group_limited_topk: empty [0, E]",
                   lambda: tuple(t.shape for t in glt(torch.zeros(0, 8), 2, n_groups=2, topk_groups=1)),
                   expect=lambda: (torch.Size([0, 2]), torch.Size([0, 2])))]
    # routers
    for cls in (Router, NoisyTopKRouter):
        name = cls.__name__
        cases += bad_ints(name, "d_model", lambda v, c=cls: c(v, E), D)
        cases += bad_ints(name, "num_experts", lambda v, c=cls: c(D, v), E)
        cases += [Case(f"{name}.forward: x {what}", lambda v=v, c=cls: c(D, E)(v), error="x")
                  for what, v in (("a list", X.tolist()), ("0-D", torch.tensor(1.0)), ("[T, d - 1]", X[:, 1:]),
                                  ("int64", X.long()), ("bool", X.bool()), ("complex64", X.to(torch.complex64)))]
    router = Router(D, E)
    cases += [Case("Router.forward: dtype=torch.int32", lambda: router(X, torch.int32), error="dtype"),
              Case("Router.forward: float64 x", lambda: router(X.double()), expect=lambda: X @ router.weight.detach().T),
              Case("Router.forward: empty [0, d] x", lambda: router(torch.zeros(0, D)).shape,
                   expect=lambda: torch.Size([0, E]))]
    # jitter and dense gates
    cases += [Case(f"multiplicative_jitter: eps={v!r}", lambda v=v: multiplicative_jitter(X, v), error="eps")
              for v in (-0.1, 1.0, math.nan, "0.1", None)]
    cases += [Case("multiplicative_jitter: int64 x", lambda: multiplicative_jitter(X.long(), 0.1), error="x"),
              Case("multiplicative_jitter: eps=0 is the identity", lambda: multiplicative_jitter(X, 0.0), expect=lambda: X)]
    cases += bad_id_tensors("dense_gates", "experts", lambda v: dense_gates(CHOSEN, v, E), IDS, E)
    cases += [Case("dense_gates: gates int64", lambda: dense_gates(CHOSEN.long(), IDS, E), error="gates"),
              Case("dense_gates: gates [T, k+1]", lambda: dense_gates(PROBS[:, :3], IDS, E), error="gates"),
              Case("dense_gates: num_experts='4'", lambda: dense_gates(CHOSEN, IDS, "4"), error="num_experts"),
              Case("dense_gates: empty", lambda: dense_gates(torch.zeros(0, K), torch.zeros(0, K, dtype=torch.long), E),
                   expect=lambda: torch.zeros(0, E))]
    return cases


def capacity_cases() -> list[Case]:
    cases: list[Case] = []
    cases += bad_ints("expert_capacity", "num_tokens", lambda v: expert_capacity(v, E, 1.0), 10, low=0)
    cases += bad_ints("expert_capacity", "num_experts", lambda v: expert_capacity(10, v, 1.0), E)
    cases += bad_ints("expert_capacity", "k", lambda v: expert_capacity(10, E, 1.0, v), K)
    cases += bad_positive_numbers("expert_capacity", "capacity_factor", lambda v: expert_capacity(10, E, v))
    cases += [Case("expert_capacity: k > num_experts", lambda: expert_capacity(10, E, 1.0, E + 1), error="k"),
              Case("expert_capacity: tiny capacity factor", lambda: expert_capacity(10, 4, 1e-12), expect=lambda: 1),
              Case("expert_capacity: float noise 1.1 * 100 / 10", lambda: expert_capacity(100, 10, 1.1), expect=lambda: 11),
              Case("expert_capacity: no tokens", lambda: expert_capacity(0, 4, 1.0), expect=lambda: 0),
              Case("expert_capacity: numpy sizes", lambda: expert_capacity(np.int64(10), np.int64(4), 1.0, np.int64(2)),
                   expect=lambda: 5),
              Case("expert_capacity: huge capacity factor", lambda: expert_capacity(10, 4, 1e9), expect=lambda: 2_500_000_000),
              Case("expert_capacity: 7 tokens, 3 experts", lambda: expert_capacity(7, 3, 1.0), expect=lambda: 3)]
    cases += bad_id_tensors("capacity_mask", "experts", lambda v: capacity_mask(v, E, 2), IDS, E)
    cases += [Case(f"capacity_mask: capacity={v!r}", lambda v=v: capacity_mask(IDS, E, v), error="capacity")
              for v in (1.5, math.nan, -1, "2", True, None, math.inf)]
    cases += [Case(f"capacity_mask: num_experts={v!r}", lambda v=v: capacity_mask(IDS, v, 2), error="num_experts")
              for v in (0, "4", 4.0, None)]
    cases += [Case(f"capacity_mask: {dt} ids", lambda dt=dt: capacity_mask(IDS.to(dt), E, 2),
                   expect=lambda: naive_queue_positions(IDS) < 2) for dt in (torch.int32, torch.int16, torch.uint8)]
    cases += [Case(f"capacity_mask: probs {what}", lambda v=v: capacity_mask(IDS, E, 2, v, "probability"), error="probs")
              for what, v in (("None", None), ("[T, E]", PROBS), ("a list", CHOSEN.tolist()),
                              ("NaN", with_value(CHOSEN, math.nan)), ("complex", CHOSEN.to(torch.complex64)),
                              ("int64", CHOSEN.long()))]
    cases += [Case(f"capacity_mask: policy={v!r}", lambda v=v: capacity_mask(IDS, E, 2, CHOSEN, v), error="drop_policy")
              for v in ("random", None)]
    cases += [Case("capacity_mask: probs of the wrong shape with position policy",
                   lambda: capacity_mask(IDS, E, 2, PROBS, "position"), error="probs"),
              Case("capacity_mask: empty experts", lambda: capacity_mask(torch.zeros(0, K, dtype=torch.long), E, 2),
                   expect=lambda: torch.zeros(0, K, dtype=torch.bool)),
              Case("capacity_mask: capacity 0", lambda: capacity_mask(IDS, E, 0),
                   expect=lambda: torch.zeros(T, K, dtype=torch.bool)),
              Case("capacity_mask: numpy capacity", lambda: capacity_mask(IDS, E, np.int64(2)),
                   expect=lambda: naive_queue_positions(IDS) < 2),
              Case("queue_positions: int32 ids", lambda: queue_positions(IDS.int(), E),
                   expect=lambda: naive_queue_positions(IDS)),
              Case("queue_positions: float ids", lambda: queue_positions(IDS.float(), E), error="experts"),
              Case("queue_positions: num_experts='4'", lambda: queue_positions(IDS, "4"), error="num_experts"),
              Case("queue_positions: policy='first'", lambda: queue_positions(IDS, E, CHOSEN, "first"), error="drop_policy"),
              Case("queue_positions: NaN probs",
                   lambda: queue_positions(IDS, E, with_value(CHOSEN, math.nan), "batch_priority"),
                   error="probs")]
    return cases


def loss_cases() -> list[Case]:
    cases: list[Case] = []
    cases += bad_float_tensors("cv_squared", "values", cv_squared, LOAD.float(), dims=False)[:2]
    cases += [Case(f"cv_squared: values {what}", lambda v=v: cv_squared(v), error="values")
              for what, v in (("[2, 3]", torch.ones(2, 3)), ("0-D", torch.tensor(2.0)), ("bool", LOAD.bool()),
                              ("complex", LOAD.to(torch.complex64)), ("NaN", with_value(LOAD.float(), math.nan)),
                              ("inf", with_value(LOAD.float(), math.inf)))]
    cases += [Case(f"cv_squared: eps={v!r}", lambda v=v: cv_squared(LOAD.float(), v), error="eps")
              for v in (-1.0, math.nan, "1e-10", None)]
    cases += [Case("cv_squared: integer counts", lambda: cv_squared(LOAD),
                   expect=lambda: torch.tensor(np.var(LOAD.numpy()) / (np.mean(LOAD.numpy()) ** 2 + 1e-10))),
              Case("cv_squared: empty", lambda: cv_squared(torch.zeros(0)), expect=lambda: torch.tensor(0.0))]
    dense = dense_gates(CHOSEN, IDS, E)
    cases += bad_float_tensors("importance_loss", "gates", importance_loss, dense)
    cases += [Case("importance_loss: no tokens", lambda: importance_loss(torch.zeros(0, E)), expect=lambda: torch.tensor(0.0))]
    noisy, std = LOGITS + 0.1, torch.full((T, E), 0.5)
    cases += bad_float_tensors("prob_in_topk", "clean", lambda v: prob_in_topk(v, noisy, std, K), LOGITS)
    cases += [Case(f"prob_in_topk: {what}", call, error=err) for what, call, err in (
        ("noisy [T, E-1]", lambda: prob_in_topk(LOGITS, noisy[:, 1:], std, K), "noisy"),
        ("noise_std 0", lambda: prob_in_topk(LOGITS, noisy, torch.zeros(T, E), K), "noise_std"),
        ("noise_std negative", lambda: prob_in_topk(LOGITS, noisy, -std, K), "noise_std"),
        ("noise_std NaN", lambda: prob_in_topk(LOGITS, noisy, with_value(std, math.nan), K), "noise_std"),
        ("k = 0", lambda: prob_in_topk(LOGITS, noisy, std, 0), "k"),
        ("k > E", lambda: prob_in_topk(LOGITS, noisy, std, E + 1), "k"),
        ("load_loss noise_std 0", lambda: load_loss(LOGITS, noisy, torch.zeros(T, E), K), "noise_std"),
        ("load_loss k '2'", lambda: load_loss(LOGITS, noisy, std, "2"), "k"))]
    # balance losses
    cases += bad_float_tensors("switch_aux_loss", "probs", lambda v: switch_aux_loss(v, IDS), PROBS)
    cases += bad_id_tensors("switch_aux_loss", "experts", lambda v: switch_aux_loss(PROBS, v), IDS, E)
    cases += [Case("switch_aux_loss: no tokens",
                   lambda: switch_aux_loss(torch.zeros(0, E), torch.zeros(0, K, dtype=torch.long)),
                   error="probs"),
              Case("switch_aux_loss: T mismatch", lambda: switch_aux_loss(PROBS[:3], IDS), error="probs"),
              Case("switch_aux_loss: k = 0", lambda: switch_aux_loss(PROBS, torch.zeros(T, 0, dtype=torch.long)), error="k"),
              Case("switch_aux_loss: int32 ids", lambda: switch_aux_loss(PROBS, IDS.int()),
                   expect=lambda: torch.tensor(naive_switch_aux(PROBS, IDS))),
              Case("switch_aux_loss: bfloat16 probs", lambda: switch_aux_loss(PROBS.bfloat16(), IDS),
                   expect=lambda: torch.tensor(naive_switch_aux(PROBS.bfloat16().float(), IDS)))]
    cases += bad_float_tensors("router_z_loss", "logits", router_z_loss, LOGITS)
    cases += [Case("router_z_loss: [0, E]", lambda: router_z_loss(torch.zeros(0, E)), error="logits"),
              Case("router_z_loss: [T, 0]", lambda: router_z_loss(torch.zeros(T, 0)), error="logits"),
              Case("router_z_loss: float64", lambda: router_z_loss(LOGITS.double()),
                   expect=lambda: torch.tensor(sum(math.log(sum(math.exp(v) for v in row)) ** 2
                                                   for row in LOGITS.tolist()) / T))]
    seq_probs, seq_ids = PROBS.view(2, 3, E), IDS.view(2, 3, K)
    cases += bad_float_tensors("sequence_balance_loss", "probs", lambda v: sequence_balance_loss(v, seq_ids), seq_probs)
    cases += bad_id_tensors("sequence_balance_loss", "experts", lambda v: sequence_balance_loss(seq_probs, v), seq_ids, E,
                            dims=False)
    cases += [Case("sequence_balance_loss: no sequences",
                   lambda: sequence_balance_loss(torch.zeros(0, 3, E), torch.zeros(0, 3, K, dtype=torch.long)), error="probs"),
              Case("sequence_balance_loss: empty sequences",
                   lambda: sequence_balance_loss(torch.zeros(2, 0, E), torch.zeros(2, 0, K, dtype=torch.long)), error="probs"),
              Case("sequence_balance_loss: one sequence = the Switch loss",
                   lambda: sequence_balance_loss(PROBS[None], IDS[None]),
                   expect=lambda: torch.tensor(naive_switch_aux(PROBS, IDS)))]
    cases += bad_id_tensors("device_balance_loss", "experts", lambda v: device_balance_loss(PROBS, v, 2), IDS, E, dims=False)
    cases += [Case(f"device_balance_loss: n_devices={v!r}", lambda v=v: device_balance_loss(PROBS, IDS, v), error="n_devices")
              for v in (3, 0, "2", 2.0)]
    cases += [Case(f"communication_balance_loss: max_devices={v!r}",
                   lambda v=v: communication_balance_loss(PROBS, IDS, 2, v), error="max_devices")
              for v in (0, 3, "1", 1.0)]
    cases += [Case("communication_balance_loss: n_devices='2'", lambda: communication_balance_loss(PROBS, IDS, "2", 1),
                   error="n_devices"),
              Case("communication_balance_loss: float ids", lambda: communication_balance_loss(PROBS, IDS.float(), 2, 1),
                   error="experts"),
              Case("communication_balance_loss: id = E", lambda: communication_balance_loss(PROBS, with_value(IDS, E), 2, 1),
                   error="experts")]
    bias = torch.zeros(E)
    cases += bad_positive_numbers("bias_update", "rate", lambda v: bias_update(bias, LOAD, v), zero_ok=True)
    cases += [Case(f"bias_update: {what}", call, error=err) for what, call, err in (
        ("bias a list", lambda: bias_update([0.0] * E, LOAD, 0.1), "bias"),
        ("bias [E, 1]", lambda: bias_update(bias[:, None], LOAD, 0.1), "bias"),
        ("load [E - 1]", lambda: bias_update(bias, LOAD[1:], 0.1), "load"),
        ("load NaN", lambda: bias_update(bias, with_value(LOAD.float(), math.nan), 0.1), "load"),
        ("load complex", lambda: bias_update(bias, LOAD.to(torch.complex64), 0.1), "load"),
        ("bias NaN", lambda: bias_update(with_value(bias, math.nan), LOAD, 0.1), "bias"))]
    cases += [Case("bias_update: integer load", lambda: bias_update(bias, LOAD, 0.5),
                   expect=lambda: torch.tensor([0.0, 0.5, 0.5, -0.5]))]
    return cases


def metric_cases() -> list[Case]:
    cases: list[Case] = []
    cases += bad_id_tensors("tokens_per_expert", "experts", lambda v: tokens_per_expert(v, E), IDS, E)
    cases += [Case(f"tokens_per_expert: num_experts={v!r}", lambda v=v: tokens_per_expert(IDS, v), error="num_experts")
              for v in (0, "4", 4.0, None)]
    cases += [Case(f"tokens_per_expert: {dt} ids", lambda dt=dt: tokens_per_expert(IDS.to(dt), E),
                   expect=lambda: naive_counts(IDS, E)) for dt in (torch.int32, torch.uint8)]
    cases += [Case("tokens_per_expert: empty", lambda: tokens_per_expert(torch.zeros(0, K, dtype=torch.long), E),
                   expect=lambda: torch.zeros(E, dtype=torch.long))]
    for name, fn in (("max_violation", max_violation), ("max_over_mean", max_over_mean)):
        cases += [Case(f"{name}: load {what}", lambda v=v, f=fn: f(v), error="load")
                  for what, v in (("a list", LOAD.tolist()), ("empty", torch.zeros(0)), ("all zero", torch.zeros(E)),
                                  ("negative", torch.tensor([2.0, -1.0, 3.0])), ("NaN", with_value(LOAD.float(), math.nan)),
                                  ("[2, E]", torch.ones(2, E)), ("complex", LOAD.to(torch.complex64)),
                                  ("bool", LOAD.bool()))]
    cases += [Case("max_violation: counts", lambda: max_violation(LOAD), expect=lambda: (8 - 3) / 3),
              Case("max_violation_tensor: [..., 0]", lambda: max_violation_tensor(torch.zeros(3, 0)), error="load"),
              Case("max_violation_tensor: 0-D", lambda: max_violation_tensor(torch.tensor(1.0)), error="load"),
              Case("max_violation_tensor: complex", lambda: max_violation_tensor(LOAD.to(torch.complex64)), error="load"),
              Case("max_violation_tensor: rows", lambda: max_violation_tensor(torch.stack([LOAD, LOAD.flip(0)])),
                   expect=lambda: torch.tensor([5 / 3, 5 / 3]))]
    cases += [Case(f"expert_groups: {what}", call, error=err) for what, call, err in (
        ("num_experts '8'", lambda: expert_groups("8", 2), "num_experts"),
        ("num_experts 0", lambda: expert_groups(0, 1), "num_experts"),
        ("n_groups 3", lambda: expert_groups(8, 3), "n_groups"),
        ("n_groups 0", lambda: expert_groups(8, 0), "n_groups"))]
    cases += bad_id_tensors("devices_per_token", "experts", lambda v: devices_per_token(v, E, 2), IDS, E, dims=False)
    cases += [Case(f"devices_per_token: n_devices={v!r}", lambda v=v: devices_per_token(IDS, E, v), error="n_devices")
              for v in (3, 0, "2")]
    cases += [Case("devices_per_token: int32 ids", lambda: devices_per_token(IDS.int(), E, 2),
                   expect=lambda: torch.tensor([len({e // 2 for e in row}) for row in IDS.tolist()]))]
    cases += bad_float_tensors("routing_entropy", "probs", routing_entropy, PROBS)
    cases += [Case("routing_entropy: no tokens", lambda: routing_entropy(torch.zeros(0, E)), error="probs"),
              Case("routing_entropy: negative probs", lambda: routing_entropy(PROBS - 0.5), error="probs"),
              Case("routing_entropy: uniform", lambda: routing_entropy(torch.full((3, E), 1 / E)), expect=lambda: math.log(E))]
    dropped = IDS == 0
    for name, fn in (("drop_rate", drop_rate), ("unrouted_fraction", unrouted_fraction)):
        cases += [Case(f"{name}: dropped {what}", lambda v=v, f=fn: f(v), error="dropped")
                  for what, v in (("a list", dropped.tolist()), ("float", dropped.float() * 0.5), ("int64", dropped.long()),
                                  ("1-D", dropped.reshape(-1)), ("0-D", torch.tensor(True)))]
    cases += [Case("drop_rate: empty", lambda: drop_rate(torch.zeros(0, K, dtype=torch.bool)), expect=lambda: 0.0),
              Case("drop_rate: value", lambda: drop_rate(dropped), expect=lambda: dropped.sum().item() / dropped.numel()),
              Case("unrouted_fraction: value", lambda: unrouted_fraction(dropped),
                   expect=lambda: sum(all(r) for r in dropped.tolist()) / T)]
    return cases


def calculator_cases() -> list[Case]:
    cases: list[Case] = []
    cases += bad_ints("ffn_params", "d_model", lambda v: ffn_params(v, 8), 4096)
    cases += bad_ints("ffn_params", "d_ff", lambda v: ffn_params(4096, v), 8)
    cases += [Case("ffn_params: activation='relu'", lambda: ffn_params(4096, 8, "relu"), error="activation"),
              Case("ffn_params: numpy sizes", lambda: ffn_params(np.int64(4096), np.int64(8)), expect=lambda: 3 * 4096 * 8)]
    cases += [Case(f"moe_params: {what}", call, error=err) for what, call, err in (
        ("num_experts '8'", lambda: moe_params(64, 32, "8", 2), "num_experts"),
        ("num_experts 0", lambda: moe_params(64, 32, 0, 1), "k"),
        ("k > E", lambda: moe_params(64, 32, 8, 9), "k"),
        ("k '2'", lambda: moe_params(64, 32, 8, "2"), "k"),
        ("d_model -64", lambda: moe_params(-64, 32, 8, 2), "d_model"),
        ("d_ff '32'", lambda: moe_params(64, "32", 8, 2), "d_ff"),
        ("moe_flops_per_token d_model 0", lambda: moe_flops_per_token(0, 32, 8, 2), "d_model"))]
    cases += [Case(f"moe_schedule: {what}", call, error=err) for what, call, err in (
        ("n_layers -1", lambda: moe_schedule(-1), "n_layers"), ("n_layers '4'", lambda: moe_schedule("4"), "n_layers"),
        ("n_layers True", lambda: moe_schedule(True), "n_layers"), ("every 0", lambda: moe_schedule(4, 0), "every"),
        ("first_dense -1", lambda: moe_schedule(4, 1, -1), "first_dense"),
        ("first_dense 1.0", lambda: moe_schedule(4, 1, 1.0), "first_dense"))]
    cases += [Case(f"attention_params: {what}", call, error=err) for what, call, err in (
        ("n_heads 0", lambda: attention_params(512, 0), "n_heads"),
        ("n_heads -8", lambda: attention_params(512, -8), "n_heads"),
        ("n_heads '8'", lambda: attention_params(512, "8"), "n_heads"),
        ("d_model '512'", lambda: attention_params("512", 8), "d_model"),
        ("d_model -512", lambda: attention_params(-512, 8), "d_model"),
        ("n_kv_heads 3 not dividing 8", lambda: attention_params(512, 8, 3), "n_kv_heads"),
        ("n_kv_heads 0", lambda: attention_params(512, 8, 0), "n_kv_heads"),
        ("n_kv_heads 16 > n_heads", lambda: attention_params(512, 8, 16), "n_kv_heads"),
        ("head_dim 0", lambda: attention_params(512, 8, 8, 0), "head_dim"),
        ("head_dim 64.0", lambda: attention_params(512, 8, 8, 64.0), "head_dim"),
        ("n_heads 3 not dividing d_model", lambda: attention_params(100, 3), "n_heads"))]
    cases += [Case("attention_params: MHA is 4 d^2", lambda: attention_params(512, 8), expect=lambda: 4 * 512**2),
              Case("attention_params: explicit head_dim", lambda: attention_params(100, 3, 1, 7),
                   expect=lambda: 2 * 100 * 21 + 2 * 100 * 7)]
    cases += [Case(f"attention_flops_per_token: {what}", call, error=err) for what, call, err in (
        ("n_heads 0", lambda: attention_flops_per_token(0, 64, 64, 10), "n_heads"),
        ("qk_dim -1", lambda: attention_flops_per_token(8, -1, 64, 10), "qk_dim"),
        ("v_dim '64'", lambda: attention_flops_per_token(8, 64, "64", 10), "v_dim"),
        ("context -1", lambda: attention_flops_per_token(8, 64, 64, -1), "context"),
        ("context NaN", lambda: attention_flops_per_token(8, 64, 64, math.nan), "context"),
        ("context '10'", lambda: attention_flops_per_token(8, 64, 64, "10"), "context"))]
    cases += [Case("attention_flops_per_token: mean causal context", lambda: attention_flops_per_token(2, 4, 4, 2.5),
                   expect=lambda: 2 * 2 * 8 * 2.5)]
    cases += [Case(f"expected_experts_touched: {what}", call, error=err) for what, call, err in (
        ("tokens -1", lambda: expected_experts_touched(8, 2, -1), "tokens"),
        ("tokens 2.5", lambda: expected_experts_touched(8, 2, 2.5), "tokens"),
        ("tokens '4'", lambda: expected_experts_touched(8, 2, "4"), "tokens"),
        ("k 0", lambda: expected_experts_touched(8, 0, 4), "k"),
        ("num_experts '8'", lambda: expected_experts_touched("8", 2, 4), "num_experts"))]
    base = dict(n_layers=2, d_model=64, n_heads=4, vocab_size=100, d_ff=128)
    moe = dict(base, d_ff=0, num_experts=4, k=2, d_expert=32)
    arch_cases = (
        ("MoE, first_dense=1, no d_ff", dict(moe, first_dense=1), "d_ff"),
        ("MoE, moe_every=2, no d_ff", dict(moe, moe_every=2), "d_ff"),
        ("n_layers -1", dict(base, n_layers=-1), "n_layers"), ("n_layers 0", dict(base, n_layers=0), "n_layers"),
        ("d_model -64", dict(base, d_model=-64), "d_model"), ("d_model '64'", dict(base, d_model="64"), "d_model"),
        ("d_model 64.0", dict(base, d_model=64.0), "d_model"), ("n_heads 0", dict(base, n_heads=0), "n_heads"),
        ("vocab_size -1", dict(base, vocab_size=-1), "vocab_size"), ("d_ff -128", dict(base, d_ff=-128), "d_ff"),
        ("n_kv_heads 3", dict(base, n_kv_heads=3), "n_kv_heads"), ("n_kv_heads 0", dict(base, n_kv_heads=0), "n_kv_heads"),
        ("n_kv_heads 8 > n_heads", dict(base, n_kv_heads=8), "n_kv_heads"), ("head_dim 0", dict(base, head_dim=0), "head_dim"),
        ("n_heads 3 not dividing d_model", dict(base, n_heads=3), "n_heads"),
        ("num_experts -1", dict(moe, num_experts=-1), "num_experts"), ("k > E", dict(moe, k=5), "k"),
        ("k '2'", dict(moe, k="2"), "k"), ("d_expert -32", dict(moe, d_expert=-32), "d_expert"),
        ("d_expert 0", dict(moe, d_expert=0), "d_expert"), ("n_shared -1", dict(moe, n_shared=-1), "n_shared"),
        ("d_shared 0", dict(moe, d_shared=0), "d_shared"), ("moe_every 0", dict(moe, moe_every=0), "moe_every"),
        ("first_dense -1", dict(moe, first_dense=-1), "first_dense"),
        ("tie_embeddings 'no'", dict(base, tie_embeddings="no"), "tie_embeddings"), ("norms 1", dict(base, norms=1), "norms"),
        ("attention 'mha'", dict(base, attention="mha"), "attention"),
        ("mla without ranks", dict(base, attention="mla"), "mla"),
        ("gqa with kv_lora_rank", dict(base, kv_lora_rank=512), "kv_lora_rank"),
        ("mla with q_lora_rank -1", dict(base, attention="mla", kv_lora_rank=16, qk_rope_dim=8, v_head_dim=16,
                                         q_lora_rank=-1), "q_lora_rank"),
        ("k without experts", dict(base, k=2), "k"), ("n_shared without experts", dict(base, n_shared=1), "n_shared"),
        ("activation 'relu'", dict(base, activation="relu"), "activation"))
    cases += [Case(f"Arch: {what}", lambda kw=kw: Arch(**kw), error=err) for what, kw, err in arch_cases]
    arch = Arch(**base)
    cases += [Case(f"count_params: {what}", lambda v=v: count_params(v), error="arch")
              for what, v in (("a dict", base), ("a preset name", "mixtral_8x7b"), ("None", None))]
    cases += [Case(f"flops_per_token: {what}", call, error=err) for what, call, err in (
        ("context -1", lambda: flops_per_token(arch, -1), "context"),
        ("context NaN", lambda: flops_per_token(arch, math.nan), "context"),
        ("context '10'", lambda: flops_per_token(arch, "10"), "context"),
        ("training 'yes'", lambda: flops_per_token(arch, 10, training="yes"), "training"),
        ("arch a dict", lambda: flops_per_token(base, 10), "arch"))]
    cases += [Case(f"training_memory: num_params={v!r}", lambda v=v: training_memory(v), error="num_params")
              for v in (-1, "1e9", math.nan, None, True)]
    cases += [Case("training_memory: dtype='fp64'", lambda: training_memory(10, "fp64"), error="dtype"),
              Case("training_memory: dtype=['bf16']", lambda: training_memory(10, ["bf16"]), error="dtype"),
              Case("training_memory: published float count", lambda: training_memory(46.7e9)["total"],
                   expect=lambda: 46.7e9 * 16)]
    cases += [Case(f"kv_cache_bytes: {what}", call, error=err) for what, call, err in (
        ("context -1", lambda: kv_cache_bytes(arch, -1), "context"),
        ("context '10'", lambda: kv_cache_bytes(arch, "10"), "context"),
        ("context 2.5", lambda: kv_cache_bytes(arch, 2.5), "context"),
        ("batch -1", lambda: kv_cache_bytes(arch, 10, -1), "batch"),
        ("batch None", lambda: kv_cache_bytes(arch, 10, None), "batch"),
        ("dtype 'int8'", lambda: kv_cache_bytes(arch, 10, 1, "int8"), "dtype"),
        ("arch a preset name", lambda: kv_cache_bytes("mixtral_8x7b", 10), "arch"),
        ("inference_memory context -1", lambda: inference_memory(arch, -1), "context"),
        ("inference_memory arch None", lambda: inference_memory(None, 10), "arch"))]
    cases += [Case("Arch: MoE in every layer without d_ff", lambda: count_params(Arch(**moe)).components["dense_ffn"],
                   expect=lambda: (0, 0)),
              Case("Arch: dense model without an FFN (attention only)", lambda: count_params(Arch(**dict(base, d_ff=0))).total,
                   expect=lambda: 100 * 64 * 2 + 2 * 4 * 64**2 + 2 * (2 * 64) + 64),
              Case("count_params: a preset", lambda: count_params(PRESETS["mixtral_8x7b"]).total,
                   expect=lambda: count_params(PRESETS["mixtral_8x7b"]).total)]
    return cases


def layer_cases() -> list[Case]:
    cases: list[Case] = []
    cases += bad_ints("MoELayer", "d_model", lambda v: MoELayer(v, 16, E), D)
    cases += bad_ints("MoELayer", "d_ff", lambda v: MoELayer(D, v, E), 16)
    cases += bad_ints("MoELayer", "num_experts", lambda v: MoELayer(D, 16, v), E)
    cases += [Case(f"MoELayer: k={v!r}", lambda v=v: MoELayer(D, 16, E, v), error="k") for v in (0, E + 1, 2.5, "2", None)]
    options = (("activation", "relu"), ("score_func", "tanh"), ("router", "linear"), ("router_dtype", "float64"),
               ("router_dtype", torch.int32), ("capacity_factor", 0), ("capacity_factor", -1.0),
               ("capacity_factor", math.nan), ("capacity_factor", "1.0"), ("capacity_factor", True),
               ("eval_capacity_factor", "x"), ("eval_capacity_factor", 0), ("drop_policy", "random"),
               ("dispatch", "fast"), ("jitter_eps", 1.0), ("jitter_eps", -0.1), ("expert_dropout", 1.0),
               ("n_groups", 3), ("topk_groups", 2), ("group_score", "sum"), ("n_shared", -1), ("d_shared", 0),
               ("renormalize", "yes"), ("selection_bias", "yes"), ("bias_update_rate", 1e-3),
               ("routed_scaling_factor", 0), ("softmax_order", "middle"))
    cases += [Case(f"MoELayer: {name}={v!r}", lambda name=name, v=v: MoELayer(D, 16, E, K, **{name: v}), error=name)
              for name, v in options]
    layer = MoELayer(D, 16, E, K)
    cases += [Case("MoELayer: unknown option", lambda: MoELayer(D, 16, E, K, capacity=2.0), error="capacity"),
              Case("MoELayer.configure: unknown option", lambda: layer.configure(top_k=1), error="top_k"),
              Case("MoELayer.configure: k=0", lambda: layer.configure(k=0), error="k"),
              Case("MoELayer.configure: d_model", lambda: layer.configure(d_model=4), error="d_model"),
              Case("MoELayer.from_config: a dict", lambda: MoELayer.from_config({"d_model": D}), error="config"),
              Case("MoEConfig: d_model '8'", lambda: MoEConfig(d_model="8", d_ff=16, num_experts=E), error="d_model")]
    cases += [Case(f"MoELayer.forward: x {what}", lambda v=v: layer(v), error="x")
              for what, v in (("a list", X.tolist()), ("a numpy array", X.numpy()), ("0-D", torch.tensor(1.0)),
                              ("[T, d - 1]", X[:, 1:]), ("int64", X.long()), ("bool", X.bool()),
                              ("complex64", X.to(torch.complex64)), ("empty [0, d]", torch.zeros(0, D)),
                              ("empty [2, 0, d]", torch.zeros(2, 0, D)), ("holding NaN", with_value(X, math.nan)),
                              ("holding inf", with_value(X, math.inf)), ("times 1e30", X * 1e30),
                              ("on the meta device", X.to("meta")))]
    cases += [Case("MoELayer.forward: [B, L, d] = [T, d]", lambda: layer(X.view(2, 3, D))[0],
                   expect=lambda: layer(X)[0].view(2, 3, D)),
              Case("MoELayer.forward: float64 x", lambda: layer(X.double())[0], expect=lambda: layer(X)[0].double()),
              Case("MoELayer.forward: non-contiguous x", lambda: layer(X.T.contiguous().T)[0], expect=lambda: layer(X)[0]),
              Case("MoELayer.forward: x times 1e10", lambda: bool(torch.isfinite(layer(X * 1e10)[0]).all()),
                   expect=lambda: True)]
    return cases


def model_cases() -> list[Case]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, num_experts=4, k=2)
    model = MoETransformer(cfg)
    idx = torch.randint(0, 16, (2, 5), generator=_gen(3))
    cases = [Case(f"MoETransformer.forward: idx {what}", lambda v=v: model(v), error="idx")
             for what, v in (("a list", idx.tolist()), ("id = vocab_size", with_value(idx, 16)), ("id -1", with_value(idx, -1)),
                             ("float", idx.float()), ("bool", idx.bool()), ("empty [1, 0]", idx[:1, :0]),
                             ("empty [0, 5]", idx[:0]), ("1-D", idx[0]), ("3-D", idx[None]), ("int16", idx.short()))]
    cases += [Case(f"MoETransformer.loss: targets {what}", lambda v=v: model.loss(idx, v), error="targets")
              for what, v in (("id = vocab_size", with_value(idx, 16)), ("id -2", with_value(idx, -2)),
                              ("float", idx.float()), ("[2, 4]", idx[:, :4]), ("int32", idx.int()), ("a list", idx.tolist()))]
    ignored = with_value(idx, -100)
    cases += [Case("MoETransformer.forward: int32 idx", lambda: model(idx.int())[0], expect=lambda: model(idx)[0]),
              Case("MoETransformer.loss: -100 targets are ignored", lambda: model.loss(idx, ignored).ce,
                   expect=lambda: torch.nn.functional.cross_entropy(model(idx)[0].reshape(-1, 16), ignored.reshape(-1)))]
    return cases


FIRST_ROUND = {"routing": routing_cases, "capacity (dispatch)": capacity_cases, "losses": loss_cases,
               "metrics": metric_cases, "calculator": calculator_cases, "layer": layer_cases, "model": model_cases}
"""Sections of the first round (issue 16): ``{module: builder of its cases}``."""


def sections() -> dict[str, Callable[[], list[Case]]]:
    """Every section of the catalogue: the first round, then the newer modules (``tests/bad_input_newer.py``)."""
    from tests.bad_input_newer import NEWER  # here: that module builds on this one's helpers

    return {**FIRST_ROUND, **NEWER}


def all_cases() -> list[Case]:
    return [case for build in sections().values() for case in build()]


def counts() -> dict[str, tuple[int, int]]:
    """``{section: (cases that must raise, cases that must return a result)}``."""
    out = {}
    for name, build in sections().items():
        cases = build()
        errors = sum(c.error is not None for c in cases)
        out[name] = (errors, len(cases) - errors)
    return out


def counts_table() -> str:
    """The catalogue's counts by module as the README's Markdown table."""
    rows = ["| module | must raise, naming the argument | must equal a reference | cases |", "|---|---:|---:|---:|"]
    rows += [f"| {name} | {e} | {r} | {e + r} |" for name, (e, r) in counts().items()]
    e, r = (sum(column) for column in zip(*counts().values()))
    return "\n".join(rows + [f"| all | {e} | {r} | {e + r} |"])
