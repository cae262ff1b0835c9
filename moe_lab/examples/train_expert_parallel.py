"""Train a tiny MoE model with expert parallelism: experts sharded over processes, tokens exchanged all-to-all.

The task is synthetic and per token (learn a fixed random map ``token -> target`` over the vocabulary), so a
stack of residual MoE FFN blocks can solve it; each rank draws its own batches (data parallelism for tokens)
and holds ``experts / world_size`` experts of every layer. At the end every rank reports the bytes it sent per
all-to-all, next to the formula ``tokens x k x d_model x bytes per element``.

One machine, 2 CPU processes (gloo)::

    torchrun --nproc-per-node 2 -m moe_lab.examples.train_expert_parallel

Without torchrun (spawns the processes itself)::

    python -m moe_lab.examples.train_expert_parallel --local-procs 2

GPUs (NCCL, one process per GPU; ``--backend auto`` picks NCCL when CUDA is available), e.g. two nodes of 8::

    # on node 0 and node 1 (NODE_RANK = 0 or 1; HOST = node 0's address, reachable from node 1)
    torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint $HOST:29500 \\
        -m moe_lab.examples.train_expert_parallel --experts 16 --dtype bf16

``--experts`` must be a multiple of the total number of processes. Pick the network interface with
``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` when a node has several.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_lab.launch import run_local
from moe_lab.layer import MoELayer
from moe_lab.parallel import ExpertParallelMoELayer, all_to_all_bytes, allreduce_replicated_grads, broadcast_replicated
from moe_lab.utils import seed_everything


class TinyMoEModel(nn.Module):
    """Embedding -> ``layers`` x (``x + moe(rmsnorm(x))``) -> rmsnorm -> linear head.

    ``idx: [T]`` token ids -> ``(logits: [T, vocab], aux_loss)`` (mean Switch aux loss over layers).
    """

    def __init__(self, vocab: int, d_model: int, d_ff: int, experts: int, k: int, layers: int,
                 capacity_factor: float | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(layers))
        # Build each layer at full size (same seed on every rank: same weights), keep this rank's shard.
        self.moes = nn.ModuleList(
            ExpertParallelMoELayer.from_layer(MoELayer(d_model, d_ff, experts, k, capacity_factor=capacity_factor))
            for _ in range(layers)
        )
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(idx)
        aux = x.new_zeros((), dtype=torch.float32)
        for norm, moe in zip(self.norms, self.moes):
            y, info = moe(norm(x))
            x = x + y
            aux = aux + info.aux_loss / len(self.moes)
        return self.head(self.norm(x)), aux


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank per step (default 256)")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary size of the synthetic task")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--d-ff", type=int, default=64, help="hidden width of each expert")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (a multiple of the world size)")
    p.add_argument("--k", type=int, default=2, help="experts per token")
    p.add_argument("--layers", type=int, default=2, help="MoE blocks")
    p.add_argument("--capacity-factor", type=float, default=None, help="expert capacity factor (default dropless)")
    p.add_argument("--aux-coef", type=float, default=0.01, help="Switch aux loss coefficient")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (router stays fp32)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--local-procs", type=int, default=0,
                   help="spawn this many local gloo processes instead of running under torchrun")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> dict:
    """Train on this rank (the process group must exist). Returns the losses and this rank's traffic."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    seed_everything(args.seed)  # identical initial weights on every rank
    model = TinyMoEModel(args.vocab, args.d_model, args.d_ff, args.experts, args.k, args.layers,
                         args.capacity_factor).to(device)
    broadcast_replicated(model)  # rank 0's router, embedding, norms and head everywhere, whatever the seed did
    target_map = torch.randperm(args.vocab, generator=torch.Generator().manual_seed(args.seed)).to(device)
    data = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)  # each rank its own tokens
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(args.vocab, (args.tokens,), generator=data).to(device)
        with autocast:
            logits, aux = model(idx)
        ce = F.cross_entropy(logits.float(), target_map[idx])
        # this rank's share of the global loss: expert grads then arrive complete through the all-to-all
        ((ce + args.aux_coef * aux) / world).backward()
        allreduce_replicated_grads(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean_ce = ce.detach().clone()
        dist.all_reduce(mean_ce)
        losses.append(float(mean_ce) / world)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.3f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    comm = model.moes[0].last_comm
    element = 2 if args.dtype == "bf16" else 4
    return {"rank": rank, "world": world, "losses": losses, "dispatch_bytes": comm.dispatch_bytes,
            "combine_bytes": comm.combine_bytes, "rows_sent": comm.rows_sent,
            "formula_bytes": all_to_all_bytes(args.tokens, args.k, args.d_model, element)}


def report(result: dict, args: argparse.Namespace) -> str:
    """One line per rank: the bytes it sent in one all-to-all of the first MoE layer, and the formula."""
    element = 2 if args.dtype == "bf16" else 4
    return (f"rank {result['rank']}/{result['world']}: sent {result['dispatch_bytes']:,} bytes per dispatch "
            f"all-to-all (combine: {result['combine_bytes']:,}); formula tokens x k x d_model x bytes = "
            f"{args.tokens} x {args.k} x {args.d_model} x {element} = {result['formula_bytes']:,}")


def _spawned(args: argparse.Namespace) -> dict:
    result = train(args)
    print(report(result, args), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.local_procs:
        results = run_local(_spawned, args.local_procs, args, backend="gloo")
        print(f"loss {results[0]['losses'][0]:.3f} -> {results[0]['losses'][-1]:.3f}")
        return
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    try:
        result = train(args)
        print(report(result, args), flush=True)
        if dist.get_rank() == 0:
            print(f"loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
        dist.barrier()  # no rank closes its connections while a peer may still be reading from them
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
