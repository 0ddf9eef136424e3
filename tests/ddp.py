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

import torch.distributed as dist
import torch.multiprocessing as mp


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
