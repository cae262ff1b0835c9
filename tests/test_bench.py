"""The benchmark harness: rows, JSON output, FLOP-matched dense baseline, memory measurement, skipping, the
Hugging Face rows (same weights, same outputs), the sweep and the GPU suite's command line. No timings asserted."""
import json

import pytest
import torch

from moe_lab import MoELayer
from moe_lab.bench import (IMPLEMENTATIONS, BenchConfig, build, expert_flops, format_table, main, onehot_bytes,
                           peak_memory, run_benchmark)
from moe_lab.bench import hf, sweep

TINY = BenchConfig(tokens=64, d_model=16, d_ff=24, experts=4, k=2, warmup=0, repeats=1)
FIELDS = {"implementation", "device", "dtype", "tokens", "d_model", "d_ff", "experts", "k",
          "fwd_ms", "fwd_bwd_ms", "tokens_per_s", "tflops", "peak_mem_bytes", "note"}


def test_dense_row_has_the_active_flops_of_the_moe():
    dense, moe = build("dense", TINY), build("sorted", TINY)
    # per token the dense FFN multiplies by as many weights as k experts: equal parameter counts
    per_expert = sum(p[0].numel() for p in moe.experts.parameters())
    assert sum(p.numel() for p in dense.parameters()) == TINY.k * per_expert
    assert moe.router.weight.dtype == torch.float32


def test_rows_and_json(capsys):
    main(["--quick", "--json", "--device", "cpu"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["implementation"] for r in rows] == list(IMPLEMENTATIONS)
    for r in rows:
        assert FIELDS == set(r)
        assert (r["device"], r["dtype"], r["tokens"], r["experts"]) == ("cpu", "fp32", 256, 8)
        if r["note"]:  # a Hugging Face row this transformers lacks
            assert r["implementation"].startswith("hf_") and r["note"].startswith("skipped")
            continue
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_mem_bytes"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["fwd_bwd_ms"] / 1e3), rel=1e-3)
        assert r["tflops"] == pytest.approx(3 * 2 * 256 * 2 * 3 * 32 * 64 / (r["fwd_bwd_ms"] / 1e3) / 1e12, rel=1e-2)


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


def test_expert_flops_counts_three_gemms_per_matrix():
    assert expert_flops(TINY) == 3 * 2 * 64 * 2 * 3 * 16 * 24
    assert expert_flops(BenchConfig(**{**TINY.__dict__, "activation": "gelu"})) == 3 * 2 * 64 * 2 * 2 * 16 * 24


@pytest.mark.parametrize("implementation", hf.EXPERTS_IMPLEMENTATIONS)
def test_hf_block_has_the_layers_weights_and_outputs(implementation):
    pytest.importorskip("transformers")
    if implementation not in hf.experts_implementations():
        pytest.skip(f"this transformers has no {implementation!r} experts")
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 6, 2)
    block = hf.mixtral_block(layer, implementation)
    x = torch.randn(40, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_hf = layer(x1)[0], block(x2)
    torch.testing.assert_close(y_hf, y, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    (y_hf * weights).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)


def test_hf_rows_use_the_sorted_rows_weights():
    pytest.importorskip("transformers")
    layer, block = build("sorted", TINY), build("hf_eager", TINY)
    x = torch.randn(TINY.tokens, TINY.d_model)
    torch.testing.assert_close(block(x), layer(x)[0], rtol=1e-5, atol=1e-5)


def test_hf_rows_skipped_with_the_reason_without_transformers(monkeypatch):
    monkeypatch.setattr(hf, "_transformers", lambda: None)
    assert hf.experts_implementations() == ()
    rows = run_benchmark(TINY, ("dense", "hf_eager", "hf_grouped_mm"))
    assert rows[0].fwd_ms is not None
    for r in rows[1:]:
        assert r.fwd_ms is None and r.note.startswith("skipped: transformers is not installed")
    table = format_table(rows)
    assert "transformers is not installed" in table and "HF/x" in table


def test_hf_rows_explain_what_they_cannot_run():
    pytest.importorskip("transformers")
    assert "SwiGLU experts only" in hf.unavailable("eager", "gelu")
    with pytest.raises(ValueError, match="experts_implementation must be one of"):
        hf.unavailable("fast")
    with pytest.raises(ValueError, match="dropless"):
        hf.mixtral_block(MoELayer(16, 24, 4, 2, capacity_factor=1.0))


def test_sweep_configs_vary_one_axis_at_a_time():
    points = sweep.sweep_configs(BenchConfig(experts=4, k=2), {"experts": (2, 4), "k": (1, 8)})
    assert [(axis, value) for axis, value, _ in points] == [("experts", 2), ("experts", 4), ("k", 1)]  # k=8 > 4
    assert [(c.experts, c.k, c.tokens) for _, _, c in points] == [(2, 2, 4096), (4, 2, 4096), (4, 1, 4096)]
    with pytest.raises(ValueError, match="sweep axes"):
        sweep.sweep_configs(TINY, {"d_model": (8,)})


def test_sweep_table_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "sub" / "sweep.png"
    plot.parent.mkdir()
    main(["--sweep", "--quick", "--device", "cpu", "--impl", "sorted", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "sorted ms" in out and "plot saved to" in out
    lines = out.splitlines()[3:11]
    assert [line.split()[0] for line in lines] == ["tokens"] * 2 + ["experts"] * 2 + ["k"] * 2 + ["granularity"] * 2
    assert [line.split()[2:5] for line in lines[-2:]] == [["16", "1", "64"], ["32", "2", "32"]]  # E, k, d_ff
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["--sweep", "--quick", "--device", "cpu", "--json", "--impl", "sorted", "loop"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert {r["implementation"] for r in rows} == {"dense", "sorted", "loop"} and len(rows) == 3 * 8
    assert all(len(r["load"]) == 2 and min(r["load"]) >= 0 for r in rows)


def test_granularity_axis_is_the_fine_grained_family_at_equal_active_flops():
    points = sweep.sweep_configs(BenchConfig(d_ff=512), {"granularity": (1, 2, 4, 8)})
    assert [(c.experts, c.k, c.d_ff) for _, _, c in points] == [(16, 1, 512), (32, 2, 256), (64, 4, 128), (128, 8, 64)]
    assert len({expert_flops(c) for _, _, c in points}) == 1  # the same active expert FLOPs at every m


def test_wait_for_load_waits_until_the_load_falls(monkeypatch):
    loads = iter([3.0, 2.5, 0.4, 0.4])
    monkeypatch.setattr(sweep.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    assert sweep.wait_for_load(0.5) == 0.4
    monkeypatch.setattr(sweep.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert sweep.wait_for_load(None) == 9.0  # no limit: no wait
    assert sweep.wait_for_load(0.5, timeout_s=0.0) == 9.0  # gives up at the timeout


def test_model_rows_time_a_train_step_of_moe_and_dense(capsys):
    from moe_lab.bench import model

    cfg = model.quick(model.MODEL_SIZES["capstone"])
    dense, moe = model.model_config("dense", cfg), model.model_config("moe", cfg)
    assert dense.d_ff == moe.k * moe.d_expert and not dense.num_experts  # equal active FFN width
    rows = model.run_model_benchmark(cfg)
    assert [r.row for r in rows] == list(model.MODEL_ROWS)
    assert all(r.train_ms > 0 and r.step_ms > 0 and r.bookkeeping < 1 for r in rows)
    assert "/dense" in model.format_model_table(rows) and "1.00x" in model.format_model_table(rows)
    main(["--model", "capstone", "--quick", "--json", "--clock", "cpu"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r["size"], r["row"]) for r in lines] == [("capstone", row) for row in model.MODEL_ROWS]
    with pytest.raises(ValueError, match="clock must be one of"):
        model.run_model_benchmark(model.replace(cfg, clock="gpu"))


def test_sweep_ratio_is_time_over_dense():
    rows = run_benchmark(TINY, ("dense", "sorted"))
    point = sweep.SweepPoint("tokens", 64, rows)
    assert point.ratio("sorted") == pytest.approx(rows[1].fwd_bwd_ms / rows[0].fwd_bwd_ms)
    assert point.ratio("loop") is None


def test_command_line_errors():
    with pytest.raises(ValueError, match="--plot needs --sweep"):
        main(["--quick", "--plot", "x.png"])
    with pytest.raises(ValueError, match="--gpu-suite needs --out"):
        main(["--gpu-suite"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_gpu_suite_needs_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["--gpu-suite", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_gpu_suite_report_end_to_end_on_cpu(tmp_path, monkeypatch, capsys):
    """The suite's report path at a tiny size on CPU (the tests step stubbed: it would run pytest in pytest)."""
    from moe_lab.bench import gpu

    monkeypatch.setattr(gpu, "run_tests", lambda root: (0, "13 passed"))
    from moe_lab.bench import model

    status = gpu.run_gpu_suite(tmp_path, BenchConfig(**{**TINY.__dict__, "repeats": 1}),
                               {"capstone": model.quick(model.MODEL_SIZES["capstone"])})
    assert status == 0
    report = (tmp_path / "gpu_report.md").read_text()
    assert "13 passed" in report and "TFLOP/s" in report and "Profile of `sorted`" in report
    data = json.loads((tmp_path / "gpu_report.json").read_text())
    assert data["tests_exit_status"] == 0 and data["gemm_tflops"] > 0
    assert [r["implementation"] for r in data["rows"]] == list(IMPLEMENTATIONS)
    assert [r["row"] for r in data["model_rows"]["capstone"]] == list(model.MODEL_ROWS)
    assert "Model-level rows" in report


def test_gpu_suite_finds_the_test_files():
    from pathlib import Path

    from moe_lab.bench import gpu

    root = Path(__file__).resolve().parents[1]
    assert all((root / f).exists() for f in gpu.TEST_FILES)
    assert "no tests found" in gpu.run_tests(root / "nowhere")[1]
