"""Optimisers and the learning-rate schedule of the shared pretraining loop."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.config import PretrainConfig
from benchmark.train.method import Hooks


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as in SimCLR/BYOL.

    Parameter groups with `lars=False` (biases, norm layers) use plain SGD, as the official code
    excludes them from adaptation and weight decay.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w, gn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w > 0) & (gn > 0), group["eta"] * w / gn, torch.ones_like(w))
                    d = d.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def param_groups(params: nn.Module | Iterable[Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Weights get weight decay; biases and norm parameters (ndim <= 1) do not (SimCLR, BYOL)."""
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for p in params.parameters() if isinstance(params, nn.Module) else params:
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """The optimiser named in `cfg` over the model's parameter groups.

    A method may define `param_groups(weight_decay)` (see `benchmark.train.method.Method`) returning groups that,
    besides `params` and `weight_decay`, carry `lars` (LARS adaptation on), `lr_mult` (scale of the scheduled lr) and
    `fixed_lr` (the lr stays at its peak: SimSiam's predictor); otherwise `param_groups` above is used.
    """
    lr = base_lr(cfg)
    custom = Hooks.of(model).param_groups
    groups = custom(cfg.weight_decay) if custom is not None else param_groups(model, cfg.weight_decay)
    for g in groups:
        g.setdefault("lr_mult", 1.0)
        g.setdefault("fixed_lr", False)
        g.setdefault("lars", True)
        g["base_weight_decay"] = g["weight_decay"]
    if cfg.optimizer == "sgd":
        for g in groups:
            g.pop("lars")
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        for g in groups:
            g.pop("lars")
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999))
    return LARS(groups, lr=lr, momentum=cfg.momentum)


def set_hyperparameters(opt: torch.optim.Optimizer, scheduled_lr: float, peak_lr: float, weight_decay: float | None) -> None:
    """Per step: each group's lr (scheduled, or its peak when `fixed_lr`) x `lr_mult`; a scheduled weight
    decay replaces the decay of the groups that have one."""
    for g in opt.param_groups:
        g["lr"] = (peak_lr if g.get("fixed_lr") else scheduled_lr) * g.get("lr_mult", 1.0)
        if weight_decay is not None and g.get("base_weight_decay", 0.0) > 0:
            g["weight_decay"] = weight_decay


@torch.no_grad()
def clip_per_parameter(model: nn.Module, max_norm: float) -> None:
    """Scale each parameter's gradient to norm <= max_norm (DINO's `clip_gradients`, per tensor, not global)."""
    for p in model.parameters():
        if p.grad is not None:
            norm = torch.linalg.vector_norm(p.grad)
            p.grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))


def base_lr(cfg: PretrainConfig) -> float:
    return cfg.lr * cfg.batch_size / 256


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to `floor` at `total` (DINO's `cosine_scheduler`)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
