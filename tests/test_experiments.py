"""moe_lab.experiments against independent references: published t quantiles, hand-computed statistics and FLOPs,
an exhaustive search for matched baselines, a slow per-window evaluation, and the training loop itself."""
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from moe_lab.calculator import count_params, flops_per_token
from moe_lab.data import load_corpus, val_windows
from moe_lab.experiments import (Budget, Setup, claim, compare, flops_per_step, load_result, matched_dense, paired,
                                 paired_difference, run_comparison, save_result, summary, t_quantile, train_arm)
from moe_lab.experiments.__main__ import main
from moe_lab.experiments.results import metric_values
from moe_lab.experiments.stats import t_within
from moe_lab.hooks import TrainHook
from moe_lab.model import MoETransformer, toy_config
from moe_lab.train import evaluate

# Student t quantiles from a published table (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2): (p, df, t)
T_TABLE = [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 5, 2.571),
           (0.975, 9, 2.262), (0.975, 10, 2.228), (0.975, 29, 2.045), (0.975, 30, 2.042), (0.975, 100, 1.984),
           (0.95, 4, 2.132), (0.95, 20, 1.725), (0.99, 7, 2.998), (0.995, 4, 4.604), (0.995, 1, 63.657),
           (0.90, 3, 1.638)]


@pytest.mark.parametrize("p, df, t", T_TABLE)
def test_t_quantiles_match_the_published_table(p, df, t):
    assert t_quantile(p, df) == pytest.approx(t, abs=5e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-t, abs=5e-4)


def test_t_distribution_limits():
    assert t_quantile(0.5, 3) == 0.0
    assert t_within(0.0, 7) == 0.0 and t_within(1e6, 7) == pytest.approx(1.0)
    assert t_within(2.0, 1) == pytest.approx(2 / math.pi * math.atan(2.0))  # Cauchy
    assert t_within(2.0, 2) == pytest.approx(2.0 / math.sqrt(2 + 4.0))  # closed form for 2 degrees of freedom
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960201, abs=1e-5)  # R: qt(0.975, 10000); normal: 1.959964
    with pytest.raises(ValueError, match="p must be a finite number > 0 and < 1"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be an integer >= 1"):
        t_quantile(0.9, 0)


def test_paired_difference_by_hand():
    moe, dense = [1.599, 1.609, 1.592], [1.647, 1.656, 1.638]  # the measurement
    d = paired_difference(moe, dense)
    diffs = [-0.048, -0.047, -0.046]
    assert d.differences == pytest.approx(diffs)
    assert d.mean == pytest.approx(-0.047) and d.sd == pytest.approx(0.001)  # sample SD (n - 1)
    half = 4.303 * 0.001 / math.sqrt(3)
    assert (d.low, d.high) == pytest.approx((-0.047 - half, -0.047 + half), abs=1e-6)
    assert d.agree == 3 and d.verdict == "lower"
    mixed = paired_difference([1.0, 2.0, 3.0], [1.5, 1.5, 2.0])  # diffs -0.5, 0.5, 1.0
    assert mixed.verdict == "unresolved" and mixed.agree == 2 and mixed.low < 0 < mixed.high
    assert paired_difference([2.0, 3.0, 2.5], [1.0, 1.2, 1.1]).verdict == "higher"
    tie = paired_difference([1.0, 2.0], [1.0, 2.0])
    assert tie.verdict == "unresolved" and tie.agree == 0
    assert paired_difference(moe, dense, 0.99).half_width > d.half_width


def test_paired_difference_rejects_bad_input():
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_difference([1.0], [2.0])
    with pytest.raises(ValueError, match="a must hold finite numbers"):
        paired_difference([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence must be"):
        paired_difference([1.0, 2.0], [1.0, 3.0], confidence=95)


def test_flops_per_step_by_hand():
    d, L, d_ff, V, ctx, B = 64, 4, 256, 256, 64, 16
    # forward per token: 2 x (attention 4 d^2 + SwiGLU 3 d d_ff per layer + output head V d) + scores and values
    # 4 d ctx per layer; training: x 3
    forward = 2 * (L * (4 * d * d + 3 * d * d_ff) + V * d) + L * 4 * d * ctx
    assert flops_per_step(toy_config("dense"), B, ctx) == 3 * forward * B * ctx == 1_912_602_624
    switch = 3 * (forward + 2 * L * d * 8) * B * ctx  # + the router, d x E per layer
    assert flops_per_step(toy_config("switch"), B, ctx) == switch


def test_budget_gives_each_model_its_own_steps_rounded_down():
    dense, switch = toy_config("dense"), toy_config("switch")
    budget = Budget.of("flops", dense, 800, batch_size=16, seq_len=64)
    assert budget == Budget("flops", 800 * 1_912_602_624)
    assert budget.steps_for(dense, batch_size=16, seq_len=64) == 800
    per_step = flops_per_step(switch, 16, 64)
    steps = budget.steps_for(switch, batch_size=16, seq_len=64)
    assert steps == 794 and steps * per_step <= budget.amount < (steps + 1) * per_step
    assert Budget("tokens", 10_000).steps_for(dense, batch_size=16, seq_len=64) == 9  # 10,000 // 1,024
    assert Budget("steps", 7).steps_for(switch, batch_size=4, seq_len=8) == 7
    with pytest.raises(ValueError, match="less than one step of this model"):
        Budget("flops", 1e6).steps_for(dense, batch_size=16, seq_len=64)
    with pytest.raises(ValueError, match=r"kind must be one of \('steps', 'tokens', 'flops'\)"):
        Budget("seconds", 10)
    with pytest.raises(ValueError, match="amount must be a finite number > 0"):
        Budget("steps", 0)


@pytest.mark.parametrize("preset, overrides", [("mixtral", {"n_layers": 2}), ("switch", {}), ("glam", {}),
                                               ("deepseek_v1", {}), ("mixtral", {"activation": "gelu"})])
@pytest.mark.parametrize("match", ["active_flops", "total_params"])
def test_matched_dense_is_the_nearest_width_by_exhaustive_search(preset, overrides, match):
    moe = toy_config(preset, **overrides)
    count = (lambda a: flops_per_token(a)) if match == "active_flops" else (lambda a: count_params(a).total)
    dense = matched_dense(moe, match)
    target = count(moe.arch())
    search = min(range(1, 4097), key=lambda w: (abs(count(toy_config("dense", d_model=moe.d_model,
                                                                        n_layers=moe.n_layers, n_heads=moe.n_heads,
                                                                        activation=moe.activation,
                                                                        d_ff=w).arch()) - target), w))
    assert dense.d_ff == search
    assert dense.num_experts == 0 and dense.aux_coef == 0
    assert (dense.d_model, dense.n_layers, dense.n_heads, dense.vocab_size, dense.activation) == (
        moe.d_model, moe.n_layers, moe.n_heads, moe.vocab_size, moe.activation)


def test_matched_dense_capstone_widths_and_errors():
    moe = toy_config("mixtral", n_layers=2)
    assert matched_dense(moe, "active_flops").d_ff == 259  # 2 x 128 + the router's 2 d E FLOPs / (6 d)
    assert matched_dense(moe, "total_params").d_ff == 1027  # 8 x 128 + the router's d E parameters / (3 d)
    with pytest.raises(ValueError, match="cfg must be an MoE ModelConfig"):
        matched_dense(toy_config("dense"))
    with pytest.raises(ValueError, match=r"match must be one of \('active_flops', 'total_params'\)"):
        matched_dense(moe, "flops")


def slow_evaluate(model, data, seq_len, tokens):
    """Mean next-token cross-entropy over val_windows, one window at a time, from the logits."""
    x, y = val_windows(data, seq_len, tokens)
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x[i:i + 1])[0][0], y[i], reduction="sum") for i in range(len(x))]
    return float(sum(losses)) / y.numel()


def test_evaluate_scores_the_fixed_windows_whatever_the_batch_size():
    model = MoETransformer(toy_config("mixtral", n_layers=1))
    data = load_corpus("pydoc").val
    expected = slow_evaluate(model, data, 16, 512)
    model.train()
    for batch_size in (1, 7, 64):
        assert evaluate(model, data, seq_len=16, tokens=512, batch_size=batch_size) == pytest.approx(expected,
                                                                                                      rel=1e-5)
    assert model.training  # restored


TINY = {"dense": toy_config("dense", n_layers=1, d_model=32, n_heads=2, d_ff=64),
        "moe": toy_config("mixtral", n_layers=1, d_model=32, n_heads=2, d_expert=32)}
SETUP = Setup(batch_size=4, seq_len=16, eval_tokens=256, eval_points=1)


@pytest.fixture(scope="module")
def tiny_result():
    arms = {**TINY, "dense again": TINY["dense"]}
    return run_comparison(arms, Budget.of("flops", TINY["dense"], 6, batch_size=4, seq_len=16), seeds=(0, 1),
                          setup=SETUP, progress=False, name="tiny", description="a test")


def test_run_comparison_records_budget_matched_paired_runs(tiny_result):
    r = json.loads(json.dumps(tiny_result))  # plain JSON data
    budget = Budget(**r["setup"]["budget"])
    for arm, cfg in TINY.items():
        steps = budget.steps_for(cfg, batch_size=4, seq_len=16)
        assert r["arms"][arm]["steps"] == steps and r["arms"][arm]["flops_per_step"] == flops_per_step(cfg, 4, 16)
        assert [run["seed"] for run in r["runs"][arm]] == [0, 1]
        for run in r["runs"][arm]:
            assert len(run["train_ce"]) == len(run["step_time"]) == steps  # the whole schedule, to its own end
            assert run["val"][-1] == [steps, pytest.approx(run["val_ce"], rel=1e-5)] and len(run["val"]) == 2
    assert r["arms"]["moe"]["steps"] < r["arms"]["dense"]["steps"]  # the router's FLOPs cost steps
    assert set(r["runs"]["moe"][0]) >= {"max_vio", "drop_rate", "expert_load"}
    assert "max_vio" not in r["runs"]["dense"][0]
    # paired seeds: the same configuration under another name reproduces each seed exactly
    assert r["runs"]["dense again"] == [{**run, "step_time": run2["step_time"], "wall_s": run2["wall_s"]}
                                        for run, run2 in zip(r["runs"]["dense"], r["runs"]["dense again"])]
    assert r["runs"]["dense"][0]["train_ce"] != r["runs"]["dense"][1]["train_ce"]
    assert paired(r, "dense", "dense again").differences == (0.0, 0.0)
    assert r["setup"] == {"budget": r["setup"]["budget"], "seeds": [0, 1], "device": "cpu", "corpus": "python",
                          "batch_size": 4, "seq_len": 16, "lr": 3e-3, "warmup": 10, "eval_tokens": 256,
                          "eval_points": 1}
    prov = r["provenance"]
    assert {"git_commit", "torch", "python", "cpu", "threads", "load_before", "load_after", "wall_s",
            "date"} <= set(prov)


def test_val_ce_is_the_fixed_validation_of_the_finished_model(tiny_result):
    corpus = load_corpus("python")
    steps = tiny_result["arms"]["moe"]["steps"]
    model, history = train_arm(TINY["moe"], steps, 1, SETUP, data=corpus.train, device=torch.device("cpu"))
    assert history.ce == pytest.approx(tiny_result["runs"]["moe"][1]["train_ce"], rel=1e-5)
    assert tiny_result["runs"]["moe"][1]["val_ce"] == pytest.approx(slow_evaluate(model, corpus.val, 16, 256),
                                                                    rel=1e-5)


def test_run_comparison_passes_hooks_and_hands_back_each_model():
    class Count(TrainHook):
        def __init__(self):
            self.steps = 0

        def after_optimizer_step(self, state):
            self.steps += 1

    counters, seen = {}, []

    def hooks(arm, seed):
        counters[arm, seed] = Count()
        return [counters[arm, seed]]

    r = run_comparison(TINY, Budget("steps", 2), seeds=(3,), setup=SETUP, progress=False, hooks=hooks,
                       on_run=lambda arm, seed, model, history: seen.append((arm, seed, len(history.ce),
                                                                             type(model).__name__)))
    assert {key: c.steps for key, c in counters.items()} == {("dense", 3): 2, ("moe", 3): 2}
    assert seen == [("dense", 3, 2, "MoETransformer"), ("moe", 3, 2, "MoETransformer")]
    assert r["runs"]["moe"][0]["seed"] == 3


def test_run_comparison_rejects_bad_arguments():
    budget = Budget("steps", 1)
    with pytest.raises(ValueError, match="arms must name at least one"):
        run_comparison({}, budget)
    with pytest.raises(ValueError, match=r"arms\['x'\] must be a moe_lab.model.ModelConfig"):
        run_comparison({"x": "dense"}, budget)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_comparison(TINY, budget, seeds=(0, 0))
    with pytest.raises(ValueError, match="corpus must be one of"):
        Setup(corpus="stdlib")
    with pytest.raises(ValueError, match="eval_tokens must be an integer >= 64"):
        Setup(eval_tokens=10)


def test_metrics_and_summary(tiny_result):
    steps = tiny_result["arms"]["moe"]["steps"]
    run = tiny_result["runs"]["moe"][0]
    last = max(1, round(0.1 * steps))
    assert metric_values(tiny_result, "moe", "train_ce")[0] == pytest.approx(statistics.fmean(run["train_ce"][-last:]))
    assert metric_values(tiny_result, "moe", "step_ms")[0] == pytest.approx(1000 * statistics.median(run["step_time"]))
    with pytest.raises(ValueError, match="recorded for MoE arms only"):
        metric_values(tiny_result, "dense", "max_vio")
    with pytest.raises(ValueError, match="arm must be one of"):
        metric_values(tiny_result, "sparse", "val_ce")
    rows = {row["arm"]: row for row in summary(tiny_result)}
    assert rows["moe"]["val_ce mean"] == pytest.approx(statistics.fmean(metric_values(tiny_result, "moe", "val_ce")))
    assert "max_vio mean" in rows["moe"] and "max_vio mean" not in rows["dense"]


def result_with(a_values, b_values):
    return {"runs": {"a": [{"seed": s, "val_ce": v} for s, v in enumerate(a_values)],
                     "b": [{"seed": s, "val_ce": v} for s, v in enumerate(b_values)]}}


def test_claim_wording_follows_the_interval():
    lower = compare(result_with([1.599, 1.609, 1.592], [1.647, 1.656, 1.638]), "a", "b", subject="MoE",
                    other="dense")
    assert lower.verdict == "lower" and lower.text == (
        "the validation cross-entropy of MoE is lower than that of dense by 0.047 nats "
        "(95% CI [0.045, 0.049]; lower in 3 of 3 seeds)")
    higher = compare(result_with([1.7, 1.8, 1.75], [1.6, 1.65, 1.62]), "a", "b")
    assert higher.verdict == "higher"
    assert "the validation cross-entropy of a is higher than that of b by 0.127" in higher.text
    unresolved = compare(result_with([1.0, 2.0, 3.0], [1.5, 1.5, 2.0]), "a", "b")
    assert unresolved.verdict == "unresolved" and unresolved.text.startswith(
        "3 seeds cannot resolve a difference in validation cross-entropy between a and b: the mean difference is "
        "+0.333 nats (95% CI [")
    assert "contains 0; higher in 2 of 3 seeds)" in unresolved.text


def test_claims_say_whether_they_reproduce_the_source():
    diff = paired_difference([1.0, 1.1, 1.05], [1.2, 1.3, 1.24])
    kw = dict(subject="a", other="b", quantity="loss", source="Fedus et al. 2021")
    assert claim(diff, expected="lower", **kw).text.endswith(
        "; this reproduces the direction reported by Fedus et al. 2021")
    assert claim(diff, expected="lower", **kw).reproduces is True
    opposite = claim(diff, expected="higher", **kw)
    assert opposite.reproduces is False and opposite.text.endswith("opposite of the direction reported by Fedus et "
                                                                   "al. 2021: not reproduced")
    unsure = claim(paired_difference([1.0, 2.0], [1.5, 1.4]), expected="lower", **kw)
    assert unsure.reproduces is False and unsure.text.endswith(
        "; these seeds can neither confirm nor rule out that it is lower, as reported by Fedus et al. 2021")
    assert claim(diff, subject="a", other="b", quantity="loss").reproduces is None
    scaled = claim(paired_difference([0.10, 0.12], [0.30, 0.31]), subject="a", other="b", quantity="drops",
                   unit="percentage points", digits=1, scale=100)
    assert "by 19.5 percentage points" in scaled.text
    with pytest.raises(ValueError, match="expected and source go together"):
        claim(diff, subject="a", other="b", quantity="loss", expected="lower")


def test_save_and_load_results(tmp_path, tiny_result, capsys):
    path = save_result(tiny_result, tmp_path / "tiny.json")
    assert load_result(path) == json.loads(json.dumps(tiny_result))
    lines = path.read_text().splitlines()
    assert not [line for line in lines if line.strip().rstrip(",").replace(".", "").isdigit()]  # number lists: 1 line
    assert any(line.startswith('    "train_ce": [') and line.endswith("],") for line in lines)
    gz = save_result(tiny_result, tmp_path / "tiny.json.gz")
    assert load_result(gz) == load_result(path) and gz.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert save_result(tiny_result, tmp_path / "again.json.gz").read_bytes() == gz.read_bytes()  # no timestamp
    with pytest.raises(ValueError, match="no stored result named 'nothing'"):
        load_result("nothing")
    main(["show", str(path)])
    out = capsys.readouterr().out
    assert "tiny: a test" in out and "val_ce mean" in out and "provenance" in out
    main(["list"])
    assert "switch_family" in capsys.readouterr().out
