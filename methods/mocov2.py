"""MoCo v2: Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive Learning",
https://arxiv.org/abs/2003.04297; MoCo v1: He et al. 2019, "Momentum Contrast for Unsupervised Visual
Representation Learning", https://arxiv.org/abs/1911.05722; official code https://github.com/facebookresearch/moco.

A query encoder (backbone + MLP head) is trained with InfoNCE to pick the key of the other view, encoded
by a momentum copy of itself, out of a queue of keys from earlier batches. v2 adds to v1 the MLP head,
temperature 0.2, blur in the augmentation and a cosine learning-rate schedule.

Not reproduced here: Shuffle-BN (v1 sec. 3.3) needs several processes, so single-process runs skip it, as
lightly's benchmarks do; the key encoder's BN then sees the same batch as the query's. Under
torch.distributed the keys are computed on a batch shuffled across processes, as in the official code.
The official code also applies weight decay to every parameter; the shared optimiser skips biases and norms.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec, moco_v2_pair
from benchmark.registry import register_method
from benchmark.train.distributed import gather, is_distributed, rank


@dataclass(frozen=True)
class Config:
    proj_hidden_dim: int = 2048  # head hidden width (official: the backbone width, 2048 for ResNet-50)
    proj_dim: int = 128  # key/query size (official `--moco-dim 128`)
    queue_size: int = 65536  # K, negatives kept (official `--moco-k 65536`)
    momentum: float = 0.999  # m of the key encoder, constant (official `--moco-m 0.999`)
    temperature: float = 0.2  # tau (v2 `--moco-t 0.2`; v1 used 0.07)
    symmetric: bool = False  # average both directions (the official colab demo); the official v2 code is one-way
    min_scale: float = 0.2  # smallest random-resized-crop area (official `aug_plus`: 0.2)

    def __post_init__(self) -> None:
        check(self.proj_hidden_dim > 0 and self.proj_dim > 0, "mocov2 head sizes must be > 0")
        check(self.queue_size > 0, f"mocov2.queue_size must be > 0, got {self.queue_size}")
        check(0 <= self.momentum <= 1, f"mocov2.momentum must be in [0, 1], got {self.momentum}")
        check(self.temperature > 0, f"mocov2.temperature must be > 0, got {self.temperature}")
        check(0 < self.min_scale <= 1, f"mocov2.min_scale must be in (0, 1], got {self.min_scale}")


def moco_infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE over [positive key, queue negatives] (v1 eq. 1), averaged over the batch.

    L = -1/N sum_i log( exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.n_j / t)) ),
    with every vector L2-normalised. Each term is per query, so the mean over processes equals the loss
    on the global batch.

    Args:
        q: (N, D) queries; the only input that receives a gradient.
        k: (N, D) keys, row i the positive of q_i (detached).
        queue: (K, D) negatives n_j (detached).
        temperature: t > 0.

    Returns:
        A scalar, at least 0; log(1 + K) when every logit is equal.
    """
    with torch.autocast(q.device.type, enabled=False):  # 65536 logits: keep them in float32
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.detach().float(), dim=1)
        n = F.normalize(queue.detach().float(), dim=1)
        pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        neg = q @ n.T  # (N, K)
        logits = torch.cat([pos, neg], dim=1) / temperature  # (N, 1 + K)
        target = torch.zeros(len(q), dtype=torch.long, device=q.device)  # the positive is column 0
        return F.cross_entropy(logits, target)


def _head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-ReLU-Linear with biases and no BN: the official `--mlp` head replacing ResNet's fc."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


# Official v2 recipe (README): SGD, lr 0.03 x batch/256, momentum 0.9, weight decay 1e-4, cosine, no warm-up.
@register_method("mocov2", config=Config, pretrain=dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0))
class MoCoV2(nn.Module):
    queue: Tensor
    queue_ptr: Tensor

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.head = _head(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim)  # type: ignore[arg-type]
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        # Random unit vectors until real keys replace them (official code). Buffers: checkpoints keep them.
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def views(self, image_size: int) -> list[ViewSpec]:
        # Official `aug_plus`.
        return moco_v2_pair(image_size, (self.cfg.min_scale, 1.0))

    @torch.no_grad()
    def update_key_encoder(self, m: float) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q (v1 eq. 2), parameters only: the key encoder's BN keeps its
        own running statistics (official code). Called before the keys, as the official forward does."""
        for online, key in ((self.backbone, self.key_backbone), (self.head, self.key_head)):
            for pq, pk in zip(online.parameters(), key.parameters()):
                pk.mul_(m).add_(pq.detach(), alpha=1 - m)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """Normalised keys (B, D) of a (B, C, H, W) batch, with Shuffle-BN across processes when there are several."""
        if not is_distributed():
            return F.normalize(self.key_head(self.key_backbone(x)), dim=1)
        b = x.shape[0]
        x_all = gather(x)  # (world * B, ...)
        perm = torch.randperm(len(x_all), device=x.device)
        dist.broadcast(perm, src=0)  # every process uses rank 0's shuffle
        mine = perm[rank() * b : (rank() + 1) * b]
        k_all = gather(F.normalize(self.key_head(self.key_backbone(x_all[mine])), dim=1))  # rows in `perm` order
        k_sorted = torch.empty_like(k_all)
        k_sorted[perm] = k_all  # undo the shuffle
        return k_sorted[rank() * b : (rank() + 1) * b]

    @torch.no_grad()
    def enqueue(self, k: Tensor) -> None:
        """Write the keys of every process over the oldest queue rows (FIFO), wrapping around the end, so batch
        sizes need not divide the queue; the same as writing the gathered rows one at a time in order."""
        k = gather(k).float()  # (world * B, D), the same order in every process, so the queues stay equal
        size, n = self.queue.shape[0], k.shape[0]
        kept = k[-size:]  # earlier rows of a batch larger than the queue would be overwritten at once
        start = int(self.queue_ptr) + n - len(kept)
        self.queue[(start + torch.arange(len(kept), device=k.device)) % size] = kept
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: two (N, C, H, W) crops; progress is unused (momentum and temperature are constant)."""
        self.update_key_encoder(self.cfg.momentum)
        v1, v2 = views
        # moco_infonce multiplies q by a normalised copy of the queue, so the in-place enqueue below leaves
        # what autograd saved intact (the official code clones the queue for the same reason).
        negatives = self.queue
        q1, k2 = self.head(self.backbone(v1)), self.keys(v2)
        if not self.cfg.symmetric:
            loss = moco_infonce(q1, k2, negatives, self.cfg.temperature)
            self.enqueue(k2)
            return loss
        q2, k1 = self.head(self.backbone(v2)), self.keys(v1)
        loss = (moco_infonce(q1, k2, negatives, self.cfg.temperature) + moco_infonce(q2, k1, negatives, self.cfg.temperature)) / 2
        self.enqueue(torch.cat([k1, k2]))  # both directions' keys, as the colab demo does
        return loss

    def encoder(self) -> nn.Module:
        return self.backbone
