from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import benchmark.data.voc  # noqa: F401  (registers voc2007)
from benchmark.config import DataConfig
from benchmark.data.datasets import load_raw, load_splits
from benchmark.data.stream import vissl_resize
from benchmark.data.voc import VOC_CLASSES, Annotation, VocObject, image_labels, parse_annotation, read_image_set
from benchmark.errors import DatasetError
from benchmark.registry import DATASETS

# one object: (class, (xmin, ymin, xmax, ymax), difficult, truncated); difficult=None writes no <difficult> tag
Obj = tuple[str, tuple[int, int, int, int], bool | None, bool]
C = {c: i for i, c in enumerate(VOC_CLASSES)}

TRAINVAL: dict[str, list[Obj]] = {
    "000001": [("dog", (3, 5, 40, 30), False, False), ("person", (1, 1, 64, 48), False, True)],
    "000002": [("cat", (2, 2, 20, 20), True, False)],  # cat only as difficult -> -1
    "000004": [("car", (5, 5, 9, 9), True, False), ("car", (10, 10, 30, 30), False, False)],  # difficult first, then not -> 1
    "000006": [("aeroplane", (1, 1, 10, 10), False, False), ("tvmonitor", (2, 2, 8, 8), False, True)],
    "000007": [("bicycle", (4, 4, 14, 14), True, True), ("bird", (1, 2, 3, 4), None, False)],  # no <difficult>: not difficult
    "000009": [("sheep", (6, 7, 30, 40), False, False)],
}
TEST: dict[str, list[Obj]] = {
    "000003": [("sofa", (1, 1, 60, 40), False, False)],
    "000005": [("chair", (1, 1, 5, 5), True, False), ("chair", (6, 6, 9, 9), True, False)],
    "000008": [("train", (3, 3, 33, 33), False, False), ("horse", (2, 2, 5, 5), True, False)],
    "000010": [("pottedplant", (2, 3, 4, 5), False, False)],
}
SIZES = [(64, 48), (48, 64), (300, 200), (200, 300), (224, 224), (500, 375)]


def xml(image_id: str, size: tuple[int, int], objects: list[Obj]) -> str:
    """An annotation laid out as the official VOC2007 files are (including the fields we ignore)."""
    objs = ""
    for name, (x0, y0, x1, y1), difficult, truncated in objects:
        diff = "" if difficult is None else f"<difficult>{int(difficult)}</difficult>"
        objs += (f"<object><name>{name}</name><pose>Unspecified</pose><truncated>{int(truncated)}</truncated>{diff}"
                 f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>\n")
    return (f"<annotation>\n<folder>VOC2007</folder><filename>{image_id}.jpg</filename>\n"
            f"<source><database>The VOC2007 Database</database></source>\n"
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>\n"
            f"<segmented>0</segmented>\n{objs}</annotation>\n")


def digit_jpeg(path: Path, k: int, size: tuple[int, int], gray: bool = False) -> None:
    """A real scikit-learn digit, upscaled to `size` and tinted, saved as JPEG."""
    img = load_digits().images[k] * (255 / 16)
    tint = np.array([1.0, 0.3 + 0.1 * (k % 7), 0.5])
    rgb = (img[:, :, None] * tint).round().astype(np.uint8)
    im = Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST)
    (im.convert("L") if gray else im).save(path, quality=95)


def make_devkit(root: Path, trainval: dict[str, list[Obj]], test: dict[str, list[Obj]]) -> Path:
    """root/VOCdevkit/VOC2007 with the three folders; returns the VOCdevkit folder."""
    base = root / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (base / d).mkdir(parents=True)
    for name, objs in (("trainval", trainval), ("test", test)):
        (base / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in objs))
    for k, (image_id, objects) in enumerate(sorted({**trainval, **test}.items())):
        size = SIZES[k % len(SIZES)]
        (base / "Annotations" / f"{image_id}.xml").write_text(xml(image_id, size, objects))
        digit_jpeg(base / "JPEGImages" / f"{image_id}.jpg", k, size, gray=image_id == "000010")
    return root / "VOCdevkit"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket.connect

    def refuse(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError("network access attempted")
        real(self, address)  # Unix sockets: how DataLoader workers hand tensors back

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    return make_devkit(tmp_path, TRAINVAL, TEST)


def expected_labels(table: dict[str, list[Obj]]) -> torch.Tensor:
    """The label matrix written out by hand, one dict per image: class -> label."""
    hand = {
        "000001": {"dog": 1, "person": 1}, "000002": {"cat": -1}, "000004": {"car": 1},
        "000006": {"aeroplane": 1, "tvmonitor": 1}, "000007": {"bicycle": -1, "bird": 1}, "000009": {"sheep": 1},
        "000003": {"sofa": 1}, "000005": {"chair": -1}, "000008": {"train": 1, "horse": -1}, "000010": {"pottedplant": 1},
    }  # fmt: skip
    y = torch.zeros(len(table), 20, dtype=torch.int64)
    for row, image_id in enumerate(table):
        for name, v in hand[image_id].items():
            y[row, C[name]] = v
    return y


def test_parse_annotation_reads_every_field(devkit: Path) -> None:
    ann = parse_annotation(devkit / "VOC2007" / "Annotations" / "000001.xml")
    assert ann == Annotation("000001.jpg", 64, 48, [
        VocObject("dog", (3.0, 5.0, 40.0, 30.0), difficult=False, truncated=False),
        VocObject("person", (1.0, 1.0, 64.0, 48.0), difficult=False, truncated=True),
    ])  # fmt: skip
    ann7 = parse_annotation(devkit / "VOC2007" / "Annotations" / "000007.xml")
    assert ann7.objects == [VocObject("bicycle", (4.0, 4.0, 14.0, 14.0), True, True), VocObject("bird", (1.0, 2.0, 3.0, 4.0), False, False)]
    assert isinstance(ann7.objects[0].box[0], float)


def test_image_labels_hand_cases() -> None:
    def ann(*objs: tuple[str, bool]) -> Annotation:
        return Annotation("x.jpg", 10, 10, [VocObject(n, (1.0, 1.0, 2.0, 2.0), d, False) for n, d in objs])

    assert image_labels(ann()) == [0] * 20
    y = image_labels(ann(("tvmonitor", True), ("aeroplane", False), ("cat", True), ("cat", False), ("dog", False), ("dog", True)))
    assert y[C["tvmonitor"]] == -1 and y[C["aeroplane"]] == 1 and y[C["cat"]] == 1 and y[C["dog"]] == 1
    assert sum(v != 0 for v in y) == 4
    with pytest.raises(DatasetError, match=r"unknown class 'zebra'.*aeroplane, bicycle"):
        image_labels(ann(("zebra", False)), "a.xml")


def test_voc_classes_are_the_standard_twenty_in_order() -> None:
    assert len(VOC_CLASSES) == 20 and len(set(VOC_CLASSES)) == 20
    assert VOC_CLASSES[:3] == ("aeroplane", "bicycle", "bird") and VOC_CLASSES[-1] == "tvmonitor"
    assert VOC_CLASSES.index("diningtable") == 10 and VOC_CLASSES.index("person") == 14


def test_read_image_set_takes_the_first_column(devkit: Path) -> None:
    assert read_image_set(devkit, 2007, "trainval") == list(TRAINVAL)
    assert read_image_set(devkit / "VOC2007", "2007", "test") == list(TEST)
    (devkit / "VOC2007" / "ImageSets" / "Main" / "cat_test.txt").write_text("000003 -1\n000005  0\n\n000008 -1\n")
    assert read_image_set(devkit, 2007, "cat_test") == ["000003", "000005", "000008"]


def test_voc2007_labels_images_and_both_root_forms(devkit: Path) -> None:
    raw = load_raw("voc2007", str(devkit))
    assert raw.num_classes == 20
    assert torch.equal(raw.train.y, expected_labels(TRAINVAL)) and torch.equal(raw.test.y, expected_labels(TEST))
    train, test = raw.train.materialise(), raw.test.materialise()  # type: ignore[union-attr]
    assert train.shape == (6, 3, 224, 224) and test.shape == (4, 3, 224, 224)
    assert train.dtype == torch.uint8 and raw.train.y.dtype == torch.int64
    gray = test[3]  # 000010 is a grayscale JPEG: converted to three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and gray.float().std() > 10
    other = load_raw("voc2007", str(devkit / "VOC2007"))
    assert torch.equal(other.train.materialise(), train) and torch.equal(other.test.y, raw.test.y)  # type: ignore[union-attr]
    assert other.source_hash == raw.source_hash
    assert load_raw("voc2007", str(devkit.parent)).source_hash == raw.source_hash  # the folder holding VOCdevkit


def test_images_match_visslss_torchvision_transform(devkit: Path) -> None:
    import torchvision.transforms as T

    vissl = T.Compose([T.Resize(256), T.Resize((224, 224)), T.PILToTensor()])  # eval_resnet_8gpu_transfer_voc07_svm.yaml
    raw = load_raw("voc2007", str(devkit))
    train = raw.train.materialise()  # type: ignore[union-attr]
    for row, image_id in enumerate(TRAINVAL):
        with Image.open(devkit / "VOC2007" / "JPEGImages" / f"{image_id}.jpg") as im:
            assert torch.equal(train[row], vissl(im.convert("RGB")))


def test_resize_squashes_the_whole_image_without_cropping() -> None:
    a = np.zeros((100, 400, 3), dtype=np.uint8)  # 4:1, black left quarter, red right quarter
    a[:, 300:, 0] = 255
    a[:, 100:300] = 128
    out = np.asarray(vissl_resize(Image.fromarray(a)))
    assert out.shape == (224, 224, 3)
    assert out[:, :50].max() == 0 and (out[:, 60:160] == 128).all()  # a center crop would lose both quarters
    assert (out[:, 175:, 0] == 255).all() and out[:, 175:, 1:].max() == 0  # RGB order kept


def test_source_hash_follows_annotations_and_images(devkit: Path) -> None:
    base = devkit / "VOC2007"
    h0 = load_raw("voc2007", str(devkit)).source_hash
    ann = base / "Annotations" / "000009.xml"
    ann.write_text(ann.read_text().replace("<difficult>0", "<difficult>1"))
    raw1 = load_raw("voc2007", str(devkit))
    assert raw1.source_hash != h0 and raw1.train.y[5, C["sheep"]] == -1
    digit_jpeg(base / "JPEGImages" / "000003.jpg", 7, (64, 48))  # a different picture, same annotations
    assert load_raw("voc2007", str(devkit)).source_hash not in (h0, raw1.source_hash)


def test_load_splits_end_to_end_with_multilabel_y(tmp_path: Path) -> None:
    trainval: dict[str, list[Obj]] = {f"{i:06d}": [(VOC_CLASSES[i % 20], (1, 1, 8, 8), False, False), (VOC_CLASSES[(i + 3) % 20], (1, 1, 4, 4), i % 2 == 0, False)]
                for i in range(30)}  # fmt: skip
    test: dict[str, list[Obj]] = {f"{i:06d}": [(VOC_CLASSES[i % 20], (1, 1, 8, 8), False, False)] for i in range(30, 36)}
    root = make_devkit(tmp_path, trainval, test)
    raw = load_raw("voc2007", str(root))
    s = load_splits("voc2007", DataConfig(root=str(root), image_size=32))
    assert s.multilabel and s.num_classes == 20
    assert (len(s.train), len(s.val), len(s.test)) == (10, 20, 6)  # val = max(num_classes, 10%)
    assert s.train.x.shape == (10, 3, 32, 32) and s.train.y.shape == (10, 20)
    assert torch.equal(s.val.y, raw.train.y[s.val_ids])
    assert len(set(s.val_ids.tolist())) == 20
    assert all(0 < m < 1 for m in s.mean) and all(sd > 0.01 for sd in s.std)
    assert set(s.train.y.flatten().tolist()) == {-1, 0, 1}
    assert (s.storage, s.transform) == ("memory", "vissl-resize37-squash32")
    streamed = load_splits("voc2007", DataConfig(root=str(root), image_size=32, storage="stream"))  # issue 19: when asked
    assert streamed.storage == "stream (2 workers)" and streamed.fingerprint == s.fingerprint and streamed.mean == s.mean
    for a, b in ((s.train, streamed.train), (s.val, streamed.val), (s.test, streamed.test)):
        assert torch.equal(torch.cat(list(b.batches(7))), a.x) and torch.equal(a.y, b.y)


def test_data_root_from_environment_and_missing_root_message(devkit: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "voc2007" in DATASETS
    monkeypatch.setenv("SSLBENCH_DATA_VOC2007", str(devkit))
    assert len(load_raw("voc2007", None).test) == 4
    monkeypatch.delenv("SSLBENCH_DATA_VOC2007")
    with pytest.raises(DatasetError, match=r"needs a root.*VOCtrainval_06-Nov-2007\.tar and VOCtest_06-Nov-2007\.tar"):
        load_raw("voc2007", None)


def test_missing_test_set_names_the_test_tarball(devkit: Path) -> None:
    listing = devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    listing.unlink()
    with pytest.raises(DatasetError, match=re.escape(str(listing)) + r" is missing: extract VOCtest_06-Nov-2007\.tar"):
        load_raw("voc2007", str(devkit))


def test_malformed_or_incomplete_xml_names_the_file(devkit: Path) -> None:
    bad = devkit / "VOC2007" / "Annotations" / "000004.xml"
    bad.write_text("<annotation><size><width>3</width>")
    with pytest.raises(DatasetError, match=re.escape(str(bad)) + " is malformed XML"):
        load_raw("voc2007", str(devkit))
    bad.write_text(xml("000004", (10, 10), TRAINVAL["000004"]).replace("<xmax>30</xmax>", ""))
    with pytest.raises(DatasetError, match=re.escape(str(bad)) + r" lacks <object>/<bndbox/xmax>"):
        parse_annotation(bad)
    bad.write_text(xml("000004", (10, 10), TRAINVAL["000004"]).replace("<difficult>1", "<difficult>yes"))
    with pytest.raises(DatasetError, match=re.escape(str(bad)) + r": <difficult> is 'yes'"):
        parse_annotation(bad)
    with pytest.raises(DatasetError, match=re.escape(str(bad.with_name("nope.xml"))) + " is missing"):
        parse_annotation(bad.with_name("nope.xml"))


def test_missing_folder_image_or_annotation_and_corrupt_jpeg(devkit: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"no VOC2007 folder under " + re.escape(str(empty))):
        load_raw("voc2007", str(empty))
    with pytest.raises(DatasetError, match=r"not found at .*VOCtest_06-Nov-2007\.tar"):
        load_raw("voc2007", str(tmp_path / "absent"))
    jpgs = devkit / "VOC2007" / "JPEGImages"
    (jpgs / "000005.jpg").write_bytes((jpgs / "000005.jpg").read_bytes()[:200])  # truncated
    with pytest.raises(DatasetError, match=re.escape(str(jpgs / "000005.jpg")) + r": not a decodable image \("):
        load_splits("voc2007", DataConfig(root=str(devkit), val_fraction=0.5))  # decoded into memory: found at planning
    (jpgs / "000005.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) missing, e\.g\. " + re.escape(str(jpgs / "000005.jpg"))):
        load_raw("voc2007", str(devkit))
    ann = devkit / "VOC2007" / "Annotations" / "000008.xml"
    ann.unlink()
    with pytest.raises(DatasetError, match=re.escape(str(ann)) + " is missing"):
        load_raw("voc2007", str(devkit))


def test_overlapping_image_sets_are_refused(devkit: Path) -> None:
    main = devkit / "VOC2007" / "ImageSets" / "Main"
    shutil.copy(main / "trainval.txt", main / "test.txt")
    with pytest.raises(DatasetError, match="trainval and test share 6 image ids"):
        load_raw("voc2007", str(devkit))
