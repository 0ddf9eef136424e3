"""In-memory image sets: `ImageSet` (uint8 images + labels), `Splits` (train/val/test as every protocol receives
them), `RawDataset` and `DatasetSpec` (what a dataset reader returns and how it is found), and the tensor helpers on
them (class-balanced subsets, resizing, grey <-> RGB)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImageSet:
    """Images and labels. x: (N, C, H, W) uint8; y: (N,) int64 class indices, or for multi-label data
    (N, K) int64 with 1 = present, 0 = absent, -1 = present only as "difficult" (VOC)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: Tensor) -> ImageSet:
        return ImageSet(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class Splits:
    """What every protocol receives: train/val/test plus the statistics needed to normalise."""

    name: str
    train: ImageSet  # train minus val: fit here
    val: ImageSet  # select hyperparameters here
    test: ImageSet  # touch once
    num_classes: int
    mean: tuple[float, ...]  # per channel, of train, in [0, 1] units
    std: tuple[float, ...]
    # sha256 prefix of the whole source (the files read, or every decoded pixel and label and the class names)
    # plus the split settings
    fingerprint: str
    val_ids: Tensor  # indices into the source train set that form `val` (saved with the results)

    @property
    def channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])

    @property
    def multilabel(self) -> bool:
        return self.train.y.ndim == 2

    def trainval(self) -> ImageSet:
        return ImageSet(torch.cat([self.train.x, self.val.x]), torch.cat([self.train.y, self.val.y]))


@dataclass(frozen=True)
class RawDataset:
    train: ImageSet
    test: ImageSet
    num_classes: int
    source_hash: str  # of the whole source: every file read, or every decoded pixel, label and class name


@dataclass(frozen=True)
class DatasetSpec:
    """How to find a dataset. `load(root)` returns a `RawDataset` or raises `DatasetError`."""

    load: Callable[[Path], RawDataset]
    default_root: str | None
    how_to_get: str




def balanced_subset(y: Tensor, n: int, g: torch.Generator) -> Tensor:
    """Indices of `n` samples spread as evenly as possible over the classes in `y` (sorted).

    Multi-label `y` (N, K) is stratified by each sample's first present class.
    """
    if n >= len(y):
        return torch.arange(len(y))
    if y.ndim == 2:
        y = (y > 0).to(torch.int64).argmax(1)
    perm = torch.randperm(len(y), generator=g)
    order = torch.argsort(y[perm], stable=True)  # grouped by class, random within a class
    ys = y[perm][order]
    rank = torch.empty_like(ys)
    classes, counts = torch.unique_consecutive(ys, return_counts=True)
    start = 0
    for c in counts.tolist():
        rank[start : start + c] = torch.arange(c)
        start += c
    # round-robin over classes: the k-th sample of every class before any (k+1)-th
    pick = torch.argsort(rank * (len(classes) + 1) + ys, stable=True)[:n]
    return torch.sort(perm[order][pick]).values


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601


def convert_channels(x: Tensor, channels: int) -> Tensor:
    """uint8 images (C, H, W) or (N, C, H, W) with `channels` channels: grey repeated, RGB -> ITU-R 601 luma (rounded).
    Raises ValueError for any other pair."""
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1:
        return x.expand(*x.shape[:-3], channels, *x.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor(LUMA).view(3, 1, 1)
        return (x.float() * w).sum(-3, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def resize(s: ImageSet, size: int, chunk: int = 1024) -> ImageSet:
    """Bilinear, antialiased, in chunks (a float copy of a whole large set would not fit)."""
    out = torch.empty(len(s), s.x.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(s), chunk):
        x = torch.nn.functional.interpolate(s.x[i : i + chunk].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return ImageSet(out, s.y)


# --------------------------------------------------------------------------- readers
