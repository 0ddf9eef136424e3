"""Monitors computed on embeddings during pretraining: collapse (no labels, no hyperparameters) and the kNN vote
(DINO's weighted kNN, shared with the `knn` protocol)."""

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


BANK_CHUNK = 65_536  # bank rows compared at once: similarities stay (queries x BANK_CHUNK), whatever the bank's size


def knn_predict(train_f: Tensor | list[Tensor], train_y: Tensor, test_f: Tensor, k: int, t: float, num_classes: int,
                chunk: int = 1024) -> Tensor:
    """Class scores (M, num_classes) of `test_f` (M, D) by DINO's weighted vote (Caron et al. 2021, `eval_knn.py`) of
    the k nearest of the bank `train_f` (N, D), or of the bank given as parts (e.g. [train, val], never concatenated),
    labels `train_y` (N,): features are L2-normalised and each neighbour votes for its class with weight exp(cos / t).

    Out of core: the bank is normalised and compared BANK_CHUNK rows at a time, keeping a running top-k, so memory
    holds the bank once plus (chunk x BANK_CHUNK) similarities (ImageNet's 1.28M-image bank included). A bank of
    one chunk takes the direct path. The scores are on `test_f`'s device (the bank and labels must be there too)."""
    given = [train_f] if isinstance(train_f, Tensor) else list(train_f)
    n = sum(len(p_) for p_ in given)
    parts = [torch.cat(given)] if n <= BANK_CHUNK else [c for part in given for c in torch.split(part, BANK_CHUNK)]
    k = min(k, n)
    out = []
    for q in torch.split(F.normalize(test_f, dim=1), chunk):
        if len(parts) == 1:
            sim, idx = (q @ F.normalize(parts[0], dim=1).T).topk(k, dim=1)  # (m, k)
        else:
            sim = torch.empty(len(q), 0, dtype=q.dtype, device=q.device)
            idx = torch.empty(len(q), 0, dtype=torch.int64, device=q.device)
            start = 0
            for part in parts:
                s_, i_ = (q @ F.normalize(part, dim=1).T).topk(min(k, len(part)), dim=1)
                sim, pos = torch.cat([sim, s_], 1).topk(min(k, sim.shape[1] + s_.shape[1]), dim=1)
                idx = torch.cat([idx, i_ + start], 1).gather(1, pos)
                start += len(part)
        w = (sim / t).exp()
        out.append(torch.zeros(len(q), num_classes, dtype=w.dtype, device=w.device).scatter_add_(1, train_y[idx], w))
    return torch.cat(out)
