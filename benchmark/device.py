"""Which device runs the work, and how to describe it in result rows."""

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
