"""Supervised training of a classification head on an encoder, frozen or fine-tuned, with augmentation.

The loop behind the SGD protocols (linear head with augmentation, 1%/10% semi-supervised and full
fine-tuning). The augmentation is the evaluation recipe of every anchor: random resized crop + flip
for training, the plain image for testing. A frozen backbone stays in eval mode (BN statistics are
not updated, MoCo's `sanity_check`) and runs without autograd.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from benchmark.data.augment import ViewSpec, augment
from benchmark.data.sets import Images
from benchmark.train.optim import param_groups


@dataclass(frozen=True)
class Recipe:
    """One supervised schedule. Protocol configs carry these as flat fields and build a `Recipe`."""

    epochs: int
    batch_size: int
    lr: float  # for batch 256, scaled linearly with batch_size
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: tuple[float, ...] = (0.6, 0.8)  # step schedule: fractions of training where lr is multiplied by `gamma`
    gamma: float = 0.1  # step schedule: lr factor at each milestone (VISSL, MoCo 0.1; mmselfsup 0.2)
    head_lr_mult: float = 1.0  # head lr = lr x this (mmselfsup's 1/10/100 head multipliers)
    crop_scale: float = 0.08  # RandomResizedCrop minimum area (+ horizontal flip); 1.0 = no augmentation

    def lr_at(self, step: int, total: int) -> float:
        """Multiplier of the base lr at `step` of `total` (no warm-up, as the anchors' eval recipes)."""
        t = step / max(1, total)
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return float(self.gamma ** sum(t >= m for m in self.milestones))


class Classifier(nn.Module):
    """backbone -> head. With `train_backbone=False` the backbone is frozen in eval mode."""

    def __init__(self, backbone: nn.Module, head: nn.Module, train_backbone: bool) -> None:
        super().__init__()
        self.backbone, self.head, self.train_backbone = backbone, head, train_backbone
        if not train_backbone:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.train_backbone:
            return self.head(self.backbone(x))  # type: ignore[no-any-return]
        with torch.no_grad():
            f = self.backbone(x)
        return self.head(f)  # type: ignore[no-any-return]


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x.float().div(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def train_classifier(model: Classifier, train: Images, recipe: Recipe, mean: tuple[float, ...], std: tuple[float, ...],
                     device: torch.device, seed: int, progress: bool = False, desc: str = "train") -> list[float]:
    """Train `model` in place on `train` (uint8 images, int labels); returns the mean loss per epoch.

    Deterministic given `seed`: the order of samples and every augmentation draw come from one generator.
    """
    model.to(device)
    m, s = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    n = len(train)
    bs = min(recipe.batch_size, n)  # a subset smaller than the batch trains in one batch per epoch
    lr = recipe.lr * bs / 256  # linear scaling with the batch actually used
    groups = []
    for part, mult in ((model.backbone, 1.0), (model.head, recipe.head_lr_mult)):
        for grp in param_groups(part, recipe.weight_decay):
            grp.pop("lars")
            if grp["params"]:
                groups.append({**grp, "lr": lr * mult, "base_lr": lr * mult})
    opt = torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0)
    g = torch.Generator(device="cpu").manual_seed(seed)
    per_epoch = max(1, n // bs)  # drop_last, as the anchors (a 1-sample batch breaks BN)
    total = recipe.epochs * per_epoch
    amp = device.type == "cuda"
    losses: list[float] = []
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    for _ in range(recipe.epochs):
        model.train()
        run = torch.zeros((), device=device)
        for v, y in augmented_epoch(train, recipe, m, s, device, g):
            for grp in opt.param_groups:
                grp["lr"] = grp["base_lr"] * recipe.lr_at(step, total)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(v).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            run += loss.detach()
            step += 1
            bar.update()
        losses.append(float(run) / per_epoch)  # one host sync per epoch
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{desc}: loss is {losses[-1]} after epoch {len(losses)}; lower the lr")
    bar.close()
    return losses


@torch.inference_mode()
def predict(model: nn.Module, images: Images, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
            batch_size: int = 512) -> Tensor:
    """Logits (N, K) on CPU for the plain (unaugmented) images, in eval mode."""
    model.eval().to(device)
    m, s = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    amp = device.type == "cuda"
    out = []
    for xb in images.batches(batch_size, pin=device.type == "cuda"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model(_normalise(xb.to(device), m, s)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def augmented_epoch(train: Images, recipe: Recipe, mean: Tensor, std: Tensor, device: torch.device,
                    g: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of (view (B, C, H, W), labels (B,)) batches as `train_classifier` draws them from generator `g`.

    The sample order (`randperm`, drop_last: a 1-sample batch breaks BN) and each batch's crop seed come from `g`, so
    `train_classifier` and `train_heads`, both built on it, see the same batches at the same seed. Streamed sets
    decode ahead, in order.
    """
    spec = ViewSpec(train.image_size, scale=(recipe.crop_scale, 1.0), jitter_p=0.0, gray_p=0.0)
    n = len(train)
    bs = min(recipe.batch_size, n)
    order = torch.randperm(n, generator=g)
    steps = [order[i * bs : (i + 1) * bs] for i in range(max(1, n // bs))]
    for idx, xb in zip(steps, train.loader(steps, pin=device.type == "cuda")):
        x = xb.to(device, non_blocking=True)
        y = train.y[idx].to(device, non_blocking=True)
        gd = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        yield (augment(x, spec, mean, std, gd) if recipe.crop_scale < 1.0 else _normalise(x, mean, std)), y


def _head_optimizer(heads: Sequence[nn.Module], lrs: Sequence[float], recipe: Recipe, bs: int) -> torch.optim.SGD:
    """One SGD over every head, each with its own param groups at its lr x bs/256 x `head_lr_mult`."""
    groups = []
    for head, base in zip(heads, lrs):
        lr = base * bs / 256 * recipe.head_lr_mult  # linear scaling with the batch actually used, as train_classifier
        for grp in param_groups(head, recipe.weight_decay):
            grp.pop("lars")
            if grp["params"]:
                groups.append({**grp, "lr": lr, "base_lr": lr})
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0)


def train_heads(backbone: nn.Module, heads: Sequence[nn.Module], lrs: Sequence[float], train: Images, recipe: Recipe,
                mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, seed: int, progress: bool = False,
                desc: str = "train") -> list[list[float]]:
    """Train one head per lr in place on a frozen `backbone`, all on one backbone forward per step (DINOv2 `eval/linear.py`).

    Head i sees the batches and crops `train_classifier` gives `Classifier(backbone, heads[i], train_backbone=False)`
    at `replace(recipe, lr=lrs[i])` and the same seed, and ends as that run would (bit-identical on CPU). The backbone
    is put in eval mode without gradients; `recipe.lr` is unused. A head whose mean loss over an epoch is not finite
    has diverged: it is left out from the next epoch on and the others go on; if every head diverges, training stops.

    Returns:
        Each head's mean loss per epoch; a diverged head's list ends at the first non-finite value.
    """
    if not heads or len(heads) != len(lrs):
        raise ValueError(f"train_heads needs one lr per head, got {len(heads)} heads and {len(lrs)} lrs")
    backbone.to(device).eval().requires_grad_(False)
    for head in heads:
        head.to(device)
    m, s = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    bs = min(recipe.batch_size, len(train))
    opt = _head_optimizer(heads, lrs, recipe, bs)
    g = torch.Generator(device="cpu").manual_seed(seed)
    per_epoch = max(1, len(train) // bs)
    total = recipe.epochs * per_epoch
    amp = device.type == "cuda"
    losses: list[list[float]] = [[] for _ in heads]
    live, step = list(range(len(heads))), 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    for _ in range(recipe.epochs):
        for i in live:
            heads[i].train()
        run = torch.zeros(len(heads), device=device)
        for v, y in augmented_epoch(train, recipe, m, s, device, g):
            for grp in opt.param_groups:
                grp["lr"] = grp["base_lr"] * recipe.lr_at(step, total)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                with torch.no_grad():
                    f = backbone(v)  # (B, dim), shared by every head
                per = torch.stack([F.cross_entropy(heads[i](f).float(), y) for i in live])  # (live,)
            opt.zero_grad(set_to_none=True)  # a diverged head gets no gradient, so SGD leaves it alone
            per.sum().backward()  # type: ignore[no-untyped-call]
            opt.step()
            run[live] += per.detach()
            step += 1
            bar.update()
        for i in live:
            losses[i].append(float(run[i]) / per_epoch)  # one host sync per epoch, as train_classifier
        live = [i for i in live if math.isfinite(losses[i][-1])]
        if not live:
            break
    bar.close()
    return losses
