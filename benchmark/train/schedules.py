"""Schedules that methods take as a function of training progress in [0, 1]."""

from __future__ import annotations

import math


def cosine_ramp(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at progress 1 along a half cosine (DINO's `cosine_scheduler`)."""
    return end + (start - end) * (math.cos(math.pi * min(1.0, max(0.0, progress))) + 1) / 2


def momentum_at(base: float, progress: float) -> float:
    """EMA momentum from `base` at progress 0 to 1 at progress 1 along a half cosine.

    m = 1 - (1 - base) (cos(pi progress) + 1) / 2: BYOL sec. 3.2, MoCo v3 `adjust_moco_momentum`,
    DINO's `cosine_scheduler` for the teacher.
    """
    return cosine_ramp(base, 1.0, progress)
