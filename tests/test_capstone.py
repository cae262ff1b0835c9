"""moe_lab.specialisation (token classes, class x expert statistics, router saturation, routing snapshots) and
the references of notebook 13's exercises, against slow obvious implementations."""
import keyword
import math
import string
from collections import Counter

import pytest
import torch

from moe_lab.checks.nb13 import _slow_block, moe_vs_dense_at_equal_flops, train_moe_block
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


def test_equal_flops_comparison_by_hand():
    moe = torch.tensor([[5.0, 4.0, 3.0, 2.0], [5.0, 4.0, 3.0, 4.0]])  # 4 steps x 10 FLOPs = 40
    dense = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])  # 10 steps x 3 = 30
    budget, moe_mean, moe_std, dense_mean, dense_std = moe_vs_dense_at_equal_flops(moe, 10, dense, 3)
    assert budget == 30 and (moe_mean, dense_mean, dense_std) == (3.0, 0.0, 0.0)  # MoE after 3 steps, dense 10
    assert moe_std == 0.0
    with pytest.raises(ValueError, match="moe_losses"):
        moe_vs_dense_at_equal_flops(torch.zeros(3), 1, dense, 1)


def test_moe_block_reference_matches_a_slow_block():
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(24, 6, generator=g), torch.randn(24, 6, generator=g)
    args = (x, target, torch.randn(4, 6, generator=g), torch.randn(4, 6, 8, generator=g) / 6**0.5,
            torch.randn(4, 8, 6, generator=g) / 8**0.5, 2, 0.1, 0.2, 4)
    for got, expected in zip(train_moe_block(*args), _slow_block(*args)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    losses = train_moe_block(*args)[0]
    assert losses[-1] < losses[0]  # it trains
