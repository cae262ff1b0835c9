"""Training hooks for stability: loss-weight schedules (closed forms, and the loss the loop really optimised),
the router monitor (against float64 recomputation), and the NaN guard (which step, which quantity, the saved
checkpoint holds the weights before the failing step)."""
import math

import pytest
import torch

from moe_lab.data import stdlib_corpus
from moe_lab.hooks import (Decay, LossWeightSchedule, NaNGuard, NonFiniteError, RouterMonitor, TrainHook,
                           first_nonfinite)
from moe_lab.model import MoETransformer, toy_config
from moe_lab.stability import topk_flips
from moe_lab.train import train

from .test_train import _one_thread  # noqa: F401  (autouse: tiny models train fastest on one thread)

SMALL = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64)
DATA = stdlib_corpus(20_000)


def small_model(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(toy_config("mixtral", **SMALL, **overrides))


def run(model, steps=3, **kwargs):
    return train(model, DATA, steps=steps, batch_size=2, seq_len=16, progress=False, **kwargs)


class Capture(TrainHook):
    """Records what the other hooks are checked against: the weights each step starts from (after an optional
    ``at_step_start`` fault), the outputs and gradients (then an optional ``before_step`` fault)."""

    def __init__(self, at_step_start=None, before_step=None):
        self.weights, self.outputs, self.grads = [], [], []
        self.at_step_start, self.before_step = at_step_start, before_step

    def on_step_start(self, state):
        if self.at_step_start:
            self.at_step_start(state)
        self.weights.append({n: p.detach().clone() for n, p in state.model.named_parameters()})

    def before_optimizer_step(self, state):
        self.outputs.append(state.outputs)
        self.grads.append([p.grad.detach().double().clone() for p in state.model.parameters() if p.grad is not None])
        if self.before_step:
            self.before_step(state)


def test_decay_closed_forms():
    steps = 11  # steps 0..10
    for shape, middle in (("exponential", math.sqrt(1e-2 * 1e-3)), ("linear", 5.5e-3), ("cosine", 5.5e-3)):
        d = Decay(1e-2, 1e-3, shape=shape)
        assert d(0, steps) == pytest.approx(1e-2) and d(10, steps) == pytest.approx(1e-3)
        assert d(5, steps) == pytest.approx(middle)
        assert d(100, steps) == pytest.approx(1e-3)  # stays at the end value
    assert Decay(1e-2, 1e-3, shape="exponential")(1, 11) == pytest.approx(1e-2 * 0.1**0.1)  # constant ratio
    assert Decay(1.0, 0.0, shape="cosine")(2, 11) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    half = Decay(1e-2, 1e-3, shape="linear", over=0.5)
    assert half(5, 11) == pytest.approx(1e-3) and half(8, 11) == pytest.approx(1e-3)
    for kwargs, message in ((dict(start=0.0, end=1e-3), "start must be a finite number > 0"),
                            (dict(start=1e-2, end=-1.0, shape="linear"), "end must be"),
                            (dict(start=1e-2, end=1e-3, shape="step"), "shape must be one of"),
                            (dict(start=1e-2, end=1e-3, over=1.5), "over must be")):
        with pytest.raises(ValueError, match=message):
            Decay(**kwargs)


def test_loss_weight_schedule_sets_the_coefficients_the_loss_uses():
    model = small_model(aux_coef=0.0, z_coef=0.0)
    decay = Decay(1e-1, 1e-3)
    cap = Capture()
    h = run(model, steps=4, hooks=[LossWeightSchedule(z=decay, aux=0.05), cap])
    assert h.extra["z_coef"] == pytest.approx([decay(s, 4) for s in range(4)])
    assert h.extra["aux_coef"] == [0.05] * 4
    for s, outputs in enumerate(cap.outputs):
        for out in outputs:  # the loss that was backpropagated, recomputed from its terms
            expected = out.ce + decay(s, 4) * out.z + 0.05 * out.aux
            torch.testing.assert_close(out.total, expected)
    assert model.loss_weights["z"] == pytest.approx(decay(3, 4))
    with pytest.raises(ValueError, match="terms must be among"):
        run(small_model(), steps=1, hooks=[LossWeightSchedule(zloss=1e-3)])
    with pytest.raises(ValueError, match="at least one term"):
        LossWeightSchedule()
    with pytest.raises(ValueError, match="z must be a finite number >= 0"):
        LossWeightSchedule(z=-1.0)


def test_router_monitor_logs_lse_max_logit_grad_norm_and_flips():
    model = small_model()
    cap = Capture()
    h = run(model, steps=2, grad_clip=0.0, hooks=[RouterMonitor(torch.bfloat16), cap])
    for s, outputs in enumerate(cap.outputs):
        logits = [info.logits.detach().double() for info in outputs[0].infos]
        lse = torch.tensor([float(z.exp().sum(-1).log().mean()) for z in logits])
        torch.testing.assert_close(h.extra["router_lse"][s].double(), lse.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h.extra["router_max_logit"][s].double(), torch.stack([z.abs().max() for z in logits]))
        assert h.extra["grad_norm"][s] == pytest.approx(math.sqrt(sum(float((g**2).sum()) for g in cap.grads[s])),
                                                        rel=1e-5)
        assert h.extra["router_flips"][s].shape == (2,)
    # flips: the bf16 router on the same inputs, read from a second forward pass after training
    monitor = RouterMonitor(torch.bfloat16)
    h = run(model, steps=1, lr=0.0, hooks=[monitor])
    assert all(0.0 <= float(f) <= 1.0 for f in h.extra["router_flips"][0])
    assert not any(layer.ffn.router._forward_hooks for layer in model.blocks)  # removed at the end
    with pytest.raises(ValueError, match="flips_dtype"):
        RouterMonitor(torch.float64)


def test_router_monitor_flips_equal_the_low_precision_router():
    model = small_model()
    layer = model.blocks[0].ffn
    with torch.no_grad():
        layer.router.weight.mul_(30)
    inputs = []
    handle = layer.router.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().clone()))
    h = run(model, steps=1, lr=0.0, hooks=[RouterMonitor(torch.bfloat16)])
    handle.remove()
    x = inputs[0]  # the first micro-batch's router input
    ref = x @ layer.router.weight.detach().T
    low = (x.bfloat16() @ layer.router.weight.detach().bfloat16().T)
    assert float(h.extra["router_flips"][0][0]) == pytest.approx(topk_flips(ref, low, 2))


def test_first_nonfinite_names_the_first_bad_quantity():
    ok, nan, inf = torch.tensor(1.0), torch.tensor(math.nan), torch.tensor(-math.inf)
    logits = [torch.randn(4, 3), torch.randn(4, 3)]
    assert first_nonfinite(logits, ok, ok) is None
    assert first_nonfinite([], ok, None) is None
    bad = logits[1].clone()
    bad[2, 1] = math.inf
    assert first_nonfinite([logits[0], bad], nan, inf) == "router logits"  # computed first, closest to the cause
    assert first_nonfinite(logits, nan, inf) == "loss"
    assert first_nonfinite(logits, torch.tensor([1.0, math.nan]), None) == "loss"  # any micro-batch
    assert first_nonfinite(logits, ok, inf) == "gradient norm"


def poison_router(state):
    if state.step == 2:
        with torch.no_grad():
            state.model.blocks[1].ffn.router.weight[0, 0] = math.nan


def test_nan_guard_stops_on_router_logits_and_saves_a_checkpoint(tmp_path):
    model = small_model()
    path = tmp_path / "nan.pt"
    cap = Capture(at_step_start=poison_router)
    with pytest.raises(NonFiniteError, match=r"non-finite router logits at step 2: .*'blocks\.1\.ffn'") as err:
        run(model, steps=5, hooks=[cap, NaNGuard("checkpoint", path)])
    assert (err.value.step, err.value.quantity, err.value.checkpoint) == (2, "router logits", str(path))
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 2 and saved["quantity"] == "router logits"
    for name, value in cap.weights[2].items():  # the weights the failing step started from (poison included)
        torch.testing.assert_close(saved["model"][name], value, equal_nan=True)
    assert set(saved["optimizer"]) == {"state", "param_groups"}
    assert not any(layer.ffn.router._forward_hooks for layer in model.blocks)  # released


def test_nan_guard_stops_on_the_loss_before_the_update(tmp_path):
    def poison_norm(state):
        if state.step == 1:
            with torch.no_grad():
                state.model.norm.weight[0] = math.nan  # after the last MoE layer: routers stay finite

    model = small_model()
    cap = Capture(at_step_start=poison_norm)
    with pytest.raises(NonFiniteError, match="non-finite loss at step 1") as err:
        run(model, steps=3, hooks=[cap, NaNGuard("checkpoint", tmp_path / "loss.pt")])
    assert err.value.quantity == "loss"
    for name, p in model.named_parameters():  # no optimizer step was taken with the NaN gradients
        torch.testing.assert_close(p.detach(), cap.weights[1][name], equal_nan=True)


def test_nan_guard_stops_on_the_gradient_norm(tmp_path):
    def poison_grad(state):
        if state.step == 1:
            state.model.lm_head.weight.grad[0, 0] = math.inf

    with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 1: the gradient norm is inf") as err:
        run(small_model(), steps=3, grad_clip=0.0, hooks=[Capture(before_step=poison_grad), NaNGuard()])
    assert err.value.quantity == "gradient norm" and err.value.checkpoint is None
    assert not list(tmp_path.iterdir())


def test_nan_guard_reports_the_non_finite_value_even_when_saving_fails(tmp_path):
    """Issue 23: a checkpoint path in a missing folder replaced the NonFiniteError by torch.save's "Parent directory
    does not exist". The folder is checked when the guard is built; if saving fails anyway (here: the path is a
    folder), the NonFiniteError still comes, saying so, with the save error as its cause."""
    with pytest.raises(ValueError, match="path"):
        NaNGuard("checkpoint", tmp_path / "missing" / "nan.pt")
    with pytest.raises(TypeError, match="path"):
        NaNGuard("checkpoint", 123)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(NonFiniteError, match="non-finite router logits at step 2: .*saving the checkpoint to .* failed") as err:
        run(small_model(), steps=4, hooks=[Capture(at_step_start=poison_router), NaNGuard("checkpoint", folder)])
    assert err.value.checkpoint is None and err.value.__cause__ is not None  # torch.save: a RuntimeError here


def test_nan_guard_is_silent_on_a_healthy_run_and_validates():
    h = run(small_model(), steps=2, hooks=[NaNGuard()])
    assert len(h.loss) == 2
    with pytest.raises(ValueError, match="policy must be one of"):
        NaNGuard("skip")
    with pytest.raises(ValueError, match="path is required"):
        NaNGuard("checkpoint")
    with pytest.raises(ValueError, match="path is required"):
        NaNGuard("stop", "x.pt")


@pytest.mark.cuda
def test_nan_guard_on_cuda_checks_router_logits_with_the_loss():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = small_model().cuda()
    with pytest.raises(NonFiniteError, match="router logits at step 2") as err:
        run(model, steps=4, hooks=[Capture(at_step_start=poison_router), NaNGuard()])
    assert err.value.quantity == "router logits"
