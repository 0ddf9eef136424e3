"""DINO: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294; official code https://github.com/facebookresearch/dino.

Self-distillation with no labels. A student (backbone + DINO head) predicts, for every crop, the
output distribution that a teacher (an EMA copy of the student, no gradient) gives on the *other*
global crops. The teacher's outputs are centred (a running mean of its batch outputs, against
collapse onto one dimension) and sharpened (a low temperature, against collapse to the uniform).
Multi-crop: 2 global + V local crops; the teacher sees only the global ones.
Defaults follow the official code (main_dino.py), differences from the paper noted inline.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.backbones import set_drop_path
from benchmark.config import check
from benchmark.data.augment import ViewSpec, byol_pair
from benchmark.registry import register_method
from benchmark.train.distributed import all_reduce_mean
from benchmark.train.schedules import cosine_ramp, momentum_at

N_GLOBAL = 2  # global crops, the only ones the teacher sees (official DataAugmentationDINO)


@dataclass(frozen=True)
class Config:
    out_dim: int = 65536  # K, head output size (official `--out_dim 65536`)
    hidden_dim: int = 2048  # head MLP hidden width (official DINOHead)
    bottleneck_dim: int = 256  # head bottleneck before the L2 norm and the last layer (official DINOHead)
    norm_last_layer: bool = True  # fix the weight-norm gain g = 1 (official default; help: False is better for ViT-S)
    momentum: float = 0.996  # teacher EMA base, cosine schedule to 1 (official `--momentum_teacher`; 0.9995 suggested at batch 256)
    student_temp: float = 0.1  # tau_s (official DINOLoss)
    warmup_teacher_temp: float = 0.04  # tau_t at the start of training (official `--warmup_teacher_temp`)
    teacher_temp: float = 0.04  # tau_t after warm-up (official default; paper / ViT-S README: 0.07, above 0.07 is unstable)
    teacher_temp_warmup: float = 0.1  # fraction of training for the linear tau_t warm-up (help text: 30 epochs of the 300-epoch recipe; argparse default 0)
    center_momentum: float = 0.9  # m of the centre's EMA (paper eq. 4; official DINOLoss)
    weight_decay_end_ratio: float = 10.0  # weight decay rises on a cosine from pretrain.weight_decay to x this (official 0.04 -> 0.4)
    n_local_crops: int = 8  # V local crops of 96/224 of the image side (official `--local_crops_number 8`)
    global_scale: tuple[float, float] = (0.4, 1.0)  # global-crop area range (official `--global_crops_scale 0.4 1.`; 0.14 1. without local crops)
    local_scale: tuple[float, float] = (0.05, 0.4)  # local-crop area range (official `--local_crops_scale 0.05 0.4`)
    freeze_last_layer: float = 0.01  # fraction of training with a frozen last layer (official: 1 epoch of the default 100)
    drop_path: float = 0.1  # stochastic depth of a ViT student, linear over the blocks (official `--drop_path_rate 0.1`; the teacher has none); CNNs: none, as official
    evaluate_teacher: bool = True  # protocols read the teacher backbone (official eval_*.py `--checkpoint_key teacher`; paper fig. 6)

    def __post_init__(self) -> None:
        check(self.out_dim > 0 and self.hidden_dim > 0 and self.bottleneck_dim > 0, "dino head sizes must be > 0")
        check(0 <= self.momentum <= 1, f"dino.momentum must be in [0, 1], got {self.momentum}")
        for name in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            check(getattr(self, name) > 0, f"dino.{name} must be > 0, got {getattr(self, name)}")
        check(0 <= self.teacher_temp_warmup <= 1, f"dino.teacher_temp_warmup must be in [0, 1], got {self.teacher_temp_warmup}")
        check(0 <= self.center_momentum <= 1, f"dino.center_momentum must be in [0, 1], got {self.center_momentum}")
        check(self.weight_decay_end_ratio > 0, f"dino.weight_decay_end_ratio must be > 0, got {self.weight_decay_end_ratio}")
        check(self.n_local_crops >= 0, f"dino.n_local_crops must be >= 0, got {self.n_local_crops}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            check(0 < lo <= hi <= 1, f"dino.{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        check(0 <= self.drop_path < 1, f"dino.drop_path must be in [0, 1), got {self.drop_path}")
        check(0 <= self.freeze_last_layer <= 1, f"dino.freeze_last_layer must be in [0, 1], got {self.freeze_last_layer}")


def _crops(x: Tensor | Sequence[Tensor], b: int) -> list[Tensor]:
    """A (V*B, K) tensor in crop-major order (official layout) or a list of (B, K) tensors, as a list."""
    return list(x.split(b)) if isinstance(x, Tensor) else list(x)


def dino_loss(student_out: Tensor | Sequence[Tensor], teacher_out: Tensor | Sequence[Tensor], center: Tensor,
              student_temp: float, teacher_temp: float, n_global: int = N_GLOBAL) -> Tensor:
    """Cross entropy from centred, sharpened teacher crops to every other student crop (paper eq. 3, alg. 1).

    L = 1/|P| sum_{(i, v) in P} mean_n [ -sum_k P_t(i)[n, k] log P_s(v)[n, k] ],
    P_t(i) = softmax((t_i - c) / tau_t), P_s(v) = softmax(s_v / tau_s),
    P = {(i, v): i < n_global, v < V, v != i}: a global crop is never its own target.

    Args:
        student_out: V crops of student logits (B, K), the n_global global crops first; a list or
            their (V*B, K) concatenation.
        teacher_out: n_global crops of teacher logits (B, K) (no gradient flows into them).
        center: (1, K) centre c.
        student_temp: tau_s.
        teacher_temp: tau_t.
        n_global: number of teacher crops; student crop i < n_global is the same crop as teacher crop i.

    Returns:
        scalar loss.
    """
    b = (teacher_out.shape[0] // n_global) if isinstance(teacher_out, Tensor) else teacher_out[0].shape[0]
    s = [F.log_softmax(x.float() / student_temp, dim=-1) for x in _crops(student_out, b)]
    t = [F.softmax((x.detach().float() - center) / teacher_temp, dim=-1) for x in _crops(teacher_out, b)]
    if len(t) != n_global:
        raise ValueError(f"dino_loss: expected {n_global} teacher crops, got {len(t)}")
    terms = [-(q * s[v]).sum(dim=-1).mean() for i, q in enumerate(t) for v in range(len(s)) if v != i]
    return torch.stack(terms).mean()


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, m: float) -> None:
    """c <- m c + (1 - m) mean(teacher_out) in place (paper eq. 4). teacher_out: (n_global*B, K), all
    global crops; the batch mean is averaged over processes (equal per-process batches), as the
    official all_reduce of the sum divided by the global row count."""
    batch_center = all_reduce_mean(teacher_out.float().mean(dim=0, keepdim=True))
    center.mul_(m).add_(batch_center, alpha=1 - m)



def teacher_temp_at(cfg: Config, progress: float) -> float:
    """Linear warm-up from `warmup_teacher_temp` to `teacher_temp` over `teacher_temp_warmup`, then flat."""
    if progress >= cfg.teacher_temp_warmup:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * progress / cfg.teacher_temp_warmup


class DINOHead(nn.Module):
    """3-layer MLP (GELU, no BN) -> bottleneck -> L2 normalise -> weight-normalised linear to K (official DINOHead)."""

    def __init__(self, in_dim: int, cfg: Config) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, cfg.hidden_dim), nn.GELU(), nn.Linear(cfg.hidden_dim, cfg.hidden_dim), nn.GELU(),
                                 nn.Linear(cfg.hidden_dim, cfg.bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Created after the init above, so it keeps nn.Linear's default init (as the official code).
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # (K, 1) gain
        with torch.no_grad():
            g.fill_(1)
        g.requires_grad_(not cfg.norm_last_layer)

    def forward(self, x: Tensor, freeze_last_layer: bool = False) -> Tensor:
        """x: (N, in_dim) features -> (N, K) logits. A frozen last layer gets no gradient (official
        `cancel_gradients_last_layer`, which sets its .grad to None for the first epoch)."""
        z = F.normalize(self.mlp(x), dim=-1)
        w = self.last_layer.weight  # (K, bottleneck), g * v / ||v||
        return F.linear(z, w.detach() if freeze_last_layer else w)


# Official defaults: AdamW, lr 0.0005 per 256 images, 10 warm-up epochs, weight decay 0.04 on a cosine schedule to 0.4
# (`weight_decay_at`), per-parameter gradient clipping at norm 3.0 (`--clip_grad`), the learning rate's cosine ending
# at min_lr 1e-6, stochastic depth 0.1 in a ViT student (`Config.drop_path`).
@register_method("dino", config=Config,
                 pretrain=dict(optimizer="adamw", lr=0.0005, weight_decay=0.04, warmup_epochs=10, clip_grad=3.0, min_lr=1e-6))
class DINO(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.head = DINOHead(backbone.dim, cfg)  # type: ignore[arg-type]
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        set_drop_path(self.backbone, cfg.drop_path)  # the student's only (after the teacher's copy)
        self.center: Tensor
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    def views(self, image_size: int) -> list[ViewSpec]:
        # Official DataAugmentationDINO: flip, jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2 on every crop;
        # blur p=1.0 / p=0.1 + solarise p=0.2 on the two global crops, blur p=0.5 on the local ones (bicubic there, bilinear here).
        pair = byol_pair(image_size, self.cfg.global_scale)
        local = dataclasses.replace(pair[0], size=max(8, image_size * 96 // 224), scale=self.cfg.local_scale, blur_p=0.5)
        return pair + [local] * self.cfg.n_local_crops

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """teacher <- m teacher + (1 - m) student, parameters only (official); the teacher keeps its own
        BN statistics. Called before each loss: the same as after each step, as the first call sees equal nets."""
        for student, teacher in ((self.backbone, self.teacher_backbone), (self.head, self.teacher_head)):
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)

    def features(self, backbone: nn.Module, views: list[Tensor]) -> Tensor:
        """(V*B, dim) features. Consecutive crops of equal size share one backbone pass (official
        MultiCropWrapper, so BatchNorm sees them together)."""
        feats, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(backbone(torch.cat(views[start:end])))
            start = end
        return torch.cat(feats)

    def weight_decay_at(self, progress: float, base: float) -> float:
        """Cosine from `base` to base x weight_decay_end_ratio (official `wd_schedule`)."""
        return cosine_ramp(base, base * self.cfg.weight_decay_end_ratio, progress)

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: 2 global then V local (B, C, H, W) crops; progress drives the EMA, tau_t and the last-layer freeze."""
        self.update_teacher(momentum_at(self.cfg.momentum, progress))
        s = self.head(self.features(self.backbone, views), freeze_last_layer=progress < self.cfg.freeze_last_layer)  # (V*B, K)
        with torch.no_grad():
            t = self.teacher_head(self.features(self.teacher_backbone, views[:N_GLOBAL]))  # (2B, K)
        loss = dino_loss(s, t, self.center, self.cfg.student_temp, teacher_temp_at(self.cfg, progress), N_GLOBAL)
        update_center(self.center, t, self.cfg.center_momentum)  # after the loss, which uses the previous centre
        return loss

    def encoder(self) -> nn.Module:
        """The teacher backbone by default, as the official evaluations; it misses only the EMA step of the very
        last optimiser step (momentum is 1 there), as the update runs at the start of each loss."""
        return self.teacher_backbone if self.cfg.evaluate_teacher else self.backbone
