"""DirectPred: Tian, Chen, Ganguli 2021, "Understanding self-supervised Learning Dynamics without Contrastive Pairs",
https://arxiv.org/abs/2102.06810; official code https://github.com/facebookresearch/luckmatters/tree/master/ssl/real-dataset
(`byol_trainer.py`, `predictor_reg=corr`, `balance_type=boost_scale`).

BYOL with a linear predictor that is not learned: it is set directly from the eigen-decomposition of a moving
average of the correlation matrix F = E[z z^T] of the online projections (paper eqs. 18-19):
F <- rho F + (1 - rho) E[z z^T];  F = U diag(s) U^T;  Wp = U diag(p) U^T,  p_j = sqrt(s_j / max_j' s_j') + eps.
The official code divides by max s (dyn_convert = 2 gives the square root); the cosine loss ignores the overall
scale of Wp, so this is the paper's eq. 18 up to a constant factor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.registry import register_method
from benchmark.train.distributed import all_reduce_mean
from benchmark.train.heads import mlp
from benchmark.train.schedules import momentum_at
from methods.byol import byol_loss


@dataclass(frozen=True)
class Config:
    hidden_dim: int = 512  # projector hidden width (official byol_config.yaml, ResNet-18 on STL-10)
    proj_dim: int = 128  # projection size d; the predictor is d x d without bias (official code)
    momentum: float = 0.996  # EMA rate of the target network (official `trainer.m`)
    cosine_momentum: bool = False  # official code keeps the EMA rate constant; True: BYOL's cosine ramp to 1
    rho: float = 0.3  # EMA rate of F (paper eq. 19 rho; README command `dyn_lambda=0.3`)
    eps: float = 0.01  # added to every p_j (paper eq. 18 eps; README command `dyn_eps=0.01`)
    freq: int = 1  # steps between predictor updates (README command `predictor_freq=1`)
    jitter_strength: float = 1.0  # SimCLR colour-jitter strength s (official STL-10 transforms: s = 1)
    blur_p: float = 0.5  # Gaussian blur probability (official GaussianBlur applies with p = 0.5)
    min_scale: float = 0.08  # smallest random-resized-crop area (torchvision default, used by the official code)

    def __post_init__(self) -> None:
        check(0 <= self.momentum <= 1, f"directpred.momentum must be in [0, 1], got {self.momentum}")
        check(0 <= self.rho < 1, f"directpred.rho must be in [0, 1), got {self.rho}")
        check(self.eps >= 0, f"directpred.eps must be >= 0, got {self.eps}")
        check(self.freq >= 1, f"directpred.freq must be >= 1, got {self.freq}")
        check(self.proj_dim > 0 and self.hidden_dim > 0, "directpred projector sizes must be > 0")


def correlation(z: Tensor) -> Tensor:
    """E[z z^T] over the global batch. z: (B, d) per process; returns (d, d).

    Each process averages its own rows and the (d, d) estimates are averaged over processes: with equal
    per-process batches this is the mean over the global batch.
    """
    z = z.detach().float()
    estimate: Tensor = z.T @ z / z.shape[0]  # (d, d)
    return all_reduce_mean(estimate)


def ema_correlation(F_hat: Tensor, estimate: Tensor, rho: float, first: bool) -> Tensor:
    """F <- rho F + (1 - rho) estimate (paper eq. 19). The first call takes the estimate as it is, as the
    official `Accumulator` does, rather than averaging with the zero initial value."""
    return estimate.clone() if first else rho * F_hat + (1 - rho) * estimate


def predictor_weight(F_hat: Tensor, eps: float) -> Tensor:
    """Wp = U diag(p) U^T with F = U diag(s) U^T and p_j = sqrt(max(s_j, 0) / max_j' s_j') + eps (paper eq. 18).

    Args:
        F_hat: (d, d) symmetric correlation matrix.
        eps: boost of the weak directions, so that they keep receiving gradient.

    Returns:
        (d, d) symmetric positive definite predictor weight. As in the official code, p is clamped to >= 1e-4.
    """
    s, U = torch.linalg.eigh(F_hat.double())  # eigenvalues ascending, U orthonormal
    s = s.clamp_min(0)
    p = (s / s.max().clamp_min(1e-12)).sqrt() + eps
    p = p.clamp_min(1e-4)
    w: Tensor = (U * p) @ U.T  # (d, d)
    return w.to(F_hat.dtype)


# Official code: SGD lr 0.03 at batch 128 (0.06 per 256 here, scaled linearly), momentum 0.9, weight decay 4e-4,
# constant lr, 100 epochs on STL-10/CIFAR-10. The shared loop decays the lr with a cosine; no warm-up.
@register_method("directpred", config=Config,
                 pretrain=dict(optimizer="sgd", lr=0.06, momentum=0.9, weight_decay=4e-4, warmup_epochs=0))
class DirectPred(nn.Module):
    F_hat: Tensor  # buffers, declared for type checkers
    Wp: Tensor
    step: Tensor

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = mlp(backbone.dim, cfg.hidden_dim, cfg.proj_dim)  # type: ignore[arg-type]
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        d = cfg.proj_dim
        self.register_buffer("F_hat", torch.zeros(d, d))  # moving average of E[z z^T] (paper eq. 19)
        self.register_buffer("Wp", torch.eye(d))  # predictor weight, set from F_hat, never trained
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # F updates so far

    def views(self, image_size: int) -> list[ViewSpec]:
        # The official STL-10 pipeline: SimCLR augmentations, the same distribution for both views.
        s = self.cfg.jitter_strength
        view = ViewSpec(size=image_size, scale=(self.cfg.min_scale, 1.0), brightness=0.8 * s, contrast=0.8 * s,
                        saturation=0.8 * s, hue=0.2 * s, gray_p=0.2, blur_p=self.cfg.blur_p)
        return [view, view]

    def momentum_at(self, progress: float) -> float:
        """EMA rate of the target: constant (official code) or BYOL's cosine ramp to 1."""
        return momentum_at(self.cfg.momentum, progress) if self.cfg.cosine_momentum else self.cfg.momentum

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online (as BYOL.update_target; buffers are copied)."""
        for online, target in ((self.backbone, self.target_backbone), (self.projector, self.target_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(tau).add_(po.detach(), alpha=1 - tau)
            for bo, bt in zip(online.buffers(), target.buffers()):
                bt.copy_(bo)

    @torch.no_grad()
    def update_predictor(self, z: Tensor) -> None:
        """Fold this batch's projections z: (N, d) into F_hat, and reset Wp from it every `freq` steps.

        The official code updates Wp after the optimiser step, so each batch is predicted with the Wp of the
        previous batch (and the first with a random layer); here Wp includes the current batch, one step earlier.
        """
        step = int(self.step)
        self.F_hat.copy_(ema_correlation(self.F_hat, correlation(z), self.cfg.rho, first=step == 0))
        if step % self.cfg.freq == 0:
            self.Wp.copy_(predictor_weight(self.F_hat, self.cfg.eps))
        self.step.add_(1)

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        self.update_target(self.momentum_at(progress))
        v1, v2 = views
        z1, z2 = (self.projector(self.backbone(v)) for v in (v1, v2))  # (N, d) each
        self.update_predictor(torch.cat([z1, z2]))  # both views, as the official code
        p1, p2 = z1 @ self.Wp.to(z1.dtype), z2 @ self.Wp.to(z2.dtype)  # Wp is symmetric: Wp z = z Wp^T
        with torch.no_grad():
            t1, t2 = (self.target_projector(self.target_backbone(v)) for v in (v1, v2))
        return byol_loss(p1, t2) + byol_loss(p2, t1)  # symmetric (BYOL paper eq. 2, L + L~)

    def encoder(self) -> nn.Module:
        return self.backbone

