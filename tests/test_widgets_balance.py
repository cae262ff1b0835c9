"""Live training dashboard (notebook 04), driven headlessly through its controls."""
import pytest

from moe_lab.balancing import BalanceConfig, BalanceExperiment
from moe_lab.widgets import balance_dashboard


def test_first_render_shows_trained_steps():
    dash = balance_dashboard(BalanceConfig(tokens=64), initial_steps=5)
    assert set(dash.controls) == {"play", "reset", "alpha", "noise"}
    assert dash.last["step"] == 5 and sum(dash.last["load"]) == 64
    assert dash.png.startswith(b"\x89PNG") and "MaxVio" in dash.text.value
    reference = BalanceExperiment(BalanceConfig(tokens=64))
    reference.step(5)
    assert dash.last["task_loss"] == reference.history.task_loss[-1]  # same seed, same run


def test_play_alpha_noise_and_reset():
    dash = balance_dashboard(BalanceConfig(tokens=64), steps_per_tick=2, initial_steps=0)
    assert dash.last["step"] == 0 and dash.last["load"] is None
    dash.controls["play"].value = 3  # three ticks of the play button
    assert dash.last["step"] == 6
    dash.controls["alpha"].value = 0.1
    dash.controls["noise"].value = 0.2
    assert dash.experiment.config.alpha == 0.1 and dash.experiment.layer.jitter_eps == 0.2
    dash.controls["play"].value = 4
    assert dash.last["step"] == 8 and dash.last["alpha"] == 0.1 and dash.last["noise"] == 0.2
    dash.controls["reset"].click()
    assert dash.last["step"] == 0 and dash.controls["play"].value == 0
    assert dash.experiment.config.alpha == 0.1  # the fresh run keeps the chosen settings


def test_alpha_must_be_on_the_slider():
    with pytest.raises(ValueError, match="alpha"):
        balance_dashboard(BalanceConfig(alpha=0.05))
