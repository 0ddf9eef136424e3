"""Baseline `pixels`: the normalised raw pixels as features, a reference row no network influences.

Every frozen protocol gets a row that measures the data, not a representation (the "raw pixels"
rows of the classic self-supervised comparisons). Fine-tuning protocols train only their head on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from benchmark.data.augment import ViewSpec
from benchmark.registry import register_method


@dataclass(frozen=True)
class Config:
    pass


@register_method("pixels", config=Config, pretrain_fixed=dict(backbone="pixels", epochs=0))
class Pixels(nn.Module):
    trainable = False  # nothing to train: the backbone is the identity on pixels

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.backbone = backbone

    def views(self, image_size: int) -> list[ViewSpec]:
        return []

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        raise RuntimeError("the pixels baseline is not trained")

    def encoder(self) -> nn.Module:
        return self.backbone
