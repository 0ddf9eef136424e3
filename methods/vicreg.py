"""VICReg: Bardes, Ponce, LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", https://arxiv.org/abs/2105.04906; official code https://github.com/facebookresearch/vicreg.

Two views go through one backbone and a wide MLP "expander"; the loss pulls the two embeddings together
(invariance), keeps every embedding dimension's standard deviation above 1 across the batch (variance) and
decorrelates the dimensions (covariance). No negatives, no stop-gradient, no momentum encoder.

The loss follows the official code's normalisation (`main_vicreg.py`), which is what the 25/25/1
coefficients were tuned for; where it differs from the paper's equations it is noted in `vicreg_terms`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec, byol_pair
from benchmark.registry import register_method
from benchmark.train.distributed import gather_with_grad
from benchmark.train.heads import mlp_stack


@dataclass(frozen=True)
class Config:
    expander_dims: tuple[int, ...] = (8192, 8192, 8192)  # Linear output sizes (code: `--mlp 8192-8192-8192`)
    sim_coeff: float = 25.0  # lambda, invariance weight (paper sec. 4.1 and code `--sim-coeff 25`)
    std_coeff: float = 25.0  # mu, variance weight (paper and code `--std-coeff 25`)
    cov_coeff: float = 1.0  # nu, covariance weight (paper and code `--cov-coeff 1`)
    min_scale: float = 0.08  # smallest random-resized-crop area (code: augmentations.py, scale=(0.08, 1.0))

    def __post_init__(self) -> None:
        check(len(self.expander_dims) >= 1 and all(d > 0 for d in self.expander_dims),
              f"vicreg.expander_dims must be a non-empty list of sizes > 0, got {self.expander_dims}")
        for name in ("sim_coeff", "std_coeff", "cov_coeff"):
            check(getattr(self, name) >= 0, f"vicreg.{name} must be >= 0, got {getattr(self, name)}")
        check(0 < self.min_scale <= 1, f"vicreg.min_scale must be in (0, 1], got {self.min_scale}")


def _off_diagonal(c: Tensor) -> Tensor:
    """The d(d-1) off-diagonal entries of a square (d, d) matrix, flattened (the official code's trick)."""
    d = c.shape[0]
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def _variance_covariance(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """v(Z) = mean_j relu(1 - sqrt(Var(z^j) + eps)) and c(Z) = sum_{i != j} C(Z)_ij^2 / d for z: (N, d)."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    std = torch.sqrt(z.var(dim=0) + eps)  # unbiased, (d,)
    cov = (z.T @ z) / (n - 1)  # (d, d)
    return F.relu(1 - std).mean(), _off_diagonal(cov).pow(2).sum() / d


def vicreg_terms(z1: Tensor, z2: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """The three unweighted VICReg terms (invariance, variance, covariance), as in the official code.

    Args:
        z1, z2: (B, d) expander outputs of the two views of this process's batch (row i of each: same image).
        eps: added to the variance before the square root (paper eq. 1, epsilon = 1e-4).

    Returns:
        inv = ||z1 - z2||^2 / (B d), the mean squared error. The paper's s(Z, Z') (eq. 5) sums over
            dimensions, i.e. d times this; the code's `F.mse_loss` is what lambda = 25 was tuned for.
        var = [v(Z) + v(Z')] / 2 with v(Z) = mean_j relu(1 - sqrt(Var(z^j) + eps)) (eq. 1). The paper's
            loss (eq. 6) adds v(Z) + v(Z') without the 1/2; the code halves it.
        cov = c(Z) + c(Z') with c(Z) = sum_{i != j} C(Z)_ij^2 / d and C the unbiased covariance (eqs. 3-4).

    Under torch.distributed, var and cov use the global batch, gathered with gradients (the code's
    FullGatherLayer): batch statistics of B rows are not those of the global batch. The invariance term is
    per-sample, so it stays on the local batch, as in the code: with equal per-process batches the mean over
    processes (DDP's gradient average) of the local MSE is exactly the global MSE, without communication.
    The terms are computed in float32 with autocast off: a bf16 covariance of 8192 dimensions is too coarse.
    """
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.float(), z2.float()
        inv = F.mse_loss(z1, z2)
        v1, c1 = _variance_covariance(gather_with_grad(z1), eps)  # (N, d) global batch
        v2, c2 = _variance_covariance(gather_with_grad(z2), eps)
    return inv, (v1 + v2) / 2, c1 + c2


def vicreg_loss(z1: Tensor, z2: Tensor, sim_coeff: float, std_coeff: float, cov_coeff: float) -> Tensor:
    """lambda * inv + mu * var + nu * cov (paper eq. 6 with the code's normalisation; see `vicreg_terms`).

    z1, z2: (B, d) expander outputs of the two views. Returns a scalar.
    """
    inv, var, cov = vicreg_terms(z1, z2)
    return sim_coeff * inv + std_coeff * var + cov_coeff * cov


# Paper and code: LARS, lr = 0.2 x batch/256 (`--base-lr 0.2`), weight decay 1e-6, 10 warm-up epochs, then
# cosine decay; the code decays to base_lr x 0.001, the shared loop to 0.
@register_method("vicreg", config=Config, pretrain=dict(optimizer="lars", lr=0.2, weight_decay=1e-6, warmup_epochs=10))
class VICReg(nn.Module):
    sync_bn = True  # official multi-GPU code converts BN to SyncBN (statistics over the global batch)

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.expander = mlp_stack(backbone.dim, cfg.expander_dims, hidden_bias=True)  # type: ignore[arg-type]  # official `Projector`  # type: ignore[arg-type]

    def views(self, image_size: int) -> list[ViewSpec]:
        # BYOL's asymmetric pair (code: augmentations.py TrainTransform): blur always on the first view;
        # blur 0.1 and solarisation 0.2 on the second.
        return byol_pair(image_size, (self.cfg.min_scale, 1.0))

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: two (N, C, H, W) crops; VICReg has no schedule, so `progress` is unused."""
        z1, z2 = (self.expander(self.backbone(v)) for v in views)
        return vicreg_loss(z1, z2, self.cfg.sim_coeff, self.cfg.std_coeff, self.cfg.cov_coeff)

    def encoder(self) -> nn.Module:
        return self.backbone
