"""Datasets held in memory as uint8 tensors, with a fixed held-out validation split.

Nothing is ever downloaded. Each dataset is read from a local root: `--data-root`/`data.root`, else
`$SSLBENCH_DATA_<NAME>`, else the dataset's default path. A missing or corrupt dataset raises a
`DatasetError` naming the path tried and how to get the data, before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from benchmark.config import DataConfig
from benchmark.data import layouts, readers, voc  # noqa: F401  (importing them registers the datasets they read)
from benchmark.data.sets import DatasetSpec, Images, ImageSet, RawDataset, Splits, balanced_subset, resize
from benchmark.data.stream import EvalTransform, StreamSet
from benchmark.errors import ConfigError, DatasetError
from benchmark.registry import DATASETS
from benchmark.store.io import atomic_write_text


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


CACHE_SIZE = 4  # datasets kept in memory per process (a grid uses one or two at a time)
_CACHE: OrderedDict[tuple[str, str | None, DataConfig], Splits] = OrderedDict()


def load_splits(name: str, cfg: DataConfig) -> Splits:
    """Load, subset, split and resize `name` as `cfg` says (memoised per process)."""
    key = (name, cfg.root, cfg)
    if key not in _CACHE:
        _CACHE[key] = make_splits(name, load_raw(name, cfg.root), cfg)
        while len(_CACHE) > CACHE_SIZE:  # the least recently used goes: a sweep over many configs stays bounded
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]

def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform: no limit known
        return 2**62


def _check_raw(name: str, raw: RawDataset, cfg: DataConfig) -> None:
    """What would fail later, inside a job, with a traceback: empty splits, labels outside the classes, a subset
    too small to hold a validation and a training image of every class, images too large for this machine."""
    for split, images in (("train", raw.train), ("test", raw.test)):
        if len(images) == 0:
            raise DatasetError(f"dataset {name!r} has 0 {split} images; check its folder (data.root or --data-root)")
        y = images.y
        if y.ndim == 1 and len(y) and (int(y.min()) < 0 or int(y.max()) >= raw.num_classes):
            bad = int(y.max()) if int(y.max()) >= raw.num_classes else int(y.min())
            raise DatasetError(f"dataset {name!r}: label {bad} in its {split} split is outside its {raw.num_classes} classes "
                               f"(0..{raw.num_classes - 1}); the labels or the class list are wrong")
        if y.ndim == 2 and y.shape[1] != raw.num_classes:
            raise DatasetError(f"dataset {name!r}: {split} labels have {y.shape[1]} columns for {raw.num_classes} classes")
    need = 2 * raw.num_classes  # one validation and one training image per class
    if cfg.train_size is not None and cfg.train_size < need:
        raise ConfigError(f"data.train_size={cfg.train_size} is too small for {name!r}: its {raw.num_classes} classes need "
                          f"one validation and one training image each; use data.train_size >= {need}")
    if cfg.image_size is not None and isinstance(raw.train, ImageSet):
        n = min(len(raw.train), cfg.train_size or len(raw.train)) + min(len(raw.test), cfg.test_size or len(raw.test))
        size = n * raw.train.channels * cfg.image_size**2
        if size > _physical_memory():
            raise ConfigError(f"data.image_size={cfg.image_size} would hold {n} images in {size / 2**30:,.0f} GiB of memory; "
                              f"this machine has {_physical_memory() / 2**30:,.0f} GiB: use a smaller data.image_size")


def make_splits(name: str, raw: RawDataset, cfg: DataConfig) -> Splits:
    _check_raw(name, raw, cfg)
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
    val_ids = ids[val_idx]
    if isinstance(train, StreamSet) and isinstance(val, StreamSet) and isinstance(test, StreamSet):
        return _file_splits(name, raw, cfg, train, val, test, val_ids)
    if cfg.image_size is not None and cfg.image_size != train.image_size:
        train, val, test = (resize(s, cfg.image_size) for s in (train, val, test))  # type: ignore[arg-type]
    xf = train.x.float().div_(255)
    mean = tuple(xf.mean(dim=(0, 2, 3)).tolist())
    std = tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    settings = json.dumps([raw.source_hash, cfg.train_size, cfg.test_size, cfg.val_fraction, cfg.split_seed, cfg.image_size])
    fp = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return Splits(name, train, val, test, raw.num_classes, mean, std, fp, val_ids)


STATS_SAMPLE = 2048  # a file-based dataset's per-channel statistics come from this many fixed, class-balanced images
MEMORY_AUTO = 2 * 2**30  # data.storage=auto decodes a file-based dataset into memory up to this many bytes


def choose_storage(cfg: DataConfig, n: int, channels: int, size: int) -> str:
    """"memory" or "stream" for `n` images of `channels` x `size`²: data.storage, or by size when "auto"."""
    need = n * channels * size * size
    if cfg.storage == "stream":
        return "stream"
    if cfg.storage == "memory":
        if need > _physical_memory() // 2:
            raise ConfigError(f"data.storage=memory would hold {n} images of {size} px in {need / 2**30:,.1f} GiB, more than half "
                              f"of this machine's {_physical_memory() / 2**30:,.0f} GiB: use data.storage=stream (or auto)")
        return "memory"
    return "memory" if need <= min(MEMORY_AUTO, _physical_memory() // 8) else "stream"


def _channel_stats(images: StreamSet) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of a fixed class-balanced sample of `images`: exact integer sums
    of the uint8 pixels and their squares (no float copy of a batch: 64 images of 224 px at a time)."""
    sample = images.subset(balanced_subset(images.y, STATS_SAMPLE, torch.Generator().manual_seed(0)))
    s1 = torch.zeros(images.channels, dtype=torch.float64)
    s2 = torch.zeros(images.channels, dtype=torch.float64)
    count = 0
    for xb in sample.batches(64):
        s1 += xb.sum(dim=(0, 2, 3), dtype=torch.float64)
        s2 += xb.to(torch.int32).square_().sum(dim=(0, 2, 3), dtype=torch.float64)
        count += xb.numel() // images.channels
    mean = s1 / count
    var = (s2 / count - mean.square()).clamp_min(0) * count / max(1, count - 1)
    return tuple(float(v) / 255 for v in mean), tuple(max(1e-3, float(v) / 255) for v in var.sqrt())


def _file_splits(name: str, raw: RawDataset, cfg: DataConfig, train: StreamSet, val: StreamSet, test: StreamSet,
                 val_ids: torch.Tensor) -> Splits:
    """A file-based dataset's splits with its evaluation transform, in memory or streamed (`choose_storage`).
    The per-channel statistics come from the same fixed sample either way, so both give the same numbers."""
    kind = raw.default_transform if cfg.transform == "auto" else cfg.transform
    try:
        tf = EvalTransform.named(kind, cfg.image_size or raw.default_size)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    names = [tuple(os.path.basename(p) for p in s.paths) if bool((s.offsets < 0).all()) else () for s in (train, val)]
    train, val, test = (s.with_transform(tf) for s in (train, val, test))
    train, val, test = (dataclasses.replace(s, workers=cfg.workers) for s in (train, val, test))
    size = train.image_size
    storage = choose_storage(cfg, len(train) + len(val) + len(test), train.channels, size)
    mean, std = _channel_stats(train)
    sets: tuple[Images, Images, Images] = (train, val, test)
    if storage == "memory":
        sets = tuple(ImageSet(s.materialise(progress=True, desc=f"decoding {name} {split}"), s.y)  # type: ignore[assignment]
                     for s, split in zip((train, val, test), ("train", "val", "test")))
    label = "memory" if storage == "memory" else f"stream ({cfg.workers} workers)"
    settings = json.dumps([raw.source_hash, cfg.train_size, cfg.test_size, cfg.val_fraction, cfg.split_seed, tf.describe()])
    fp = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return Splits(name, *sets, raw.num_classes, mean, std, fp, val_ids, storage=label, transform=tf.describe(),
                  train_names=names[0], val_names=names[1])


def save_split_file(splits: Splits, path: Path) -> None:
    """Save the validation split (indices into the source train set) and sizes next to the results."""
    info = {
        "dataset": splits.name,
        "fingerprint": splits.fingerprint,
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "val_ids": splits.val_ids.tolist(),
    }
    atomic_write_text(path, json.dumps(info))
