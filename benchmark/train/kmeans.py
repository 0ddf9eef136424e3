"""k-means in torch as faiss runs it (the clustering of DeepCluster, PCL, SwAV's ancestors), and the training set's
features for methods that cluster them between epochs. Deterministic given a generator; no faiss needed."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.sets import Splits

SPLIT_EPS = 1 / 1024  # relative perturbation of a split centroid (faiss Clustering.cpp, EPS)
EXTRACT_BATCH = 512  # images per forward pass when featurising the training set (eval mode: no effect on values)
ASSIGN_CHUNK = 16384  # rows per distance block (bounds memory at chunk x K)


def assign(x: Tensor, c: Tensor) -> Tensor:
    """(N,) index of the nearest centroid (squared L2; ties to the lowest index). x: (N, D), c: (K, D)."""
    c2 = (c * c).sum(dim=1)
    return torch.cat([(c2 - 2 * xb @ c.T).argmin(dim=1) for xb in torch.split(x, ASSIGN_CHUNK)])


@torch.no_grad()
def split_empty_clusters(c: Tensor, counts: Tensor, g: torch.Generator) -> int:
    """faiss's `split_clusters`, in place: every empty centroid i becomes a copy of a centroid j drawn with
    probability proportional to n_j - 1, and the pair is pushed apart symmetrically (x (1 +- eps) on
    alternate dimensions); j's count is shared between the two. faiss draws j by a cyclic scan accepting
    with probability (n_j - 1) / (N - K); drawing j directly has the same proportions.

    Args:
        c: (K, D) centroids, modified in place.
        counts: (K,) float cluster sizes, modified in place.
        g: generator on c's device.

    Returns:
        the number of clusters split.
    """
    sign = torch.ones(c.shape[1], device=c.device)
    sign[1::2] = -1
    empty = (counts == 0).nonzero().flatten().tolist()
    for i in empty:
        p = (counts - 1).clamp_min(0)
        if float(p.sum()) <= 0:  # every cluster holds at most one point: nothing left to split
            break
        j = int(torch.multinomial(p, 1, generator=g))
        c[i] = c[j] * (1 + SPLIT_EPS * sign)
        c[j] = c[j] * (1 - SPLIT_EPS * sign)
        counts[i] = torch.floor(counts[j] / 2)  # faiss: hassign[ci] = hassign[cj] / 2
        counts[j] -= counts[i]
    return len(empty)


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int, g: torch.Generator, init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means as faiss runs it (DeepCluster, PCL): k distinct random points as initial centroids,
    `iters` rounds of (assign, recompute centroids, split a cluster for every empty one), then a final
    assignment. Deterministic given `g` (on CUDA the centroid sums use `index_add_`, deterministic under
    `torch.use_deterministic_algorithms`, which resumable runs switch on).

    Args:
        x: (N, D) points, N >= k.
        k: number of clusters.
        iters: Lloyd iterations.
        g: generator on x's device.
        init: (K, D) initial centroids instead of random points (tests).

    Returns:
        centroids (K, D) and labels (N,) int64.
    """
    n = len(x)
    check(n >= k, f"k-means: {k} clusters need at least as many points, got {n}")
    c = x[torch.randperm(n, generator=g, device=x.device)[:k]].clone() if init is None else init.clone()
    for _ in range(iters):
        labels = assign(x, c)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        full = counts > 0
        c[full] = sums[full] / counts[full, None]
        split_empty_clusters(c, counts, g)
    return c, assign(x, c)



@torch.no_grad()
def training_features(backbone: nn.Module, splits: Splits, device: torch.device) -> Tensor:
    """(N, D) float32 features of the whole training set, normalised with the split's mean/std, eval mode."""
    was_training = backbone.training
    backbone.eval()
    mean = torch.tensor(splits.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(splits.std, device=device).view(1, -1, 1, 1)
    feats = [backbone((xb.to(device).float() / 255 - mean) / std).float() for xb in splits.train.batches(EXTRACT_BATCH)]
    backbone.train(was_training)
    return torch.cat(feats)
