"""Notebook 09's exercises: every known mistake is caught by the visible or hidden cases (and is told apart from
the reference), the cache simulator's rule variants reduce to the reference when no rule is changed, and the lecture
notebook's generated measured sentences are in its stored outputs and agree with the numbers the same run printed."""
import re

import pytest

from moe_lab.checks import REGISTRY, run_check
from moe_lab.checks.core import exercise_cases
from moe_lab.checks.nb09 import _cache_variant, simulate_expert_cache

NB09 = [ex_id for ex_id in REGISTRY if ex_id.startswith("09.")]


def test_notebook_09_has_five_exercises_with_mistakes():
    assert len(NB09) >= 5 and all(REGISTRY[i].mistakes for i in NB09)


@pytest.mark.parametrize("ex_id", NB09)
def test_every_known_mistake_fails(ex_id):
    for description, mistake in REGISTRY[ex_id].mistakes.items():
        result = run_check(ex_id, mistake, hidden=True)
        assert result.status == "failed", (description, str(result))


def test_cache_variant_without_changes_is_the_reference():
    for seed in (0, 1, 2):
        for case, _ in exercise_cases(REGISTRY["09.2"], seed, hidden=True):
            assert _cache_variant(*case.args) == simulate_expert_cache(*case.args), case.name


# The measured sentences of notebooks/09_inference.ipynb are generated from the run (display(Markdown(...))): each
# must be in the stored outputs and agree with the numbers the same run printed.

def _outputs():
    from tests.test_evidence import notebook_outputs
    return notebook_outputs("09_inference")


def _num(pattern, text):
    match = re.search(pattern, text)
    assert match, f"not in the stored outputs of notebooks/09_inference.ipynb: {pattern}"
    return [float(g) for g in match.groups()]


def test_notebook_09_timing_sentence_is_generated_from_the_printed_ratios():
    out = _outputs()
    (b1,) = _num(r"decode at batch 1: the MoE step takes (\d+\.\d\d)x", out)
    (b64,) = _num(r"decode at batch 64: the MoE step takes (\d+\.\d\d)x", out)
    ratios = {t: _num(rf"layer at {t} token\(s\): sorted (\d+\.\d\d)x, loop (\d+\.\d\d)x", out) for t in (1, 8, 64)}
    assert f"The toy MoE's decode step took {b1:.2f}× the dense step at batch 1 and {b64:.2f}× at batch 64" in out
    s1, l1 = ratios[1]
    assert f"at one token the sorted MoE layer took {s1:.2f}× and the per-expert loop {l1:.2f}× of it" in out
    assert f"(published naive loop: {1.555 / 0.759:.2f}×)" in out
    for t in (8, 64):
        s, l = ratios[t]
        assert f"{t} tokens: sorted {s:.2f}×, loop {l:.2f}×" in out


def test_notebook_09_prefetch_sentence_reports_hit_rate_and_bytes_consistently():
    out = _outputs()
    lru, prefetch = _num(r"at S = k = 2: LRU (\d\.\d\d), shuffled control \d\.\d\d, LRU \+ prefetch (\d\.\d\d)", out)
    verb, a, b, moved, without, extra = re.search(
        r"prefetching (raises|lowers) the LRU hit rate from (\d\.\d{3}) to (\d\.\d{3}), and copies (\d+) KiB of "
        r"experts per token instead of (\d+) \((\d+\.\d\d)× the bytes\)", out).groups()
    a, b, moved, without, extra = float(a), float(b), int(moved), int(without), float(extra)
    assert round(a, 2) == lru and round(b, 2) == prefetch
    assert verb == ("raises" if b > a else "lowers")
    assert abs(moved / without - extra) < 0.02 and extra > 1  # prefetch moves more bytes


def test_notebook_09_runtime_gap_sentence_matches_the_runtime():
    out = _outputs()
    (printed,) = _num(r"S=2 prefetch=False: logits identical True, hit rate (\d\.\d{3}) \(= simulated: True\)", out)
    assert f"At $S = 2$ without prefetch the runtime's hit rate is {printed:.3f}, equal to the simulation" in out


def test_notebook_09_published_range_sentence_agrees_with_the_printed_hit_rate():
    out = _outputs()
    rate, where = re.search(r"the toy's LRU hit rate, (\d\.\d{3}), lies (inside|outside) the published 40%–60%", out).groups()
    assert where == ("inside" if 0.4 <= float(rate) <= 0.6 else "outside")
