"""Collectives for losses that need the global batch; identity when torch.distributed is not initialised.

Losses call these unconditionally, so one code path serves one process and many: with N processes
and a per-process batch B, `gather_with_grad` returns the (N*B, ...) global batch and gradients flow
back to each process's own rows, giving the same loss as one process on the same global batch.
"""

from __future__ import annotations

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
