"""PCL: Li, Zhou, Xiong, Hoi 2021, "Prototypical Contrastive Learning of Unsupervised Representations",
https://arxiv.org/abs/2005.04966; official code https://github.com/salesforce/PCL (PCL v2: `--mlp --aug-plus --cos`).

MoCo v2 (query encoder + momentum key encoder + queue, InfoNCE) plus ProtoNCE: at the start of every epoch the
momentum encoder's normalised features of the whole training set are clustered by k-means at several
granularities; each query is then also contrasted against its cluster's centroid (prototype), every centroid
with its own temperature phi, the cluster's concentration. loss = InfoNCE + mean over granularities of ProtoNCE.
The MoCo v2 half is `methods.mocov2.MoCoV2` (key encoder, its momentum update, Shuffle-BN keys, FIFO queue) and
its `moco_infonce`, imported; this file adds the clustering and the prototype term.

Follows the official code (main_pcl.py, pcl/builder.py) where it differs from the paper:
- ProtoNCE's columns are the positive prototypes of the WHOLE batch (query i's target is column i; another query
  of the same cluster repeats that prototype in its column) plus r prototypes sampled among the clusters that are
  no query's positive; the paper's eq. 11 has each query's own prototype plus r negatives;
- r = 16384 (`--pcl-r`, also the queue size; the paper says 16000). Here r is clamped to the clusters available
  (the official `random.sample` would raise instead);
- phi = mean_z ||v_z - c|| / log(Z + alpha) for clusters with Z > 1; clusters with Z <= 1 take the largest phi;
  then phi is clipped to its 10th-90th percentiles and scaled to mean `temperature` (official `run_kmeans`);
- k-means as faiss runs it there: 20 iterations, the best of 5 runs (`nredo`), at most 1000 points per centroid
  to fit (then every point is assigned); centroids are L2-normalised after k-means.
Harness differences: the warm-up is a fraction of training (official `--warmup-epoch 20` of 200 epochs), checked
against `progress`; since `before_epoch` does not know the number of epochs, it clusters in warm-up epochs too
(unused then; about warmup / (1 - warmup) = 11% more clustering). Clustering featurises the raw training images
(the official code uses a centre crop). The ProtoNCE term is computed per process on its own batch, as in the
official code (not over the global batch). See methods/mocov2.py for MoCo v2's own differences (Shuffle-BN with
one process, weight decay on biases and norms).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import register_method
from benchmark.train.distributed import all_reduce_sum, rank
from benchmark.train.kmeans import assign, kmeans, training_features
from methods import mocov2
from methods.mocov2 import MoCoV2, moco_infonce

log = logging.getLogger(__name__)

MAX_POINTS_PER_CENTROID = 1000  # k-means fits at most k x this many points (official clus.max_points_per_centroid)


@dataclass(frozen=True)
class Config:
    proj_hidden_dim: int = 2048  # MLP head hidden width (official `--mlp`: the backbone width, 2048 for ResNet-50)
    proj_dim: int = 128  # query/key/prototype size (official `--low-dim 128`)
    queue_size: int = 16384  # MoCo negatives (official `--pcl-r 16384` sets the queue and r)
    momentum: float = 0.999  # key encoder EMA, constant (official `--moco-m 0.999`)
    temperature: float = 0.2  # InfoNCE tau and the mean of phi (official `--temperature 0.2`)
    num_clusters: tuple[int, ...] | None = None  # k per granularity; None: (25, 50, 100) x num_classes (official 25000,50000,100000 for ImageNet's 1000)
    n_negative_protos: int = 16384  # r, negative prototypes per granularity (official `--pcl-r`; the paper says 16000)
    warmup: float = 0.1  # fraction of training with InfoNCE only (official `--warmup-epoch 20` of `--epochs 200`)
    kmeans_iters: int = 20  # Lloyd iterations (official clus.niter = 20)
    kmeans_redo: int = 5  # k-means runs per granularity, the lowest objective kept (official clus.nredo = 5)
    alpha: float = 10.0  # phi's smoothing: log(Z + alpha) (official and paper: 10)
    min_scale: float = 0.2  # smallest random-resized-crop area (official `--aug-plus`: 0.2)
    num_classes: int | None = None  # filled by the runner; only used for the default num_clusters
    num_samples: int | None = None  # filled by the runner with len(splits.train): size of the assignment buffer

    def __post_init__(self) -> None:
        check(self.proj_hidden_dim > 0 and self.proj_dim > 0, "pcl.proj_hidden_dim and pcl.proj_dim must be > 0")
        check(self.queue_size > 0, f"pcl.queue_size must be > 0, got {self.queue_size}")
        check(0 <= self.momentum <= 1, f"pcl.momentum must be in [0, 1], got {self.momentum}")
        check(self.temperature > 0, f"pcl.temperature must be > 0, got {self.temperature}")
        check(self.num_clusters is None or (len(self.num_clusters) >= 1 and all(k >= 2 for k in self.num_clusters)),
              f"pcl.num_clusters must be one or more cluster counts >= 2, got {self.num_clusters}")
        check(self.n_negative_protos >= 0, f"pcl.n_negative_protos must be >= 0, got {self.n_negative_protos}")
        check(0 <= self.warmup <= 1, f"pcl.warmup must be a fraction of training in [0, 1], got {self.warmup}")
        check(self.kmeans_iters >= 1, f"pcl.kmeans_iters must be >= 1, got {self.kmeans_iters}")
        check(self.kmeans_redo >= 1, f"pcl.kmeans_redo must be >= 1, got {self.kmeans_redo}")
        check(self.alpha > 0, f"pcl.alpha must be > 0, got {self.alpha}")
        check(0 < self.min_scale <= 1, f"pcl.min_scale must be in (0, 1], got {self.min_scale}")
        check(self.num_samples is None or self.num_samples >= 1, f"pcl.num_samples must be >= 1, got {self.num_samples}")

    @property
    def ks(self) -> tuple[int, ...]:
        """The cluster count of every granularity, from `num_clusters` or (25, 50, 100) x `num_classes`."""
        check(self.num_clusters is not None or self.num_classes is not None,
              "pcl.num_clusters is None and pcl.num_classes is unset: set one of them")
        if self.num_clusters is not None:
            return self.num_clusters
        return tuple(m * int(self.num_classes) for m in (25, 50, 100))  # type: ignore[arg-type, operator]


def proto_nce(q: Tensor, centroids: Tensor, phi: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """ProtoNCE at one granularity as the official code computes it, averaged over the batch:

    L = -1/B sum_i log( exp(q_i.c_{pos_i} / phi_{pos_i}) / sum_{j in cols} exp(q_i.c_j / phi_j) ),
    cols = [pos_1 .. pos_B, neg_1 .. neg_R] (a prototype shared by several queries appears once per query).

    Args:
        q: (B, D) queries, L2-normalised here; the only input that receives a gradient.
        centroids: (K, D) unit prototypes (detached).
        phi: (K,) concentration of every prototype, > 0 (detached).
        pos: (B,) each query's cluster.
        neg: (R,) sampled negative clusters, R >= 0.

    Returns:
        A scalar, at least 0.
    """
    with torch.autocast(q.device.type, enabled=False):  # up to B + 16384 logits with temperatures ~0.05: float32
        q = F.normalize(q.float(), dim=1)
        cols = torch.cat([pos, neg])  # (B + R,)
        logits = q @ centroids.detach().float()[cols].T / phi.detach().float()[cols]  # (B, B + R)
        return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def sample_negatives(pos: Tensor, k: int, r: int) -> Tensor:
    """(R,) distinct clusters drawn uniformly (global RNG) among the k that are no query's positive,
    R = min(r, number of such clusters) (official `sample(set(range(k)) - set(pos), r)`)."""
    free = torch.ones(k, dtype=torch.bool, device=pos.device)
    free[pos] = False
    ids = free.nonzero().flatten()
    return ids[torch.randperm(len(ids), device=pos.device)[:r]]


def concentration(x: Tensor, c: Tensor, labels: Tensor, temperature: float, alpha: float = 10.0) -> Tensor:
    """phi of every cluster (official `run_kmeans`): the mean distance of its Z members to the centroid over
    log(Z + alpha) when Z > 1; clusters with Z <= 1 get the largest of those; then clipped to the 10th-90th
    percentiles (linear interpolation, numpy's default) and scaled so that the mean is `temperature`.

    Args:
        x: (N, D) points; c: (K, D) centroids (before normalisation); labels: (N,) each point's cluster.

    Returns:
        (K,) phi, mean `temperature`.
    """
    k = len(c)
    dist = (x - c[labels]).norm(dim=1)  # (N,)
    z = torch.bincount(labels, minlength=k).to(x.dtype)
    mean_dist = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, dist) / z.clamp_min(1)
    phi = torch.where(z > 1, mean_dist / torch.log(z + alpha), torch.zeros_like(z))
    phi = torch.where(z > 1, phi, phi.max())
    phi = phi.clamp(torch.quantile(phi, 0.1), torch.quantile(phi, 0.9))
    # every cluster a single point (or of identical points): no spread to scale, all prototypes get the temperature
    return temperature * phi / phi.mean() if float(phi.mean()) > 0 else torch.full_like(phi, temperature)


def cluster(x: Tensor, k: int, iters: int, redo: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """faiss Clustering as PCL configures it: the best (lowest squared-distance sum) of `redo` k-means runs, each fit
    on at most k x MAX_POINTS_PER_CENTROID random points; then every point goes to its nearest centroid.

    Returns:
        centroids (K, D) and labels (N,)."""
    best: tuple[float, Tensor] | None = None
    for _ in range(redo):
        fit = x
        if len(x) > k * MAX_POINTS_PER_CENTROID:
            fit = x[torch.randperm(len(x), generator=g, device=x.device)[: k * MAX_POINTS_PER_CENTROID]]
        c, labels = kmeans(fit, k, iters, g)
        objective = float(((fit - c[labels]) ** 2).sum())
        if best is None or objective < best[0]:
            best = (objective, c)
    if best is None:
        raise ConfigError(f"pcl.kmeans_redo must be >= 1, got {redo}")
    return best[1], assign(x, best[1])


# Official recipe: SGD, lr 0.03 (batch 256), momentum 0.9, weight decay 1e-4, cosine (`--cos`), no lr warm-up.
@register_method("pcl", config=Config, pretrain=dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0))
class PCL(nn.Module):
    uses_indices = True  # each sample's cluster is looked up by its index in the training set
    centroids: Tensor
    phi: Tensor
    im2cluster: Tensor

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.moco = MoCoV2(backbone, mocov2.Config(proj_hidden_dim=cfg.proj_hidden_dim, proj_dim=cfg.proj_dim,
                                                   queue_size=cfg.queue_size, momentum=cfg.momentum,
                                                   temperature=cfg.temperature, min_scale=cfg.min_scale))
        check(cfg.num_samples is not None, "pcl.num_samples is unset: the runner fills it with len(splits.train)")
        n = int(cfg.num_samples)  # type: ignore[arg-type]
        check(max(cfg.ks) <= n, f"pcl.num_clusters ({cfg.ks}) must all be <= num_samples ({n})")
        # Every granularity's prototypes, stacked: rows offsets[i]:offsets[i + 1] are granularity i's. Until the first
        # clustering (only reachable outside the loop) the prototypes are zero (constant logits) and labels i mod k.
        self.offsets = [0, *accumulate(cfg.ks)]
        self.register_buffer("centroids", torch.zeros(self.offsets[-1], cfg.proj_dim))
        self.register_buffer("phi", torch.full((self.offsets[-1],), cfg.temperature))
        self.register_buffer("im2cluster", torch.stack([torch.arange(n) % k for k in cfg.ks]))  # (G, N)

    def views(self, image_size: int) -> list[ViewSpec]:
        return self.moco.views(image_size)  # MoCo v2's `aug_plus` (official PCL v2 `--aug-plus`)

    def key_features(self, splits: Splits, device: torch.device) -> Tensor:
        """(N, proj_dim) unit features of the training set by the momentum encoder (official `compute_features`)."""
        key = nn.Sequential(self.moco.key_backbone, self.moco.key_head).train(self.moco.key_backbone.training)
        return F.normalize(training_features(key, splits, device), dim=1)

    @torch.no_grad()
    def before_epoch(self, epoch: int, splits: Splits, device: torch.device, seed: int) -> None:
        """Cluster the momentum features at every granularity; deterministic given `seed`."""
        check(len(splits.train) == self.im2cluster.shape[1],
              f"pcl.num_samples ({self.im2cluster.shape[1]}) != training-set size ({len(splits.train)})")
        x = self.key_features(splits, device)
        g = torch.Generator(device).manual_seed(seed)
        for i, k in enumerate(self.cfg.ks):
            c, labels = cluster(x, k, self.cfg.kmeans_iters, self.cfg.kmeans_redo, g)
            phi = concentration(x, c, labels, self.cfg.temperature, self.cfg.alpha)
            # Rank 0's result everywhere (official: clustered on rank 0, then broadcast)
            keep = int(rank() == 0)
            lo, hi = self.offsets[i], self.offsets[i + 1]
            self.centroids[lo:hi] = all_reduce_sum(F.normalize(c, dim=1) * keep)
            self.phi[lo:hi] = all_reduce_sum(phi * keep)
            self.im2cluster[i] = all_reduce_sum(labels * keep)
            sizes = torch.bincount(self.im2cluster[i], minlength=k)
            log.info("pcl epoch %d, k=%d: %d non-empty, largest %d, phi %.3f-%.3f", epoch + 1, k,
                     int((sizes > 0).sum()), int(sizes.max()), float(self.phi[lo:hi].min()), float(self.phi[lo:hi].max()))

    def proto_loss(self, q: Tensor, indices: Tensor) -> Tensor:
        """Mean over granularities of ProtoNCE for queries q (B, D) of the training rows `indices` (B,)."""
        terms = []
        for i, k in enumerate(self.cfg.ks):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            pos = self.im2cluster[i, indices]
            neg = sample_negatives(pos, k, self.cfg.n_negative_protos)
            terms.append(proto_nce(q, self.centroids[lo:hi], self.phi[lo:hi], pos, neg))
        return torch.stack(terms).mean()

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None, indices: Tensor | None = None) -> Tensor:
        """views: two (B, C, H, W) crops (query, key); indices: (B,) their rows of the training set; progress in
        [0, 1]: the prototype term is on from `warmup` on (official: after the warm-up epochs)."""
        if indices is None:
            raise ValueError("pcl needs each sample's training-set index: loss(..., indices=) (uses_indices = True)")
        moco = self.moco
        moco.update_key_encoder(self.cfg.momentum)
        v1, v2 = views
        q, k = moco.head(moco.backbone(v1)), moco.keys(v2)
        # moco_infonce normalises a copy of the queue, so the in-place enqueue leaves autograd's saved tensors intact
        loss = moco_infonce(q, k, moco.queue, self.cfg.temperature)
        moco.enqueue(k)
        if progress >= self.cfg.warmup:
            loss = loss + self.proto_loss(q, indices.to(self.im2cluster.device))
        return loss

    def encoder(self) -> nn.Module:
        return self.moco.backbone

