"""Training loop, history, hooks, gradient accumulation and data: the corpus is the interpreter's own standard
library, batches are shifted windows."""
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from moe_lab.data import get_batch, stdlib_corpus, stdlib_files, train_val_split
from moe_lab.hooks import TrainHook
from moe_lab.metrics import max_violation_tensor
from moe_lab.model import MoETransformer, toy_config
from moe_lab.train import evaluate, evaluate_load, lr_at, train

SMALL = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train fastest on one thread; more threads on a shared 2-core machine oversubscribe it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_diverged_loss_stops_training():
    model = MoETransformer(toy_config("mixtral", **SMALL))
    with torch.no_grad():
        model.norm.weight[0] = float("nan")  # after the last MoE layer: the routers stay finite, the loss is NaN
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        train(model, torch.arange(500) % 256, steps=3, progress=False)


def test_stdlib_corpus_is_the_standard_library_source():
    first = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[0]
    data = stdlib_corpus(5000)
    assert stdlib_files()[0] == first
    assert data.dtype == torch.int64 and len(data) == 5000
    expected = (first.read_bytes() + b"\n\n")[:5000]
    assert bytes(data[: len(expected)].tolist()) == expected
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_corpus(0)


def test_batches_are_shifted_windows():
    data = torch.arange(100)
    x, y = get_batch(data, 5, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8)
    torch.testing.assert_close(y, x + 1)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    train_part, val_part = train_val_split(data, 0.2)
    assert torch.equal(torch.cat([train_part, val_part]), data) and len(val_part) == 20
    with pytest.raises(ValueError, match="seq_len"):
        get_batch(data, 1, 100)


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)


def test_training_reduces_loss_and_records_history():
    data = stdlib_corpus(20_000)
    torch.manual_seed(0)
    model = MoETransformer(toy_config("switch", **SMALL))
    h = train(model, data, steps=25, batch_size=8, seq_len=32, lr=1e-2, progress=False, val_data=data[-2000:],
              eval_every=10)
    assert len(h.loss) == len(h.ce) == len(h.step_time) == len(h.drop_rate) == 25
    assert sum(h.ce[-5:]) / 5 < h.ce[0] - 1.0  # from ~ln 256 = 5.5 to well below
    assert h.ce[0] == pytest.approx(math.log(256), abs=0.5)
    load = h.expert_load()
    assert load.shape == (25, 2, 8)
    assert torch.all(load.sum(-1) == 8 * 32 * 1)  # T * k slots per layer per step
    assert all(0 <= d < 1 for d in h.drop_rate) and max(h.drop_rate) > 0  # capacity factor 1.0 drops
    assert [s for s, _ in h.val] == [10, 20, 25]
    for loss, ce, aux in zip(h.loss, h.ce, h.aux):
        assert loss == pytest.approx(ce + 1e-2 * aux, rel=1e-5)


def test_training_is_deterministic_and_dense_history_has_no_load():
    data = stdlib_corpus(10_000)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(train(MoETransformer(toy_config("dense", **SMALL)), data, steps=3, batch_size=4, seq_len=16,
                          progress=False))
    assert runs[0].loss == runs[1].loss
    assert runs[0].expert_load().shape == (3, 0, 0)
    assert runs[0].terms == {}  # no auxiliary term has a weight: none is computed or recorded
    with pytest.raises(AttributeError, match="record=\\('aux',\\)"):
        runs[0].aux


def test_evaluate_restores_mode():
    model = MoETransformer(toy_config("mixtral", **SMALL))
    data = stdlib_corpus(5000)
    loss = evaluate(model, data, batch_size=2, seq_len=16, batches=2)
    assert model.training and loss == pytest.approx(math.log(256), abs=0.5)
    with pytest.raises(ValueError, match="steps"):
        train(model, data, steps=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_matches_cpu_start():
    data = stdlib_corpus(10_000)
    histories = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = MoETransformer(toy_config("st_moe", **SMALL)).to(device)
        histories.append(train(model, data, steps=3, batch_size=4, seq_len=16, progress=False))
    cpu, cuda = histories
    assert cuda.ce[0] == pytest.approx(cpu.ce[0], rel=1e-4)  # same weights, same batch: same first loss
    assert torch.equal(cuda.expert_load()[0], cpu.expert_load()[0])


class Recorder(TrainHook):
    """Records the events it sees and the gradients before each optimiser step."""

    def __init__(self, skip_steps=()):
        self.events, self.grads, self.skip_steps = [], [], set(skip_steps)

    def on_train_start(self, state):
        self.events.append("start")

    def on_step_start(self, state):
        self.events.append(("step", state.step, state.lr))

    def before_optimizer_step(self, state):
        self.events.append(("before", len(state.outputs), state.grad_norm is not None))
        self.grads.append({n: p.grad.clone() for n, p in state.model.named_parameters() if p.grad is not None})
        state.skip_step = state.step in self.skip_steps

    def after_optimizer_step(self, state):
        self.events.append(("after", state.skip_step))
        state.history.log("seen", state.step)

    def on_train_end(self, state):
        self.events.append("end")


def test_hooks_see_every_event_in_order():
    model = MoETransformer(toy_config("mixtral", **SMALL))
    rec = Recorder()
    h = train(model, stdlib_corpus(5000), steps=2, batch_size=2, seq_len=16, grad_accum=3, warmup=2, hooks=[rec],
              progress=False)
    assert rec.events == ["start", ("step", 0, lr_at(0, 2, 3e-3, 2)), ("before", 3, True), ("after", False),
                          ("step", 1, lr_at(1, 2, 3e-3, 2)), ("before", 3, True), ("after", False), "end"]
    assert h.extra == {"seen": [0, 1]}
    with pytest.raises(ValueError, match="TrainHook"):
        train(model, stdlib_corpus(5000), steps=1, hooks=[object()], progress=False)
    with pytest.raises(ValueError, match="grad_accum"):
        train(model, stdlib_corpus(5000), steps=1, grad_accum=0, progress=False)


def test_gradient_accumulation_equals_one_big_batch():
    """grad_accum micro-batches of B sum to the gradient of one batch of grad_accum * B (equal-size means;
    same windows: the step draws them in one go), for a model whose loss is a per-token mean."""
    data = stdlib_corpus(10_000)
    grads = []
    for batch_size, accum in ((8, 1), (4, 2), (2, 4)):
        torch.manual_seed(0)
        rec = Recorder()
        h = train(MoETransformer(toy_config("mixtral", aux_coef=0.0, **SMALL)), data, steps=1,
                  batch_size=batch_size, seq_len=16, grad_accum=accum, hooks=[rec], progress=False)
        grads.append(rec.grads[0])
        assert torch.all(h.expert_load()[0].sum(-1) == 8 * 16 * 2)  # loads summed over the micro-batches
    for other in grads[1:]:
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, rtol=1e-4, atol=1e-6)


def test_a_hook_can_skip_a_step_and_the_nan_check_respects_it():
    data = stdlib_corpus(5000)
    torch.manual_seed(0)
    model = MoETransformer(toy_config("mixtral", **SMALL))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, data, steps=1, batch_size=2, seq_len=16, hooks=[Recorder(skip_steps={0})], progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # skipped: nothing moved
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    h = train(model, data, steps=2, batch_size=2, seq_len=16, hooks=[Recorder(skip_steps={0, 1})], progress=False)
    assert all(math.isnan(v) for v in h.loss)  # a NaN policy that skips steps takes over from the raise


def test_history_max_violation_and_eval_load():
    data = stdlib_corpus(10_000)
    model = MoETransformer(toy_config("mixtral", **SMALL))
    h = train(model, data, steps=3, batch_size=4, seq_len=16, progress=False)
    torch.testing.assert_close(h.max_violation(), max_violation_tensor(h.expert_load()))
    assert h.max_violation().shape == (3, 2) and list(h.terms) == ["aux"]  # the preset weights only aux
    load = evaluate_load(model, data, batch_size=2, seq_len=16, batches=3)
    assert load.shape == (2, 8) and torch.all(load.sum(-1) == 3 * 2 * 16 * 2)
    assert model.training


def test_a_hook_can_stop_a_run_early_without_shortening_its_schedule():
    class Stop(TrainHook):
        def __init__(self):
            self.lrs = []

        def on_step_start(self, state):
            self.lrs.append(state.lr)

        def after_optimizer_step(self, state):
            state.stop = state.step == 2

    hook = Stop()
    h = train(MoETransformer(toy_config("dense", **SMALL)), torch.arange(2000) % 256, steps=50, batch_size=2,
              seq_len=8, warmup=2, hooks=[hook], progress=False)
    assert len(h.ce) == 3
    assert hook.lrs == pytest.approx([lr_at(s, 50, 3e-3, 2) for s in range(3)])  # the 50-step schedule


def test_periodic_validation_on_fixed_windows():
    data = torch.arange(5000) % 251
    model = MoETransformer(toy_config("dense", **SMALL))
    h = train(model, data, steps=4, batch_size=2, seq_len=8, val_data=data, eval_every=2, eval_tokens=256,
              progress=False)
    assert [s for s, _ in h.val] == [2, 4]
    assert h.val[-1][1] == pytest.approx(evaluate(model, data, seq_len=8, tokens=256, batch_size=5), rel=1e-5)
    legacy = evaluate(model, data, seq_len=8, batch_size=2, batches=3, seed=1)  # random windows (notebooks 08-13)
    g = torch.Generator().manual_seed(1)
    model.eval()
    with torch.no_grad():
        expected = sum(float(model.loss(*get_batch(data, 2, 8, g)).ce) for _ in range(3)) / 3
    assert legacy == pytest.approx(expected)


def test_eval_load_on_fixed_windows_counts_every_token_slot():
    model = MoETransformer(toy_config("mixtral", **SMALL))
    load = evaluate_load(model, torch.arange(3000) % 256, seq_len=16, tokens=320, batch_size=7)
    assert load.shape == (2, 8) and torch.all(load.sum(-1) == 320 * 2)  # 20 windows of 16 tokens, top-2


def test_evaluate_names_bad_arguments():
    model, data = MoETransformer(toy_config("dense", **SMALL)), torch.arange(500) % 256
    with pytest.raises(ValueError, match="batches must be an integer >= 1"):
        evaluate(model, data, seq_len=8, batch_size=2, batches=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        evaluate(model, data, seq_len=8, tokens=64, batch_size=0)
    with pytest.raises(ValueError, match="tokens must be an integer >= 8"):
        evaluate(model, data, seq_len=8, tokens=4)


def test_recorded_terms_equal_their_definition_and_unweighted_ones_only_when_asked():
    """Weighted terms are recorded; ``record`` adds unweighted ones, computed after the backward pass: each
    equals its formula recomputed in float64 from the step's routing (mean over micro-batches, sum over layers)."""
    data = stdlib_corpus(5000)
    model = MoETransformer(toy_config("st_moe", **SMALL))  # aux and z weighted
    rec = Capture()
    h = train(model, data, steps=2, batch_size=2, seq_len=16, grad_accum=2, hooks=[rec], progress=False,
              record=("seq_aux",))
    assert list(h.terms) == ["aux", "z", "seq_aux"]
    for step, outputs in enumerate(rec.outputs):
        z = [sum(float(torch.logsumexp(i.logits.detach().double(), -1).square().mean()) for i in out.infos) for out in outputs]
        assert h.z[step] == pytest.approx(sum(z) / 2, rel=1e-6)
        seq = []
        for out in outputs:  # DeepSeek-V3's sequence-wise loss per layer, by hand: 2 sequences of 16 tokens
            total = 0.0
            for i in out.infos:
                probs, experts = i.probs.detach().double().view(2, 16, 8), i.experts.view(2, 16, 2)
                f = torch.stack([torch.bincount(e.flatten(), minlength=8) for e in experts]).double() * 8 / (2 * 16)
                total += float((f * probs.mean(1)).sum(-1).mean())
            seq.append(total)
        assert h.seq_aux[step] == pytest.approx(sum(seq) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="record must hold names"):
        train(model, data, steps=1, record=("zloss",), progress=False)
    with pytest.raises(ValueError, match="do not define 'load'"):  # Shazeer's load loss needs the noisy router
        train(model, data, steps=1, record=("load",), progress=False)


class Capture(TrainHook):
    """Keeps each step's micro-batch outputs."""

    def __init__(self):
        self.outputs = []

    def after_optimizer_step(self, state):
        self.outputs.append(list(state.outputs))


def test_train_adds_the_bias_balancer_the_layers_need():
    data = stdlib_corpus(5000)
    h = train(MoETransformer(toy_config("deepseek_v3", **SMALL)), data, steps=2, batch_size=2, seq_len=16,
              progress=False)  # one dense layer, then one MoE layer with a selection bias and gamma 1e-3
    assert len(h.extra["expert_bias"]) == 2 and h.extra["expert_bias"][0].shape == (1, 32)
    assert h.extra["expert_bias"][0].abs().max() == pytest.approx(1e-3)  # one sign step of gamma
    for quiet in (toy_config("deepseek_v3", bias_update_rate=0.0, **SMALL), toy_config("deepseek_v1", **SMALL)):
        h = train(MoETransformer(quiet), data, steps=1, batch_size=2, seq_len=16, progress=False)
        assert "expert_bias" not in h.extra


def test_reading_the_records_every_few_steps_gives_the_same_history():
    """sync_every=N reads the step records back once per N steps (a GPU then waits once per N steps): the same
    values as reading every step; a diverged loss still stops training, naming its step."""
    data = stdlib_corpus(5000)
    runs = []
    for sync_every in (1, 3):
        torch.manual_seed(0)
        runs.append(train(MoETransformer(toy_config("switch", **SMALL)), data, steps=7, batch_size=2, seq_len=16,
                          progress=False, sync_every=sync_every, record=("z",)))
    a, b = runs
    assert (a.loss, a.ce, a.terms, a.drop_rate) == (b.loss, b.ce, b.terms, b.drop_rate) and len(b.step_time) == 7
    assert torch.equal(a.expert_load(), b.expert_load())
    model = MoETransformer(toy_config("dense", **SMALL))  # (an MoE layer would refuse the NaN input at step 1)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):  # found at the read after step 3
        train(model, data, steps=5, batch_size=2, seq_len=16, progress=False, sync_every=4)
    with pytest.raises(ValueError, match="sync_every"):
        train(model, data, steps=1, sync_every=0, progress=False)
