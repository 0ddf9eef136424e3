from __future__ import annotations

import gzip
import shutil
import socket
from pathlib import Path

import pytest
import torch

from benchmark.config import DataConfig
from benchmark.data.datasets import load_raw, make_splits
from benchmark.data.readers import read_idx
from benchmark.data.sets import ImageSet, RawDataset, balanced_subset
from benchmark.errors import DatasetError
from tests.conftest import FMNIST


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to download fails loudly (RELIABILITY.md T12)."""

    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_reads_the_debian_idx_files() -> None:
    raw = load_raw("fashion_mnist", None)
    assert raw.train.x.shape == (60000, 1, 28, 28) and raw.test.x.shape == (10000, 1, 28, 28)
    assert raw.train.x.dtype == torch.uint8
    assert torch.bincount(raw.train.y).tolist() == [6000] * 10


def test_validation_split_is_fixed_disjoint_and_balanced(digits_raw=None) -> None:
    raw = load_raw("digits", None)
    cfg = DataConfig(val_fraction=0.2, split_seed=0)
    a, b = make_splits("digits", raw, cfg), make_splits("digits", raw, cfg)
    assert torch.equal(a.val_ids, b.val_ids)  # same seed, same split
    assert len(a.train) + len(a.val) == len(raw.train)
    assert len(set(a.val_ids.tolist())) == len(a.val)
    counts = torch.bincount(a.val.y, minlength=10)
    assert counts.max() - counts.min() <= 1
    c = make_splits("digits", raw, DataConfig(val_fraction=0.2, split_seed=1))
    assert not torch.equal(a.val_ids, c.val_ids)
    assert a.fingerprint != c.fingerprint


def test_balanced_subset_takes_equal_counts_per_class() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = balanced_subset(y, 30, torch.Generator().manual_seed(0))
    assert torch.bincount(y[idx]).tolist() == [10, 10, 10]
    assert torch.equal(idx, idx.sort().values)


def test_missing_root_names_the_path_and_the_local_way(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=rf"not found at {tmp_path / 'nope'}.*apt-get install dataset-fashion-mnist"):
        load_raw("fashion_mnist", str(tmp_path / "nope"))


def test_empty_dir_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*is missing"):
        load_raw("fashion_mnist", str(tmp_path))


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_truncated_idx_file_is_corrupt_data_not_an_index_error(tmp_path: Path) -> None:
    for f in FMNIST.iterdir():
        shutil.copy(f, tmp_path / f.name)
    labels = gzip.decompress((FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[: len(labels) // 2]))
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_raw("fashion_mnist", str(tmp_path))


def test_idx_header_is_checked(tmp_path: Path) -> None:
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(p)
    p.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DatasetError, match="header says 13"):
        read_idx(p)


def test_torchvision_datasets_never_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="CIFAR10 not found or corrupt"):
        load_raw("cifar10", str(tmp_path))


def test_convert_channels_single_and_batched() -> None:
    from benchmark.data.colour import convert_channels

    rgb = torch.tensor([[[[255]], [[0]], [[0]]], [[[10]], [[20]], [[30]]]], dtype=torch.uint8)  # (2, 3, 1, 1)
    grey = convert_channels(rgb, 1)
    assert grey.dtype == torch.uint8 and grey.flatten().tolist() == [76, 18]  # round(0.299*255), round(2.99+11.74+3.42)
    assert torch.equal(convert_channels(rgb[1], 1), grey[1])  # one (C, H, W) image alike
    assert torch.equal(convert_channels(grey, 3), grey.repeat(1, 3, 1, 1)) and convert_channels(rgb, 3) is rgb
    with pytest.raises(ValueError, match="cannot convert 2-channel images to 3 channels"):
        convert_channels(torch.zeros(2, 4, 4, dtype=torch.uint8), 3)


def _raw(train_y: list[int], test_y: list[int], classes: int = 3) -> RawDataset:
    def images(y: list[int]) -> ImageSet:
        return ImageSet(torch.zeros(len(y), 1, 8, 8, dtype=torch.uint8), torch.tensor(y, dtype=torch.long))

    return RawDataset(images(train_y), images(test_y), classes, "h")


@pytest.mark.parametrize("raw, message", [
    (_raw([], [0, 1, 2]), "dataset 'x' has 0 train images"),
    (_raw([0, 1, 2] * 4, []), "dataset 'x' has 0 test images"),
    (_raw([0, 1, 200] * 4, [0, 1, 2]), r"label 200 in its train split is outside its 3 classes \(0\.\.2\)"),
    (_raw([0, 1, 2] * 4, [0, -1]), "label -1 in its test split is outside its 3 classes"),
])
def test_empty_splits_and_labels_outside_the_classes_fail_at_planning(raw: RawDataset, message: str) -> None:
    """Issue 18.7: these passed planning and failed inside the job (an IndexError, a division by zero)."""
    with pytest.raises(DatasetError, match=message):
        make_splits("x", raw, DataConfig())



def test_an_image_folder_fingerprint_covers_every_image_and_class_name(tmp_path: Path) -> None:
    """Issue 18.6: it hashed the first 64 training images only; a changed 70th or test image kept the fingerprint."""
    from PIL import Image

    def write(path: Path, value: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (value, value, value)).save(path)

    for c in ("a", "b"):
        for i in range(40):
            write(tmp_path / "train" / c / f"{i:03d}.png", 3 * i)
        write(tmp_path / "val" / c / "000.png", 7)

    def fingerprint() -> str:
        return load_raw("imagefolder", str(tmp_path)).source_hash

    seen = {fingerprint()}
    write(tmp_path / "train" / "b" / "030.png", 250)  # the 71st training image
    seen.add(fingerprint())
    write(tmp_path / "val" / "a" / "000.png", 250)  # a test image
    seen.add(fingerprint())
    for d in ("train", "val"):
        (tmp_path / d / "b").rename(tmp_path / d / "c")  # the same images under another class name
    seen.add(fingerprint())
    assert len(seen) == 4


def test_the_dataset_cache_is_bounded() -> None:
    """Issue 18.15: every distinct data config stayed in memory for the life of the process."""
    from benchmark.data import datasets

    datasets._CACHE.clear()
    for size in range(100, 100 + 2 * datasets.CACHE_SIZE):
        datasets.load_splits("digits", DataConfig(train_size=size))
    assert len(datasets._CACHE) == datasets.CACHE_SIZE
    newest = datasets.load_splits("digits", DataConfig(train_size=99 + 2 * datasets.CACHE_SIZE))
    assert datasets.load_splits("digits", DataConfig(train_size=99 + 2 * datasets.CACHE_SIZE)) is newest
