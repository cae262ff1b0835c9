"""moe_lab.specialisation (token classes, class x expert statistics, router saturation, routing snapshots) and
the references of notebook 13's exercises, against slow obvious implementations."""
import keyword
import math
import string
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from moe_lab.checks.core import run_check
from moe_lab.checks.nb13 import _slow_block, budget_matched_comparison, train_moe_block
from moe_lab.data import stdlib_corpus
from moe_lab.model import MoETransformer, toy_config
from moe_lab.specialisation import (TOKEN_CLASSES, RoutingSnapshots, class_expert_counts, class_expert_stats,
                                    router_saturation, routing_decisions, token_classes)
from moe_lab.train import train


def slow_classes(text: bytes) -> list[str]:
    """Byte by byte: the class of the byte, then whole identifier runs that are keywords."""
    out = []
    for b in text:
        ch = chr(b)
        out.append("other" if b > 127 else "letter" if ch in string.ascii_letters else "digit"
                   if ch in string.digits else "whitespace" if ch in string.whitespace else "punctuation"
                   if ch in string.punctuation else "other")
    i = 0
    while i < len(text):
        if chr(text[i]).isascii() and (chr(text[i]).isalnum() or text[i] == ord("_")):
            j = i
            while j < len(text) and text[j] < 128 and (chr(text[j]).isalnum() or text[j] == ord("_")):
                j += 1
            if text[i:j].decode() in keyword.kwlist:
                out[i:j] = ["keyword"] * (j - i)
            i = j
        else:
            i += 1
    return out


@pytest.mark.parametrize("text", [b"def f(x1, _if):\n    return None", b"classify elif_ if2 elif", b"not",
                                  "caf\u00e9 = 1\r\n".encode(), b"", b"match case type _ True"])
def test_token_classes_match_a_byte_by_byte_reference(text):
    got = token_classes(torch.tensor(list(text), dtype=torch.int64))
    assert [TOKEN_CLASSES[i] for i in got.tolist()] == slow_classes(text)


def test_token_classes_on_real_source():
    text = stdlib_corpus(20_000)
    assert [TOKEN_CLASSES[i] for i in token_classes(text).tolist()] == slow_classes(bytes(text.tolist()))


def test_token_classes_rejects_bad_input():
    with pytest.raises(ValueError, match="tokens"):
        token_classes(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="tokens"):
        token_classes(torch.tensor([300]))


def slow_stats(classes, experts, n_classes, num_experts):
    pairs = Counter((c, e) for c, row in zip(classes.tolist(), experts.tolist()) for e in row)
    total = sum(pairs.values())
    pc, pe = Counter(), Counter()
    for (c, e), n in pairs.items():
        pc[c] += n
        pe[e] += n
    given = [[pairs[c, e] / pc[c] if pc[c] else 0.0 for e in range(num_experts)] for c in range(n_classes)]
    mi = sum(n / total * math.log((n / total) / (pc[c] / total * pe[e] / total)) for (c, e), n in pairs.items())
    return torch.tensor(given), mi


@pytest.mark.parametrize("n, c, e, k", [(100, 4, 8, 2), (7, 6, 4, 1), (50, 3, 3, 3)])
def test_class_expert_stats_match_counting(n, c, e, k):
    g = torch.Generator().manual_seed(n)
    classes = torch.randint(c, (n,), generator=g)
    experts = torch.rand(n, e, generator=g).topk(k, dim=-1).indices
    given, mi = class_expert_stats(classes, experts, c, e)
    ref_given, ref_mi = slow_stats(classes, experts, c, e)
    torch.testing.assert_close(given, ref_given)
    assert mi == pytest.approx(ref_mi, abs=1e-9)
    assert int(class_expert_counts(classes, experts, c, e).sum()) == n * k


def test_mutual_information_bounds():
    classes = torch.arange(40) % 4
    assert class_expert_stats(classes, classes[:, None], 4, 4)[1] == pytest.approx(math.log(4))
    assert class_expert_stats(classes, torch.zeros(40, 1, dtype=torch.long), 4, 4)[1] == pytest.approx(0.0)


def test_router_saturation_is_the_mean_set_overlap():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(30, 8, generator=g).topk(3, dim=-1).indices for _ in range(2))
    expected = sum(len(set(x) & set(y)) / 3 for x, y in zip(a.tolist(), b.tolist())) / 30
    assert router_saturation(a, b) == pytest.approx(expected)
    assert router_saturation(a, a.flip(-1)) == 1.0
    with pytest.raises(ValueError, match="experts and final"):
        router_saturation(a, b[:, :2])


def test_routing_snapshots_record_the_probe_routing():
    model = MoETransformer(toy_config("mixtral", n_layers=2, d_model=32, d_expert=32))
    data = stdlib_corpus(20_000)
    probe = data[:64].view(2, 32)
    hook = RoutingSnapshots(probe, every=3)
    train(model, data, steps=7, batch_size=2, seq_len=32, hooks=[hook], progress=False)
    assert hook.steps == [3, 6, 7]
    final = routing_decisions(model, probe)
    assert final.shape == (2, 64, 2) and torch.equal(hook.experts[-1], final)
    _, infos = model.eval()(probe)
    assert torch.equal(final[1], infos[1].experts)
    sat = hook.saturation()
    assert sat.shape == (3, 2) and torch.all(sat[-1] == 1.0)
    with pytest.raises(ValueError, match="MoE layer"):
        routing_decisions(MoETransformer(toy_config("dense", n_layers=1, d_model=32)), probe)


def test_budget_matched_comparison_by_hand():
    moe, dense = torch.tensor([1.50, 1.60, 1.70]), torch.tensor([1.55, 1.62, 1.69])  # differences -0.05 -0.02 +0.01
    steps_moe, steps_dense, mean, sd, agree = budget_matched_comparison(30, 1, 30, moe, dense)
    assert (steps_moe, steps_dense, agree) == (30, 1, 2)  # the case the old reference read as step 0 and wrapped
    assert mean == pytest.approx(-0.02, abs=1e-6) and sd == pytest.approx(0.03, abs=1e-6)
    assert budget_matched_comparison(95, 10, 7, moe[:1], dense[:1])[:4] == (9, 13, pytest.approx(-0.05), 0.0)
    with pytest.raises(ValueError, match="moe_flops_per_step"):
        budget_matched_comparison(30, 50, 1, moe, dense)
    with pytest.raises(ValueError, match="moe_final"):
        budget_matched_comparison(30, 1, 1, moe, dense[:2])


def _statistics_answer(budget, moe_flops_per_step, dense_flops_per_step, moe_final, dense_final):
    import math
    import statistics
    diffs = [a - b for a, b in zip(moe_final.tolist(), dense_final.tolist())]
    mean = statistics.fmean(diffs)
    return (math.floor(budget / moe_flops_per_step), math.floor(budget / dense_flops_per_step), mean,
            statistics.stdev(diffs) if len(diffs) > 1 else 0.0, sum((d < 0) == (mean < 0) for d in diffs))


def _tensor_answer(budget, moe_flops_per_step, dense_flops_per_step, moe_final, dense_final):
    d = moe_final - dense_final
    sd = d.std() if len(d) > 1 else torch.tensor(0.0)
    return budget // moe_flops_per_step, budget // dense_flops_per_step, d.mean(), sd, (d.sign() == d.mean().sign()).sum()


@pytest.mark.parametrize("answer", [_statistics_answer, _tensor_answer])
def test_13_4_accepts_natural_answers_written_differently(answer):
    assert run_check("13.4", answer, hidden=True).status == "passed"


class _IndexAddBlock(torch.nn.Module):
    """The solution's way: a loop over experts with index_add."""

    def __init__(self, router_weight, w1, w2, k):
        super().__init__()
        self.router_weight = torch.nn.Parameter(router_weight.detach().clone())
        self.w1, self.w2, self.k = torch.nn.Parameter(w1.clone()), torch.nn.Parameter(w2.clone()), k

    def forward(self, x):
        num_experts = self.w1.shape[0]
        probs = torch.softmax(x @ self.router_weight.T, dim=-1)
        gates, experts = probs.topk(self.k, dim=-1)
        gates = gates / gates.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(num_experts):
            token, slot = (experts == e).nonzero(as_tuple=True)
            y = y.index_add(0, token, gates[token, slot, None] * (F.gelu(x[token] @ self.w1[e]) @ self.w2[e]))
        f = torch.bincount(experts.flatten(), minlength=num_experts).float() / experts.numel()
        return y, num_experts * (f * probs.mean(0)).sum()


class _GatherBlock(torch.nn.Module):
    """Written differently: parameters under other names and in another order, every expert on every token then a
    gather, the gates as a softmax over the top-k logits (equal to renormalised probabilities), f from one_hot."""

    def __init__(self, router_weight, w1, w2, k):
        super().__init__()
        self.register_parameter("up", torch.nn.Parameter(w1.clone()))
        self.register_parameter("down", torch.nn.Parameter(w2.clone()))
        self.register_parameter("gate", torch.nn.Parameter(router_weight.clone()))
        self.k = k

    def forward(self, x):
        logits = x @ self.gate.T
        top, idx = logits.topk(self.k, dim=-1)
        outs = torch.einsum("tef,efd->ted", F.gelu(torch.einsum("td,edf->tef", x, self.up)), self.down)
        y = (top.softmax(-1)[..., None] * outs.gather(1, idx[..., None].expand(-1, -1, x.shape[1]))).sum(1)
        f = F.one_hot(idx, logits.shape[-1]).float().sum((0, 1)) / idx.numel()
        return y, logits.shape[-1] * (f * logits.softmax(-1).mean(0)).sum()


class _UnregisteredRouter(_IndexAddBlock):
    """Wrong: the router weight kept as a plain tensor, so the optimiser never sees it."""

    def __init__(self, router_weight, w1, w2, k):
        super().__init__(router_weight, w1, w2, k)
        del self.router_weight
        self.router_weight = router_weight.clone()


@pytest.mark.parametrize("block", [_IndexAddBlock, _GatherBlock])
def test_13_5_builds_and_trains_the_students_block_and_accepts_natural_answers(block):
    assert run_check("13.5", block, hidden=True).status == "passed"


def test_13_5_rejects_a_block_whose_weights_are_not_parameters():
    result = run_check("13.5", _UnregisteredRouter)
    assert result.status == "failed" and "must register its weights as parameters" in result.message
    assert "got 2 of shapes" in result.message


def test_moe_block_reference_matches_a_slow_block():
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(24, 6, generator=g), torch.randn(24, 6, generator=g)
    args = (x, target, torch.randn(4, 6, generator=g), torch.randn(4, 6, 8, generator=g) / 6**0.5,
            torch.randn(4, 8, 6, generator=g) / 8**0.5, 2, 0.1, 0.2, 4)
    for got, expected in zip(train_moe_block(*args), _slow_block(*args)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    losses = train_moe_block(*args)[0]
    assert losses[-1] < losses[0]  # it trains


def test_the_learning_rate_sweep_claim_is_rendered_from_the_stored_runs_and_shown():
    import statistics

    from moe_lab.experiments import load_result, reference_run
    from moe_lab.experiments.reference import CAPSTONE_LRS, SWEEP_SEEDS, capstone_sweep
    from moe_lab.experiments.stats import t_quantile
    from tests.test_evidence import notebook_outputs

    results = {reference_run("capstone").setup.lr: load_result("capstone"),
               **{lr: load_result(f"capstone_lr_{lr:g}") for lr in CAPSTONE_LRS}}
    table, best, tuned = capstone_sweep(results)

    def val(lr, arm):  # recomputed here from the stored runs
        return [r["val_ce"] for r in results[lr]["runs"][arm] if r["seed"] in SWEEP_SEEDS]

    for arm in ("moe", "dense, equal FLOPs"):
        means = {lr: statistics.fmean(val(lr, arm)) for lr in results}
        assert table[arm] == pytest.approx(means) and best[arm] == min(means, key=means.get)
    d = [a - b for a, b in zip(val(best["moe"], "moe"), val(best["dense, equal FLOPs"], "dense, equal FLOPs"))]
    half = t_quantile(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    mean = statistics.fmean(d)
    verdict = "lower" if mean + half < 0 else "higher" if mean - half > 0 else "unresolved"
    assert tuned.verdict == verdict and tuned.diff.mean == pytest.approx(mean)
    assert tuned.text in notebook_outputs("13_capstone")
