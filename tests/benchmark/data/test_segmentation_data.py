"""Segmentation data: the embedded set against fmnist_det's canvases, the VOC12 (+ SBD), Cityscapes and ADE20K readers
on small trees written here, mask decoding, the held-out val split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.data.detection import EmbeddedSpec
from benchmark.data.detection import load_embedded as load_detection_embedded
from benchmark.data.segmentation import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_TRAIN_ID,
    FMNIST_SEG_CLASSES,
    VOC_SEG_CLASSES,
    LazyMasks,
    SegmentationSet,
    SegmentationSpec,
    build_embedded,
    carve_val,
    item_mask,
    load_embedded,
    load_segmentation,
    read_ade20k,
    read_cityscapes,
    read_mask,
    read_voc12,
    voc_palette,
    write_mask,
)
from benchmark.errors import DatasetError

FMNIST = Path("/usr/share/datasets/fashion-mnist")
SPEC = SegmentationSpec(n_train=12, n_val=4, n_test=6)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "sslbench-cache"))  # the readers' file-hash cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def embedded(cache: Path) -> tuple[SegmentationSet, SegmentationSet, SegmentationSet]:
    return load_embedded(SPEC, cache=cache)


def test_item_mask_is_each_box_thresholded_pixels() -> None:
    img = np.zeros((6, 8), dtype=np.uint8)
    img[1:3, 1:4] = [[9, 7, 200], [8, 0, 8]]  # item of class 2 (label 3), box x 1..4, y 1..3
    img[4, 5:7] = [40, 5]  # item of class 0 (label 1): 5 is below the threshold 8 -> background
    img[0, 7] = 6  # a faint pixel outside every box
    mask = item_mask(img, [(1, 1, 4, 3), (5, 4, 6, 5)], [2, 0])
    want = np.zeros((6, 8), dtype=np.uint8)
    want[1:3, 1:4] = [[3, 0, 3], [3, 0, 3]]
    want[4, 5] = 1
    assert (mask == want).all()


def test_embedded_set_is_fmnist_det_canvases_with_masks(cache: Path, embedded: tuple[SegmentationSet, ...]) -> None:
    train, val, test = embedded
    assert (len(train), len(val), len(test)) == (12, 4, 6)
    assert train.classes == FMNIST_SEG_CLASSES and len(train.classes) == 11
    det_train, det_test = load_detection_embedded(EmbeddedSpec(n_train=16, n_test=6), cache=cache)
    # same draw, same ids: train = the first 12 trainval canvases, val = the last 4, test = test
    assert train.ids + val.ids == det_train.ids and test.ids == det_test.ids
    masks = list(train.masks) + list(val.masks) + list(test.masks)
    images = list(train.images) + list(val.images) + list(test.images)
    for m, im, b, y in zip(masks, images, det_train.boxes + det_test.boxes, det_train.labels + det_test.labels):
        assert m.shape == (128, 128) and im.shape == (1, 128, 128) and im.dtype == torch.uint8
        # each item's mask pixels span exactly its fmnist_det box, with its class + 1; outside the boxes: background
        outside = torch.ones(128, 128, dtype=torch.bool)
        for (x1, y1, x2, y2), c in zip(b.int().tolist(), y.tolist()):
            rows, cols = (m[y1:y2, x1:x2] == c + 1).nonzero().unbind(1)
            assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (0, y2 - y1 - 1, 0, x2 - x1 - 1)
            assert set(m[y1:y2, x1:x2].unique().tolist()) <= {0, c + 1}
            outside[y1:y2, x1:x2] = False
        assert int(m[outside].max()) == 0
        # lossless: the PNG canvas read back gives the same mask again
        assert torch.equal(torch.from_numpy(item_mask(im[0].numpy(), b.int().tolist(), y.tolist())), m)
    assert len(set(train.ids) | set(val.ids)) == 16


def test_embedded_set_is_deterministic_and_reused(cache: Path, tmp_path: Path, embedded: tuple[SegmentationSet, ...]) -> None:
    root = build_embedded(SPEC, cache=cache)
    assert build_embedded(SPEC, cache=cache) == root and (root / "DONE").is_file()
    again = load_embedded(SPEC, cache=tmp_path)  # drawn again elsewhere: the same set
    assert [s.fingerprint for s in again] == [s.fingerprint for s in embedded]
    assert all(torch.equal(a, b) for a, b in zip(again[2].masks, embedded[2].masks))
    assert build_embedded(SegmentationSpec(n_train=12, n_val=4, n_test=6, seed=1), cache=cache) != root
    # the val split of real datasets is no part of the embedded set's key
    assert build_embedded(SegmentationSpec(n_train=12, n_val=4, n_test=6, val_fraction=0.3), cache=cache) == root


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def _voc_tree(root: Path, train: list[str], val: list[str], aug: list[str] | None = None) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i, name in enumerate(sorted(set(train + val + (aug or [])))):
        _png(base / "JPEGImages" / f"{name}.jpg", np.full((6, 8, 3), 10 * i, dtype=np.uint8))
        mask = np.zeros((6, 8), dtype=np.uint8)
        mask[1:3, 2:5] = 1 + i
        mask[0, :] = 255  # VOC's object border
        (base / "SegmentationClass").mkdir(exist_ok=True)
        write_mask(base / "SegmentationClass" / f"{name}.png", mask)
        if aug is not None:  # SBD: grey PNGs of the same indices
            _png(base / "SegmentationClassAug" / f"{name}.png", mask, "L")
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{n}\n" for n in train))
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{n}\n" for n in val))
    if aug is not None:  # DeepLab's two-column format
        (base / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
            "".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in aug))
    return root


def test_voc_palette_masks_read_as_indices_not_colours(tmp_path: Path) -> None:
    mask = np.array([[0, 1, 15], [255, 20, 0]], dtype=np.uint8)
    write_mask(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P" and im.convert("RGB").getpixel((1, 0)) == (128, 0, 0)  # VOC's aeroplane red
    assert read_mask(tmp_path / "m.png").tolist() == mask.tolist()
    assert voc_palette()[3 * 15 : 3 * 16] == [192, 128, 128] and voc_palette()[3 * 255 : 3 * 256] == [224, 224, 192]
    _png(tmp_path / "rgb.png", np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="rgb.png is a RGB colour image, not class indices"):
        read_mask(tmp_path / "rgb.png")


def test_read_voc12_and_the_sbd_augmentation(tmp_path: Path) -> None:
    root = _voc_tree(tmp_path, ["a", "b", "c"], ["d", "e"], aug=["a", "b", "c", "x", "d"])
    train, test = read_voc12(root, aug=False)
    assert train.ids == ["a", "b", "c"] and test.ids == ["d", "e"] and train.classes == VOC_SEG_CLASSES
    assert isinstance(train.masks, LazyMasks) and train.images[1].shape == (3, 6, 8)
    m = train.masks[1]
    assert m.dtype == torch.uint8 and m[0].tolist() == [255] * 8 and int(m[1, 2]) == 2 and int(m[5, 7]) == 0
    aug, test2 = read_voc12(root / "VOCdevkit", aug=True)  # VOCdevkit itself as the root works too
    assert aug.ids == ["a", "b", "c", "x"] and test2.ids == test.ids  # "d" is VOC12 val (the test set): dropped
    assert "SegmentationClassAug" in str(aug.masks.paths[0])  # type: ignore[attr-defined]
    train3, val3, test3 = load_segmentation("voc12aug", str(root), SegmentationSpec(val_fraction=0.25))
    assert len(val3) == 1 and sorted(train3.ids + val3.ids) == ["a", "b", "c", "x"] and test3.ids == ["d", "e"]


def test_voc_readers_say_where_to_put_the_data(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no VOC2012 segmentation under .*extract VOCtrainval_11-May-2012.tar"):
        read_voc12(tmp_path, aug=False)
    root = _voc_tree(tmp_path, ["a", "b"], ["c"])
    with pytest.raises(DatasetError, match=r"train_aug.txt is missing: put SBD's SegmentationClassAug/"):
        read_voc12(root, aug=True)
    (root / "VOCdevkit/VOC2012/JPEGImages/b.jpg").unlink()
    with pytest.raises(DatasetError, match=r"b.jpg is missing \(listed in .*train.txt\)"):
        read_voc12(root, aug=False)
    with pytest.raises(DatasetError, match="needs its folder in the config's data_root"):
        load_segmentation("voc12", None)
    with pytest.raises(DatasetError, match="unknown segmentation dataset 'coco'"):
        load_segmentation("coco", str(root))


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path: Path) -> None:
    assert sorted(CITYSCAPES_TRAIN_ID.values()) == list(range(19)) and len(CITYSCAPES_CLASSES) == 19
    assert CITYSCAPES_TRAIN_ID[26] == CITYSCAPES_CLASSES.index("car") and CITYSCAPES_TRAIN_ID[7] == 0
    ids = np.array([[0, 7, 8, 9], [26, 33, 24, 3]], dtype=np.uint8)  # unlabeled, road, sidewalk, parking / car, bicycle, person, out of roi
    for split, city in (("train", "aachen"), ("train", "bonn"), ("val", "lindau")):
        stem = f"{city}_000000_000019"
        _png(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", np.zeros((2, 4, 3), dtype=np.uint8))
        _png(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids, "L")
    train = read_cityscapes(tmp_path, "train")
    assert train.ids == ["aachen_000000_000019", "bonn_000000_000019"] and train.images[0].shape == (3, 2, 4)
    assert train.masks[0].tolist() == [[255, 0, 1, 255], [13, 18, 11, 255]]
    (tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match="lindau_000000_000019_gtFine_labelIds.png is missing"):
        read_cityscapes(tmp_path, "val")
    with pytest.raises(DatasetError, match=r"no Cityscapes images in .*extract leftImg8bit_trainvaltest.zip"):
        read_cityscapes(tmp_path / "nowhere", "train")


def test_ade20k_reduce_zero_label(tmp_path: Path) -> None:
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"
    base = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        _png(base / "images" / split / f"ADE_{split}_1.jpg", np.zeros((2, 3, 3), dtype=np.uint8))
        _png(base / "annotations" / split / f"ADE_{split}_1.png", np.array([[0, 1, 150], [2, 149, 0]], dtype=np.uint8), "L")
    with pytest.raises(DatasetError, match="ade20k_training has 1 image"):  # too few to hold out a val split
        load_segmentation("ade20k", str(tmp_path))
    test = read_ade20k(tmp_path, "validation")
    assert test.ids == ["ADE_validation_1"] and test.masks[0].tolist() == [[255, 0, 149], [1, 148, 255]]
    (base / "annotations" / "training" / "ADE_training_1.png").unlink()
    with pytest.raises(DatasetError, match="ADE_training_1.png is missing .*ADEChallengeData2016.zip"):
        read_ade20k(base, "training")


def test_carve_val_is_seeded_disjoint_and_recorded() -> None:
    n = 20
    ds = SegmentationSet("src", ("a", "b"), [torch.zeros(1, 2, 2, dtype=torch.uint8)] * n,
                         [torch.zeros(2, 2, dtype=torch.uint8)] * n, [f"i{k}" for k in range(n)], "fp")
    train, val = carve_val(ds, 0.1, seed=0)
    assert (len(train), len(val)) == (18, 2) and not set(train.ids) & set(val.ids)
    assert sorted(train.ids + val.ids) == sorted(ds.ids) and val.ids == sorted(val.ids, key=ds.ids.index)
    again, other = carve_val(ds, 0.1, seed=0)[1], carve_val(ds, 0.1, seed=1)[1]
    assert again.ids == val.ids and again.fingerprint == val.fingerprint
    assert other.ids != val.ids and other.fingerprint != val.fingerprint and val.fingerprint.startswith("fp-")
