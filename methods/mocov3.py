"""MoCo v3: Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.02057; official code https://github.com/facebookresearch/moco-v3.

A base encoder (backbone, projector, predictor) predicts, for each image, the momentum encoder's key
(momentum copy of backbone and projector) of the other view among the keys of the whole batch: a
symmetric InfoNCE with in-batch negatives, no queue. Defaults are the official ResNet recipe; ViT runs
use `proj_layers=3, pred_bn_last=True, temperature=0.2` (official `MoCo_ViT` and README), and the README's
ViT optimiser (AdamW, lr 1.5e-4, weight decay 0.1, 40 warm-up epochs) via `pretrain.*` overrides.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec, byol_pair
from benchmark.registry import register_method
from benchmark.train.distributed import gather, rank
from benchmark.train.heads import mlp
from benchmark.train.schedules import momentum_at


@dataclass(frozen=True)
class Config:
    hidden_dim: int = 4096  # projector and predictor hidden width (`--moco-mlp-dim`)
    proj_dim: int = 256  # projection / prediction / key size (`--moco-dim`)
    proj_layers: int = 2  # Linear layers in the projector: 2 for ResNet (`MoCo_ResNet`), 3 for ViT (`MoCo_ViT`)
    pred_bn_last: bool = False  # BN without affine on the predictor output: off for ResNet, on for ViT (builder.py)
    temperature: float = 1.0  # `--moco-t`: 1.0 for ResNet (code default), 0.2 for ViT (README)
    momentum: float = 0.99  # m0 of the cosine schedule to 1 (`--moco-m`, `--moco-m-cos` in every reference command)
    min_scale: float = 0.08  # `--crop-min` code default; the ResNet reference commands (CONFIG.md) use 0.2

    def __post_init__(self) -> None:
        check(self.hidden_dim > 0 and self.proj_dim > 0, "mocov3.hidden_dim and mocov3.proj_dim must be > 0")
        check(self.proj_layers >= 1, f"mocov3.proj_layers must be >= 1, got {self.proj_layers}")
        check(self.temperature > 0, f"mocov3.temperature must be > 0, got {self.temperature}")
        check(0 <= self.momentum <= 1, f"mocov3.momentum must be in [0, 1], got {self.momentum}")
        check(0 < self.min_scale <= 1, f"mocov3.min_scale must be in (0, 1], got {self.min_scale}")


def ctr(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """InfoNCE of queries against in-batch keys, times 2T (paper alg. 1; official `contrastive_loss`).

    ctr(q, k) = 2T * mean_i -log( exp(q_i . k_i / T) / sum_j exp(q_i . k_j / T) ), q and k L2-normalised.

    Args:
        q: (B, D) this process's queries (base encoder + predictor), with gradient.
        k: (B, D) this process's keys (momentum encoder); never receives gradient. Keys are gathered
            from every process (N = world size x B candidates) and the positive of local row i is the
            global row rank * B + i, so the mean over processes equals one process on the global batch.
        temperature: T. The 2T factor (paper alg. 1, official code) cancels the 1/T in d loss / d(q . k).

    Returns:
        Scalar loss.
    """
    b = q.shape[0]
    q = F.normalize(q.float(), dim=1)
    k = gather(F.normalize(k.detach().float(), dim=1))  # (N, D); detach: identity gather keeps the graph
    logits = q @ k.T / temperature  # (B, N)
    labels = torch.arange(b, device=q.device) + rank() * b
    return F.cross_entropy(logits, labels) * (2 * temperature)



def _head(layers: int, in_dim: int, hidden_dim: int, out_dim: int, bn_last: bool) -> nn.Sequential:
    """The official `_build_mlp`: heads.mlp, with the last Linear bias-free even without a final BN."""
    head = mlp(in_dim, hidden_dim, out_dim, layers=layers, bn_last=bn_last)
    if not bn_last:
        head[-1] = nn.Linear(hidden_dim if layers > 1 else in_dim, out_dim, bias=False)
    return head


# Official ResNet recipe (main_moco.py defaults): LARS, lr 0.6 x batch/256 (`args.lr * batch_size / 256`,
# i.e. 9.6 at batch 4096), weight decay 1e-6, momentum 0.9, 10 warm-up epochs.
@register_method("mocov3", config=Config, pretrain=dict(optimizer="lars", lr=0.6, weight_decay=1e-6, momentum=0.9, warmup_epochs=10))
class MoCoV3(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.projector = _head(cfg.proj_layers, backbone.dim, cfg.hidden_dim, cfg.proj_dim, bn_last=True)  # type: ignore[arg-type]
        self.predictor = _head(2, cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim, bn_last=cfg.pred_bn_last)
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def views(self, image_size: int) -> list[ViewSpec]:
        # BYOL's asymmetric pair (main_moco.py augmentation1/2): blur 1.0 / 0.1, solarize 0 / 0.2.
        return byol_pair(image_size, (self.cfg.min_scale, 1.0))

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """k <- m k + (1 - m) q over parameters only, as the official code: the momentum encoder's BN
        layers keep their own running statistics (it runs in train mode, so they never affect the loss)."""
        for base, mom in ((self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)):
            for pb, pm in zip(base.parameters(), mom.parameters()):
                pm.mul_(m).add_(pb.detach(), alpha=1 - m)

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        x1, x2 = views
        q1, q2 = (self.predictor(self.projector(self.backbone(x))) for x in (x1, x2))
        with torch.no_grad():
            self.update_momentum_encoder(momentum_at(self.cfg.momentum, progress))
            k1, k2 = (self.momentum_projector(self.momentum_backbone(x)) for x in (x1, x2))
        return ctr(q1, k2, self.cfg.temperature) + ctr(q2, k1, self.cfg.temperature)  # symmetric (alg. 1)

    def encoder(self) -> nn.Module:
        return self.backbone
