"""NPID: Wu, Xiong, Yu, Lin 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
https://arxiv.org/abs/1805.01978; official code https://github.com/zhirongw/lemniscate.pytorch.

Every training image is its own class. The backbone's pooled features go through a linear layer to 128-d
L2-normalised embeddings f; a memory bank V holds one embedding per training image, and the loss asks the
embedding of image i to pick its own bank row v_i out of K noise rows drawn uniformly from the bank
(noise-contrastive estimation, paper sec. 3.2), or out of the whole bank (`loss_type: softmax`, the
non-parametric softmax of paper eq. 2). After each step the batch's rows are updated,
v_i <- normalise(m v_i + (1 - m) f_i).

Where the official code differs from the paper, the code is followed:
- the bank row update uses momentum m = 0.5 (`--nce-m 0.5`); the paper writes v_i <- f_i plus a proximal term
  (sec. 3.4), which the code does not have;
- the bank starts as uniform noise in [-a, a], a = sqrt(3 / D) (unit norm in expectation), not unit vectors;
- Z is estimated once, on the first batch, as N x the mean of exp(v.f / tau) over the sampled rows, and kept.
Not reproduced: the official step schedule (lr x0.1 at epochs 120 and 160); the shared loop's cosine is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.errors import ConfigError
from benchmark.registry import register_method
from benchmark.train.distributed import all_reduce_mean, gather


@dataclass(frozen=True)
class Config:
    proj_dim: int = 128  # D, size of the embeddings and bank rows (official `--low-dim 128`)
    nce_k: int = 4096  # K, noise rows per sample for NCE (official `--nce-k 4096`)
    temperature: float = 0.07  # tau (official ImageNet `--nce-t 0.07`; its CIFAR script uses 0.1)
    bank_momentum: float = 0.5  # m of the bank update (official `--nce-m 0.5`; the paper replaces, m = 0)
    loss_type: Literal["nce", "softmax"] = "nce"  # nce: official default; softmax: over the whole bank (official `--nce-k 0`)
    min_scale: float = 0.2  # smallest random-resized-crop area (official: RandomResizedCrop(scale=(0.2, 1)))
    num_samples: int | None = None  # N, rows of the memory bank; None: filled in with the training-set size

    def __post_init__(self) -> None:
        check(self.proj_dim > 0, f"npid.proj_dim must be > 0, got {self.proj_dim}")
        check(self.nce_k > 0, f"npid.nce_k must be > 0, got {self.nce_k}")
        check(self.temperature > 0, f"npid.temperature must be > 0, got {self.temperature}")
        check(0 <= self.bank_momentum < 1, f"npid.bank_momentum must be in [0, 1), got {self.bank_momentum}")
        check(self.loss_type in ("nce", "softmax"), f"npid.loss_type must be 'nce' or 'softmax', got {self.loss_type!r}")
        check(0 < self.min_scale <= 1, f"npid.min_scale must be in (0, 1], got {self.min_scale}")
        check(self.num_samples is None or self.num_samples > 0, f"npid.num_samples must be > 0 or null, got {self.num_samples}")


def nce_loss(logits: Tensor, log_z: Tensor | float, num_samples: int) -> Tensor:
    """NCE loss of instance discrimination (paper eqs. 5-7, the official NCECriterion), averaged over the batch.

    With P(j | f) = exp(v_j . f / tau) / Z, uniform noise P_n = 1/N and h = P / (P + K P_n):
    L = -1/B sum_b [ log h(positive) + sum_{k=1..K} log(1 - h(noise k)) ].
    Computed in log space (softplus), so it cannot overflow at small tau; the official code adds eps = 1e-7 to
    each denominator instead, a difference far below K/N for any real bank.

    Args:
        logits: (B, 1 + K) v_j . f / tau; column 0 is the sample's own bank row, columns 1..K the noise rows.
        log_z: log Z, the normaliser of P(j | f).
        num_samples: N, the size of the memory bank.

    Returns:
        A scalar, at least 0.
    """
    k = logits.shape[1] - 1
    log_p = logits.float() - log_z  # (B, 1 + K) log P(j | f)
    log_kpn = math.log(k / num_samples)  # log(K P_n)
    pos = F.softplus(log_kpn - log_p[:, 0])  # -log h = log(1 + K P_n / P)
    neg = F.softplus(log_p[:, 1:] - log_kpn).sum(dim=1)  # -log(1 - h) = log(1 + P / (K P_n))
    return (pos + neg).mean()


def estimate_log_z(logits: Tensor, num_samples: int) -> Tensor:
    """log Z for Z = N x mean(exp(logits)), the Monte Carlo estimate over the sampled rows (official
    NCEAverage, first batch). logits: (B, 1 + K) as for `nce_loss`. Averaged over processes."""
    mean = logits.detach().double().exp().mean()  # float64: exp(1 / tau) overflows float32 below tau = 0.011
    return torch.log(all_reduce_mean(mean) * num_samples).float()


def bank_update(v: Tensor, f: Tensor, momentum: float) -> Tensor:
    """New bank rows normalise(m v + (1 - m) f) (official NCEFunction.backward). v, f: (B, D)."""
    return F.normalize(momentum * v + (1 - momentum) * f, dim=1)


# Official ImageNet recipe (main.py): SGD, lr 0.03 at batch 256, momentum 0.9, weight decay 1e-4, no warm-up.
@register_method("npid", config=Config, pretrain=dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0))
class NPID(nn.Module):
    uses_indices = True  # the loss reads and writes the bank rows of the batch's images
    memory: Tensor
    log_z: Tensor

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        if cfg.num_samples is None:
            raise ConfigError("npid.num_samples (the training-set size, which sizes the memory bank) must be set; "
                              "the runner fills it in from the dataset")
        self.cfg = cfg
        self.backbone = backbone
        self.head = nn.Linear(backbone.dim, cfg.proj_dim)  # type: ignore[arg-type]  # official: ResNet's fc -> low_dim
        a = math.sqrt(3 / cfg.proj_dim)  # uniform in [-a, a]: E|v|^2 = 1 (official NCEAverage)
        # Buffers: checkpoints carry the bank and Z, so a resumed run continues bit for bit.
        self.register_buffer("memory", torch.rand(cfg.num_samples, cfg.proj_dim) * (2 * a) - a)
        self.register_buffer("log_z", torch.tensor(float("nan")))  # NaN until the first NCE batch sets it

    def views(self, image_size: int) -> list[ViewSpec]:
        # Official main.py: RandomResizedCrop(0.2, 1), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4) always,
        # flip. The shared augmentation applies jitter before grayscale (the order of lemniscate's CIFAR script).
        return [ViewSpec(size=image_size, scale=(self.cfg.min_scale, 1.0), jitter_p=1.0, brightness=0.4, contrast=0.4,
                         saturation=0.4, hue=0.4, gray_p=0.2, blur_p=0.0, flip_p=0.5)]

    def embed(self, x: Tensor) -> Tensor:
        """L2-normalised float32 embeddings f (B, D) of a (B, C, H, W) batch."""
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)

    @torch.no_grad()
    def update_memory(self, indices: Tensor, f: Tensor) -> None:
        """Move the rows of the batch (of every process, so the banks stay equal) towards their embeddings."""
        indices, f = gather(indices), gather(f.detach().float())
        self.memory[indices] = bank_update(self.memory[indices], f, self.cfg.bank_momentum)

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None, indices: Tensor | None = None) -> Tensor:
        """views: one (B, C, H, W) crop; indices: (B,) the images' rows in the training set (and the bank)."""
        if indices is None:
            raise ValueError("npid needs each sample's training-set index: loss(..., indices=) (uses_indices = True)")
        n, cfg = self.memory.shape[0], self.cfg
        f = self.embed(views[0])  # (B, D)
        with torch.autocast(f.device.type, enabled=False):
            # A copy of the bank, as the update below writes in place while autograd still needs these values.
            # All N logits, then the K + 1 sampled ones: less memory than gathering (B, 1 + K, D) bank rows as the
            # official code does while N < (1 + K) D (0.5 M rows at the defaults).
            logits = f @ self.memory.clone().T / cfg.temperature  # (B, N)
            if cfg.loss_type == "softmax":
                loss = F.cross_entropy(logits, indices)  # non-parametric softmax (paper eq. 2)
            else:
                noise = torch.randint(n, (len(f), cfg.nce_k), device=f.device)  # uniform over the bank, with replacement
                logits = logits.gather(1, torch.cat([indices[:, None], noise], dim=1))  # (B, 1 + K)
                if bool(torch.isnan(self.log_z)):
                    self.log_z.copy_(estimate_log_z(logits, n))
                loss = nce_loss(logits, self.log_z, n)
        self.update_memory(indices, f)
        return loss

    def encoder(self) -> nn.Module:
        return self.backbone
