"""Frozen linear semantic segmentation: BatchNorm + 1x1 conv heads on the encoder's last spatial features, mIoU.

The recipe is DINOv3's linear segmentation evaluation (Siméoni et al. 2025, https://arxiv.org/abs/2508.10104;
github.com/facebookresearch/dinov3 `dinov3/eval/segmentation/configs/config-ade20k-linear-training.yaml` on the
defaults of `eval/segmentation/config.py`, loop in `train.py`, head in `models/heads/linear_head.py`): the backbone
frozen in eval mode, its last layer's patch tokens (ViTs; convnets: the last stage's map), head = Dropout2d(0.1) ->
BatchNorm2d -> 1x1 conv (weights N(0, 0.01), bias 0), logits bilinearly upsampled to the labels, cross-entropy with
255 ignored, AdamW lr 1e-3 betas (0.9, 0.999) wd 1e-3, gradient norm clipped at 35, 40k iterations at batch 16
(2 per GPU x 8), linear warm-up over 1,500 iterations from lr x 1e-6 then cosine to 0 (WarmupOneCycleLR), training
views: short side 512 x U(0.5, 2.0), a 512 crop (cat_max_ratio 0.75), flip 0.5, photometric distortion, padding to
512 (image 0 after normalisation, mask 255); inference: short side 512, slide windows 512 every 341 pixels, logits
averaged, resized to the label.

Several learning rates train as parallel heads (LightlyTrain's multi-head linear segmentation trains 9: `lrs` =
(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)) on one backbone forward per batch. Each head has its own AdamW
param group, its own dropout generator and its own gradient clipping, so head i ends bit-identical (on CPU) to a run
with `lrs=(lrs[i],)` at the same seed. A head whose loss turns non-finite is dropped (diverged); the others go on.
The head with the best val mIoU is scored once on test (no retraining). Val is not the published evaluation split:
for real datasets it is `val_fraction` of train (`benchmark.data.segmentation.carve_val`), written to out/splits/.

Data (`benchmark.data.segmentation`): `fmnist_seg` (embedded), `voc12`, `voc12aug`, `cityscapes`, `ade20k` from local
folders. Images are converted to the encoder's channel count and normalised with the encoder's mean/std.
Differences from DINOv3: one process (BatchNorm, not SyncBatchNorm), val every run end only (DINOv3 validates
every `eval_interval` on its test split and keeps the best), no test-time augmentation, bf16 autocast on CUDA.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from benchmark.backbones import stage_widths
from benchmark.config import check, nohash
from benchmark.data.segmentation import SEGMENTATION_DATASETS, SegmentationSet, SegmentationSpec, load_segmentation
from benchmark.data.sets import Splits
from benchmark.errors import DivergedError
from benchmark.evaluate.encoder import Encoder
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext
from benchmark.evaluate.segmentation import (
    EpochSampler,
    Inference,
    TrainAugment,
    dense_features,
    describe_val,
    save_val_split,
    segment_confusions,
    segmentation_loss,
    segmentation_rows,
    segmentation_scores,
    train_batch,
)
from benchmark.registry import register_protocol
from benchmark.store.results import Row

__all__ = ["Config", "LinearHead", "segmentation", "train_heads"]

log = logging.getLogger(__name__)

LIGHTLY_LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)  # LightlyTrain's multi-head sweep


@dataclass(frozen=True)
class Config:
    dataset: str = "fmnist_seg"  # fmnist_seg (embedded) | voc12 | voc12aug | cityscapes | ade20k (DINOv3: ade20k)
    data_root: str | None = nohash(None)  # its folder (fmnist_seg: Fashion-MNIST's; None = the usual lookup)
    lrs: tuple[float, ...] = (1e-3,)  # one head per lr, picked on val mIoU (DINOv3 optimizer.lr; LightlyTrain: LIGHTLY_LRS)
    betas: tuple[float, float] = (0.9, 0.999)  # DINOv3 optimizer.beta1/beta2
    weight_decay: float = 1e-3  # DINOv3 linear config (config.py's default is 1e-2)
    grad_clip: float = 35.0  # DINOv3 optimizer.gradient_clip: max grad norm, per head
    iterations: int = 40000  # DINOv3 scheduler.total_iter
    warmup_iters: int = 1500  # WarmupOneCycleLR warmup_iters
    warmup_ratio: float = 1e-6  # warm-up starts at lr x this (warmup_ratio)
    batch_size: int = 16  # DINOv3: bs 2 x n_gpus 8
    dropout: float = 0.1  # DINOv3 decoder_head.dropout (Dropout2d before the BN, training only)
    crop_size: int = 512  # transforms.train.crop_size
    img_size: int | None = 512  # transforms.train.img_size: short side before the ratio (None: the image's own)
    scale_range: tuple[float, float] = (0.5, 2.0)  # transforms.train.random_img_size_ratio_range
    flip_prob: float = 0.5  # transforms.train.flip_prob
    cat_max_ratio: float = 0.75  # RandomCropWithLabel default
    photometric: bool = True  # PhotoMetricDistortion in the train transforms
    inference: str = "slide"  # eval.mode: slide | whole
    eval_size: int | None = 512  # transforms.eval.img_size: short side before inference (None: as stored)
    stride: int = 341  # eval.stride (window = crop_size, eval.crop_size 512)
    eval_batch_size: int = nohash(16)  # images of one shape per inference forward
    workers: int = nohash(8)  # threads decoding image files (real datasets; in-memory fmnist_seg: none)
    # the embedded set (fmnist_seg) and the val split of real datasets: they define the data, so they are hashed
    embedded_train: int = 1600
    embedded_val: int = 400
    embedded_test: int = 500
    val_fraction: float = 0.1  # real datasets: fraction of train held out as val (seeded by split_seed)
    split_seed: int = 0

    def __post_init__(self) -> None:
        check(self.dataset in SEGMENTATION_DATASETS, f"segmentation.dataset must be one of {', '.join(SEGMENTATION_DATASETS)}, got {self.dataset!r}")
        check(len(self.lrs) > 0 and all(math.isfinite(lr) and lr > 0 for lr in self.lrs) and len(set(self.lrs)) == len(self.lrs),
              f"segmentation.lrs must be distinct finite numbers > 0, got {self.lrs}")
        check(all(0 <= b < 1 for b in self.betas), f"segmentation.betas must be in [0, 1), got {self.betas}")
        check(self.weight_decay >= 0 and self.grad_clip > 0, "segmentation.weight_decay must be >= 0 and grad_clip > 0")
        check(self.iterations > 0 and self.batch_size > 0, "segmentation.iterations and batch_size must be > 0")
        check(0 <= self.warmup_iters < self.iterations, f"segmentation.warmup_iters must be in [0, iterations), got {self.warmup_iters}")
        check(0 < self.warmup_ratio <= 1, f"segmentation.warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        check(0 <= self.dropout < 1 and 0 <= self.flip_prob <= 1, "segmentation.dropout must be in [0, 1), flip_prob in [0, 1]")
        check(self.crop_size > 0 and 0 < self.stride <= self.crop_size, f"segmentation.stride must be in (0, crop_size], got {self.stride}")
        check(0 < self.scale_range[0] <= self.scale_range[1], f"segmentation.scale_range must be 0 < lo <= hi, got {self.scale_range}")
        check(self.inference in ("slide", "whole"), f"segmentation.inference must be slide or whole, got {self.inference!r}")
        check((self.img_size is None or self.img_size > 0) and (self.eval_size is None or self.eval_size > 0),
              "segmentation.img_size and eval_size must be > 0 or null")
        check(0 < self.cat_max_ratio <= 1, f"segmentation.cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        check(min(self.embedded_train, self.embedded_val, self.embedded_test, self.eval_batch_size) > 0,
              "segmentation.embedded_train/val/test and eval_batch_size must be > 0")
        check(0 < self.val_fraction < 1, f"segmentation.val_fraction must be in (0, 1), got {self.val_fraction}")
        check(self.workers >= 0, f"segmentation.workers must be >= 0, got {self.workers}")

    def lr_factor(self, it: int) -> float:
        """WarmupOneCycleLR (pct_start 0, final_div_factor inf): linear from warmup_ratio to 1, then cosine to 0."""
        if it < self.warmup_iters:
            return self.warmup_ratio + (1 - self.warmup_ratio) * it / self.warmup_iters
        t = (it - self.warmup_iters) / max(1, self.iterations - self.warmup_iters)
        return 0.5 * (1 + math.cos(math.pi * t))

    def augment(self) -> TrainAugment:
        return TrainAugment(self.crop_size, self.img_size, self.scale_range, self.flip_prob, self.cat_max_ratio, self.photometric)

    def eval(self) -> Inference:
        return Inference(self.inference, self.crop_size, self.stride, self.eval_size, self.eval_batch_size)

    def spec(self) -> SegmentationSpec:
        return SegmentationSpec(n_train=self.embedded_train, n_val=self.embedded_val, n_test=self.embedded_test,
                                val_fraction=self.val_fraction, split_seed=self.split_seed)


class LinearHead(nn.Module):
    """DINOv3's LinearHead: Dropout2d (training) -> BatchNorm2d -> 1x1 conv, on a (N, dim, h, w) map."""

    def __init__(self, dim: int, num_classes: int, dropout: float, seed: int) -> None:
        super().__init__()
        self.p = dropout
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)
        nn.init.normal_(self.conv.weight, 0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        assert self.conv.bias is not None  # Conv2d's default bias=True
        nn.init.zeros_(self.conv.bias)

    def forward(self, f: Tensor, g: torch.Generator | None = None) -> Tensor:
        """Logits (N, K, h, w); `g` draws the channel dropout (each head its own, so heads do not share a stream)."""
        if self.training and self.p > 0:
            keep = torch.rand(f.shape[0], f.shape[1], 1, 1, generator=g, device=f.device) >= self.p
            f = f * keep.to(f.dtype) / (1 - self.p)
        out: Tensor = self.conv(self.bn(f))
        return out


def train_heads(features: nn.Module, heads: list[LinearHead], train: SegmentationSet, cfg: Config, channels: int,
                mean: tuple[float, ...], std: tuple[float, ...], seed: int, device: torch.device,
                progress: bool = False, pool: Executor | None = None) -> dict[int, int]:
    """Train heads[i] at cfg.lrs[i] in place on the frozen `features`, one backbone forward per batch (`pool`: decodes
    the files of a lazily read `train`).

    Returns:
        {head index: iteration} of the heads whose loss became non-finite (left out from then on).

    Raises:
        DivergedError: every head diverged.
    """
    features.to(device).eval()
    g = torch.Generator().manual_seed(seed)  # sample order and every view draw
    drops = [torch.Generator(device=device).manual_seed(seed) for _ in heads]  # per-head dropout streams
    sampler = EpochSampler(len(train), g)
    for h in heads:
        h.to(device).train()
    opt = torch.optim.AdamW([{"params": list(h.parameters()), "lr": lr, "base_lr": lr} for h, lr in zip(heads, cfg.lrs)],
                            betas=cfg.betas, weight_decay=cfg.weight_decay)
    m, s = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    aug, amp = cfg.augment(), device.type == "cuda"
    live, diverged, last = list(range(len(heads))), dict[int, int](), math.nan
    bar = tqdm(range(cfg.iterations), desc="segmentation", disable=not progress, leave=False)
    for it in bar:
        x, y = train_batch(train, sampler.take(cfg.batch_size), channels, aug, m, s, g, device, pool)
        for grp in opt.param_groups:
            grp["lr"] = grp["base_lr"] * cfg.lr_factor(it)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                f = features(x)  # (B, dim, h, w), shared by every head
            losses = torch.stack([segmentation_loss(heads[i](f, drops[i]), y) for i in live])
        ok = torch.isfinite(losses).tolist()
        diverged |= {i: it for i, good in zip(live, ok) if not good}
        if not all(ok):
            live = [i for i, good in zip(live, ok) if good]
            if not live:
                raise DivergedError(it, None if math.isnan(last) else last)
            losses = losses[torch.tensor(ok, device=losses.device)]
        opt.zero_grad(set_to_none=True)  # a dropped head gets no gradient, so AdamW leaves it alone
        losses.sum().backward()
        for i in live:
            nn.utils.clip_grad_norm_(heads[i].parameters(), cfg.grad_clip)
        opt.step()
        if it % 20 == 0 or it == cfg.iterations - 1:
            last = float(losses.detach().min())
            bar.set_postfix(loss=f"{last:.3f}")
    return diverged


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _sweep(lrs: tuple[float, ...], val: dict[int, float], diverged: dict[int, int]) -> str:
    return " ".join(f"{lr:g}:diverged@{diverged[i]}" if i in diverged else f"{lr:g}:{val[i]:.4f}" for i, lr in enumerate(lrs))


@register_protocol("segmentation", config=Config, version="1")
def segmentation(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    features = dense_features(encoder.trainable_copy().eval().requires_grad_(False))  # NotApplicable: cell skipped
    train, val, test = load_segmentation(cfg.dataset, cfg.data_root, cfg.spec())
    save_val_split(ctx.out, cfg.dataset, train, val)
    with ThreadPoolExecutor(cfg.workers) if cfg.workers and train.lazy else nullcontext() as pool:
        return _run(features, encoder, (train, val, test), data.channels, cfg, seed, ctx, pool)


def _run(features: nn.Module, encoder: Encoder, sets: tuple[SegmentationSet, SegmentationSet, SegmentationSet],
         channels: int, cfg: Config, seed: int, ctx: EvalContext, pool: Executor | None) -> list[Row]:
    """Train every head, pick on val, score the pick on test: the rows."""
    train, val, test = sets
    dim = stage_widths([features.to(ctx.device)], channels)[0]
    heads = [LinearHead(dim, train.num_classes, cfg.dropout, seed) for _ in cfg.lrs]
    before = _snapshot(features)
    t0 = time.perf_counter()
    diverged = train_heads(features, heads, train, cfg, channels, encoder.mean, encoder.std, seed, ctx.device, ctx.progress, pool)
    s_per_iter = (time.perf_counter() - t0) / cfg.iterations
    changed = [k for k, v in _snapshot(features).items() if not torch.equal(v, before[k])]
    if changed:
        raise RuntimeError(f"segmentation: the frozen backbone changed during training ({', '.join(changed[:3])})")
    live = [i for i in range(len(heads)) if i not in diverged]
    for i in live:
        heads[i].eval()
    args = (channels, encoder.mean, encoder.std, cfg.eval(), ctx.device, ctx.progress)
    cms = segment_confusions(features, [heads[i] for i in live], val, *args, desc="segmentation val", pool=pool)
    val_miou = {i: segmentation_scores(cm).miou for i, cm in zip(live, cms)}
    best = max(live, key=lambda i: (val_miou[i], -i))  # ties keep the earlier lr
    lr = cfg.lrs[best]
    sel = f"val mIoU: lr={lr:g} of {len(cfg.lrs)}" if len(cfg.lrs) > 1 else f"fixed lr={lr:g}"
    sel += f"; {cfg.iterations} it x {cfg.batch_size}, crop {cfg.crop_size}, {cfg.inference} inference; {s_per_iter:.3f} s/it"
    (cm,) = segment_confusions(features, [heads[best]], test, *args, desc="segmentation test", pool=pool)
    scores = segmentation_scores(cm)
    log.info("segmentation: test mIoU %.2f aAcc %.2f (%s)", 100 * scores.miou, 100 * scores.aacc, sel)
    made = describe_val(cfg.dataset, train, val, cfg.val_fraction, cfg.split_seed)
    rows = [Row("mIoU", val_miou[best], split="val", selection=f"{sel} ({_sweep(cfg.lrs, val_miou, diverged)}); {made}",
                n_train=len(train))]
    return rows + segmentation_rows(scores, test.classes, selection=sel, n_train=len(train))
