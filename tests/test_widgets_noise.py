"""Noise dashboard (notebook 03): compute function against direct computation, widget headlessly."""
import math

import pytest
import torch

from moe_lab.widgets import noise_dashboard, noise_snapshot


def _clean():
    return torch.randn(400, 6, generator=torch.Generator().manual_seed(0)) + torch.linspace(2, 0, 6)


def test_zero_noise_is_the_deterministic_choice():
    clean = _clean()
    snap = noise_snapshot(clean, 0.7, k=2, scale=0.0)
    top = clean.topk(2, dim=-1).indices
    assert snap.changed == 0.0
    assert snap.load.tolist() == torch.bincount(top.reshape(-1), minlength=6).tolist()


def test_snapshot_matches_direct_computation():
    clean = _clean()
    snap = noise_snapshot(clean, 0.5, k=1, scale=2.0, seed=4)
    noisy = clean + 2.0 * 0.5 * torch.randn(400, 6, generator=torch.Generator().manual_seed(4))
    choice = noisy.argmax(-1)
    assert snap.load.tolist() == torch.bincount(choice, minlength=6).tolist()
    assert snap.changed == pytest.approx(float((choice != clean.argmax(-1)).float().mean()))
    p = noisy.softmax(-1)
    assert snap.token_entropy == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    share = snap.load.float() / 400
    assert snap.load_entropy == pytest.approx(float(-(share * share.log()).sum()), rel=1e-5)


def test_more_noise_spreads_the_load():
    clean = _clean()
    snaps = [noise_snapshot(clean, math.log(2), 1, s) for s in (0.0, 1.0, 3.0)]
    assert snaps[0].max_over_mean > snaps[1].max_over_mean > snaps[2].max_over_mean
    assert snaps[0].load_entropy < snaps[1].load_entropy < snaps[2].load_entropy
    assert snaps[0].changed < snaps[1].changed < snaps[2].changed


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        noise_snapshot(_clean(), 1.0, 1, -1.0)
    with pytest.raises(ValueError, match="k"):
        noise_dashboard(_clean(), k=7)


def test_dashboard_headless():
    dash = noise_dashboard(_clean(), k=1, scale=0.0)
    assert set(dash.controls) == {"scale", "k"} and dash.last.changed == 0.0
    assert dash.png.startswith(b"\x89PNG") and "image/png" in dash._repr_mimebundle_()
    dash.controls["scale"].value = 3.0
    assert dash.last.scale == 3.0 and dash.last.changed > 0
    dash.controls["k"].value = 2
    assert int(dash.last.load.sum()) == 800
