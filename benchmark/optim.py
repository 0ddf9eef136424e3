"""Optimisers and the learning-rate schedule of the shared pretraining loop."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.config import PretrainConfig


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weights get weight decay; biases and norm parameters (ndim <= 1) do not (SimCLR, BYOL)."""
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    lr = base_lr(cfg)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        for g in groups:
            g.pop("lars")
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        for g in groups:
            g.pop("lars")
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, 0.999))
    return LARS(groups, lr=lr, momentum=cfg.momentum)


def base_lr(cfg: PretrainConfig) -> float:
    return cfg.lr * cfg.batch_size / 256


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
