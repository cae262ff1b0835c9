"""Shared plumbing for every figure dashboard: controls, a PNG plot, a text line, the last data drawn."""
from __future__ import annotations

import base64
import io

import ipywidgets as widgets
from matplotlib.figure import Figure


def png_bytes(fig: Figure, dpi: int = 80) -> bytes:
    """Render a matplotlib figure (not attached to pyplot) to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


class FigureDashboard(widgets.VBox):
    """A VBox of control rows, a text line and a plot. Subclasses implement ``update``.

    ``controls``: name -> ipywidget; ``last``: the data drawn last; ``png``: that drawing as PNG bytes. The
    display bundle also offers the first render as static HTML (the text line above the figure) and PNG, which
    JupyterLab shows where it does not run the widget (an untrusted notebook) and GitHub shows.
    """

    def __init__(self, controls: dict[str, widgets.Widget], rows: list[list[str]]):
        self.controls = controls
        self.plot, self.text = widgets.Output(), widgets.HTML()
        self.last = None
        self.png = b""
        super().__init__([widgets.HBox([controls[name] for name in row]) for row in rows] + [self.text, self.plot])

    def redraw_on_change(self) -> None:
        """Call ``update`` now and whenever a control's value changes (dashboards that redraw from scratch)."""
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self.update()

    def show_figure(self, fig: Figure, text: str) -> None:
        """Replace the plot with ``fig`` and the text line with ``text`` (HTML)."""
        self.png = png_bytes(fig)
        self.text.value = text
        self.plot.outputs = ({
            "output_type": "display_data",
            "data": {"image/png": base64.b64encode(self.png).decode("ascii"), "text/plain": "<figure>"},
            "metadata": {},
        },)

    def _repr_mimebundle_(self, **kwargs) -> dict:
        bundle = super()._repr_mimebundle_(**kwargs)
        png = base64.b64encode(self.png).decode("ascii")
        bundle["image/png"] = png
        bundle["text/html"] = f'<div>{self.text.value}</div><img src="data:image/png;base64,{png}" alt="figure"/>'
        return bundle
