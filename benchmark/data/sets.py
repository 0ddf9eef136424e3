"""In-memory image sets: `ImageSet` (uint8 images + labels), `Splits` (train/val/test as every protocol receives
them), `RawDataset` and `DatasetSpec` (what a dataset reader returns and how it is found), and the tensor helpers on
them (class-balanced subsets, resizing, grey <-> RGB)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from benchmark.data.stream import StreamSet


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

    # the interface shared with `StreamSet`: code that reads images through it works on either
    @property
    def channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])

    def concat(self, other: ImageSet) -> ImageSet:
        return ImageSet(torch.cat([self.x, other.x]), torch.cat([self.y, other.y]))

    def take(self, idx: Tensor) -> Tensor:
        return self.x[idx]

    def loader(self, batches: Sequence[Tensor], pin: bool = False) -> Iterator[Tensor]:
        del pin  # already in memory
        for b in batches:
            yield self.x[b]

    def batches(self, batch_size: int, pin: bool = False) -> Iterator[Tensor]:
        del pin
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size]


Images = ImageSet | StreamSet  # what a split holds: decoded in memory, or decoded on the fly from files


@dataclass(frozen=True)
class Splits:
    """What every protocol receives: train/val/test plus the statistics needed to normalise."""

    name: str
    train: Images  # train minus val: fit here
    val: Images  # select hyperparameters here
    test: Images  # touch once
    num_classes: int
    mean: tuple[float, ...]  # per channel, of train, in [0, 1] units
    std: tuple[float, ...]
    # sha256 prefix of the whole source (the files read, or every decoded pixel and label and the class names)
    # plus the split settings
    fingerprint: str
    val_ids: Tensor  # indices into the source train set that form `val` (saved with the results)
    storage: str = "memory"  # "memory", or "stream (N workers)": where the images are read from (recorded per row)
    transform: str = ""  # the evaluation transform of a file-based dataset ("resize256-crop224"); "" for tensor data
    # file names (basenames) of train's and val's images, for a dataset read from files ((): tensor data, shards):
    # what lets published subset lists (SimCLR's `1percent.txt`) be read as they are distributed
    train_names: tuple[str, ...] = ()
    val_names: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return self.train.channels

    @property
    def image_size(self) -> int:
        return self.train.image_size

    @property
    def multilabel(self) -> bool:
        return self.train.y.ndim == 2

    def trainval(self) -> Images:
        return self.train.concat(self.val)  # type: ignore[arg-type]  # both splits are stored alike


@dataclass(frozen=True)
class RawDataset:
    train: Images  # a `StreamSet` for file-based datasets: `make_splits` decodes it into memory or streams it
    test: Images
    num_classes: int
    source_hash: str  # of the whole source: every file read, or every decoded pixel, label and class name
    default_size: int | None = None  # a file-based dataset's evaluation size when data.image_size is unset
    default_transform: str = "resize_crop"  # and its evaluation transform when data.transform is "auto"


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


def resize(s: ImageSet, size: int, chunk: int = 1024) -> ImageSet:
    """Bilinear, antialiased, in chunks (a float copy of a whole large set would not fit)."""
    out = torch.empty(len(s), s.x.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(s), chunk):
        x = torch.nn.functional.interpolate(s.x[i : i + chunk].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return ImageSet(out, s.y)


# --------------------------------------------------------------------------- readers
