"""What every figure dashboard shows without a live kernel, and what its figure explains (legends, no repeats)."""
import base64
import math
import re

import pytest
import torch
from matplotlib.container import BarContainer

from moe_lab.balancing import BalanceConfig
from moe_lab.widgets import (
    _display, balance_dashboard, calculator_dashboard, capacity_dashboard, expert_load_dashboard, noise_dashboard,
)


def _routing():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 2], [0, 2], [0, 1]])
    return experts, torch.full(experts.shape, 0.5)


DASHBOARDS = {
    "expert_load": lambda: expert_load_dashboard(num_tokens=64),
    "noise": lambda: noise_dashboard(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), math.log(2)),
    "capacity": lambda: capacity_dashboard(*_routing(), num_experts=3, capacity_factor=0.75),
    "balance": lambda: balance_dashboard(BalanceConfig(tokens=64, seed=0), initial_steps=2),
    "calculator": lambda: calculator_dashboard(),
}


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the dashboards draw, in order."""
    drawn = []
    real = _display.png_bytes

    def capture(fig, dpi=80):
        drawn.append(fig)
        return real(fig, dpi)

    monkeypatch.setattr(_display, "png_bytes", capture)
    return drawn


@pytest.mark.parametrize("name", DASHBOARDS)
def test_static_bundle_shows_summary_and_figure(name):
    dash = DASHBOARDS[name]()
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == dash.png and dash.png.startswith(b"\x89PNG")
    html = bundle["text/html"]
    assert dash.text.value in html  # the summary line ...
    assert f'src="data:image/png;base64,{bundle["image/png"]}"' in html  # ... and the figure, in one static view


@pytest.mark.parametrize("name", DASHBOARDS)
def test_figure_does_not_repeat_the_summary_line(name, figures):
    dash = DASHBOARDS[name]()
    fig = figures[-1]
    figure_text = " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
    summary = re.sub(r"<[^>]+>", " ", dash.text.value)
    for item in (part.strip() for part in re.split(r"\|", summary)):
        if re.search(r"\d", item):  # every number of the summary line appears once: above the figure
            assert item not in figure_text, f"{name}: {item!r} is printed in the text line and in the figure"


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_bar_colour_has_a_legend_entry(name, figures):
    DASHBOARDS[name]()
    for ax in figures[-1].axes:
        colours = {tuple(patch.get_facecolor()) for c in ax.containers if isinstance(c, BarContainer)
                   for patch in c if patch.get_height() > 0}
        if len(colours) < 2:
            continue  # a single colour needs no key
        legend = ax.get_legend()
        assert legend is not None, f"{name}: bars in {len(colours)} colours without a legend"
        keyed = {tuple(handle.get_facecolor()) for handle in legend.get_patches()}
        assert colours <= keyed, f"{name}: some bar colours have no legend entry"


def test_expert_load_legend_names_the_red_bars(figures):
    dash = expert_load_dashboard(distribution="dominant", num_tokens=256)
    assert dash.last.tokens_per_expert.max() > 1.5 * dash.last.ideal_load  # red bars are drawn
    labels = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert "load > 1.5x ideal" in labels and any(label.startswith("ideal") for label in labels)
