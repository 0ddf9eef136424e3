"""SwAV: Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
https://arxiv.org/abs/2006.09882; official code https://github.com/facebookresearch/swav.

Every crop is projected onto the unit sphere and scored against K learnable prototypes. For the two
global crops, balanced soft codes are computed by Sinkhorn-Knopp over the batch (optionally together
with a queue of earlier embeddings); every other crop predicts those codes with a softmax over its own
scores ("swapped prediction", paper eq. 1-3). Multi-crop: 2 large + V small crops.
Defaults follow the official code (main_swav.py and scripts/*.sh), differences noted inline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.registry import register_method
from benchmark.train.distributed import all_reduce_sum, world_size
from benchmark.train.heads import mlp

N_ASSIGN = 2  # crops_for_assign = [0, 1]: codes come from the two global crops (official default)


@dataclass(frozen=True)
class Config:
    hidden_dim: int = 2048  # projection head hidden width (official `--hidden_mlp 2048`)
    proj_dim: int = 128  # embedding size z (official `--feat_dim 128`)
    n_prototypes: int = 3000  # K (official `--nmb_prototypes 3000`)
    temperature: float = 0.1  # tau of the prediction softmax (paper eq. 2; official `--temperature 0.1`)
    epsilon: float = 0.05  # Sinkhorn entropy regulariser (paper eq. 3; README suggests 0.03 if the loss is stuck at ln K)
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations (paper sec. 3.1 and official code: 3)
    n_small_crops: int = 6  # V small crops of 96/224 of the image side (official `--nmb_crops 2 6`)
    global_scale: tuple[float, float] = (0.14, 1.0)  # large-crop area range (official `--min/max_scale_crops 0.14 1.`)
    small_scale: tuple[float, float] = (0.05, 0.14)  # small-crop area range (official `0.05 0.14`)
    queue_length: int = 0  # embeddings kept per global crop; 0 = no queue (official default; bs-256 script: 3840)
    queue_start: float = 0.075  # training fraction after which the queue fills (bs-256 script: epoch 15 of 200)
    freeze_prototypes: float = 0.01  # fraction of training with frozen prototypes (official: 313 iters = 1 epoch at bs 4096)

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"swav.temperature must be > 0, got {self.temperature}")
        check(self.epsilon > 0, f"swav.epsilon must be > 0, got {self.epsilon}")
        check(self.sinkhorn_iters >= 1, f"swav.sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")
        check(self.n_prototypes >= 1 and self.proj_dim >= 1 and self.hidden_dim >= 1, "swav head sizes must be >= 1")
        check(self.n_small_crops >= 0, f"swav.n_small_crops must be >= 0, got {self.n_small_crops}")
        for name in ("global_scale", "small_scale"):
            lo, hi = getattr(self, name)
            check(0 < lo <= hi <= 1, f"swav.{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        check(self.queue_length >= 0, f"swav.queue_length must be >= 0, got {self.queue_length}")
        check(0 <= self.queue_start <= 1, f"swav.queue_start must be in [0, 1], got {self.queue_start}")
        check(0 <= self.freeze_prototypes <= 1, f"swav.freeze_prototypes must be in [0, 1], got {self.freeze_prototypes}")


@torch.no_grad()
def sinkhorn(scores: Tensor, eps: float = 0.05, iters: int = 3) -> Tensor:
    """Soft codes Q by Sinkhorn-Knopp (paper eq. 3-5; official `distributed_sinkhorn`).

    Q = diag(u) exp(C^T Z / eps) diag(v), scaled so that every prototype gets 1/K of the mass and every
    sample 1/B; the last step normalises columns, so each returned row sums to exactly 1. Prototype
    totals and the matrix total are all-reduced, so with N processes the result equals one process
    on the concatenated (N*B, K) scores.

    Args:
        scores: (B, K) cosine scores z . c of this process's samples (queue rows included).
        eps: entropy regularisation; smaller gives sharper codes.
        iters: alternating normalisations.

    Returns:
        (B, K) codes, each row a distribution over prototypes.
    """
    q = torch.exp(scores.float() / eps).T  # (K, B), the paper's layout
    k, b = q.shape[0], q.shape[1] * world_size()
    q /= all_reduce_sum(q.sum())
    for _ in range(iters):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype's total -> 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample's total -> 1/B (columns are local)
        q /= b
    return (q * b).T


def swav_loss(scores: list[Tensor], codes: list[Tensor], temperature: float) -> Tensor:
    """Swapped prediction over crops (paper eq. 1-2, multi-crop form of the official code).

    L = 1/|A| sum_{a in A} 1/(V-1) sum_{v != a} mean_n [ -sum_k q_a[n, k] log softmax(s_v[n] / tau)_k ],
    where A are the crops with codes (the first len(codes) crops) and V = len(scores).

    Args:
        scores: V tensors (B, K) of prototype scores z_v . c, one per crop.
        codes: |A| tensors (B, K), the codes of crops 0..|A|-1 (targets; no gradient flows into them).
        temperature: tau.

    Returns:
        scalar loss.
    """
    total = scores[0].new_zeros((), dtype=torch.float32)
    for a, q in enumerate(codes):
        q = q.detach().float()
        sub = [-(q * F.log_softmax(s.float() / temperature, dim=1)).sum(dim=1).mean() for v, s in enumerate(scores) if v != a]
        total = total + torch.stack(sub).mean()
    return total / len(codes)


# Official README's batch-256 recipe (scripts/swav_200ep_bs256_pretrain.sh): LARS, base_lr 0.6 at batch 256,
# wd 1e-6, no warm-up, queue 3840. The batch-4096 scripts use lr 4.8 (= 0.3 per 256, linear scaling of 0.6
# would give 9.6) with 10 warm-up epochs. Official LARC adapts every parameter; our LARS skips biases/norms.
@register_method("swav", config=Config, pretrain=dict(optimizer="lars", lr=0.6, weight_decay=1e-6, warmup_epochs=0))
class SwAV(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp(backbone.dim, cfg.hidden_dim, cfg.proj_dim)  # type: ignore[arg-type]
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.n_prototypes, bias=False)
        # Each process keeps its own queue_length / world_size rows (official code): across processes that is
        # the same set of past embeddings as one process with queue_length rows on the global batch.
        self.queue: Tensor
        self.register_buffer("queue", torch.zeros(N_ASSIGN, cfg.queue_length // world_size(), cfg.proj_dim))

    def views(self, image_size: int) -> list[ViewSpec]:
        # get_color_distortion(s=1) + PILRandomGaussianBlur(p=0.5) on every crop (src/multicropdataset.py)
        base = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, jitter_p=0.8, gray_p=0.2, blur_p=0.5)
        large = ViewSpec(size=image_size, scale=self.cfg.global_scale, **base)  # type: ignore[arg-type]
        small = ViewSpec(size=max(8, image_size * 96 // 224), scale=self.cfg.small_scale, **base)  # type: ignore[arg-type]
        return [large] * N_ASSIGN + [small] * self.cfg.n_small_crops

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Project the prototypes back onto the unit sphere (official code, before every step)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def embed(self, views: list[Tensor]) -> Tensor:
        """(V*B, D) unit-norm embeddings. Crops of equal size share one backbone pass (official
        multi-resolution forward, so BatchNorm sees them together), and the head sees all crops at once."""
        feats, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(views[start:end])))
            start = end
        return F.normalize(self.projector(torch.cat(feats)), dim=1)

    @torch.no_grad()
    def codes(self, s: Tensor, z: Tensor, i: int, progress: float) -> Tensor:
        """Codes (B, K) of global crop i from its scores s (B, K); uses then fills the queue as the
        official code does: queue scores are prepended once the queue is full, newest rows go first."""
        if self.queue.shape[1] > 0 and progress >= self.cfg.queue_start:
            if bool(self.queue[i, -1].any()):
                s = torch.cat([self.queue[i] @ self.prototypes.weight.T.to(self.queue.dtype), s.float()])
            self.queue[i] = torch.cat([z.float(), self.queue[i]])[: self.queue.shape[1]]
        return sinkhorn(s, self.cfg.epsilon, self.cfg.sinkhorn_iters)[-z.shape[0]:]

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: 2 global then V small (B, C, H, W) crops; progress drives prototype freezing and the queue."""
        self.normalize_prototypes()
        b = views[0].shape[0]
        z = self.embed(views)  # (V*B, D)
        w = self.prototypes.weight
        # Official code drops the prototypes' gradient for the first iterations; detaching is the same.
        scores = z @ (w.detach() if progress < self.cfg.freeze_prototypes else w).T  # (V*B, K)
        q = [self.codes(scores[i * b : (i + 1) * b].detach(), z[i * b : (i + 1) * b].detach(), i, progress) for i in range(N_ASSIGN)]
        return swav_loss(list(scores.split(b)), q, self.cfg.temperature)

    def encoder(self) -> nn.Module:
        return self.backbone
