"""Dataset readers, registered by name: Fashion-MNIST (IDX files), scikit-learn's digits, CIFAR-10/100 and STL-10
(torchvision layouts, never downloaded); file-based datasets are in `layouts`. Each returns a `RawDataset` or raises `DatasetError`."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.data.sets import DatasetSpec, ImageSet, RawDataset, balanced_subset
from benchmark.errors import DatasetError
from benchmark.registry import register_dataset


def _sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _content(*sets: ImageSet, extra: str = "") -> str:
    """sha256 prefix of every pixel and label of `sets` (and `extra`, e.g. class names): the whole decoded dataset,
    so that any changed, added or removed image changes it (a second or so per 200 MB)."""
    h = hashlib.sha256(extra.encode())
    for s in sets:
        h.update(repr((tuple(s.x.shape), tuple(s.y.shape))).encode())
        h.update(s.x.contiguous().numpy().tobytes())
        h.update(s.y.contiguous().numpy().tobytes())
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
        return RawDataset(train, test, num_classes, _content(train, test))

    return load


_TV_HINT = "Nothing is downloaded: copy the official archive, extracted, under --data-root DIR (the layout torchvision expects) or set ${}."
_TV: list[tuple[str, str, int, tuple[dict[str, Any], dict[str, Any]]]] = [
    ("cifar10", "CIFAR10", 10, ({"train": True}, {"train": False})),
    ("cifar100", "CIFAR100", 100, ({"train": True}, {"train": False})),
    ("stl10", "STL10", 10, ({"split": "train"}, {"split": "test"})),
]
for _name, _cls, _k, _kw in _TV:
    register_dataset(_name)(DatasetSpec(_load_torchvision(_cls, _k, _kw), None, _TV_HINT.format(f"SSLBENCH_DATA_{_name.upper()}")))
