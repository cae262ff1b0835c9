"""Feedback that teaches, for the exercises of notebooks 01-07: a wrong answer that makes a known mistake is named
("this looks like ..."), every registered mistake is reachable on the visible cases, each mistake differs from the
correct answer in one piece only, and hints come in tiers that start with the idea."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from moe_lab.checks import REGISTRY, run_check
from moe_lab.checks import nb02, nb03, nb04, nb05, nb06, nb07
from moe_lab.checks.core import compare, exercise_cases, reference_answer

COURSE = sorted(i for i in REGISTRY if "01" <= i[:2] <= "07")


def _mistake(ex_id: str, starts: str) -> str:
    (description,) = [d for d in REGISTRY[ex_id].mistakes if d.startswith(starts)]
    return description


def _named(ex_id: str, fn, starts: str, hidden: bool = False) -> None:
    result = run_check(ex_id, fn, hidden=hidden)
    assert result.status == "failed", str(result)
    assert f"\nthis looks like {_mistake(ex_id, starts)}\nHint: " in result.message, result.message


# ------------------------------------------------------------------ wrong answers a student writes, named


def test_05_2_token_order_filling():
    def position_priority(experts, num_experts, capacity):
        used, keep = [0] * num_experts, torch.zeros(experts.shape, dtype=torch.bool)
        for t in range(experts.shape[0]):  # token by token: a second choice before later first choices
            for j in range(experts.shape[1]):
                e = int(experts[t, j])
                if used[e] < capacity:
                    used[e] += 1
                    keep[t, j] = True
        return keep, float((~keep).float().mean()) if keep.numel() else 0.0

    _named("05.2", position_priority, "filling the queues token by token")


def test_07_3_renormalised_top1():
    def switch_ffn(x, router_weight, w1, w2, capacity_factor):
        probs = (x @ router_weight.T).softmax(-1)
        top, expert = probs.max(-1)
        gate = top / top  # renormalised over the single selected expert
        capacity = math.ceil(round(x.shape[0] * capacity_factor / w1.shape[0], 9))
        rank = (F.one_hot(expert, w1.shape[0]).cumsum(0) * F.one_hot(expert, w1.shape[0])).sum(-1) - 1
        y = torch.zeros_like(x)
        for e in range(w1.shape[0]):
            idx = torch.where((expert == e) & (rank < capacity))[0]
            y = y.index_add(0, idx, gate[idx, None] * (F.gelu(x[idx] @ w1[e]) @ w2[e]))
        return y

    _named("07.3", switch_ffn, "renormalising the top-1 gate")


def test_04_3_f_over_tokens():
    def switch_aux_loss(probs, experts):
        n = probs.shape[1]
        return n * (torch.bincount(experts.flatten(), minlength=n) / experts.shape[0] * probs.mean(0)).sum()

    _named("04.3", switch_aux_loss, "f_i over T instead of T * k")


def test_04_1_unbiased_variance():
    def importance_loss_from_gates(gates, experts, num_experts):
        importance = torch.zeros(gates.shape[0], num_experts).scatter(1, experts, gates).sum(0)
        return importance.var() / (importance.mean() ** 2 + 1e-10)  # torch's default: the sample variance

    _named("04.1", importance_loss_from_gates, "the unbiased (sample) variance")


def test_03_1_softmax_then_topk():
    def noisy_topk_gating(clean, raw_noise, standard_normal, k, training):
        h = clean + standard_normal * F.softplus(raw_noise) if training else clean
        top, idx = h.softmax(-1).topk(k, dim=-1)  # the outline's order, without renormalising
        return torch.zeros_like(h).scatter(-1, idx, top)

    _named("03.1", noisy_topk_gating, "a softmax over all experts, then top-k")


def test_01_1_swiglu_with_two_matrices():
    _named("01.1", lambda d_model, d_ff, activation: 2 * d_model * d_ff, "counting two matrices for SwiGLU")


def test_01_4_dense_compute_then_mask():
    def sparse_moe_forward(x, gates, w_in, w_out):
        outs = torch.stack([F.gelu(x @ w_in[e]) @ w_out[e] for e in range(w_in.shape[0])], dim=1)  # [T, E, d]
        flops = 4 * x.shape[0] * w_in.shape[0] * w_in.shape[1] * w_in.shape[2]
        return (gates.unsqueeze(-1) * outs).sum(1), flops

    _named("01.4", sparse_moe_forward, "running every expert on every token")


def test_02_2_choosing_by_underflowed_probabilities():
    def topk_gating(logits, k, renormalize):
        gates, experts = logits.float().softmax(-1).topk(k, dim=-1)
        return (gates / gates.sum(-1, keepdim=True) if renormalize else gates), experts

    _named("02.2", topk_gating, "choosing the experts by their probabilities")


def test_02_5_gates_not_renormalised():
    def moe_forward(x, router_weight, w1, w3, w2, k):
        gates, experts = (x @ router_weight.T).softmax(-1).topk(k, dim=-1)
        y = torch.zeros_like(x)
        for e in range(w1.shape[0]):
            t, j = torch.where(experts == e)
            y = y.index_add(0, t, gates[t, j, None] * ((F.silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e]))
        return y

    _named("02.5", moe_forward, "not renormalising the top-k gates")


def test_04_2_threshold_not_excluding_the_expert():
    def smooth_load(clean, noisy, noise_std, k):
        kth = noisy.topk(k, dim=-1).values[:, -1:]  # the k-th largest of all, the expert itself included
        return 0.5 * (1 + torch.erf((clean - kth) / noise_std / math.sqrt(2)))

    _named("04.2", smooth_load, "thresholding every expert at the k-th largest")


def test_04_4_gradient_without_the_softmax_jacobian():
    def switch_aux_loss_grad(logits, experts):
        t, n = logits.shape
        f = torch.bincount(experts.flatten(), minlength=n).float() / experts.numel()
        return (n * f / t).expand(t, n).clone()

    _named("04.4", switch_aux_loss_grad, "the gradient w.r.t. the probabilities")


def test_04_6_naive_logsumexp():
    _named("04.6", lambda logits: torch.log(logits.float().exp().sum(-1)).square().mean(),
           "logsumexp written as log(sum(exp(z)))")


def test_05_1_float_noise():
    _named("05.1", lambda num_tokens, num_experts, capacity_factor, k=1: math.ceil(
        num_tokens * k * capacity_factor / num_experts), "float noise")


def test_05_3_dropped_slots_added():
    _named("05.3", lambda expert_out, gates, keep: (expert_out * gates[..., None]).sum(1), "ignoring keep")


def test_05_4_token_major_places():
    def gshard_moe(x, experts, gates, w1, w2, capacity):
        num_tokens, k = experts.shape
        chosen = F.one_hot(experts, w1.shape[0]).float().reshape(num_tokens * k, -1)  # token-major queue
        place = ((chosen.cumsum(0) - 1) * chosen).sum(-1).reshape(num_tokens, k).long()
        kept = chosen.reshape(num_tokens, k, -1) * (place < capacity).unsqueeze(-1)
        at = F.one_hot(place.clamp(max=capacity), capacity + 1)[..., :capacity].float()
        dispatch = torch.einsum("tke,tkc->tec", kept, at) > 0
        combine = torch.einsum("tke,tkc,tk->tec", kept, at, gates)
        out = torch.bmm(F.gelu(torch.bmm(torch.einsum("tec,td->ecd", dispatch.float(), x), w1)), w2)
        return torch.einsum("tec,ecd->td", combine, out), combine, dispatch

    _named("05.4", gshard_moe, "token-major buffer places")


def test_06_2_every_layer_moe():
    def deepseek_style_params(n_layers, first_dense, d, vocab, d_ff, n_routed, n_shared, k, d_expert, h, q_rank,
                              kv_rank, nope, rope, v):
        q = d * q_rank + q_rank * h * (nope + rope) if q_rank else d * h * (nope + rope)
        attention = q + d * (kv_rank + rope) + kv_rank * h * (nope + v) + h * v * d
        per_layer = attention + 2 * d + q_rank + kv_rank + d * n_routed + n_shared * 3 * d * d_expert
        common = n_layers * per_layer + 2 * vocab * d + d  # forgets the dense first layers
        return common + n_layers * n_routed * 3 * d * d_expert, common + n_layers * k * 3 * d * d_expert

    _named("06.2", deepseek_style_params, "every layer an MoE layer")


def test_07_2_renormalised_gate():
    _named("07.2", lambda logits: (torch.ones(logits.shape[0]) + 0 * logits.sum(-1), logits.argmax(-1)),
           "a renormalised top-1 gate")


def test_04_5_forgotten_zero_grad():
    from moe_lab.balancing import BalanceConfig, BalanceExperiment, one_thread

    def balancing_experiment(alpha, seed, steps=100):
        experiment = BalanceExperiment(BalanceConfig(seed=seed))
        with one_thread():
            for _ in range(steps):
                x, y = experiment.batch()
                out, info = experiment.layer(x)
                ((out - y).square().mean() + alpha * info.aux_loss).backward()  # no zero_grad: gradients pile up
                experiment.optimizer.step()
        return experiment.evaluate()["max_over_mean"]

    _named("04.5", balancing_experiment, "forgetting optimizer.zero_grad()")


# ------------------------------------------------------------------ every registered mistake


MISTAKES = [(ex_id, d) for ex_id in COURSE for d in REGISTRY[ex_id].mistakes]


@pytest.mark.parametrize("ex_id, description", MISTAKES, ids=[f"{i}: {d[:40]}" for i, d in MISTAKES])
def test_every_mistake_is_named_on_the_visible_cases(ex_id, description, monkeypatch):
    """Submitting a known mistake itself (allowed to run the checker's code) fails with its own name: it is wrong
    on some visible case, and no earlier mistake gives the same answer there."""
    ex = REGISTRY[ex_id]
    monkeypatch.setattr(ex, "allow", ex.allow + ("moe_lab.checks",))
    result = run_check(ex_id, ex.mistakes[description])
    assert result.status == "failed" and f"this looks like {description}\nHint" in result.message, result.message


def _agrees_with_reference(ex_id, fn, hidden=True):
    ex = REGISTRY[ex_id]
    for case, _ in exercise_cases(ex, 0, hidden):
        expected = reference_answer(ex.reference, case)
        got = reference_answer(fn, case, expected.weights)
        assert compare(expected.expected, got.expected, ex.rtol, ex.atol) is None, (ex_id, case.name)
        for i, e, g in zip(case.grad_wrt, expected.grads, got.grads):
            zeros = torch.zeros_like(case.args[i])
            e, g = zeros if e is None else e, zeros if g is None else g
            assert torch.allclose(e, g, rtol=10 * ex.rtol, atol=10 * ex.atol), (ex_id, case.name, i)


@pytest.mark.parametrize("ex_id, correct", [
    ("02.5", nb02._variant()), ("03.1", nb03._noisy_variant()), ("03.2", nb03._manual_backward()),
    ("04.1", nb04._importance_variant()), ("04.2", nb04._smooth_variant()), ("04.3", nb04._aux_variant()),
    ("04.4", nb04._aux_grad_variant()), ("05.2", nb05._priority_variant()), ("06.1", nb06._mixtral_variant()),
    ("06.2", nb06.deepseek_formula), ("06.4", nb06._memory_variant()), ("07.3", nb07._switch_variant()),
], ids=lambda v: v if isinstance(v, str) else "")
def test_mistake_factories_are_correct_without_their_mistake(ex_id, correct):
    """Each family of mistakes is one correct implementation, independent of the reference, with one piece
    switched off: without the switch it equals the reference on every case, hidden ones included (so each mistake
    is wrong in exactly the way it says)."""
    _agrees_with_reference(ex_id, correct)


def test_experiment_mistakes_are_correct_without_their_mistake():
    _agrees_with_reference("04.5", nb04._experiment_variant(), hidden=False)


def test_the_deepseek_reference_lands_on_the_published_sizes():
    for args, (total, active) in ((nb06.V3, (671e9, 37e9)), (nb06.V2, (236e9, 21e9))):
        got_total, got_active = nb06.deepseek_style_params(*args)
        assert abs(got_total / total - 1) < 0.02 and abs(got_active / active - 1) < 0.02


# ------------------------------------------------------------------ hints


MECHANICAL = {"01.1", "01.2", "01.3", "02.1", "02.2", "02.3", "03.3", "04.3", "04.6", "05.1", "05.3", "06.3", "06.4",
              "06.5", "07.1", "07.2"}  # formula translations: their last hint may show the code
CODE = re.compile(r"torch\.|\.\w+\(|\breturn\b|==|\bdim=")  # none of this in a first hint
CODE_LINE = re.compile(r"\breturn \w+ ?[-+*/(]|= torch\.|torch\.\w+\(")  # nor in any hint of the others


@pytest.mark.parametrize("ex_id", COURSE)
def test_hints_come_in_tiers_that_start_with_the_idea(ex_id):
    ex = REGISTRY[ex_id]
    assert len(ex.tiers) >= 2 and len(set(ex.tiers)) == len(ex.tiers), ex_id
    assert not CODE.search(ex.hint), (ex_id, ex.hint)
    if ex_id not in MECHANICAL:
        for tier in ex.tiers:
            assert not CODE_LINE.search(tier), (ex_id, tier)


def test_every_exercise_names_some_known_mistakes():
    for ex_id in COURSE:
        assert REGISTRY[ex_id].mistakes, ex_id
