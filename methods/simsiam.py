"""SimSiam: Chen & He 2021, "Exploring Simple Siamese Representation Learning", https://arxiv.org/abs/2011.10566;
official code https://github.com/facebookresearch/simsiam.

One network f (backbone + projection MLP) encodes both views; a predictor h maps one view's projection
to the other's, whose gradient is stopped. There is no momentum encoder, no negatives and no queue: the
stop-gradient alone prevents collapse (paper sec. 4.1; `stop_gradient=False` reproduces the collapse).

The predictor's learning rate stays fixed at its peak (official `--fix-pred-lr`, paper sec. 4.2), through
`param_groups`. Not reproduced: the official code applies weight decay to all parameters and uses SyncBN;
here biases and norm layers get no decay and BN is per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec, moco_v2_pair
from benchmark.registry import register_method
from benchmark.train.heads import mlp
from benchmark.train.optim import param_groups


@dataclass(frozen=True)
class Config:
    proj_hidden_dim: int = 2048  # projector hidden width (paper: 2048; official code: the backbone width, 2048 for ResNet-50)
    proj_dim: int = 2048  # projector output z and predictor output p (official `--dim 2048`)
    proj_layers: int = 3  # Linear layers in the projector: 3 on ImageNet, 2 in the CIFAR setup (paper appendix D)
    pred_hidden_dim: int = 512  # predictor bottleneck (official `--pred-dim 512`, paper sec. 4.4)
    stop_gradient: bool = True  # False is the paper's collapse ablation (sec. 4.1, fig. 2)
    min_scale: float = 0.2  # smallest random-resized-crop area (official code, as MoCo v2: 0.2)

    def __post_init__(self) -> None:
        check(self.proj_hidden_dim > 0 and self.proj_dim > 0, "simsiam projector sizes must be > 0")
        check(self.pred_hidden_dim > 0, f"simsiam.pred_hidden_dim must be > 0, got {self.pred_hidden_dim}")
        check(self.proj_layers >= 1, f"simsiam.proj_layers must be >= 1, got {self.proj_layers}")
        check(0 < self.min_scale <= 1, f"simsiam.min_scale must be in (0, 1], got {self.min_scale}")


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """D(p, z) = -<p/||p||, z/||z||>, averaged over the batch (paper eq. 1). p, z: (N, D)."""
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor, stop_gradient: bool = True) -> Tensor:
    """L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2 (paper eq. 3 and 4), in [-1, 1].

    Args:
        p1, p2: (N, D) predictor outputs h(f(x1)), h(f(x2)).
        z1, z2: (N, D) projections f(x1), f(x2), the targets.
        stop_gradient: detach the targets (SimSiam); False is the collapsing ablation.

    Returns:
        A scalar; its minimum -1 is reached when each p_i points along the other view's z.
        Every term is per sample, so the mean over processes equals the loss on the global batch.
    """
    if stop_gradient:
        z1, z2 = z1.detach(), z2.detach()
    return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2


# Official code (main_simsiam.py): SGD, lr 0.05 x batch/256, momentum 0.9, weight decay 1e-4, cosine, no warm-up.
@register_method("simsiam", config=Config, pretrain=dict(optimizer="sgd", lr=0.05, weight_decay=1e-4, momentum=0.9, warmup_epochs=0))
class SimSiam(nn.Module):
    sync_bn = True  # official multi-GPU code converts BN to SyncBN (statistics over the global batch)
    loss_bound = 1.0 + 1e-3  # the mean of two negative cosines lies in [-1, 1]; float rounding aside

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        # BN on every projector layer, the output one without affine (official builder); no bias before a BN.
        self.projector = mlp(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=cfg.proj_layers, bn_last=True)  # type: ignore[arg-type]
        # Bottleneck Linear-BN-ReLU-Linear, no BN on the output (paper sec. 4.4).
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)

    def views(self, image_size: int) -> list[ViewSpec]:
        # MoCo v2 augmentation (official main_simsiam.py).
        return moco_v2_pair(image_size, (self.cfg.min_scale, 1.0))

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The predictor's lr is not decayed (official `--fix-pred-lr`)."""
        rest = [p for n, p in self.named_parameters() if not n.startswith("predictor.")]
        groups = param_groups(rest, weight_decay)
        return groups + [{**g, "fixed_lr": True} for g in param_groups(list(self.predictor.parameters()), weight_decay)]

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: two (N, C, H, W) crops; progress is unused (SimSiam has no schedule of its own)."""
        z1, z2 = (self.projector(self.backbone(v)) for v in views)  # (N, proj_dim) each
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return simsiam_loss(p1, p2, z1, z2, stop_gradient=self.cfg.stop_gradient)

    def encoder(self) -> nn.Module:
        return self.backbone
