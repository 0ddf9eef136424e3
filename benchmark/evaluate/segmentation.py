"""Semantic segmentation pieces the segmentation protocols share: metrics, training views, sliding-window inference,
dense backbone features and ResNet dilation.

- Metrics (mmseg's `IoUMetric`, 0.x `mean_iou`): one confusion matrix accumulated over every pixel whose label is not
  255; per-class IoU = intersection / union, a class with zero union is NaN and left out of the mean (mIoU); aAcc =
  correct / labelled pixels; mAcc = the mean of the per-class recalls (NaN for classes without label pixels).
- Training views: DINOv3's `make_segmentation_train_transforms` (mmseg's train pipeline): the short side resized to
  `img_size` x U(scale), a random crop (re-drawn up to 10 times while one class covers more than `cat_max_ratio` of
  it), a flip, the photometric distortion, normalisation, then padding to the crop (image 0 in normalised units,
  mask 255).
- Inference (mmseg's `slide_inference` / `whole_inference`): windows of `crop` every `stride` pixels, each window's
  logits upsampled to it, overlapping logits averaged, then the whole map resized to the label's resolution.
- `dense_features`: the backbone as a module returning its spatial map (N, C, h, w): ConvNet / torchvision ResNets
  chained through `benchmark.backbones.stages`, timm ViTs' last-layer patch tokens on their grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from benchmark.backbones import TimmViT, TorchvisionResNet, stages
from benchmark.data.colour import convert_channels
from benchmark.data.segmentation import IGNORE, SegmentationSet, check_mask
from benchmark.errors import NotApplicable
from benchmark.store.io import atomic_write_text
from benchmark.store.results import Row

# --------------------------------------------------------------------------- metrics


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE) -> Tensor:
    """Pixel counts (K, K) int64, row = true class, column = predicted, over the pixels labelled other than `ignore_index`.

    Args:
        pred: integer class ids, any shape (e.g. (N, H, W)).
        target: integer labels of the same shape.
        num_classes: K.

    Raises:
        ValueError: shapes differ, or a label (other than `ignore_index`) or a prediction is outside 0..K-1.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} shapes differ")
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    k = num_classes
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
        raise ValueError(f"labels must be in 0..{k - 1} or {ignore_index}, got {int(t.min())}..{int(t.max())}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= k):
        raise ValueError(f"predictions must be in 0..{k - 1}, got {int(p.min())}..{int(p.max())}")
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k)


@dataclass(frozen=True)
class SegScores:
    """mmseg's metrics of one confusion matrix, as fractions in [0, 1]."""

    miou: float  # mean of `iou` over classes with a non-zero union
    aacc: float  # correct / labelled pixels
    macc: float  # mean of `acc` over classes with label pixels
    iou: tuple[float, ...]  # per class: intersection / union (NaN: the class is in neither labels nor predictions)
    acc: tuple[float, ...]  # per class: intersection / label pixels (NaN: no label pixel)


def segmentation_scores(cm: Tensor) -> SegScores:
    """mIoU, aAcc, mAcc and per-class IoU / accuracy of a confusion matrix (K, K) (rows true, columns predicted)."""
    c = cm.double()
    inter = c.diagonal()
    label, predicted = c.sum(1), c.sum(0)
    iou = inter / (label + predicted - inter)  # 0 / 0 = NaN for a class nobody has
    acc = inter / label
    aacc = float(inter.sum() / label.sum()) if float(label.sum()) > 0 else math.nan
    return SegScores(float(iou.nanmean()), aacc, float(acc.nanmean()), tuple(iou.tolist()), tuple(acc.tolist()))


def segmentation_rows(scores: SegScores, classes: Sequence[str], **row: object) -> list[Row]:
    """`mIoU`, `aAcc`, `mAcc` and `IoU.<class>` rows (spaces in class names become "_"; NaN IoUs give no row);
    `row` holds the other `Row` fields (split, selection, n_train)."""
    out = [Row(m, v, **row) for m, v in (("mIoU", scores.miou), ("aAcc", scores.aacc), ("mAcc", scores.macc))]  # type: ignore[arg-type]
    out += [Row(f"IoU.{name.replace(' ', '_')}", v, **row) for name, v in zip(classes, scores.iou)  # type: ignore[arg-type]
            if not math.isnan(v)]
    return out


# --------------------------------------------------------------------------- training views


@dataclass(frozen=True)
class TrainAugment:
    """One training view: protocol configs carry these as flat fields and build it."""

    crop: int = 512  # square crop side (padded when the rescaled image is smaller)
    img_size: int | None = 512  # short side before the random ratio (None: the image's own short side)
    scale: tuple[float, float] = (0.5, 2.0)  # ratio range of the random rescale
    flip: float = 0.5  # horizontal flip probability
    cat_max_ratio: float = 0.75  # re-draw the crop (up to 10 times) while one class covers more of it than this
    photometric: bool = True  # DINOv3's PhotoMetricDistortion (brightness, contrast; saturation and hue on RGB)
    long_cap: float | None = None  # mmseg's Resize((2048, 512)): the long side stays <= long_cap x the short target


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=g))


def _coin(g: torch.Generator) -> bool:
    return bool(torch.randint(2, (1,), generator=g))


def _coin_p(g: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand(1, generator=g)) < p


def resized_shape(h: int, w: int, short: int, long_cap: float | None = None) -> tuple[int, int]:
    """(h, w) with the short side `short` (DINOv3's FixedSideResize: the long side rounded), or the long side at
    `long_cap` x `short` where that is smaller (mmseg's Resize with keep_ratio)."""
    if long_cap is not None and short * max(h, w) / min(h, w) > long_cap * short:
        f = long_cap * short / max(h, w)
        return int(h * f + 0.5), int(w * f + 0.5)
    if h > w:
        return int(short * h / w + 0.5), short
    return short, int(short * w / h + 0.5)


def resize_image(x: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (C, H, W) -> uint8 (C, *size), bilinear with antialiasing (as PIL's bilinear, which DINOv3 resizes with)."""
    if tuple(x.shape[-2:]) == size:
        return x
    y = F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resize_mask(m: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) class ids -> (*size), nearest neighbour (PIL's NEAREST: torch's "nearest-exact")."""
    if tuple(m.shape[-2:]) == size:
        return m
    return F.interpolate(m[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(m.dtype)


def random_crop(x: Tensor, m: Tensor, crop: int, cat_max_ratio: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """DINOv3's RandomCropWithLabel (mmseg's RandomCrop): a crop x crop window (the whole side where shorter),
    re-drawn up to 10 times while fewer than 2 classes are in it or one covers >= cat_max_ratio of its labelled pixels."""
    h, w = m.shape[-2:]

    def draw() -> tuple[int, int]:
        return int(torch.randint(max(h - crop, 0) + 1, (1,), generator=g)), int(torch.randint(max(w - crop, 0) + 1, (1,), generator=g))

    y0, x0 = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            seg = m[y0 : y0 + crop, x0 : x0 + crop]
            counts = torch.bincount(seg[seg != IGNORE].long().reshape(-1))
            counts = counts[counts > 0]
            if len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio:
                break
            y0, x0 = draw()
    return x[:, y0 : y0 + crop, x0 : x0 + crop], m[y0 : y0 + crop, x0 : x0 + crop]


def photometric_distortion(x: Tensor, g: torch.Generator) -> Tensor:
    """DINOv3's PhotoMetricDistortion on uint8 (C, H, W), each step with probability 0.5: brightness + U(-32, 32),
    contrast x U(0.5, 1.5) (before or after the colour steps, a coin decides), then on RGB only torchvision's
    saturation x U(0.5, 1.5) and hue + U(-0.5, 0.5); values clipped to [0, 255] and truncated after each step."""
    from torchvision.transforms.v2 import functional as TF

    def affine(v: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
        return (v.float() * alpha + beta).clamp_(0, 255).to(torch.uint8)

    rgb = x.shape[0] == 3
    if _coin(g):
        x = affine(x, beta=_uniform(g, -32, 32))
    contrast_first = _coin(g)
    if contrast_first and _coin(g):
        x = affine(x, alpha=_uniform(g, 0.5, 1.5))
    if _coin(g):
        f = _uniform(g, 0.5, 1.5)
        x = TF.adjust_saturation(x, f) if rgb else x
    if _coin(g):
        f = _uniform(g, -0.5, 0.5)
        x = TF.adjust_hue(x, f) if rgb else x
    if not contrast_first and _coin(g):
        x = affine(x, alpha=_uniform(g, 0.5, 1.5))
    return x


def augment_pair(image: Tensor, mask: Tensor, aug: TrainAugment, mean: Tensor, std: Tensor, g: torch.Generator
                 ) -> tuple[Tensor, Tensor]:
    """One training view of (uint8 image (C, H, W), mask (H, W)): float (C, crop, crop) normalised, int64 (crop, crop).

    All draws come from `g` (CPU), so the view does not depend on the device the tensors are on.
    """
    h, w = mask.shape
    short = int((aug.img_size or min(h, w)) * _uniform(g, *aug.scale))
    size = resized_shape(h, w, max(1, short), aug.long_cap)
    x, m = random_crop(resize_image(image, size), resize_mask(mask, size), aug.crop, aug.cat_max_ratio, g)
    if _coin_p(g, aug.flip):
        x, m = x.flip(-1), m.flip(-1)
    if aug.photometric:
        x = photometric_distortion(x, g)
    v = (x.float().div(255) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    ph, pw = aug.crop - v.shape[-2], aug.crop - v.shape[-1]
    v = F.pad(v, (0, pw, 0, ph), value=0.0)
    return v, F.pad(m.long(), (0, pw, 0, ph), value=IGNORE)


class EpochSampler:
    """Indices of `n` items in random order from `g`, a fresh permutation each time one runs out."""

    def __init__(self, n: int, g: torch.Generator) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty set")
        self.n, self.g, self.order = n, g, list[int]()

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.g).tolist()
            out.append(self.order.pop())
        return out


def read_pairs(ds: SegmentationSet, idx: Sequence[int], pool: Executor | None = None) -> list[tuple[Tensor, Tensor]]:
    """(image, mask) of `ds[idx]`, decoded by `pool`'s threads when one is given (PIL releases the GIL)."""
    def read(i: int) -> tuple[Tensor, Tensor]:
        return ds.images[i], ds.masks[i]

    return list(pool.map(read, idx)) if pool is not None else [read(i) for i in idx]


def train_batch(ds: SegmentationSet, idx: Sequence[int], channels: int, aug: TrainAugment, mean: Tensor, std: Tensor,
                g: torch.Generator, device: torch.device, pool: Executor | None = None) -> tuple[Tensor, Tensor]:
    """Views of `ds[idx]` (images converted to `channels`, as `convert_channels`): (B, C, crop, crop), (B, crop, crop).

    Files are decoded in `pool` (if given); the views are drawn one after the other from `g`, so `pool` changes no draw.
    """
    xs, ys = [], []
    for i, (image, m) in zip(idx, read_pairs(ds, idx, pool)):
        check_mask(m, ds.num_classes, f"{ds.ids[i]} of {ds.name}")
        image = convert_channels(image, channels)
        x, y = augment_pair(image.to(device, non_blocking=True), m.to(device, non_blocking=True), aug, mean, std, g)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of logits (N, K, h, w), bilinearly upsampled to the labels (N, H, W), over the pixels not 255
    (a crop with none gives 0, not NaN)."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp_min(1)


# --------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class Inference:
    """How test images are segmented (protocol configs carry these as flat fields)."""

    mode: str = "slide"  # slide | whole
    crop: int = 512  # slide: window side
    stride: int = 341  # slide: window step
    size: int | None = 512  # the image's short side is resized to this first (None: as stored); logits go back
    batch_size: int = 16  # images of one shape per forward


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's slide grid: ceil((side - crop) / stride) + 1 steps per side, the last window
    pushed back to end at the border, windows never larger than the image."""
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def average_windows(logits: Sequence[Tensor], boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int]) -> Tensor:
    """Windows' logits (N, K, y2 - y1, x2 - x1) pasted at their boxes and averaged where they overlap: (N, K, *size)."""
    n, k = logits[0].shape[:2]
    out = logits[0].new_zeros(n, k, *size, dtype=torch.float32)
    count = out.new_zeros(1, 1, *size)
    for lg, (y1, y2, x1, x2) in zip(logits, boxes):
        out[:, :, y1:y2, x1:x2] += lg.float()
        count[:, :, y1:y2, x1:x2] += 1
    if bool((count == 0).any()):
        raise ValueError("the windows do not cover the image")
    return out / count


def slide_logits(fn: Callable[[Tensor], Tensor], x: Tensor, crop: int, stride: int) -> Tensor:
    """mmseg's slide_inference: `fn` maps windows (N, C, h, w) to logits at their own size (N, K, h, w)."""
    boxes = slide_windows(x.shape[-2], x.shape[-1], crop, stride)
    return average_windows([fn(x[:, :, y1:y2, x1:x2]) for y1, y2, x1, x2 in boxes], boxes, (x.shape[-2], x.shape[-1]))


def eval_input(image: Tensor, channels: int, size: int | None, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (C, H, W) on `mean`'s device -> normalised (1, channels, H', W'), the short side resized to `size`."""
    x = convert_channels(image, channels).to(mean.device)
    if size is not None:
        x = resize_image(x, resized_shape(x.shape[-2], x.shape[-1], size))
    return ((x.float().div(255) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1))[None]


def _groups(ds: SegmentationSet, batch_size: int, pool: Executor | None) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Consecutive (image, mask) pairs of one image shape, at most `batch_size` per group (decoded `batch_size` at a time)."""
    group: list[tuple[Tensor, Tensor]] = []
    for start in range(0, len(ds), batch_size):
        idx = list(range(start, min(len(ds), start + batch_size)))
        for i, (image, mask) in zip(idx, read_pairs(ds, idx, pool)):
            if tuple(image.shape[-2:]) != tuple(mask.shape):
                raise ValueError(f"{ds.name} {ds.ids[i]}: image {tuple(image.shape)} and mask {tuple(mask.shape)} sizes differ")
            if group and (image.shape != group[0][0].shape or len(group) == batch_size):
                yield group
                group = []
            group.append((image, mask))
    if group:
        yield group


@torch.no_grad()
def segment_confusions(features: nn.Module, heads: Sequence[Callable[[Tensor], Tensor]], ds: SegmentationSet, channels: int,
                       mean: Sequence[float], std: Sequence[float], inference: Inference, device: torch.device,
                       progress: bool = False, desc: str = "segment", pool: Executor | None = None) -> list[Tensor]:
    """Each head's confusion matrix (K, K) on `ds`, every backbone window computed once and shared by the heads.

    Args:
        features: images (N, C, h, w) -> feature maps (N, D, h', w'), in eval mode.
        heads: feature maps -> logits (N, K, h', w') (upsampled here to each window, then to the label).
        pool: decodes the files of a lazily read set (None: in this thread).
    """
    m, s = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    k = ds.num_classes
    cms = [torch.zeros(k, k, dtype=torch.int64, device=device) for _ in heads]
    amp = device.type == "cuda"
    bar = tqdm(total=len(ds), desc=desc, disable=not progress, leave=False)
    for group in _groups(ds, inference.batch_size, pool):
        x = torch.cat([eval_input(im, channels, inference.size, m, s) for im, _ in group])
        target = torch.stack([mask for _, mask in group]).to(device)
        h, w = x.shape[-2:]
        boxes = slide_windows(h, w, inference.crop, inference.stride) if inference.mode == "slide" else [(0, h, 0, w)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = [features(x[:, :, y1:y2, x1:x2]) for y1, y2, x1, x2 in boxes]
            for cm, head in zip(cms, heads):
                parts = [F.interpolate(head(f).float(), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
                         for f, (y1, y2, x1, x2) in zip(feats, boxes)]
                logits = average_windows(parts, boxes, (h, w))
                if logits.shape[-2:] != target.shape[-2:]:
                    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
                cm += confusion_matrix(logits.argmax(1), target, k)
        bar.update(len(group))
    bar.close()
    return [cm.cpu() for cm in cms]


def describe_val(dataset: str, train: SegmentationSet, val: SegmentationSet, fraction: float, seed: int) -> str:
    """How val was made, for the val row's selection text."""
    if dataset == "fmnist_seg":
        return f"val: {len(val)} canvases of their own"
    return f"val: {len(val)} of {len(train) + len(val)} train images (fraction {fraction:g}, seed {seed})"


def save_val_split(out: Path | None, dataset: str, train: SegmentationSet, val: SegmentationSet) -> Path | None:
    """Write the held-out val ids to out/splits/<dataset>-<val fingerprint>-val.json once (None: nothing written)."""
    if out is None:
        return None
    path = Path(out) / "splits" / f"{dataset}-{val.fingerprint}-val.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"dataset": dataset, "train": train.name, "train_fingerprint": train.fingerprint,
                                            "n": len(val), "ids": list(val.ids)}))
    return path


# --------------------------------------------------------------------------- dense features and dilation


class PatchGrid(nn.Module):
    """A timm ViT's last-layer patch tokens, after its final norm, as a (N, D, H / p, W / p) map (prefix tokens
    dropped): the features DINOv2 / DINOv3 linear segmentation reads (`backbone_out_layers: LAST`, no cls token)."""

    def __init__(self, vit: TimmViT) -> None:
        super().__init__()
        net: Any = vit.net  # timm's VisionTransformer
        self.net = net
        patch = net.patch_embed.patch_size
        self.patch = (int(patch[0]), int(patch[1]))

    def forward(self, x: Tensor) -> Tensor:
        tokens: Tensor = self.net.forward_features(x)  # (N, prefix + h * w, D)
        h, w = x.shape[-2] // self.patch[0], x.shape[-1] // self.patch[1]
        grid = tokens[:, int(self.net.num_prefix_tokens) :]
        return grid.transpose(1, 2).reshape(x.shape[0], grid.shape[-1], h, w)


def dense_features(net: nn.Module) -> nn.Module:
    """`net` (a backbone, its modules shared: pass a copy to train) as a module returning its spatial feature map.

    Raises:
        NotApplicable: `net` has no spatial map (the pixels baseline, two-encoder methods).
    """
    if isinstance(net, TimmViT):
        return PatchGrid(net)
    try:
        return nn.Sequential(*stages(net))
    except NotApplicable:
        raise NotApplicable(f"segmentation needs a backbone with a spatial feature map (convnet, resnet18/50, vit_*); "
                            f"{type(net).__name__} has none") from None


def output_stride(parts: Sequence[nn.Module], channels: int, size: int = 256) -> int:
    """Input side / output side of the chain `parts` (measured on a zero image)."""
    with torch.no_grad():
        p0 = next((p for part in parts for p in part.parameters()), None)
        x = torch.zeros(1, channels, size, size, device=p0.device if p0 is not None else None)
        was = [p.training for p in parts]
        for p in parts:
            x = p.eval()(x)
        for p, w in zip(parts, was):
            p.train(w)
    return size // int(x.shape[-1])


def dilate(net: nn.Module, channels: int, target: int = 8) -> list[str]:
    """Turn a torchvision ResNet's last strides into dilations, in place, until its output stride is `target`.

    From layer4 back, as torchvision's `replace_stride_with_dilation` builds a ResNet (DeepLab's / mmseg's D8 for
    target 8: layer3 dilation 2, layer4 dilation 4): the strided conv and the downsample conv of a converted stage's
    first block get stride 1, that block keeps the previous dilation and the other blocks take the new one. Bottleneck
    blocks dilate their 3x3 conv2 (torchvision); BasicBlocks (resnet18/34), which torchvision refuses to dilate, dilate
    conv1 only, as mmseg's BasicBlock. Any other backbone, or one already at `target` (ConvNet: strides 1, 2, 2, 2 give
    8; a small-stem ResNet: 8), is left as it is.

    Returns:
        The stages converted, e.g. ["layer3", "layer4"].
    """
    if not isinstance(net, TorchvisionResNet):
        return []
    r = net.net
    stride = output_stride(stages(net), channels)
    convert: list[str] = []
    for name in ("layer4", "layer3", "layer2"):
        if stride <= target:
            break
        convert.insert(0, name)
        stride //= 2
    dilation = 1
    for name in ("layer2", "layer3", "layer4"):
        if name in convert:
            previous, dilation = dilation, dilation * 2
            _dilate_layer(getattr(r, name), previous, dilation)
    return convert


def _dilate_layer(layer: nn.Module, previous: int, dilation: int) -> None:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for i, block in enumerate(layer.children()):
        d = previous if i == 0 else dilation
        conv = block.conv2 if isinstance(block, Bottleneck) else block.conv1 if isinstance(block, BasicBlock) else None
        if conv is None:
            raise NotApplicable(f"cannot dilate a {type(block).__name__} block")
        conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        down = getattr(block, "downsample", None)
        if i == 0 and down is not None:
            down[0].stride = (1, 1)
