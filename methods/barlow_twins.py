"""Barlow Twins: Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
https://arxiv.org/abs/2103.03230; official code https://github.com/facebookresearch/barlowtwins.

Two views go through the same backbone and projector; the cross-correlation matrix of the two
batch-standardised embeddings is pushed towards the identity: diagonal 1 (invariance), off-diagonal
0 (redundancy reduction). No negatives, no predictor, no momentum encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.config import check, hashed_if_set
from benchmark.data.augment import ViewSpec, byol_pair
from benchmark.registry import register_method
from benchmark.train.distributed import gather_with_grad
from benchmark.train.heads import mlp_stack
from benchmark.train.optim import param_groups


@dataclass(frozen=True)
class Config:
    proj_dims: tuple[int, ...] = (8192, 8192, 8192)  # projector widths; the last is D of the D x D matrix (`--projector 8192-8192-8192`)
    lambd: float = 0.0051  # off-diagonal weight (code `--lambd 0.0051`; paper sec. 2 says 5e-3)
    min_scale: float = 0.08  # smallest random-resized-crop area (torchvision default, as the code)
    # lr of biases and BN parameters relative to the weights'; None: official 0.0048 / 0.2, which is relative to
    # LARS-adapted weights (a suite that trains with plain SGD may set 1)
    bias_lr_mult: float | None = hashed_if_set(None)

    def __post_init__(self) -> None:
        check(len(self.proj_dims) >= 1 and all(d > 0 for d in self.proj_dims),
              f"barlow_twins.proj_dims must be one or more positive widths, got {self.proj_dims}")
        check(self.lambd >= 0, f"barlow_twins.lambd must be >= 0, got {self.lambd}")
        check(0 < self.min_scale <= 1, f"barlow_twins.min_scale must be in (0, 1], got {self.min_scale}")
        check(self.bias_lr_mult is None or self.bias_lr_mult > 0, f"barlow_twins.bias_lr_mult must be > 0, got {self.bias_lr_mult}")


def _standardise(z: Tensor, eps: float = 1e-5) -> Tensor:
    """(z - mean) / sqrt(var + eps) along the batch: `nn.BatchNorm1d(D, affine=False)` in training mode."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)  # BN normalises with the biased variance
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float) -> Tensor:
    """Redundancy-reduction loss (paper eq. 1 and 2).

    C_ij = sum_b zn1_bi zn2_bj / N, with zn the embeddings standardised per dimension over the batch;
    L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2.

    Args:
        z1, z2: (B, D) projector outputs of the two views; row b of each comes from the same image.
        lambd: weight of the off-diagonal (redundancy-reduction) term.

    Returns:
        The scalar loss of the global batch. Under torch.distributed, z1 and z2 are gathered from every
        process (N = world size x B) with gradients, so every process returns the same global loss and
        the DDP-averaged parameter gradient equals one process's gradient on the global batch (the
        official code all-reduces C and uses SyncBatchNorm instead: the same forward pass).
    """
    g1, g2 = gather_with_grad(z1.float()), gather_with_grad(z2.float())  # (N, D) each
    n = g1.shape[0]
    c = _standardise(g1).T @ _standardise(g2) / n  # (D, D)
    diag = torch.diagonal(c)
    on_diag = (1 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambd * off_diag


WEIGHT_LR, BIAS_LR = 0.2, 0.0048  # official `--learning-rate-weights` / `--learning-rate-biases`


# Code: LARS, lr 0.2 x batch/256 for weights and 0.0048 x batch/256 for biases and BN parameters
# (`--learning-rate-biases`, through `param_groups`), weight decay 1.5e-6, 10 warm-up epochs, batch 2048, 1000 epochs.
@register_method("barlow_twins", config=Config, pretrain=dict(optimizer="lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10))
class BarlowTwins(nn.Module):
    sync_bn = True  # official multi-GPU code converts BN to SyncBN (statistics over the global batch)

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp_stack(backbone.dim, cfg.proj_dims, hidden_bias=False)  # type: ignore[arg-type]  # official `main.py`  # type: ignore[arg-type]

    def views(self, image_size: int) -> list[ViewSpec]:
        # BYOL's asymmetric pair (code `Transform`): blur 1.0 / 0.1, solarisation 0.0 / 0.2.
        return byol_pair(image_size, (self.cfg.min_scale, 1.0))

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Biases and BN parameters: no decay, no LARS adaptation, lr x 0.0048 / 0.2 (official `main.py`) or x bias_lr_mult."""
        decay, no_decay = param_groups(self, weight_decay)
        mult = BIAS_LR / WEIGHT_LR if self.cfg.bias_lr_mult is None else self.cfg.bias_lr_mult
        return [decay, {**no_decay, "lr_mult": mult}]

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: two (B, C, H, W) crops; progress is unused (Barlow Twins has no schedule)."""
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        return barlow_twins_loss(z1, z2, self.cfg.lambd)

    def encoder(self) -> nn.Module:
        return self.backbone
