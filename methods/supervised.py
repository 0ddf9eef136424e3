"""Baseline `supervised`: the backbone trained with labels and cross entropy (the usual ceiling).

Same backbone, data and epochs as the self-supervised methods; a linear classifier on the pooled
features; standard crop-and-flip augmentation (He et al. 2016).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.registry import register_method


@dataclass(frozen=True)
class Config:
    num_classes: int | None = None  # None: filled in from the pretraining dataset
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check(self.num_classes is None or self.num_classes > 1, "supervised.num_classes must be > 1")
        check(0 <= self.label_smoothing < 1, "supervised.label_smoothing must be in [0, 1)")


@register_method("supervised", config=Config, pretrain=dict(optimizer="sgd", lr=0.1, weight_decay=5e-4))
class Supervised(nn.Module):
    uses_labels = True  # the only method that sees labels during pretraining

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        check(cfg.num_classes is not None, "supervised.num_classes is filled in from the dataset; set it when building by hand")
        self.head = nn.Linear(backbone.dim, cfg.num_classes)  # type: ignore[arg-type]

    def views(self, image_size: int) -> list[ViewSpec]:
        return [ViewSpec(size=image_size, scale=(0.35, 1.0), jitter_p=0.0, gray_p=0.0)]

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise TypeError("the supervised baseline needs labels (uses_labels = True)")
        return F.cross_entropy(self.head(self.backbone(views[0])), labels, label_smoothing=self.cfg.label_smoothing)

    def encoder(self) -> nn.Module:
        return self.backbone
