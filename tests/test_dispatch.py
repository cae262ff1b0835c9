"""Every dispatch path equals a dense, obviously-correct computation, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from moe_lab.dispatch import DISPATCH, dispatch_sorted, sort_by_expert
from moe_lab.experts import Experts, grouped_mm


def dense_reference(x, experts, gates, ffns):
    """Run every expert on every token, then pick: y_t = sum_j gates[t,j] * E_{experts[t,j]}(x_t)."""
    x = x.float()
    w1, w2 = ffns.w1.float(), ffns.w2.float()
    h = torch.einsum("td,edf->etf", x, w1)
    if ffns.activation == "swiglu":
        h = F.silu(h) * torch.einsum("td,edf->etf", x, ffns.w3.float())
    else:
        h = F.gelu(h)
    all_out = torch.einsum("etf,efd->etd", h, w2)  # [E, T, d]
    picked = all_out[experts, torch.arange(x.shape[0])[:, None]]  # [T, k, d]
    return (picked * gates.float()[..., None]).sum(1)


def make_case(tokens, num_experts, k, activation="swiglu", dtype=torch.float32, device="cpu", empty=()):
    ffns = Experts(num_experts, 16, 24, activation).to(device=device, dtype=dtype)
    x = torch.randn(tokens, 16, device=device, dtype=dtype)
    scores = torch.rand(tokens, num_experts, device=device)
    scores[:, list(empty)] = -1  # these experts get no tokens
    experts = scores.topk(k, dim=-1).indices
    gates = torch.rand(tokens, k, device=device).softmax(-1)
    return x, experts, gates, ffns


def grads(fn, x, experts, gates, ffns):
    x = x.detach().requires_grad_(True)
    gates = gates.detach().requires_grad_(True)
    y = fn(x, experts, gates, ffns)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y)
    params = [p for p in (ffns.w1, ffns.w3, ffns.w2) if p is not None]
    return y, torch.autograd.grad((y.float() * weights.float()).sum(), [x, gates, *params])


CASES = [
    dict(tokens=50, num_experts=8, k=2),
    dict(tokens=33, num_experts=4, k=1, activation="gelu"),
    dict(tokens=20, num_experts=6, k=6),
    dict(tokens=1, num_experts=8, k=2),
    dict(tokens=40, num_experts=8, k=3, empty=(0, 5, 7)),
    dict(tokens=7, num_experts=1, k=1),
]


@pytest.mark.parametrize("impl", sorted(DISPATCH))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dispatch_matches_dense_reference_fp32(impl, case, device):
    x, experts, gates, ffns = make_case(**case, device=device)
    y_ref, g_ref = grads(dense_reference, x, experts, gates, ffns)
    y, g = grads(DISPATCH[impl], x, experts, gates, ffns)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["sorted", "onehot"])
@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dispatch_agrees_with_loop_bf16(impl, case, device):
    x, experts, gates, ffns = make_case(**case, dtype=torch.bfloat16, device=device)
    y_ref, g_ref = grads(DISPATCH["loop"], x, experts, gates, ffns)
    y, g = grads(DISPATCH[impl], x, experts, gates, ffns)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_fused_and_fallback_agree(dtype):
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 16, dtype=dtype)
    w = torch.randn(6, 16, 8, dtype=dtype)
    ref = torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip([0, *counts.cumsum(0)[:-1]], counts.cumsum(0)))])
    fallback = grouped_mm(x, w, counts, fused=False)
    torch.testing.assert_close(fallback, ref)
    if hasattr(F, "grouped_mm"):
        torch.testing.assert_close(grouped_mm(x, w, counts, fused=True), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_sorted_fused_and_fallback_agree_with_gradients():
    x, experts, gates, ffns = make_case(64, 8, 2)
    y1, g1 = grads(lambda *a: dispatch_sorted(*a, fused=False), x, experts, gates, ffns)
    y2, g2 = grads(lambda *a: dispatch_sorted(*a), x, experts, gates, ffns)
    torch.testing.assert_close(y1, y2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_sort_by_expert_is_stable_grouping():
    experts = torch.tensor([[2, 0], [0, 1], [2, 1]])
    order, counts = sort_by_expert(experts, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    assert (order // 2).tolist() == [0, 1, 1, 2, 0, 2]  # expert 0: tokens 0,1; expert 1: 1,2; expert 2: 0,2
    assert experts.reshape(-1)[order].tolist() == [0, 0, 1, 1, 2, 2]


def test_sorted_dispatch_is_deterministic():
    x, experts, gates, ffns = make_case(128, 8, 2)
    assert torch.equal(dispatch_sorted(x, experts, gates, ffns), dispatch_sorted(x, experts, gates, ffns))


@pytest.mark.parametrize("impl", sorted(DISPATCH))
@pytest.mark.parametrize("bad", [[[0, 1], [2, 9]], [[0, -1], [2, 3]]])
def test_out_of_range_expert_ids_rejected(impl, bad):
    x, _, gates, ffns = make_case(2, 4, 2)
    experts = torch.tensor(bad)
    for keep in (None, torch.ones(2, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="expert ids in 0..3"):
            DISPATCH[impl](x, experts, gates, ffns, keep)
    with pytest.raises(ValueError, match="shape \\[tokens, k\\]"):
        sort_by_expert(torch.tensor([0, 1]), 4)


def grouped_reference(x, counts, ffns, scale=None):
    """Per-expert obvious computation in float64: rows of expert e through its MLP, times the row's scale."""
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start:start + n].double()
        h = xe @ ffns.w1[e].double()
        h = F.silu(h) * (xe @ ffns.w3[e].double()) if ffns.activation == "swiglu" else F.gelu(h)
        out.append(h @ ffns.w2[e].double())
        start += n
    y = torch.cat(out)
    return y if scale is None else y * scale.double()[:, None]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_grouped_with_scale_matches_reference_and_gradients(activation, threads):
    counts = torch.tensor([5, 0, 9, 1, 0, 7])
    ffns = Experts(6, 16, 24, activation)
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    scale = torch.rand(x.shape[0], requires_grad=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ffns.forward_grouped(x, counts, fused=False, scale=scale)
        weights = torch.randn(y.shape)
        params = [p for p in (ffns.w1, ffns.w3, ffns.w2) if p is not None]
        g = torch.autograd.grad((y * weights).sum(), [x, scale, *params])
    finally:
        torch.set_num_threads(saved)
    assert torch.get_num_threads() == saved  # the expert threads leave torch's setting as it was
    y_ref = grouped_reference(x, counts, ffns, scale)
    g_ref = torch.autograd.grad((y_ref * weights.double()).sum(), [x, scale, *params])
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)
    assert (g[2][[1, 4]] == 0).all() and (g[-1][[1, 4]] == 0).all()  # experts without rows: zero gradient


def test_expert_threads_give_bit_identical_results(monkeypatch):
    """Sharing the experts among threads changes who computes an expert, not how: same bits as one thread."""
    import threading

    import moe_lab.experts

    started = []

    class CountingThread(threading.Thread):
        def start(self):
            started.append(self)
            super().start()

    monkeypatch.setattr(moe_lab.experts.threading, "Thread", CountingThread)
    x, experts, gates, ffns = make_case(200, 8, 2)
    runs = []
    saved = torch.get_num_threads()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            runs.append(grads(dispatch_sorted, x, experts, gates, ffns))
        finally:
            torch.set_num_threads(saved)
    assert len(started) == 2 * (1 + 2)  # forward and backward: one helper with 2 threads, two with 3
    for y, g in runs[1:]:
        assert torch.equal(y, runs[0][0]) and all(torch.equal(a, b) for a, b in zip(g, runs[0][1]))


@pytest.mark.parametrize("threads", [1, 2])
def test_forward_grouped_on_no_rows(threads):
    """A rank of expert parallelism may receive no rows at all: empty output, zero weight gradients."""
    ffns = Experts(3, 8, 12)
    x = torch.randn(0, 8, requires_grad=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ffns.forward_grouped(x, torch.zeros(3, dtype=torch.long), fused=False, scale=torch.ones(0))
        y.sum().backward()
    finally:
        torch.set_num_threads(saved)
    assert y.shape == (0, 8) and (ffns.w1.grad == 0).all() and (ffns.w2.grad == 0).all()


def test_forward_grouped_only_computes_the_gradients_asked_for():
    counts = torch.tensor([3, 4])
    ffns = Experts(2, 8, 12)
    ffns.w2.requires_grad_(False)
    x = torch.randn(7, 8)  # no gradient for the input
    ffns.forward_grouped(x, counts, fused=False, scale=torch.rand(7)).sum().backward()
    assert ffns.w1.grad is not None and ffns.w3.grad is not None and ffns.w2.grad is None


def test_forward_grouped_bf16_agrees_with_float64():
    counts = torch.tensor([20, 0, 31, 13])
    ffns = Experts(4, 32, 48).to(torch.bfloat16)
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    scale = torch.rand(64, requires_grad=True)  # float32 gates, as the router gives them
    y = ffns.forward_grouped(x, counts, fused=False, scale=scale)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert scale.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    y_ref = grouped_reference(x.detach(), counts, ffns, scale.detach())
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)


def test_split_groups_balances_rows_deterministically():
    from moe_lab.experts import _groups, _split_groups

    groups = _groups([50, 0, 10, 30, 30, 0, 5])
    shares = _split_groups(groups, 2)
    assert sorted(g for share in shares for g in share) == sorted(groups)
    assert [sum(r.stop - r.start for _, r in share) for share in shares] == [65, 60]
    assert _split_groups(groups, 2) == shares and len(_split_groups(groups[:1], 4)) == 1


def test_an_error_in_an_expert_thread_reaches_the_caller():
    from moe_lab.experts import _groups, _run_shares

    def work(share):
        if any(e == 2 for e, _ in share):
            raise RuntimeError("expert 2 failed")

    saved = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="expert 2 failed"):
        _run_shares(work, _groups([4, 4, 4, 4]), 2)
    assert torch.get_num_threads() == saved


def test_forward_grouped_rejects_bad_counts_and_scale():
    ffns = Experts(3, 8, 12)
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match="counts must have 3 entries summing to the 6 rows"):
        ffns.forward_grouped(x, torch.tensor([2, 2, 1]), fused=False)
    with pytest.raises(ValueError, match="scale must have shape \\[6\\]"):
        ffns.forward_grouped(x, torch.tensor([2, 2, 2]), scale=torch.ones(6, 1))


@pytest.mark.parametrize("fused", [None, True, False])
def test_grouped_mm_kernel_names_the_branch_grouped_mm_takes(fused, monkeypatch):
    from moe_lab.experts import grouped_mm_kernel

    if fused and not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    calls = []
    if hasattr(F, "grouped_mm"):
        real = F.grouped_mm
        monkeypatch.setattr(F, "grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    counts = torch.tensor([2, 0, 3])
    x, w = torch.randn(5, 16), torch.randn(3, 16, 8)
    grouped_mm(x, w, counts, fused=fused)
    name = grouped_mm_kernel(x, w, fused)
    assert name == ("torch.nn.functional.grouped_mm (one fused kernel)" if calls
                    else "per-expert matmuls on contiguous slices")


def test_fused_without_torch_grouped_mm_is_a_clear_error(monkeypatch):
    from moe_lab.experts import grouped_mm_kernel

    monkeypatch.delattr(F, "grouped_mm", raising=False)
    x, w = torch.randn(5, 16), torch.randn(3, 16, 8)
    for call in (lambda: grouped_mm(x, w, torch.tensor([2, 0, 3]), fused=True), lambda: grouped_mm_kernel(x, w, True)):
        with pytest.raises(ValueError, match="fused=True needs torch.nn.functional.grouped_mm"):
            call()
    assert grouped_mm_kernel(x, w) == "per-expert matmuls on contiguous slices"


def test_loop_builds_each_weight_gradient_once():
    """The loop reference splits the stacked weights once (one unbind), not once per expert (a full-size
    zero gradient each): the autograd graph has one UnbindBackward per weight and no SelectBackward."""
    x, experts, gates, ffns = make_case(40, 8, 2)
    y = DISPATCH["loop"](x, experts, gates, ffns)
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    names = [type(n).__name__ for n in seen]
    assert names.count("UnbindBackward0") == 3 and "SelectBackward0" not in names
