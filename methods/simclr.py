"""SimCLR: Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
https://arxiv.org/abs/2002.05709; official code https://github.com/google-research/simclr.

Two augmented views per image, a 2-layer MLP projector, NT-Xent over the 2N views of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.augment import ViewSpec
from benchmark.config import check
from benchmark.distributed import gather_with_grad, rank
from benchmark.heads import mlp
from benchmark.registry import register_method


@dataclass(frozen=True)
class Config:
    proj_hidden_dim: int = 2048  # projector width (paper: the ResNet-50 feature width, 2048)
    proj_dim: int = 128  # output of the projector, where the loss is computed
    temperature: float = 0.5  # 0.5 for CIFAR-10 (paper, appendix B.9); 0.1 for ImageNet at batch 4096
    jitter_strength: float = 0.5  # colour-jitter strength s (0.5 on CIFAR-10, 1.0 on ImageNet)
    blur: bool = False  # Gaussian blur is used on ImageNet, not on CIFAR-10 (appendix B.9)
    min_scale: float = 0.08  # smallest random-resized-crop area (paper: 0.08)

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"simclr.temperature must be > 0, got {self.temperature}")
        check(self.proj_dim > 0 and self.proj_hidden_dim > 0, "simclr projector sizes must be > 0")


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Normalised-temperature cross entropy over 2N views (paper eq. 1, averaged over all 2N anchors).

    z1, z2: (B, D) projections of the two views; row i of z1 and row i of z2 are positives, the
    other 2N - 2 rows are negatives. Under torch.distributed, the candidates are gathered from every
    process (N = world size x B) with gradients, and the anchors are this process's rows: the mean
    over processes equals the single-process loss on the global batch.
    """
    b = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)  # (N, D) each
    n = g1.shape[0]
    cand = torch.cat([g1, g2])  # (2N, D)
    anchors = torch.cat([z1, z2])  # (2B, D)
    sim = (anchors @ cand.T).float() / temperature  # (2B, 2N)
    own = torch.arange(b, device=z1.device) + rank() * b  # global row of each local anchor
    idx = torch.arange(2 * b, device=z1.device)
    self_col = torch.cat([own, own + n])
    sim[idx, self_col] = float("-inf")  # an anchor is not its own negative
    targets = torch.cat([own + n, own])
    return F.cross_entropy(sim, targets)


@register_method("simclr", config=Config, pretrain=dict(optimizer="lars", lr=0.3, weight_decay=1e-6, warmup_epochs=10))
class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim)  # type: ignore[arg-type]

    def views(self, image_size: int) -> list[ViewSpec]:
        s = self.cfg.jitter_strength
        view = ViewSpec(size=image_size, scale=(self.cfg.min_scale, 1.0), brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s,
                        blur_p=0.5 if self.cfg.blur else 0.0)
        return [view, view]

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        return nt_xent(z1, z2, self.cfg.temperature)

    def encoder(self) -> nn.Module:
        return self.backbone
