"""Collectives for losses that need the global batch; identity when torch.distributed is not initialised.

Losses call these unconditionally, so one code path serves one process and many: with N processes
and a per-process batch B, `gather_with_grad` returns the (N*B, ...) global batch and gradients flow
back to each process's own rows, giving the same loss as one process on the same global batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, ...]:  # noqa: D102
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Tensor:  # noqa: D102
        g = torch.stack(grads)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` (B, ...) from every process along dim 0, keeping the autograd graph."""
    if not is_distributed():
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Concatenate `x` from every process along dim 0, without gradients (targets, queues)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum `x` over processes in place (no gradient), e.g. Sinkhorn marginals, DINO's centre."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of `x` over processes in place (no gradient)."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


def launched_processes() -> int:
    """How many processes this job was started as: torchrun's WORLD_SIZE, or submitit's SLURM tasks
    (`--gpus-per-node` > 1 gives one task per GPU); 1 otherwise (a plain run, even inside a bigger allocation)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if env.get("SUBMITIT_EXECUTOR") == "slurm":
        return int(env.get("SLURM_NTASKS", "1"))
    return 1


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join this job's processes for the duration of one pretraining (nccl on CUDA, gloo on CPU); yields this
    process's device (cuda:LOCAL_RANK). A no-op for one process or an already-initialised group."""
    if launched_processes() <= 1 or dist.is_initialized():
        yield device
        return
    if "WORLD_SIZE" not in os.environ:  # SLURM tasks started by submitit: derive MASTER_ADDR, RANK, ... from SLURM
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    try:
        yield device
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of every gradient over processes, in one flat all-reduce per dtype (DDP's averaging, for methods
    whose training step is `loss()` rather than `forward()`)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size()
        offset = 0
        for g in group:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
