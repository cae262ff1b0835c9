"""The benchmark harness: rows, JSON output, FLOP-matched dense baseline, memory measurement, skipping."""
import json

import pytest
import torch

from moe_lab.bench import BenchConfig, build, format_table, main, onehot_bytes, peak_memory, run_benchmark

TINY = BenchConfig(tokens=64, d_model=16, d_ff=24, experts=4, k=2, warmup=0, repeats=1)
FIELDS = {"implementation", "device", "dtype", "tokens", "d_model", "d_ff", "experts", "k",
          "fwd_ms", "fwd_bwd_ms", "tokens_per_s", "peak_mem_bytes"}


def test_dense_row_has_the_active_flops_of_the_moe():
    dense, moe = build("dense", TINY), build("sorted", TINY)
    # per token the dense FFN multiplies by as many weights as k experts: equal parameter counts
    per_expert = sum(p[0].numel() for p in moe.experts.parameters())
    assert sum(p.numel() for p in dense.parameters()) == TINY.k * per_expert
    assert moe.router.weight.dtype == torch.float32


def test_rows_and_json(capsys):
    main(["--quick", "--json", "--device", "cpu"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["implementation"] for r in rows] == ["dense", "sorted", "loop", "onehot"]
    for r in rows:
        assert FIELDS <= set(r)
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_mem_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["fwd_bwd_ms"] / 1e3), rel=1e-3)
        assert (r["device"], r["dtype"], r["tokens"], r["experts"]) == ("cpu", "fp32", 256, 8)


def test_table(capsys):
    main(["--quick", "--impl", "dense", "sorted", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "fwd+bwd ms" in out and "dense" in out and "sorted" in out and "1.00x" in out


def test_onehot_skipped_when_too_big(monkeypatch):
    import moe_lab.dispatch

    def must_not_run(*args, **kwargs):
        raise AssertionError("the size guard ran the one-hot dispatch it exists to avoid")

    monkeypatch.setitem(moe_lab.dispatch.DISPATCH, "onehot", must_not_run)
    rows = run_benchmark(BenchConfig(**{**TINY.__dict__, "onehot_max_bytes": 1}), ("sorted", "onehot"))
    assert rows[0].fwd_ms is not None
    assert rows[1].fwd_ms is None and rows[1].note.startswith("skipped")
    assert "skipped" in format_table(rows)
    assert onehot_bytes(TINY, 40) == 6 * 64 * 4 * 40 * 4


def test_peak_memory_counts_a_known_allocation():
    def step():
        a = torch.ones(1_000_000)  # 4 MB live at the peak, together with b
        b = a * 2
        del a, b

    peak = peak_memory(step, torch.device("cpu"))
    assert 8_000_000 <= peak < 8_100_000


def test_bf16_row_keeps_router_fp32():
    cfg = BenchConfig(**{**TINY.__dict__, "dtype": "bf16"})
    layer = build("sorted", cfg)
    assert layer.experts.w1.dtype == torch.bfloat16 and layer.router.weight.dtype == torch.float32
    rows = run_benchmark(cfg, ("dense", "sorted"))
    assert all(r.dtype == "bf16" and r.fwd_bwd_ms > 0 for r in rows)


def test_bad_arguments():
    with pytest.raises(ValueError, match="implementation"):
        build("fast", TINY)
    with pytest.raises(ValueError, match="k must be"):
        main(["--k", "9", "--experts", "8"])
