"""Datasets held in memory as uint8 tensors, with a fixed held-out validation split.

Nothing is ever downloaded. Each dataset is read from a local root: `--data-root`/`data.root`, else
`$SSLBENCH_DATA_<NAME>`, else the dataset's default path. A missing or corrupt dataset raises a
`DatasetError` naming the path tried and how to get the data, before any work starts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmark.config import DataConfig
from benchmark.errors import DatasetError
from benchmark.io import atomic_write_text
from benchmark.registry import DATASETS, register_dataset


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
    fingerprint: str  # sha256 prefix of the source files plus the split settings
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
    source_hash: str


@dataclass(frozen=True)
class DatasetSpec:
    """How to find a dataset. `load(root)` returns a `RawDataset` or raises `DatasetError`."""

    load: Callable[[Path], RawDataset]
    default_root: str | None
    how_to_get: str


def resolve_root(name: str, root: str | None) -> Path:
    spec: DatasetSpec = DATASETS.get(name)
    env = f"SSLBENCH_DATA_{name.upper()}"
    chosen = root or os.environ.get(env) or spec.default_root
    if chosen is None:
        raise DatasetError(f"dataset {name!r} needs a root: pass --data-root DIR or set ${env}. {spec.how_to_get}")
    path = Path(chosen).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset {name!r} not found at {path}. {spec.how_to_get}")
    return path


def load_raw(name: str, root: str | None) -> RawDataset:
    """Load the full train and test sets of `name` (raises `DatasetError`)."""
    spec: DatasetSpec = DATASETS.get(name)
    path = resolve_root(name, root)
    try:
        return spec.load(path)
    except DatasetError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, KeyError) as e:
        raise DatasetError(f"dataset {name!r} at {path} is unreadable or corrupt ({type(e).__name__}: {e}). {spec.how_to_get}") from None


_CACHE: dict[tuple[str, str | None, DataConfig], Splits] = {}


def load_splits(name: str, cfg: DataConfig) -> Splits:
    """Load, subset, split and resize `name` as `cfg` says (memoised per process)."""
    key = (name, cfg.root, cfg)
    if key not in _CACHE:
        _CACHE[key] = make_splits(name, load_raw(name, cfg.root), cfg)
    return _CACHE[key]


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


def make_splits(name: str, raw: RawDataset, cfg: DataConfig) -> Splits:
    g = torch.Generator().manual_seed(cfg.split_seed)
    train, test = raw.train, raw.test
    ids = torch.arange(len(train))
    if cfg.train_size is not None:
        ids = balanced_subset(train.y, cfg.train_size, g)
        train = train.subset(ids)
    if cfg.test_size is not None:
        test = test.subset(balanced_subset(test.y, cfg.test_size, g))
    n_val = max(raw.num_classes, round(cfg.val_fraction * len(train)))
    val_idx = balanced_subset(train.y, n_val, g)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    val, train = train.subset(val_idx), train.subset(keep.nonzero().squeeze(1))
    if cfg.image_size is not None and cfg.image_size != train.x.shape[-1]:
        train, val, test = (resize(s, cfg.image_size) for s in (train, val, test))
    xf = train.x.float().div_(255)
    mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
    std = tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    settings = json.dumps([raw.source_hash, cfg.train_size, cfg.test_size, cfg.val_fraction, cfg.split_seed, cfg.image_size])
    fp = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return Splits(name, train, val, test, raw.num_classes, mean, std, fp, ids[val_idx])


def save_split_file(splits: Splits, path: Path) -> None:
    """Save the validation split (indices into the source train set) and sizes next to the results."""
    info = {
        "dataset": splits.name,
        "fingerprint": splits.fingerprint,
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "val_ids": splits.val_ids.tolist(),
    }
    atomic_write_text(path, json.dumps(info))


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


def _sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as uint8, checking its header against its size."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 IDX file (bad magic number): corrupt data")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(f"{path} is truncated or corrupt: {len(data)} bytes, header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand
    raise DatasetError(f"{root / stem}[.gz] is missing")


def _load_idx_dataset(root: Path, num_classes: int) -> RawDataset:
    files = [_find(root, s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    xtr, ytr, xte, yte = (read_idx(p) for p in files)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DatasetError(f"{root}: image and label counts differ: corrupt data")

    def to_set(x: np.ndarray, y: np.ndarray) -> ImageSet:
        return ImageSet(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))

    return RawDataset(to_set(xtr, ytr), to_set(xte, yte), num_classes, _sha(files))


register_dataset("fashion_mnist")(
    DatasetSpec(
        load=lambda root: _load_idx_dataset(root, 10),
        default_root="/usr/share/datasets/fashion-mnist",
        how_to_get="Install it with `sudo apt-get install dataset-fashion-mnist` (IDX files in /usr/share/datasets/fashion-mnist) or point --data-root at a folder holding the four IDX files.",
    )
)


def _load_digits(root: Path) -> RawDataset:
    del root  # bundled with scikit-learn
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    # hack: digits has no official split; a fixed class-balanced quarter is the test set
    test_idx = balanced_subset(y, len(y) // 4, torch.Generator().manual_seed(12345))
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test_idx] = False
    src = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
    return RawDataset(ImageSet(x[mask], y[mask]), ImageSet(x[test_idx], y[test_idx]), 10, src)


register_dataset("digits")(
    DatasetSpec(load=_load_digits, default_root=".", how_to_get="It ships with scikit-learn: `pip install scikit-learn`.")
)


def _torchvision_set(ds: Any) -> ImageSet:
    data = ds.data
    x = torch.as_tensor(np.asarray(data))
    if x.ndim == 4 and x.shape[-1] in (1, 3):  # CIFAR stores NHWC
        x = x.permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds.labels), dtype=torch.int64)
    return ImageSet(x.contiguous(), y)


def _load_torchvision(cls_name: str, num_classes: int, splits: tuple[dict[str, Any], dict[str, Any]]) -> Callable[[Path], RawDataset]:
    def load(root: Path) -> RawDataset:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:  # download=False: torchvision checks the files' md5 and raises if absent
            tr, te = (cls(str(root), download=False, **kw) for kw in splits)
        except RuntimeError as e:
            raise DatasetError(f"{cls_name} not found or corrupt under {root}: {e}") from None
        train, test = _torchvision_set(tr), _torchvision_set(te)
        src = hashlib.sha256(train.x[:256].numpy().tobytes() + test.x[:256].numpy().tobytes()).hexdigest()[:16]
        return RawDataset(train, test, num_classes, f"{src}-{len(train)}-{len(test)}")

    return load


_TV_HINT = "Nothing is downloaded: copy the official archive, extracted, under --data-root DIR (the layout torchvision expects) or set ${}."
_TV: list[tuple[str, str, int, tuple[dict[str, Any], dict[str, Any]]]] = [
    ("cifar10", "CIFAR10", 10, ({"train": True}, {"train": False})),
    ("cifar100", "CIFAR100", 100, ({"train": True}, {"train": False})),
    ("stl10", "STL10", 10, ({"split": "train"}, {"split": "test"})),
]
for _name, _cls, _k, _kw in _TV:
    register_dataset(_name)(DatasetSpec(_load_torchvision(_cls, _k, _kw), None, _TV_HINT.format(f"SSLBENCH_DATA_{_name.upper()}")))


def _load_imagefolder(root: Path) -> RawDataset:
    """`root/train/<class>/*.jpg` and `root/val/<class>/*` (or `test/`), resized to 64 px.

    Class indices come from the train folder's sorted class names, so a test folder that lacks a
    class still maps every other class to the same index.
    """
    import torchvision.datasets as tvd
    import torchvision.transforms.v2 as T

    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DatasetError(f"imagefolder root {root} must hold train/<class>/ and val/<class>/ (or test/<class>/)")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    extra = sorted({d.name for d in test_dir.iterdir() if d.is_dir()} - set(classes))
    if extra:
        raise DatasetError(f"{test_dir} has classes that train/ lacks: {', '.join(extra[:5])}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    tf = T.Compose([T.PILToTensor(), T.Resize(72, antialias=True), T.CenterCrop(64)])
    sets = []
    for d in (root / "train", test_dir):
        samples = tvd.folder.make_dataset(str(d), class_to_idx, extensions=tvd.folder.IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise DatasetError(f"no images found under {d}/<class>/")
        imgs = [tf(tvd.folder.default_loader(path).convert("RGB")) for path, _ in samples]
        sets.append(ImageSet(torch.stack(imgs), torch.tensor([t for _, t in samples], dtype=torch.int64)))
    src = hashlib.sha256(sets[0].x[:64].numpy().tobytes()).hexdigest()[:16] + f"-{len(sets[0])}-{len(sets[1])}"
    return RawDataset(sets[0], sets[1], len(classes), src)


register_dataset("imagefolder")(
    DatasetSpec(_load_imagefolder, None, "Pass --data-root DIR with DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg.")
)


import benchmark.voc  # noqa: E402, F401  (registers voc2007; it imports the names above)
