"""Detection data: the embedded Fashion-MNIST set, the VOC and COCO readers, coordinate conventions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark.data.detection import (
    FMNIST_CLASSES,
    DetectionSet,
    EmbeddedSpec,
    LazyImages,
    build_embedded,
    coco_json,
    concat,
    load_detection,
    load_embedded,
    read_coco,
    read_voc,
    write_voc_annotation,
)
from benchmark.data.voc import parse_annotation
from benchmark.errors import DatasetError

SPEC = EmbeddedSpec(n_train=24, n_test=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def embedded(cache: Path) -> tuple[DetectionSet, DetectionSet]:
    return load_embedded(SPEC, cache=cache)


def test_embedded_set_shapes_and_boxes(embedded: tuple[DetectionSet, DetectionSet]) -> None:
    train, test = embedded
    assert (len(train), len(test)) == (24, 8)
    assert train.classes == FMNIST_CLASSES and train.ids[0] == "trainval_00000" and test.ids[0] == "test_00000"
    for ds in (train, test):
        for im, b, y, d in zip(ds.images, ds.boxes, ds.labels, ds.difficult):
            assert im.shape == (1, 128, 128) and im.dtype == torch.uint8
            assert 1 <= len(b) <= SPEC.max_objects and b.shape == (len(y), 4) and not d.any()
            assert ((b[:, :2] >= 0) & (b[:, 2:] <= 128) & (b[:, 2:] > b[:, :2])).all()
            assert ((y >= 0) & (y < 10)).all()
            # boxes never touch each other, and each one is the item's extent: its border rows/columns hold item
            # pixels, and the canvas is black (up to JPEG noise) outside every box
            outside = torch.ones(128, 128, dtype=torch.bool)
            for x1, y1, x2, y2 in b.int().tolist():
                patch = im[0, y1:y2, x1:x2].int()
                assert min(patch[:, 0].max(), patch[:, -1].max(), patch[0].max(), patch[-1].max()) >= 4  # 8, less JPEG loss
                outside[y1:y2, x1:x2] = False
            assert im[0][outside].int().max() <= 12
    sides = torch.cat([b[:, 2:] - b[:, :2] for b in train.boxes]).max(dim=1).values
    assert sides.min() >= 5 and sides.max() <= 56  # 28 px items at scale 1..2, minus their black margins


def test_embedded_set_is_deterministic_and_reused(cache: Path, tmp_path: Path, embedded: tuple[DetectionSet, DetectionSet]) -> None:
    root = build_embedded(SPEC, cache=cache)
    assert build_embedded(SPEC, cache=cache) == root  # reused, not redrawn
    again, _ = load_embedded(SPEC, cache=tmp_path)  # drawn again elsewhere: the same set
    assert again.fingerprint == embedded[0].fingerprint
    assert all(torch.equal(a, b) for a, b in zip(again.boxes, embedded[0].boxes))
    other, _ = load_embedded(EmbeddedSpec(n_train=24, n_test=8, seed=1), cache=tmp_path)
    assert other.fingerprint != embedded[0].fingerprint


def test_voc_and_coco_readers_agree_on_the_embedded_set(cache: Path, embedded: tuple[DetectionSet, DetectionSet]) -> None:
    for voc, coco in zip(embedded, load_embedded(SPEC, layout="coco", cache=cache)):
        assert voc.classes == coco.classes and voc.ids == coco.ids
        for field in ("boxes", "labels", "difficult"):
            assert all(torch.equal(a, b) for a, b in zip(getattr(voc, field), getattr(coco, field)))
        assert torch.equal(voc.images[3], coco.images[3])


def test_voc_coordinates_round_trip(tmp_path: Path) -> None:
    # continuous (x1, y1, x2, y2) = (3, 4, 10, 20) covers pixel columns 3..9, rows 4..19: VOC writes 4, 5, 10, 20
    path = tmp_path / "a.xml"
    write_voc_annotation(path, "a", (3, 32, 48), torch.tensor([[3.0, 4.0, 10.0, 20.0]]), torch.tensor([1]), ("cat", "dog"))
    ann = parse_annotation(path)
    assert (ann.width, ann.height) == (48, 32)
    assert ann.objects[0].name == "dog" and ann.objects[0].box == (4.0, 5.0, 10.0, 20.0)


def _voc_tree(root: Path, names: list[str]) -> Path:
    from PIL import Image

    base = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True)
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(base / "JPEGImages" / f"im{i}.jpg")
        write_voc_annotation(base / "Annotations" / f"im{i}.xml", f"im{i}", (3, 30, 40),
                             torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([0]), (name,))
    (base / "ImageSets" / "Main" / "test.txt").write_text("".join(f"im{i}\n" for i in range(len(names))))
    return root / "VOCdevkit"


def test_read_voc_real_layout_lazily(tmp_path: Path) -> None:
    root = _voc_tree(tmp_path, ["dog", "cat"])
    ds = read_voc(root, 2007, "test")
    assert isinstance(ds.images, LazyImages) and ds.images[1].shape == (3, 30, 40)
    assert ds.labels[0].tolist() == [11] and ds.labels[1].tolist() == [7]  # VOC_CLASSES indices of dog, cat
    assert ds.boxes[0].tolist() == [[0.0, 0.0, 10.0, 10.0]]
    both = concat([ds, ds.subset([1])], "both")
    assert len(both) == 3 and isinstance(both.images, LazyImages) and both.labels[2].tolist() == [7]


def test_read_voc_bad_input_names_the_file(tmp_path: Path) -> None:
    root = _voc_tree(tmp_path, ["unicorn"])
    with pytest.raises(DatasetError, match=r"im0.xml: unknown class 'unicorn'"):
        read_voc(root, 2007, "test")
    (root / "VOC2007" / "JPEGImages" / "im0.jpg").unlink()
    with pytest.raises(DatasetError, match="im0.jpg is missing"):
        read_voc(root, 2007, "test", ("unicorn",))
    with pytest.raises(DatasetError, match="needs detection.data_root"):
        load_detection("voc0712", None)


def test_read_coco_crowd_is_difficult_and_errors_are_clear(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (20, 10)).save(tmp_path / "a.png")
    doc = {"images": [{"id": 7, "file_name": "a.png", "height": 10, "width": 20}],
           "categories": [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [1, 2, 3, 4], "iscrowd": 0},
                           {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1},
                           {"id": 3, "image_id": 7, "category_id": 2, "bbox": [0, 0, 0, 5], "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    ds = read_coco(tmp_path / "ann.json", tmp_path)
    assert ds.classes == ("a", "b")  # category id order
    assert ds.boxes[0].tolist() == [[1.0, 2.0, 4.0, 6.0], [0.0, 0.0, 5.0, 5.0]]  # the zero-width box is dropped
    assert ds.labels[0].tolist() == [1, 0] and ds.difficult[0].tolist() == [False, True]
    assert ds.images[0].shape == (1, 10, 20)
    again = coco_json(ds, ["a.png"])
    assert again["annotations"][1]["iscrowd"] == 1 and again["annotations"][0]["bbox"] == [1.0, 2.0, 3.0, 4.0]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DatasetError, match="not a COCO instances file"):
        read_coco(tmp_path / "bad.json", tmp_path)
    with pytest.raises(DatasetError, match="missing or unreadable"):
        read_coco(tmp_path / "none.json", tmp_path)
