"""BYOL: Grill et al. 2020, "Bootstrap Your Own Latent", https://arxiv.org/abs/2006.07733;
official code https://github.com/deepmind/deepmind-research/tree/master/byol.

An online network (backbone, projector, predictor) predicts a target network's projection of the
other view; the target is an exponential moving average of the online network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec, byol_pair
from benchmark.registry import register_method
from benchmark.train.heads import mlp
from benchmark.train.schedules import momentum_at


@dataclass(frozen=True)
class Config:
    hidden_dim: int = 4096  # projector and predictor hidden width
    proj_dim: int = 256  # projection / prediction size
    momentum: float = 0.996  # tau_base; cosine schedule to 1.0 over training (paper sec. 3.2)
    min_scale: float = 0.08  # smallest random-resized-crop area (paper: 0.08)

    def __post_init__(self) -> None:
        check(0 <= self.momentum <= 1, f"byol.momentum must be in [0, 1], got {self.momentum}")


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """2 - 2 cos(p, z), averaged over the batch (paper eq. 2). p: (N, D) prediction, z: (N, D) target."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()



# Paper: LARS, lr 0.2 x batch/256, weight decay 1.5e-6, 10 warm-up epochs.
@register_method("byol", config=Config, pretrain=dict(optimizer="lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10))
class BYOL(nn.Module):
    sync_bn = True  # official multi-GPU code converts BN to SyncBN (statistics over the global batch)

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp(backbone.dim, cfg.hidden_dim, cfg.proj_dim)  # type: ignore[arg-type]
        self.predictor = mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def views(self, image_size: int) -> list[ViewSpec]:
        # The two views differ in blur and solarisation probabilities (paper, table 6).
        return byol_pair(image_size, (self.cfg.min_scale, 1.0))

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online. Called before each loss: the same as after
        each optimiser step, as the first call sees identical networks."""
        for online, target in ((self.backbone, self.target_backbone), (self.projector, self.target_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(tau).add_(po.detach(), alpha=1 - tau)
            for bo, bt in zip(online.buffers(), target.buffers()):
                bt.copy_(bo)

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        self.update_target(momentum_at(self.cfg.momentum, progress))
        v1, v2 = views
        p1, p2 = (self.predictor(self.projector(self.backbone(v))) for v in (v1, v2))
        with torch.no_grad():
            z1, z2 = (self.target_projector(self.target_backbone(v)) for v in (v1, v2))
        return byol_loss(p1, z2) + byol_loss(p2, z1)  # symmetric (paper eq. 2, L + L~)

    def encoder(self) -> nn.Module:
        return self.backbone
