"""Linear probe trained with SGD and augmentation on a frozen backbone: the MoCo/SimCLR recipe (docs/protocols.md#linear-probe).

A linear head (N(0, 0.01), bias 0: MoCo `main_lincls.py`) learns on a frozen copy of the encoder kept in eval
mode (BN statistics never move) from random resized crops + flips; tests see the plain image. Default: SimCLR
(google-research/simclr README, simclr #5) and lightly (`benchmarks/imagenet/resnet50/linear_eval.py`): SGD
Nesterov m=0.9, lr 0.1 x batch/256, cosine without warm-up, 90 epochs, batch 256, wd 0. Each lr of `lrs` is
trained on train and scored on val (a diverged lr counts as failed), the best refit on train + val and tested
once; a single lr with refit is fit on train + val directly. The sweep trains every lr at once, one head per lr
on the same augmented batches and one backbone forward per step (DINOv2 `eval/linear.py`); each head ends as its
own run would (`one_pass: false` runs them one by one, for timing). The backbone copy must be bit-identical after
every fit (MoCo's `sanity_check`). Variant `linear_sgd_moco`: MoCo v1/v2, lr 30, 100 epochs, x0.1 at 60 and 80.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from benchmark.config import check, nohash
from benchmark.data.sets import Images, Splits
from benchmark.evaluate.encoder import Encoder
from benchmark.evaluate.finetune import Classifier, Recipe, predict, train_classifier, train_heads
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext, classification_rows, topk_accuracy
from benchmark.registry import register_protocol
from benchmark.store.results import Row

__all__ = ["Config", "MoCoConfig", "fit", "fit_heads", "linear_sgd", "make_head", "recipe"]


@dataclass(frozen=True)
class Config:
    lrs: tuple[float, ...] = (0.1,)  # base lr per batch 256, one run each, picked on val (SimCLR, lightly: 0.1)
    epochs: int = 90  # SimCLR README, lightly linear_eval.py
    batch_size: int = 256  # lightly (2 x 128), MoCo; SimCLR uses 4096 with the same lr rule
    momentum: float = 0.9  # every anchor
    nesterov: bool = True  # SimCLR (simclr #5); MoCo and lightly use plain momentum
    weight_decay: float = 0.0  # lightly, MoCo, SimCLR's CIFAR example (its ImageNet README command: 1e-6)
    schedule: Literal["cosine", "step"] = "cosine"  # SimCLR, lightly: cosine, no warm-up; MoCo: step
    milestones: tuple[float, ...] = (0.6, 0.8)  # step schedule only: x0.1 at these fractions (MoCo: epochs 60, 80 of 100)
    crop_scale: float = 0.08  # RandomResizedCrop minimum area + flip (torchvision default, every anchor)
    bn_head: bool = False  # BatchNorm1d(affine=False, eps=1e-6) before the head (MAE paper A.2, main_linprobe.py)
    refit: bool = True  # retrain the picked lr on train + val before testing (ssl-transfer, BYOL TRAIN_AND_VALID)
    # the lr sweep as one head per lr on one backbone forward per step (DINOv2 eval/linear.py); False: one full run
    # per lr, as version 1 did. The same numbers either way (tested), hence not hashed
    one_pass: bool = nohash(True)

    def __post_init__(self) -> None:
        check(len(self.lrs) > 0, "linear_sgd.lrs must name at least one learning rate")
        check(all(math.isfinite(lr) and lr > 0 for lr in self.lrs), f"linear_sgd.lrs must all be finite and > 0, got {self.lrs}")
        check(len(set(self.lrs)) == len(self.lrs), f"linear_sgd.lrs has duplicates: {self.lrs}")
        check(self.epochs > 0, f"linear_sgd.epochs must be > 0, got {self.epochs}")
        check(self.batch_size > 0, f"linear_sgd.batch_size must be > 0, got {self.batch_size}")
        check(0 <= self.momentum < 1, f"linear_sgd.momentum must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, f"linear_sgd.weight_decay must be >= 0, got {self.weight_decay}")
        check(self.schedule in ("cosine", "step"), f"linear_sgd.schedule must be cosine or step, got {self.schedule!r}")
        check(all(0 < m < 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
              f"linear_sgd.milestones must be increasing fractions in (0, 1), got {self.milestones}")
        check(0 < self.crop_scale <= 1, f"linear_sgd.crop_scale must be in (0, 1], got {self.crop_scale}")


@dataclass(frozen=True)
class MoCoConfig(Config):
    """MoCo v1/v2 `main_lincls.py` defaults (also mmselfsup's "MoCo v1/v2 linear evaluation setting")."""

    lrs: tuple[float, ...] = (30.0,)
    epochs: int = 100
    nesterov: bool = False
    schedule: Literal["cosine", "step"] = "step"
    milestones: tuple[float, ...] = (0.6, 0.8)  # epochs 60 and 80 of 100


def recipe(cfg: Config, lr: float) -> Recipe:
    """The `Recipe` of one run of `cfg` at base learning rate `lr` (per batch 256)."""
    return Recipe(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                  weight_decay=cfg.weight_decay, schedule=cfg.schedule, milestones=cfg.milestones, crop_scale=cfg.crop_scale)


def make_head(dim: int, num_classes: int, bn: bool, seed: int) -> nn.Module:
    """Linear (dim -> num_classes), weights N(0, 0.01) and bias 0 (MoCo), optionally after a BN without affine (MAE)."""
    fc = nn.Linear(dim, num_classes)
    nn.init.normal_(fc.weight, 0.0, 0.01, generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(fc.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), fc) if bn else fc


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _check_unchanged(before: dict[str, Tensor], backbone: nn.Module) -> None:
    """MoCo's `sanity_check`: RuntimeError naming the weights or buffers of the frozen copy that moved."""
    after = _snapshot(backbone)
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    if changed:
        raise RuntimeError(f"linear_sgd: the frozen backbone changed during training ({', '.join(changed[:3])})")


def fit(encoder: Encoder, images: Images, num_classes: int, cfg: Config, lr: float, seed: int,
        ctx: EvalContext = NO_CONTEXT) -> Classifier:
    """Train a head on a frozen copy of `encoder` with `images`; raises if the copy's weights or buffers moved.

    Raises:
        FloatingPointError: the training loss became non-finite (the lr diverges).
        RuntimeError: the frozen backbone changed (MoCo's `sanity_check`).
    """
    backbone = encoder.trainable_copy()
    before = _snapshot(backbone)
    model = Classifier(backbone, make_head(encoder.dim, num_classes, cfg.bn_head, seed), train_backbone=False)
    train_classifier(model, images, recipe(cfg, lr), encoder.mean, encoder.std, ctx.device, seed,
                     progress=ctx.progress, desc=f"linear_sgd lr={lr:g}")
    _check_unchanged(before, model.backbone)
    return model


def fit_heads(encoder: Encoder, images: Images, num_classes: int, cfg: Config, seed: int,
              ctx: EvalContext = NO_CONTEXT) -> tuple[nn.Module, list[nn.Module | None]]:
    """Train one head per lr of `cfg.lrs` at once on one frozen copy of `encoder` (one backbone forward per step).

    Head i starts as `fit`'s head (same seed) and ends as `fit(..., cfg.lrs[i], seed)` would.

    Returns:
        The frozen copy and the heads in the order of `cfg.lrs`, None where the lr diverged.

    Raises:
        RuntimeError: the frozen backbone changed (MoCo's `sanity_check`).
    """
    backbone = encoder.trainable_copy()
    before = _snapshot(backbone)
    heads = [make_head(encoder.dim, num_classes, cfg.bn_head, seed) for _ in cfg.lrs]
    losses = train_heads(backbone, heads, cfg.lrs, images, recipe(cfg, cfg.lrs[0]), encoder.mean, encoder.std,
                         ctx.device, seed, progress=ctx.progress, desc=f"linear_sgd {len(heads)} lrs")
    _check_unchanged(before, backbone)
    return backbone, [h if math.isfinite(loss[-1]) else None for h, loss in zip(heads, losses)]


class _Heads(nn.Module):
    """Every head on the same features: logits (N, K x heads), head i in columns [i K, (i + 1) K)."""

    def __init__(self, heads: list[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, f: Tensor) -> Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)


Candidate = tuple[float, float, Classifier | None]  # (lr, val top1, model); (lr, -inf, None) where it diverged


def _sweep_per_lr(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext) -> Iterator[Candidate]:
    """One full run per lr (`one_pass: false`), each yielded before the next is trained."""
    for lr in cfg.lrs:
        try:
            model = fit(encoder, data.train, data.num_classes, cfg, lr, seed, ctx)
        except FloatingPointError:
            yield lr, -math.inf, None  # a diverged lr is a failed candidate, not a failed protocol
            continue
        yield lr, topk_accuracy(predict(model, data.val, encoder.mean, encoder.std, ctx.device), data.val.y, 1), model
        del model  # the caller keeps the best; a backbone copy per lr would add up


def _sweep_one_pass(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext) -> Iterator[Candidate]:
    """Every lr as one head of `fit_heads` on one shared frozen copy, all scored on one forward of val."""
    backbone, heads = fit_heads(encoder, data.train, data.num_classes, cfg, seed, ctx)
    live = [h for h in heads if h is not None]
    scores = iter(())
    if live:
        logits = predict(Classifier(backbone, _Heads(live), train_backbone=False), data.val, encoder.mean, encoder.std,
                         ctx.device)  # (N, K x live heads)
        scores = iter(logits.split(data.num_classes, dim=1))
    for lr, h in zip(cfg.lrs, heads):
        if h is None:
            yield lr, -math.inf, None
        else:
            yield lr, topk_accuracy(next(scores), data.val.y, 1), Classifier(backbone, h, train_backbone=False)


def _select(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext) -> tuple[float, dict[float, float], Classifier]:
    """Train every lr on train, score on val; returns (picked lr, val top1 per lr, picked model)."""
    scores: dict[float, float] = {}
    best: tuple[float, Classifier] | None = None
    for lr, score, model in (_sweep_one_pass if cfg.one_pass else _sweep_per_lr)(encoder, data, cfg, seed, ctx):
        scores[lr] = score
        if model is not None and (best is None or score > scores[best[0]]):  # ties keep the earlier lr in `lrs`
            best = (lr, model)
        del model
    if best is None:
        raise FloatingPointError(f"linear_sgd: every learning rate diverged (lrs={cfg.lrs}); try smaller ones")
    return best[0], scores, best[1]


@register_protocol("linear_sgd", config=Config, version="1")
def linear_sgd(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    if data.multilabel:
        raise ValueError("linear_sgd needs one label per image; use a multi-label protocol for this dataset")
    rows: list[Row] = []
    if len(cfg.lrs) == 1 and cfg.refit:  # nothing to select: skip the train-only run, fit train + val directly
        lr, sel = cfg.lrs[0], f"fixed lr={cfg.lrs[0]:g}"
        model = fit(encoder, data.trainval(), data.num_classes, cfg, lr, seed, ctx)
        n = len(data.train) + len(data.val)
    else:
        lr, val, model = _select(encoder, data, cfg, seed, ctx)
        sel = f"val top1: lr={lr:g} of {len(cfg.lrs)}" if len(cfg.lrs) > 1 else f"fixed lr={lr:g}"
        sweep = " ".join(f"{k:g}:{v:.4f}" if math.isfinite(v) else f"{k:g}:diverged" for k, v in val.items())
        rows.append(Row("top1", val[lr], split="val", selection=f"{sel} ({sweep})", n_train=len(data.train)))
        if cfg.refit:
            del model  # one trained copy in memory at a time
            model = fit(encoder, data.trainval(), data.num_classes, cfg, lr, seed, ctx)
        n = len(data.train) + len(data.val) if cfg.refit else len(data.train)
    scores = predict(model, data.test, encoder.mean, encoder.std, ctx.device)
    return rows + classification_rows(scores, data.test.y, selection=sel, n_train=n)


register_protocol("linear_sgd_moco", config=MoCoConfig, version="1")(linear_sgd)
