"""Collapse monitors computed on embeddings: no labels, no hyperparameters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def std_of_l2_normalized(z: Tensor) -> float:
    """Mean per-dimension std of L2-normalised rows, times sqrt(d): ~1 isotropic, 0 collapsed.

    SimSiam (Chen & He 2021, sec. 4.1) monitors the unscaled version; scaling by sqrt(d) makes it
    comparable across widths.
    """
    zn = F.normalize(z.float(), dim=1)
    return float(zn.std(dim=0).mean() * math.sqrt(z.shape[1]))


def rankme(z: Tensor, eps: float = 1e-7) -> float:
    """Effective rank (Garrido et al. 2023, arXiv 2210.02885): exp of the entropy of normalised singular values."""
    s = torch.linalg.svdvals(z.float())
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def is_collapsed(std_score: float, rank: float, dim: int) -> bool:
    """Collapsed when the normalised std is near 0 or the effective rank is below 1% of the width (>= 1)."""
    return std_score < 0.05 or rank < max(1.0, 0.01 * dim) + 0.5
