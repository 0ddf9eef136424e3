"""Which device runs the work, how to describe it in result rows, and how to tell that it ran out of memory."""

from __future__ import annotations

import os
import platform

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe(device: torch.device) -> str:
    """`cuda:NVIDIA H100 80GB HBM3` or `cpu:x86_64x2`: what made a number."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}x{len(os.sched_getaffinity(0))}"


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of any device (CUDA's OutOfMemoryError, or a RuntimeError saying so: CPU, MPS)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
