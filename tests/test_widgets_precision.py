"""Router-precision dashboard (notebook 10): compute function against direct computation, widget headlessly."""
import pytest
import torch

from moe_lab.widgets import precision_dashboard, precision_snapshot


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(300, 16, generator=gen), torch.randn(8, 16, generator=gen)


def test_snapshot_matches_direct_computation():
    x, w = _inputs()
    snap = precision_snapshot(x, w, k=2, dtype="float16", scale=3.0, offset=40.0, token=5)
    ref = (x @ (3 * w).T).double() + 40
    low = (x.half() @ (3 * w).half().T + torch.tensor(40.0, dtype=torch.float16)).double()
    changed = (ref.topk(2).indices.sort(-1).values != low.topk(2).indices.sort(-1).values).any(-1)
    assert snap.stats.flip_rate == pytest.approx(float(changed.double().mean()))
    torch.testing.assert_close(snap.probs_fp32.double(), ref[5].softmax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(snap.probs_low.double(), low[5].softmax(-1), rtol=2e-3, atol=1e-3)
    assert snap.stats.max_abs_logit == pytest.approx(float(ref.abs().max()), rel=1e-6)


def test_an_offset_flips_more_decisions_than_a_scale():
    x, w = _inputs()
    base = precision_snapshot(x, w).stats.flip_rate
    assert precision_snapshot(x, w, scale=30.0).stats.flip_rate < base + 0.02
    assert precision_snapshot(x, w, offset=1024.0).stats.flip_rate > 0.5


def test_bad_arguments():
    x, w = _inputs()
    for kwargs, message in ((dict(dtype="float32"), "dtype must be one of"), (dict(scale=0.0), "scale"),
                            (dict(offset=float("nan")), "offset"), (dict(token=300), "token"), (dict(k=9), "k must")):
        with pytest.raises(ValueError, match=message):
            precision_snapshot(x, w, **kwargs)


def test_dashboard_headless():
    x, w = _inputs()
    dash = precision_dashboard(x, w, 2)
    assert set(dash.controls) == {"dtype", "scale", "offset", "token"}
    assert dash.png.startswith(b"\x89PNG") and "image/png" in dash._repr_mimebundle_()
    start = dash.last.stats.flip_rate
    dash.controls["offset"].value = 1024.0
    assert dash.last.offset == 1024.0 and dash.last.stats.flip_rate > start
    dash.controls["dtype"].value = "float16"
    assert dash.last.dtype == "float16" and dash.last.stats.flip_rate < 0.5  # 10 mantissa bits: spacing 1 at 1024
    dash.controls["token"].value = 7
    assert dash.last.token == 7 and float(dash.last.probs_fp32.sum()) == pytest.approx(1.0)
