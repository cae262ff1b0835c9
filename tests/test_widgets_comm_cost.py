"""Communication-cost dashboard (notebook 08): the sweep against the alpha-beta formula by hand, widget headlessly."""
import numpy as np
import pytest

from moe_lab.widgets import comm_cost_dashboard, comm_cost_sweep


def test_sweep_matches_the_formula_by_hand():
    # 4096 tokens x top-2 x d=1024 x 2 bytes = 16 MiB per all-to-all; 8 ranks, 10 us, 100 GB/s
    s = comm_cost_sweep(10.0, 4096, 2, 1024, 2, 8, 10.0, 100.0, bandwidths_gbps=[1.0, 100.0])
    n = 4096 * 2 * 1024 * 2
    assert s.bytes_per_all_to_all == n == 16 * 2**20
    one = 7 * 10e-6 + 7 / 8 * n / 100e9
    assert s.estimate.comm_s == pytest.approx(4 * one)
    assert s.total_ms[1] == pytest.approx(10.0 + 4e3 * one)
    assert s.comm_share[0] > s.comm_share[1]  # slower link, larger share


def test_share_falls_as_bandwidth_grows():
    s = comm_cost_sweep(15.0, 16384, 6, 2048, 2, 8, 10.0, 153.0)
    assert np.all(np.diff(s.total_ms) < 0) and np.all(np.diff(s.comm_share) < 0)
    assert s.total_ms.min() > 15.0


def test_dashboard_headless():
    dash = comm_cost_dashboard()
    assert set(dash.controls) == {"bandwidth_gbps", "latency_us", "world_size", "tokens", "k", "d_model", "dtype",
                                  "compute_ms"}
    assert dash.png.startswith(b"\x89PNG") and "per step" in dash.text.value
    share = dash.last.estimate.comm_share
    dash.controls["bandwidth_gbps"].value = 12.5
    assert dash.last.bandwidth_gbps == pytest.approx(12.5, rel=0.01) and dash.last.estimate.comm_share > share
    dash.controls["dtype"].value = "fp8"
    assert dash.last.bytes_per_all_to_all == 16384 * 6 * 2048
    dash.controls["world_size"].value = 2
    assert dash.last.world_size == 2
    with pytest.raises(ValueError, match="dtype"):
        comm_cost_dashboard(dtype="int4")
