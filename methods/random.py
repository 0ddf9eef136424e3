"""Baseline `random`: the backbone at its seeded random initialisation, never trained (the floor)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from benchmark.data.augment import ViewSpec
from benchmark.registry import register_method


@dataclass(frozen=True)
class Config:
    pass


@register_method("random", config=Config)
class Random(nn.Module):
    trainable = False  # the loop skips training

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.backbone = backbone

    def views(self, image_size: int) -> list[ViewSpec]:
        return []

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        raise RuntimeError("the random baseline is not trained")

    def encoder(self) -> nn.Module:
        return self.backbone
