"""Semantic segmentation by fine-tuning: an FCN on the encoder's (dilated) stages, the whole network trained, mIoU.

The recipe is the FCN R50-D8 transfer that MoCo (He et al. 2020, https://arxiv.org/abs/1911.05722) and DenseCL
(Wang et al. 2021, https://arxiv.org/abs/2011.09157) report, as mmselfsup runs it
(`configs/benchmarks/mmsegmentation/voc12aug/fcn_r50-d8_512x512_20k_voc12aug.py` on mmseg's `fcn_r50-d8.py`,
`pascal_voc12_aug.py` and `schedule_20k.py`): VOC12 + SBD aug, 20k iterations at batch 16 (4 GPUs x 4), SGD lr 0.01
momentum 0.9 weight decay 5e-4, poly schedule (power 0.9, min lr 1e-4, no warm-up), every weight trained, an FCN head
on the last stage and an auxiliary FCN head (loss weight 0.4) on the second-to-last, output stride 8 (layer3 / layer4
strides turned into dilations 2 / 4), training views: Resize((2048, 512), ratio 0.5-2.0), a 512 crop (cat_max_ratio
0.75), flip 0.5, photometric distortion, padding (image 0, mask 255); inference: short side 512, whole image
(`test_cfg=dict(mode='whole')`; `inference=slide` gives segmentation@1's windows), cross-entropy with 255 ignored.

Both heads are torchvision's `FCNHead` (3x3 conv to in/4 channels, BN, ReLU, dropout 0.1, 1x1 classifier): for the
auxiliary head that is mmseg's head exactly (1024 -> 256 on a ResNet-50); mmseg's main head has two 3x3 convs to
512 channels and concatenates its input before the classifier (`concat_input=True`), this one has one conv to 512.
Dilation (`benchmark.evaluate.segmentation.dilate`) is built as torchvision's `replace_stride_with_dilation`; the
ConvNet (strides 1, 2, 2, 2) and small-stem ResNets are at output stride 8 already and are left as they are.

Data, metrics, rows and the val split are segmentation@1's (`benchmark.data.segmentation`, `fmnist_seg` by default).
Several `lrs` are trained one after the other (each on a fresh trainable copy) and picked on val mIoU; a diverged lr
is a failed candidate. Differences from mmseg: one process (BN, not SyncBN), DINOv3's photometric distortion
(torchvision's saturation and hue), the encoder's own stem (mmseg's ResNetV1c has a 3-conv stem), bf16 autocast on CUDA.
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

from benchmark.backbones import stage_widths, stages
from benchmark.config import check, nohash
from benchmark.data.segmentation import SEGMENTATION_DATASETS, SegmentationSet, SegmentationSpec, load_segmentation
from benchmark.data.sets import Splits
from benchmark.errors import NotApplicable
from benchmark.evaluate.encoder import Encoder
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext
from benchmark.evaluate.segmentation import (
    EpochSampler,
    Inference,
    SegScores,
    TrainAugment,
    describe_val,
    dilate,
    save_val_split,
    segment_confusions,
    segmentation_loss,
    segmentation_rows,
    segmentation_scores,
    train_batch,
)
from benchmark.registry import register_protocol
from benchmark.store.results import Row

__all__ = ["FCN", "Config", "build_fcn", "segmentation_fcn", "train_fcn"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    dataset: str = "fmnist_seg"  # fmnist_seg (embedded) | voc12 | voc12aug (MoCo, DenseCL) | cityscapes | ade20k
    data_root: str | None = nohash(None)  # its folder (fmnist_seg: Fashion-MNIST's; None = the usual lookup)
    lrs: tuple[float, ...] = (0.01,)  # one full run each, picked on val mIoU (mmseg: 0.01)
    momentum: float = 0.9  # mmseg SGD
    weight_decay: float = 5e-4  # mmseg SGD, on every weight
    iterations: int = 20000  # schedule_20k (VOC12aug; Cityscapes 40k)
    batch_size: int = 16  # 4 GPUs x 4 images
    poly_power: float = 0.9  # lr = (lr0 - min_lr) (1 - it / iterations)^power + min_lr
    min_lr: float = 1e-4  # mmseg poly min_lr
    aux_weight: float = 0.4  # auxiliary FCN head's loss weight
    output_stride: int = 8  # R50-D8: dilate layer3 / layer4
    crop_size: int = 512  # RandomCrop crop_size
    img_size: int | None = 512  # Resize img_scale (2048, 512): short side before the ratio (None: the image's own)
    scale_range: tuple[float, float] = (0.5, 2.0)  # Resize ratio_range
    flip_prob: float = 0.5  # RandomFlip prob
    cat_max_ratio: float = 0.75  # RandomCrop cat_max_ratio
    photometric: bool = True  # PhotoMetricDistortion
    inference: str = "whole"  # mmseg fcn_r50-d8 test_cfg mode: whole | slide
    eval_size: int | None = 512  # test Resize (2048, 512): short side before inference (None: as stored)
    stride: int = 341  # slide inference only: window step (window = crop_size)
    eval_batch_size: int = nohash(16)  # images of one shape per inference forward
    workers: int = nohash(8)  # threads decoding image files (real datasets; in-memory fmnist_seg: none)
    # the embedded set (fmnist_seg) and the val split of real datasets: they define the data, so they are hashed
    embedded_train: int = 1600
    embedded_val: int = 400
    embedded_test: int = 500
    val_fraction: float = 0.1  # real datasets: fraction of train held out as val (seeded by split_seed)
    split_seed: int = 0

    def __post_init__(self) -> None:
        check(self.dataset in SEGMENTATION_DATASETS, f"segmentation_fcn.dataset must be one of {', '.join(SEGMENTATION_DATASETS)}, got {self.dataset!r}")
        check(len(self.lrs) > 0 and all(math.isfinite(lr) and lr > 0 for lr in self.lrs) and len(set(self.lrs)) == len(self.lrs),
              f"segmentation_fcn.lrs must be distinct finite numbers > 0, got {self.lrs}")
        check(0 <= self.momentum < 1 and self.weight_decay >= 0, "segmentation_fcn.momentum must be in [0, 1), weight_decay >= 0")
        check(self.iterations > 0 and self.batch_size > 0, "segmentation_fcn.iterations and batch_size must be > 0")
        check(self.poly_power > 0 and 0 <= self.min_lr < min(self.lrs), "segmentation_fcn.poly_power must be > 0, min_lr in [0, min(lrs))")
        check(self.aux_weight >= 0 and self.output_stride in (8, 16, 32), "segmentation_fcn.aux_weight must be >= 0, output_stride 8, 16 or 32")
        check(self.crop_size > 0 and 0 < self.stride and (self.inference == "whole" or self.stride <= self.crop_size),
              f"segmentation_fcn.stride must be in (0, crop_size] for slide inference, got {self.stride}")
        check(0 < self.scale_range[0] <= self.scale_range[1], f"segmentation_fcn.scale_range must be 0 < lo <= hi, got {self.scale_range}")
        check(0 <= self.flip_prob <= 1 and 0 < self.cat_max_ratio <= 1, "segmentation_fcn.flip_prob in [0, 1], cat_max_ratio in (0, 1]")
        check(self.inference in ("slide", "whole"), f"segmentation_fcn.inference must be slide or whole, got {self.inference!r}")
        check((self.img_size is None or self.img_size > 0) and (self.eval_size is None or self.eval_size > 0),
              "segmentation_fcn.img_size and eval_size must be > 0 or null")
        check(min(self.embedded_train, self.embedded_val, self.embedded_test, self.eval_batch_size) > 0,
              "segmentation_fcn.embedded_train/val/test and eval_batch_size must be > 0")
        check(0 < self.val_fraction < 1, f"segmentation_fcn.val_fraction must be in (0, 1), got {self.val_fraction}")
        check(self.workers >= 0, f"segmentation_fcn.workers must be >= 0, got {self.workers}")

    def lr_at(self, lr: float, it: int) -> float:
        """mmcv's PolyLrUpdaterHook: (lr - min_lr) (1 - it / iterations)^power + min_lr."""
        return float((lr - self.min_lr) * (1 - it / self.iterations) ** self.poly_power + self.min_lr)

    def augment(self) -> TrainAugment:
        return TrainAugment(self.crop_size, self.img_size, self.scale_range, self.flip_prob, self.cat_max_ratio,
                            self.photometric, long_cap=4.0)  # img_scale (2048, 512): long side <= 4 x the short target

    def eval(self) -> Inference:
        return Inference(self.inference, self.crop_size, self.stride, self.eval_size, self.eval_batch_size)

    def spec(self) -> SegmentationSpec:
        return SegmentationSpec(n_train=self.embedded_train, n_val=self.embedded_val, n_test=self.embedded_test,
                                val_fraction=self.val_fraction, split_seed=self.split_seed)


class FCN(nn.Module):
    """Backbone stages -> FCN head on the last map (+ auxiliary FCN head on the one before, for training)."""

    def __init__(self, parts: list[nn.Module], head: nn.Module, aux: nn.Module) -> None:
        super().__init__()
        self.body, self.last = nn.Sequential(*parts[:-1]), parts[-1]
        self.head, self.aux = head, aux
        self.features = nn.Sequential(self.body, self.last)  # what inference runs: the same modules

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(main logits, auxiliary logits), both at the feature resolution (N, K, h, w)."""
        c4 = self.body(x)
        return self.head(self.last(c4)), self.aux(c4)


def stages_of(backbone: nn.Module) -> list[nn.Module]:
    """`benchmark.backbones.stages`, with this protocol's reason when there are none (NotApplicable)."""
    try:
        return stages(backbone)
    except NotApplicable:
        raise NotApplicable(f"segmentation_fcn needs a convolutional backbone with stages (convnet, resnet18/50); "
                            f"{type(backbone).__name__} has none") from None


def build_fcn(backbone: nn.Module, channels: int, num_classes: int, output_stride: int, seed: int) -> tuple[FCN, list[str]]:
    """An FCN on `backbone`'s stages (its modules: pass a trainable copy), dilated to `output_stride`.

    Returns:
        (the model, the stages turned into dilations).

    Raises:
        NotApplicable: the backbone has no spatial stages (ViTs, pixels).
    """
    from torchvision.models.segmentation.fcn import FCNHead

    parts = stages_of(backbone)
    converted = dilate(backbone, channels, output_stride)
    widths = stage_widths(parts, channels)
    with torch.random.fork_rng(devices=[]):  # the heads' init from `seed`, the caller's global stream untouched
        torch.manual_seed(seed)
        head, aux = FCNHead(widths[-1], num_classes), FCNHead(widths[-2], num_classes)
    return FCN(parts, head, aux), converted


def train_fcn(model: FCN, train: SegmentationSet, cfg: Config, lr: float, channels: int, mean: tuple[float, ...],
              std: tuple[float, ...], seed: int, device: torch.device, progress: bool = False,
              pool: Executor | None = None) -> dict[str, float]:
    """mmseg's schedule on `model`, every weight trained (`pool`: decodes a lazily read `train`); returns timing and the
    last loss.

    Raises:
        FloatingPointError: the loss became non-finite (this lr diverges).
    """
    torch.manual_seed(seed)  # the heads' dropout draws from the global stream
    g = torch.Generator().manual_seed(seed)  # sample order and every view draw
    sampler = EpochSampler(len(train), g)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    m, s = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    aug, amp = cfg.augment(), device.type == "cuda"
    times: list[float] = []
    last = math.nan
    bar = tqdm(range(cfg.iterations), desc=f"segmentation_fcn lr={lr:g}", disable=not progress, leave=False)
    for it in bar:
        t0 = time.perf_counter()
        x, y = train_batch(train, sampler.take(cfg.batch_size), channels, aug, m, s, g, device, pool)
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr_at(lr, it)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out, aux = model(x)
            loss = segmentation_loss(out, y) + cfg.aux_weight * segmentation_loss(aux, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"segmentation_fcn: loss is {float(loss.detach())} at iteration {it} at lr {lr:g}; lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if it % 20 == 0 or it == cfg.iterations - 1:
            last = float(loss.detach())
            bar.set_postfix(loss=f"{last:.3f}")
    steady = times[5:] or times
    return {"s_per_iter": sum(steady) / len(steady), "train_s": sum(times), "last_loss": last}


def _scores(model: FCN, ds: SegmentationSet, cfg: Config, channels: int, encoder: Encoder, ctx: EvalContext,
            pool: Executor | None) -> SegScores:
    model.eval()
    (cm,) = segment_confusions(model.features, [model.head], ds, channels, encoder.mean, encoder.std, cfg.eval(),
                               ctx.device, ctx.progress, f"segmentation_fcn {ds.name}", pool)
    return segmentation_scores(cm)


@register_protocol("segmentation_fcn", config=Config, version="1")
def segmentation_fcn(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    stages_of(encoder.trainable_copy())  # NotApplicable (cell skipped, with the reason) before any data is read
    train, val, test = load_segmentation(cfg.dataset, cfg.data_root, cfg.spec())
    save_val_split(ctx.out, cfg.dataset, train, val)
    with ThreadPoolExecutor(cfg.workers) if cfg.workers and train.lazy else nullcontext() as pool:
        return _run(encoder, (train, val, test), data.channels, cfg, seed, ctx, pool)


def _run(encoder: Encoder, sets: tuple[SegmentationSet, SegmentationSet, SegmentationSet], channels: int, cfg: Config,
         seed: int, ctx: EvalContext, pool: Executor | None) -> list[Row]:
    """Train one FCN per lr, pick on val, score the pick on test: the rows."""
    train, val, test = sets
    scores: dict[float, float] = {}
    best: tuple[float, FCN, dict[str, float]] | None = None
    converted: list[str] = []
    for lr in cfg.lrs:
        model, converted = build_fcn(encoder.trainable_copy(), channels, train.num_classes, cfg.output_stride, seed)
        try:
            stats = train_fcn(model, train, cfg, lr, channels, encoder.mean, encoder.std, seed, ctx.device, ctx.progress, pool)
        except FloatingPointError:
            scores[lr] = -math.inf  # a diverged lr is a failed candidate, not a failed protocol
            continue
        scores[lr] = _scores(model, val, cfg, channels, encoder, ctx, pool).miou
        if best is None or scores[lr] > scores[best[0]]:  # ties keep the earlier lr
            best = (lr, model, stats)
        del model
    if best is None:
        raise FloatingPointError(f"segmentation_fcn: every learning rate diverged (lrs={cfg.lrs}); try smaller ones")
    lr, model, stats = best
    dil = f"dilated {'+'.join(converted)}" if converted else "no dilation"
    sel = f"val mIoU: lr={lr:g} of {len(cfg.lrs)}" if len(cfg.lrs) > 1 else f"fixed lr={lr:g}"
    sel += (f"; {cfg.iterations} it x {cfg.batch_size}, crop {cfg.crop_size}, {dil}, {cfg.inference} inference; "
            f"{stats['s_per_iter']:.3f} s/it")
    sweep = " ".join(f"{k:g}:{v:.4f}" if math.isfinite(v) else f"{k:g}:diverged" for k, v in scores.items())
    test_scores = _scores(model, test, cfg, channels, encoder, ctx, pool)
    log.info("segmentation_fcn: test mIoU %.2f aAcc %.2f (%s)", 100 * test_scores.miou, 100 * test_scores.aacc, sel)
    made = describe_val(cfg.dataset, train, val, cfg.val_fraction, cfg.split_seed)
    rows = [Row("mIoU", scores[lr], split="val", selection=f"{sel} ({sweep}); {made}", n_train=len(train))]
    return rows + segmentation_rows(test_scores, test.classes, selection=sel, n_train=len(train))
