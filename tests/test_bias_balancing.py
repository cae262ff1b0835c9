"""Aux-loss-free balancing: loads counted over an optimiser step (gradient accumulation included), the bias
update after it (against losses.bias_update on the recorded loads), checkpoints, the sum over ranks, and the
simulation behind a bias-balancing widget."""
import pytest
import torch
import torch.distributed as dist

from moe_lab import MoELayer, seed_everything
from moe_lab.balancing import one_thread
from moe_lab.bias_balancing import BiasBalancer, simulate_bias_balancing
from moe_lab.data import stdlib_corpus
from moe_lab.hooks import TrainHook
from moe_lab.launch import run_local
from moe_lab.losses import bias_update
from moe_lab.metrics import max_violation
from moe_lab.model import MoETransformer, toy_config
from moe_lab.train import train

SMALL = dict(d_model=32, n_layers=3, n_heads=2, d_ff=64)  # layer 0 dense, layers 1-2 MoE


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny models train fastest on one thread
        yield


class LoadSpy(TrainHook):
    """Copies every layer's counted loads and bias just before each optimiser step."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.loads, self.biases = [], []

    def before_optimizer_step(self, state):
        self.loads.append(torch.stack([layer.load_counts.clone() for layer in self.layers]))
        self.biases.append(torch.stack([layer.expert_bias.clone() for layer in self.layers]))


@pytest.mark.parametrize("centered", [False, True])
def test_bias_follows_the_update_rule_over_each_step_with_grad_accumulation(centered):
    data = stdlib_corpus(20_000)
    model = MoETransformer(toy_config("deepseek_v3", bias_update_rate=1e-2, bias_update_centered=centered,
                                      **SMALL))
    spy = LoadSpy(model)
    h = train(model, data, steps=4, batch_size=2, seq_len=16, grad_accum=3, hooks=[spy], val_data=data[-2000:],
              eval_every=2, progress=False)
    assert len(spy.layers) == 2
    for step in range(4):
        # the counts are exactly this step's training loads: 3 micro-batches, no eval forward passes
        assert torch.equal(spy.loads[step], h.tokens_per_expert[step])
        assert torch.all(spy.loads[step].sum(-1) == 3 * 2 * 16 * 7)
        for layer in range(2):
            expected = bias_update(spy.biases[step][layer], spy.loads[step][layer], 1e-2, centered=centered)
            after = h.extra["expert_bias"][step][layer]
            torch.testing.assert_close(after, expected, rtol=0, atol=0)
            assert after.dtype == torch.float32
    assert spy.biases[0].abs().sum() == 0 and h.extra["expert_bias"][-1].abs().sum() > 0
    if centered:
        torch.testing.assert_close(h.extra["expert_bias"][-1].sum(-1), torch.zeros(2), atol=1e-6, rtol=0)
    assert all(int(layer.load_counts.sum()) == 0 for layer in spy.layers)  # reset after each update


def test_skipped_step_discards_its_loads():
    class SkipAll(TrainHook):
        def before_optimizer_step(self, state):
            state.skip_step = True

    model = MoETransformer(toy_config("deepseek_v3", **SMALL))
    h = train(model, stdlib_corpus(5000), steps=2, batch_size=2, seq_len=16, hooks=[SkipAll()], progress=False)
    assert "expert_bias" not in h.extra
    assert all(m.expert_bias.abs().sum() == 0 and m.load_counts.sum() == 0
               for m in model.modules() if isinstance(m, MoELayer))


def test_checkpoint_saves_and_restores_the_bias():
    data = stdlib_corpus(10_000)
    model = MoETransformer(toy_config("deepseek_v3", bias_update_rate=1e-2, **SMALL))
    train(model, data, steps=3, batch_size=2, seq_len=16, progress=False)
    state = model.state_dict()
    biases = [k for k in state if k.endswith("expert_bias")]
    assert len(biases) == 2 and all(state[k].abs().sum() > 0 for k in biases)
    restored = MoETransformer(toy_config("deepseek_v3", bias_update_rate=1e-2, **SMALL))
    restored.load_state_dict(state)
    x = torch.randint(0, 256, (2, 16))
    model.eval()
    restored.eval()
    for a, b in zip(model(x)[1], restored(x)[1]):
        assert torch.equal(a.experts, b.experts)


def test_balancer_attaches_to_any_optimizer_and_balances():
    seed_everything(0)
    layer = MoELayer(16, 16, 8, 2, score_func="sigmoid", selection_bias=True, bias_update_rate=2e-2)
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # expert 0 is popular
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)  # the router does not learn: only the bias balances
    handle = BiasBalancer(layer).attach(opt)
    x = torch.randn(512, 16).abs()
    first = None
    for _ in range(60):
        out, info = layer(x)
        first = info.tokens_per_expert if first is None else first
        out.sum().backward()
        opt.step()
        opt.zero_grad()
    final = layer(x)[1].tokens_per_expert
    handle.remove()
    assert layer.expert_bias[0] < 0 and final.max() < first.max()
    assert max_violation(final) < 0.5 * max_violation(first)


def test_gates_of_a_model_are_unchanged_by_its_bias():
    model = MoETransformer(toy_config("deepseek_v3", **SMALL)).eval()
    x = torch.randint(0, 256, (2, 16))
    _, before = model(x)
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.expert_bias.normal_(0, 0.5)
    _, after = model(x)
    # the first MoE layer sees the same input: same scores; its gates are the (normalised, scaled) scores
    torch.testing.assert_close(before[0].scores, after[0].scores)
    assert not torch.equal(before[0].experts, after[0].experts)
    s = after[0].scores.gather(1, after[0].experts)
    torch.testing.assert_close(after[0].gates, 2.5 * s / s.sum(-1, keepdim=True))


def _rank_update() -> dict:
    """Each rank: the same layer, its own tokens; one training forward, then the balancer's update."""
    rank = dist.get_rank()
    seed_everything(0)
    layer = MoELayer(8, 8, 8, 2, score_func="sigmoid", selection_bias=True, bias_update_rate=1e-3)
    x = torch.randn(2, 40, 8)[rank] * (1 + 3 * rank)  # different tokens (and loads) on each rank
    load = layer(x)[1].tokens_per_expert
    BiasBalancer(layer).update()
    return {"load": load, "bias": layer.expert_bias.clone()}


def test_loads_are_summed_across_ranks():
    results = run_local(_rank_update, 2)
    total = results[0]["load"] + results[1]["load"]
    expected = bias_update(torch.zeros(8), total, 1e-3)
    assert not torch.equal(bias_update(torch.zeros(8), results[0]["load"], 1e-3), expected)  # the sum matters
    for r in results:
        torch.testing.assert_close(r["bias"], expected, rtol=0, atol=0)


def test_simulation_balances_slowly_when_small_and_oscillates_when_large():
    runs = {rate: simulate_bias_balancing(rate=rate, steps=200) for rate in (0.0, 1e-3, 1e-2, 1.0)}
    late = {rate: float(run.max_violation[100:].mean()) for rate, run in runs.items()}
    assert runs[0.0].bias.abs().sum() == 0 and late[0.0] > 2  # a skewed router, not balanced by itself
    assert late[1e-2] < late[1e-3] < late[0.0]  # gamma too small: still converging after 200 steps
    assert late[1.0] > late[1e-2]  # gamma too large: overshoots every step
    run = runs[1e-2]
    assert run.load.shape == (200, 16) and run.bias.shape == (201, 16) and torch.all(run.load.sum(-1) == 1024)
    torch.testing.assert_close(run.bias[1], bias_update(run.bias[0], run.load[0], 1e-2))
    again = simulate_bias_balancing(rate=1e-2, steps=200)
    assert torch.equal(again.load, run.load)
    centered = simulate_bias_balancing(rate=1e-2, steps=50, centered=True, score_func="softmax")
    torch.testing.assert_close(centered.bias.sum(-1), torch.zeros(51), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rate"):
        simulate_bias_balancing(rate=-1.0)
    with pytest.raises(ValueError, match="score_func"):
        simulate_bias_balancing(score_func="relu")
