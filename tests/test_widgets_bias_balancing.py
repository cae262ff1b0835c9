"""Bias-balancing dashboard (notebook 12), driven headlessly through its controls against the simulation."""
import base64

import pytest
import torch

from moe_lab.bias_balancing import simulate_bias_balancing
from moe_lab.losses import bias_update
from moe_lab.widgets import bias_balancing_dashboard

SIZES = dict(num_experts=8, k=2, tokens=128, steps=30)


def expected(step, rate, centered=False, skew=1.0):
    trace = simulate_bias_balancing(rate=rate, centered=centered, skew=skew, seed=0, **SIZES)
    return trace.load[step].tolist(), trace.bias[step], float(trace.max_violation[step])


def test_first_render_shows_the_last_step_as_a_static_png():
    dash = bias_balancing_dashboard(1e-2, **SIZES)
    assert set(dash.controls) == {"play", "step", "reset", "rate", "centered", "skew"}
    load, bias, vio = expected(29, 1e-2)
    assert dash.last["step"] == 29 and dash.last["load"] == load and dash.last["max_violation"] == pytest.approx(vio)
    torch.testing.assert_close(torch.tensor(dash.last["bias"]), bias)
    assert dash.last["control_max_violation"] == pytest.approx(expected(29, 0.0)[2])
    assert dash.png.startswith(b"\x89PNG") and "MaxVio" in dash.text.value
    assert base64.b64decode(dash._repr_mimebundle_()["image/png"]) == dash.png


def test_reset_step_play_and_settings():
    dash = bias_balancing_dashboard(1e-2, **SIZES)
    dash.controls["reset"].click()
    assert dash.last["step"] == 0 and dash.last["bias"] == [0.0] * 8  # no update before the first step
    dash.controls["step"].click()
    dash.controls["step"].click()
    load, bias, _ = expected(2, 1e-2)
    assert dash.last["step"] == 2 and dash.last["load"] == load
    # the bias shown at step 2 is the update rule applied to the loads of steps 0 and 1
    by_hand = bias_update(bias_update(torch.zeros(8), torch.tensor(expected(0, 1e-2)[0]), 1e-2),
                          torch.tensor(expected(1, 1e-2)[0]), 1e-2)
    torch.testing.assert_close(torch.tensor(dash.last["bias"]), by_hand)
    dash.controls["play"].value = 10
    dash.controls["rate"].value = 1e-1  # recomputes the run with the new gamma, same step
    assert dash.last["step"] == 10 and dash.last["rate"] == 1e-1 and dash.last["load"] == expected(10, 1e-1)[0]
    dash.controls["centered"].value = True
    assert abs(sum(dash.last["bias"])) < 1e-5  # mean-centred: the biases keep summing to 0
    dash.controls["skew"].value = 2.0
    assert dash.last["load"] == expected(10, 1e-1, centered=True, skew=2.0)[0]
    dash.controls["play"].value = 29
    dash.controls["step"].click()  # stays on the last step
    assert dash.last["step"] == 29


def test_gamma_zero_is_its_own_control():
    dash = bias_balancing_dashboard(0.0, **SIZES)
    assert dash.last["max_violation"] == dash.last["control_max_violation"]
    assert dash.last["bias"] == [0.0] * 8


@pytest.mark.parametrize("kwargs, name", [({"rate": 0.05}, "rate"), ({"steps": 0}, "steps"),
                                          ({"initial_step": 30}, "initial_step"), ({"k": 9}, "k")])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        bias_balancing_dashboard(**{**SIZES, **kwargs})
