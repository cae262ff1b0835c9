"""Expert parallelism over gloo: 2 and 4 CPU processes equal the single-process MoELayer on all their tokens,
ranks without tokens included; what cannot work fails with the same clear error on every rank, never a hang."""
import zlib

import pytest
import torch
import torch.distributed as dist

from moe_lab import MoELayer, seed_everything
from moe_lab.examples.train_expert_parallel import parse_args, train
from moe_lab.launch import WorkerError, run_local
from moe_lab.parallel import ExpertParallelMoELayer, all_to_all, all_to_all_bytes
from moe_lab.timing import StepTimer

D_MODEL, D_FF, NUM_EXPERTS = 8, 12, 8
HOT, COLD = (0, 5), (2, 3, 7)  # experts the router favours / never picks

# name -> (MoELayer options, tokens per rank as a function of the world size)
SCENARIOS = {
    "dropless_uneven_load": ({"k": 2}, lambda w: [16] * w),
    "dropless_uneven_batches_k3_gelu": (
        {"k": 3, "activation": "gelu", "softmax_order": "after_topk"}, lambda w: [5 + 4 * r for r in range(w)]),
    "capacity_position": ({"k": 2, "capacity_factor": 1.0}, lambda w: [16] * w),
    "capacity_probability": (
        {"k": 2, "capacity_factor": 0.75, "drop_policy": "probability"}, lambda w: [7 + 2 * r for r in range(w)]),
    "top1_no_renormalize": ({"k": 1, "renormalize": False, "capacity_factor": 1.25}, lambda w: [16] * w),
    "deepseek_v3_bias_groups_shared": (
        {"k": 2, "score_func": "sigmoid", "selection_bias": True, "n_groups": 4, "topk_groups": 2,
         "group_score": "top2_sum", "routed_scaling_factor": 2.5, "n_shared": 1}, lambda w: [16] * w),
    # a rank with no tokens still joins every exchange (else its peers hang)
    "dropless_last_rank_without_tokens": ({"k": 2}, lambda w: [16] * (w - 1) + [0]),
    "capacity_first_rank_without_tokens": ({"k": 2, "capacity_factor": 1.0}, lambda w: [0] + [20] * (w - 1)),
    "deepseek_v3_last_rank_without_tokens": (  # shared expert and bias: every parameter still gets a gradient
        {"k": 2, "score_func": "sigmoid", "selection_bias": True, "n_groups": 4, "topk_groups": 2,
         "group_score": "top2_sum", "routed_scaling_factor": 2.5, "n_shared": 1}, lambda w: [16] * (w - 1) + [0]),
}


def _build(name: str, world: int):
    """The same layer, inputs and output weights in every process: the single-process reference setup."""
    opts, sizes = SCENARIOS[name]
    sizes = sizes(world)
    seed_everything(world * 100 + zlib.crc32(name.encode()) % 97)  # a scenario's seed does not depend on the others
    layer = MoELayer(D_MODEL, D_FF, NUM_EXPERTS, **opts)
    x = torch.randn(sum(sizes), D_MODEL)
    x[:, 0] = x[:, 0].abs() + 1  # a positive feature the router can key on
    with torch.no_grad():
        layer.router.weight[list(HOT), 0] += 1.0  # hot experts: uneven load
        layer.router.weight[list(COLD), 0] -= 30.0  # cold experts: empty
        if layer.expert_bias is not None:  # a non-zero selection bias, which from_layer must copy
            layer.expert_bias.copy_(torch.linspace(-0.05, 0.05, NUM_EXPERTS))
    return layer, x, torch.randn(sum(sizes), D_MODEL), sizes


def _ep_worker(names: list[str]) -> dict:
    """Runs on every rank: this rank's slice through the expert-parallel layer, forward and backward."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name in names:
        layer, x, weight, sizes = _build(name, world)
        ep = ExpertParallelMoELayer.from_layer(layer)
        start = sum(sizes[:rank])
        x_local = x[start : start + sizes[rank]].clone().requires_grad_(True)
        timer = StepTimer()
        with timer.step():
            y, info = ep(x_local)
            (y * weight[start : start + sizes[rank]]).sum().backward()
        out[name] = {
            "bytes": dict(timer.steps[0].bytes_sent), "off_rank_bytes": dict(timer.steps[0].off_rank_bytes),
            "y": y.detach(), "x_grad": x_local.grad, "dropped": info.dropped, "capacity": info.capacity,
            "experts": info.experts, "router_grad": ep.router.weight.grad,
            "expert_grads": {n: p.grad for n, p in ep.experts.named_parameters()},
            "comm": ep.last_comm,
        }
    # the autograd all-to-all on its own: rank r sends r + j rows to rank j
    x = torch.full((sum(rank + j for j in range(world)), 2), float(rank), requires_grad=True)
    got = all_to_all(x, [r + rank for r in range(world)], [rank + j for j in range(world)])
    (got * (rank + 1)).sum().backward()
    out["all_to_all"] = {"got": got.detach(), "grad": x.grad}
    out["train"] = train(parse_args(["--steps", "25", "--tokens", "64", "--d-model", "16", "--d-ff", "16",
                                     "--layers", "1", "--lr", "1e-2", "--log-every", "1000"]))
    half = MoELayer(D_MODEL, D_FF, world, 1)
    half.experts.to(torch.bfloat16)
    sharded = ExpertParallelMoELayer.from_layer(half)
    out["dtypes"] = (sharded.router.weight.dtype, sharded.experts.w1.dtype)
    try:
        ExpertParallelMoELayer(D_MODEL, D_FF, world + 1, 1)
    except ValueError as e:
        out["error"] = str(e)
    out["dtype_error"] = _mixed_dtypes()
    out["group_error"] = _not_in_group()
    return out


def _mixed_dtypes() -> str:
    """Rank 0 runs the layer under bf16 autocast, the others in fp32: every rank must refuse."""
    layer = ExpertParallelMoELayer.from_layer(MoELayer(D_MODEL, D_FF, NUM_EXPERTS, 2))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dist.get_rank() == 0):
            layer(torch.randn(6, D_MODEL))
    except ValueError as e:
        return str(e)
    return "no error"


def _not_in_group() -> str:
    """A group of rank 0 alone: rank 0 builds its layer (all experts), the other ranks are refused."""
    group = dist.new_group([0])  # every rank takes part in creating a group
    try:
        layer = ExpertParallelMoELayer(D_MODEL, D_FF, NUM_EXPERTS, 2, group=group)
        return f"built with {layer.num_local_experts} local experts"
    except ValueError as e:
        return str(e)


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def distributed(request):
    world = request.param
    return world, run_local(_ep_worker, world, sorted(SCENARIOS))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_matches_single_process_layer(distributed, name):
    world, results = distributed
    layer, x, weight, sizes = _build(name, world)
    x.requires_grad_(True)
    y, info = layer(x)
    (y * weight).sum().backward()
    load = info.tokens_per_expert
    assert (load[list(COLD)] == 0).all() and load.max() > 2 * load.float().mean()  # empty and hot experts
    if layer.capacity_factor is not None:
        assert info.dropped.any()  # the scenario really drops slots
    y_ep = torch.cat([r[name]["y"] for r in results])
    torch.testing.assert_close(y_ep, y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[name]["x_grad"] for r in results]), x.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat([r[name]["experts"] for r in results]), info.experts)
    assert torch.equal(torch.cat([r[name]["dropped"] for r in results]), info.dropped)
    assert all(r[name]["capacity"] == info.capacity for r in results)
    # the router is replicated: its data-parallel gradient is the sum over ranks
    torch.testing.assert_close(sum(r[name]["router_grad"] for r in results), layer.router.weight.grad,
                               rtol=1e-5, atol=1e-6)
    # each rank owns E / world experts, whose gradients arrive complete through the backward all-to-all
    for pname, p in layer.experts.named_parameters():
        sharded = torch.cat([r[name]["expert_grads"][pname] for r in results])
        torch.testing.assert_close(sharded, p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_bytes_sent_match_formula(distributed, name):
    world, results = distributed
    opts, sizes = SCENARIOS[name]
    k = opts["k"]
    for r, tokens in zip(results, sizes(world)):
        comm, dropped = r[name]["comm"], int(r[name]["dropped"].sum())
        assert comm.rows_sent == tokens * k - dropped
        assert comm.dispatch_bytes == all_to_all_bytes(tokens, k, D_MODEL, 4) - dropped * D_MODEL * 4
        if dropped == 0:
            assert comm.dispatch_bytes == tokens * k * D_MODEL * 4
    # every row sent is received once and sent back once
    assert sum(r[name]["comm"].rows_sent for r in results) == sum(r[name]["comm"].rows_received for r in results)
    assert sum(r[name]["comm"].combine_bytes for r in results) == sum(r[name]["comm"].dispatch_bytes for r in results)


def test_all_to_all_forward_and_backward(distributed):
    world, results = distributed
    for rank, r in enumerate(results):
        expected = torch.cat([torch.full((src + rank, 2), float(src)) for src in range(world)])
        assert torch.equal(r["all_to_all"]["got"], expected)
        # rows this rank sent to rank j received weight (j + 1) there
        grad = torch.cat([torch.full((rank + j, 2), float(j + 1)) for j in range(world)])
        assert torch.equal(r["all_to_all"]["grad"], grad)


def test_bad_expert_count(distributed):
    world, results = distributed
    assert all(f"multiple of the group size {world}" in r["error"] for r in results)


def test_mixed_dtypes_fail_on_every_rank(distributed):
    _, results = distributed
    assert all("rank 0: bfloat16, rank 1: float32" in r["dtype_error"] for r in results)


def test_layer_refuses_a_group_without_this_rank(distributed):
    _, results = distributed
    assert results[0]["group_error"] == f"built with {NUM_EXPERTS} local experts"
    assert all("not a member of the given group" in r["group_error"] for r in results[1:])


def test_timer_records_the_bytes_of_all_four_exchanges(distributed):
    world, results = distributed
    for name in SCENARIOS:
        for rank, r in enumerate(results):
            comm, sent, off = r[name]["comm"], r[name]["bytes"], r[name]["off_rank_bytes"]
            assert sent["dispatch all-to-all"] == comm.dispatch_bytes
            assert sent["combine all-to-all"] == comm.combine_bytes
            # backward: the gradients go back along the same routes, the other way round
            assert sent["combine all-to-all (backward)"] == comm.dispatch_bytes
            assert sent["dispatch all-to-all (backward)"] == comm.combine_bytes
            row = D_MODEL * 4
            assert off["dispatch all-to-all"] == comm.off_rank_dispatch_bytes == (
                comm.rows_sent - comm.input_splits[rank]) * row
            assert off["combine all-to-all"] == (comm.rows_received - comm.output_splits[rank]) * row
            assert sum(comm.received_per_expert) == comm.rows_received == sum(comm.output_splits)
            # what rank r sends to rank s is what rank s receives from rank r
            assert [results[s][name]["comm"].output_splits[rank] for s in range(world)] == comm.input_splits


def _mismatched_worker() -> None:
    rank = dist.get_rank()
    ExpertParallelMoELayer(D_MODEL, D_FF, 6, k=1 + rank % 2)


def test_mismatched_configs_raise_instead_of_hanging():
    # 3 ranks (odd), rank 1 asks for k=2: every rank raises; a hang would end in TimeoutError instead
    with pytest.raises(WorkerError, match="arguments differ across ranks: rank 0 has k=1, rank 1 has k=2"):
        run_local(_mismatched_worker, 3, timeout=60)


def test_example_trains_and_reports_bytes(distributed):
    world, results = distributed
    runs = [r["train"] for r in results]
    assert [r["rank"] for r in runs] == list(range(world))
    losses = runs[0]["losses"]
    assert all(r["losses"] == losses for r in runs)  # the logged loss is the global mean
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]
    for r in runs:  # dropless: tokens x k x d_model x 4 bytes, in each all-to-all
        assert r["dispatch_bytes"] == r["formula_bytes"] == 64 * 2 * 16 * 4


def test_needs_process_group():
    with pytest.raises(ValueError, match="process group"):
        ExpertParallelMoELayer(D_MODEL, D_FF, NUM_EXPERTS, 2)


def test_all_to_all_bytes_formula():
    # DeepSeek-V3-like: 4096 tokens, top-8, d=7168, bf16: 4096 * 8 * 7168 * 2 bytes = 448 MiB per all-to-all
    assert all_to_all_bytes(4096, 8, 7168, 2) == 448 * 2**20


def test_from_layer_keeps_the_router_in_float32(distributed):
    _, results = distributed
    assert all(r["dtypes"] == (torch.float32, torch.bfloat16) for r in results)
