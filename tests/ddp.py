"""Run a function in N CPU processes with torch.distributed (gloo), for global-batch equivalence tests.

Usage: `results = run_distributed(fn, world_size=2, args=(...))`; `fn(rank, world_size, *args)` runs
with the process group initialised and returns a picklable value; results are ordered by rank.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor


def _worker(rank: int, world_size: int, init_file: str, fn: Callable[..., Any], args: tuple[Any, ...], queue: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # plain pickle copies tensors by value: no shared memory that dies with the worker
        queue.put((rank, pickle.dumps(fn(rank, world_size, *args))))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple[Any, ...] = ()) -> list[Any]:
    """`fn` must be importable (a module-level function in a test module or the package)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        ctx_procs = mp.start_processes(_worker, args=(world_size, init_file, fn, args, queue), nprocs=world_size,
                                       join=False, start_method="spawn")
        results = {r: pickle.loads(b) for r, b in (queue.get() for _ in range(world_size))}
        while not ctx_procs.join():
            pass
    return [results[r] for r in range(world_size)]


def _pair_loss_on_rank(rank: int, world: int, loss_fn: Callable[..., Tensor], z1: Tensor, z2: Tensor,
                       args: tuple[Any, ...]) -> tuple[float, Tensor, Tensor]:
    b = len(z1) // world
    a1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    a2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    loss = loss_fn(a1, a2, *args)
    loss.backward()
    return float(loss.detach()), a1.grad, a2.grad  # type: ignore[return-value]


def pair_loss_in_processes(loss_fn: Callable[..., Tensor], z1: Tensor, z2: Tensor, *args: Any,
                           world_size: int = 2) -> tuple[list[float], float]:
    """Run `loss_fn(z1_part, z2_part, *args)` on each process's rows of a global batch.

    Asserts that the gradients DDP would apply (each process's input gradients averaged over
    processes) equal those of one process on the global batch; returns (per-process losses, the
    one-process loss) for the caller's check of how the losses combine.
    """
    ranks = run_distributed(_pair_loss_on_rank, world_size, (loss_fn, z1, z2, args))
    r1, r2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    ref = loss_fn(r1, r2, *args)
    ref.backward()
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / world_size, r1.grad)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / world_size, r2.grad)
    return [r[0] for r in ranks], float(ref.detach())
