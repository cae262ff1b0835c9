"""The local launcher: results come back in rank order (even and odd world sizes), errors name their rank,
hangs end at the timeout, and no worker outlives a failure."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from moe_lab.launch import LocalCluster, WorkerError, run_local


def _rank_info(offset: int, scale: float = 1.0) -> dict:
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": float(t) * scale, "pid": os.getpid(),
            "threads": torch.get_num_threads()}


def _raise_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise KeyError("no such expert")
    dist.barrier()  # rank 0 waits for a peer that has failed


def _skip_a_collective() -> str:
    if dist.get_rank() == 0:
        dist.all_reduce(torch.zeros(1))  # rank 1 never joins: rank 0 waits forever
    return "done"


def _die() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def _unpicklable():
    return lambda: None


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("world", [2, 3])
def test_results_in_rank_order_and_cluster_reuse(world):
    with LocalCluster(world, timeout=120) as cluster:
        first = cluster.run(_rank_info, 1)
        second = cluster.run(_rank_info, 0, scale=2.0)  # the same processes and process group, keyword args
    assert [r["rank"] for r in first] == list(range(world)) and all(r["world"] == world for r in first)
    assert all(r["sum"] == sum(range(1, world + 1)) for r in first)  # all_reduce of rank + 1 over the ranks
    assert all(r["sum"] == 2.0 * sum(range(world)) for r in second)
    assert [r["pid"] for r in first] == [r["pid"] for r in second] and len({r["pid"] for r in first}) == world
    assert all(r["threads"] == 1 for r in first)
    assert cluster.closed and all(_gone(r["pid"]) for r in first)
    assert cluster.startup_s > 0


def test_run_local_one_call():
    assert [r["sum"] for r in run_local(_rank_info, 2, 0, timeout=120)] == [1.0, 1.0]


def test_worker_error_reaches_the_caller_with_its_rank():
    cluster = LocalCluster(2, timeout=120)
    pids = [r["pid"] for r in cluster.run(_rank_info, 0)]
    with pytest.raises(WorkerError) as info:
        cluster.run(_raise_on_rank_one)
    err = info.value
    assert (err.rank, err.world_size, err.exc_type) == (1, 2, "KeyError")
    assert "no such expert" in err.summary and "_raise_on_rank_one" in err.remote_traceback
    assert str(err).startswith("rank 1 of 2 raised KeyError")
    assert cluster.closed and all(_gone(pid) for pid in pids)  # rank 0 was stuck in the barrier: killed
    with pytest.raises(RuntimeError, match="closed"):
        cluster.run(_rank_info, 0)


def test_a_hang_ends_at_the_timeout():
    cluster = LocalCluster(2, timeout=120)
    pids = [r["pid"] for r in cluster.run(_rank_info, 0)]
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0\] of 2 still running \(finished: \[1\]\)"):
        cluster.run(_skip_a_collective, timeout=2)
    assert time.monotonic() - start < 30  # bounded by the timeout (plus killing), not by gloo's own
    assert cluster.closed and all(_gone(pid) for pid in pids)


def test_a_dead_worker_and_an_unpicklable_result():
    with pytest.raises(WorkerError, match="rank 1 of 2 raised ProcessExit"):
        run_local(_die, 2, timeout=120)
    with pytest.raises(WorkerError, match="rank 0 of 2 raised"):
        run_local(_unpicklable, 2, timeout=120)


def test_functions_a_fresh_process_cannot_import_are_refused_up_front():
    def local():
        return 1

    with LocalCluster(1, timeout=120) as cluster:
        for fn in (local, lambda: 1):
            with pytest.raises(TypeError, match="top level of an importable module"):
                cluster.run(fn)
        assert not cluster.closed and cluster.run(_rank_info, 0)[0]["world"] == 1  # nothing was sent


@pytest.mark.parametrize("kwargs, match", [
    ({"world_size": 0}, "world_size"), ({"world_size": 2, "backend": "mpi"}, "backend"),
    ({"world_size": 2, "threads": 0}, "threads"), ({"world_size": 2, "timeout": 0}, "timeout"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalCluster(**kwargs)
