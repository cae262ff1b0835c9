"""CUDA: fused grouped GEMM vs fallback, bf16 autocast, determinism, no host syncs, NCCL expert parallelism.

Skipped without a GPU (CI); the dispatch and layer tests also run on CUDA through the ``device`` fixture.
"""
import pytest
import torch

from moe_lab import MoELayer
from moe_lab.bench import IMPLEMENTATIONS, BenchConfig, run_benchmark
from moe_lab.experts import Experts, fused_grouped_mm_usable, grouped_mm, grouped_mm_kernel

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def _reference(x, w, counts):
    """Per-group matmuls in float32: ``x_e @ w[e]`` on each consecutive row group."""
    ends = counts.cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x[s:e].float() @ w[i].float() for i, (s, e) in enumerate(zip(starts, ends))])


def test_fused_usable_rules():
    x = torch.zeros(4, 64, device=CUDA, dtype=torch.bfloat16)
    assert fused_grouped_mm_usable(x, torch.zeros(2, 64, 32, device=CUDA, dtype=torch.bfloat16)) == SM90
    assert not fused_grouped_mm_usable(x.float(), torch.zeros(2, 64, 32, device=CUDA))  # fp32: fallback
    assert not fused_grouped_mm_usable(x[:, :36], torch.zeros(2, 36, 33, device=CUDA, dtype=torch.bfloat16))
    w = torch.zeros(2, 64, 32, device=CUDA, dtype=torch.bfloat16)
    assert grouped_mm_kernel(x, w).startswith("torch.nn.functional.grouped_mm") == SM90
    assert grouped_mm_kernel(x, w, fused=False) == "per-expert matmuls on contiguous slices"


@pytest.mark.skipif(not SM90, reason="fused grouped GEMM needs sm90+")
def test_fused_and_fallback_agree_forward_and_backward():
    counts = torch.tensor([37, 0, 128, 5, 0, 90, 1, 195], device=CUDA)
    x = torch.randn(int(counts.sum()), 64, device=CUDA, dtype=torch.bfloat16)
    w = torch.randn(8, 64, 48, device=CUDA, dtype=torch.bfloat16) / 8
    g = torch.randn(x.shape[0], 48, device=CUDA, dtype=torch.bfloat16)
    results = {}
    for fused in (True, False):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = grouped_mm(xi, wi, counts, fused=fused)
        y.backward(g)
        results[fused] = (y, xi.grad, wi.grad)
    ref = _reference(x, w, counts)
    torch.testing.assert_close(results[True][0].float(), ref, rtol=1e-2, atol=1e-2)
    for a, b in zip(results[True], results[False]):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=2e-2)
    assert (results[True][2][[1, 4]] == 0).all()  # empty experts get zero weight gradient


@pytest.mark.skipif(not SM90, reason="fused grouped GEMM needs sm90+")
def test_grouped_experts_fused_and_per_expert_agree_with_gate_scale():
    """Both expert paths of ``forward_grouped`` with the gate folded in: outputs and every gradient."""
    counts = torch.tensor([37, 0, 128, 5, 0, 90, 1, 195], device=CUDA)
    ffns = Experts(8, 64, 96).to(CUDA, torch.bfloat16)
    x = torch.randn(int(counts.sum()), 64, device=CUDA, dtype=torch.bfloat16)
    scale = torch.rand(x.shape[0], device=CUDA)
    g = torch.randn(x.shape, device=CUDA, dtype=torch.bfloat16)
    results = {}
    for fused in (True, False):
        xi, si = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        ffns.zero_grad(set_to_none=True)
        y = ffns.forward_grouped(xi, counts, fused=fused, scale=si)
        y.backward(g)
        results[fused] = [y, xi.grad, si.grad, ffns.w1.grad, ffns.w3.grad, ffns.w2.grad]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(not SM90, reason="fused grouped GEMM needs sm90+")
def test_fused_grouped_experts_do_not_sync():
    ffns = Experts(8, 64, 96).to(CUDA, torch.bfloat16)
    counts = torch.tensor([10, 0, 30, 2, 0, 50, 4, 32], device=CUDA)
    x = torch.randn(128, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ffns.forward_grouped(x, counts).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not SM90, reason="fused grouped GEMM needs sm90+")
def test_sorted_dispatch_does_not_sync():
    """Dropless fast path: sort, count, gather, grouped GEMMs, combine, backward: no host-device sync."""
    from moe_lab.dispatch import dispatch_sorted

    ffns = Experts(8, 64, 96).to(CUDA, torch.bfloat16)
    x = torch.randn(256, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    experts = torch.randint(0, 8, (256, 2), device=CUDA)
    gates = torch.rand(256, 2, device=CUDA, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dispatch_sorted(x, experts, gates, ffns).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not SM90, reason="fused grouped GEMM needs sm90+")
def test_layer_forward_and_backward_do_not_sync():
    """A dropless MoELayer step never waits for the GPU: routing, checks, dispatch, statistics, losses."""
    layer = MoELayer(64, 96, 8, 2).to(CUDA)
    layer.experts.to(torch.bfloat16)
    x = torch.randn(256, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    layer(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, info = layer(x)
        (y.float().square().mean() + info.aux_loss + info.z_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_non_finite_logits_raise_on_cuda_in_debug_mode():
    layer = MoELayer(64, 96, 8, 2).to(CUDA)
    x = torch.randn(16, 64, device=CUDA)
    x[3, 5] = float("nan")
    layer(x)  # no check (it would sync): the NaN flows into the output
    with torch.autograd.set_detect_anomaly(True), pytest.raises(ValueError, match="non-finite"):
        layer(x)


def test_autocast_bf16_keeps_router_fp32():
    layer = MoELayer(64, 96, 8, 2).to(CUDA)
    x = torch.randn(4, 32, 64, device=CUDA)
    y_ref, _ = layer(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, info = layer(x)
    assert info.logits.dtype == info.probs.dtype == info.gates.dtype == torch.float32
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y.float(), y_ref, rtol=5e-2, atol=5e-2)
    y.float().square().sum().backward()
    assert layer.router.weight.grad.dtype == layer.experts.w1.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sorted_path_is_deterministic(dtype):
    """Forward and every gradient bit-identical across runs (no atomics in the default path), k = 6."""
    torch.manual_seed(0)
    layer = MoELayer(128, 96, 16, 6).to(CUDA)
    layer.experts.to(dtype)
    x = torch.randn(2048, 128, device=CUDA, dtype=dtype)
    runs = []
    for _ in range(3):
        xi = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y, _ = layer(xi)
        y.float().square().sum().backward()
        runs.append([y, xi.grad] + [p.grad for p in layer.parameters()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_dispatch_paths_agree_on_cuda_bf16():
    torch.manual_seed(0)
    layers = {d: MoELayer(64, 96, 8, 3, dispatch=d).to(CUDA) for d in ("loop", "sorted", "onehot")}
    for layer in layers.values():
        layer.load_state_dict(layers["loop"].state_dict())
        layer.experts.to(torch.bfloat16)
    x = torch.randn(512, 64, device=CUDA, dtype=torch.bfloat16)
    out = {d: layer(x)[0].float() for d, layer in layers.items()}
    torch.testing.assert_close(out["sorted"], out["loop"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out["onehot"], out["loop"], rtol=2e-2, atol=2e-2)


def test_benchmark_runs_on_cuda():
    cfg = BenchConfig(tokens=512, d_model=64, d_ff=96, experts=8, k=2, device="cuda", dtype="bf16",
                      warmup=1, repeats=2)
    rows = run_benchmark(cfg)
    assert [r.implementation for r in rows] == list(IMPLEMENTATIONS)
    assert all(r.fwd_bwd_ms > 0 and r.peak_mem_bytes > 0 for r in rows if not r.note)


def _nccl_equals_single_process() -> float:
    from moe_lab.parallel import ExpertParallelMoELayer

    torch.manual_seed(0)
    layer = MoELayer(64, 96, 8, 2, capacity_factor=1.0).to(CUDA)
    x = torch.randn(256, 64, device=CUDA)
    ep = ExpertParallelMoELayer.from_layer(layer)
    return float((ep(x)[0] - layer(x)[0]).abs().max())


def test_expert_parallel_over_nccl():
    from moe_lab.launch import run_local

    assert run_local(_nccl_equals_single_process, 1, backend="nccl") == [0.0]
