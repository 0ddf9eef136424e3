"""SimCLR: Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
https://arxiv.org/abs/2002.05709; official code https://github.com/google-research/simclr.
SimCLR v2: Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners",
https://arxiv.org/abs/2006.10029; same repository (tf2/).

Two augmented views per image, an MLP projector, NT-Xent over the 2N views of the batch. v2 differs in
its 3-layer projector (`num_proj_layers=3`) and the temperature used at scale (0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.registry import register_method
from benchmark.train.distributed import gather_with_grad, rank
from benchmark.train.heads import mlp


@dataclass(frozen=True)
class Config:
    proj_hidden_dim: int = 2048  # projector width (paper: the ResNet-50 feature width, 2048)
    proj_dim: int = 128  # output of the projector, where the loss is computed
    proj_layers: int = 2  # Linear layers in the projector: 2 in v1, 3 in v2
    temperature: float = 0.5  # 0.5 for CIFAR-10 (paper, appendix B.9); 0.1 for ImageNet at batch 4096
    jitter_strength: float = 0.5  # colour-jitter strength s (0.5 on CIFAR-10, 1.0 on ImageNet)
    blur: bool = False  # Gaussian blur is used on ImageNet, not on CIFAR-10 (appendix B.9)
    min_scale: float = 0.08  # smallest random-resized-crop area (paper: 0.08)

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"simclr.temperature must be > 0, got {self.temperature}")
        check(self.proj_dim > 0 and self.proj_hidden_dim > 0, "simclr projector sizes must be > 0")
        check(self.proj_layers >= 1, f"simclr.proj_layers must be >= 1, got {self.proj_layers}")


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
    sync_bn = True  # official multi-GPU code converts BN to SyncBN (statistics over the global batch)

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers)  # type: ignore[arg-type]

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


@dataclass(frozen=True)
class ConfigV2(Config):
    proj_layers: int = 3  # v2: deeper projection head (paper sec. 2, `num_proj_layers=3`)
    temperature: float = 0.1  # v2 ImageNet setting (README: `--temperature=0.1`)
    blur: bool = True  # v2 uses ImageNet augmentations, blur included


# The same LARS recipe as v1 (v2 README: lr 0.3 x batch/256 for batch 4096 with sqrt scaling ignored here).
@register_method("simclrv2", config=ConfigV2, pretrain=dict(optimizer="lars", lr=0.3, weight_decay=1e-6, warmup_epochs=10))
class SimCLRv2(SimCLR):
    """SimCLR with the v2 head. Frozen protocols read the backbone, as v2's linear evaluation does; fine-tuning
    from the first projector layer (v2's semi-supervised recipe) is `finetune_module()`."""

    def finetune_module(self) -> nn.Module:
        """Backbone followed by the first projector block (Linear-BN-ReLU), v2's fine-tuning start."""
        return nn.Sequential(self.backbone, *list(self.projector)[:3])
