"""Schedules that methods take as a function of training progress in [0, 1]."""

from __future__ import annotations

import math


def momentum_at(base: float, progress: float) -> float:
    """EMA momentum from `base` at progress 0 to 1 at progress 1 along a half cosine.

    m = 1 - (1 - base) (cos(pi progress) + 1) / 2: BYOL sec. 3.2, MoCo v3 `adjust_moco_momentum`,
    DINO's `cosine_scheduler` for the teacher.
    """
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2
