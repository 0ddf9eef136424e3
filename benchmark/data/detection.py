"""Detection data: one in-memory form, readers for VOC and COCO layouts, and the embedded Fashion-MNIST set.

Boxes are float (x1, y1, x2, y2) in continuous 0-based pixel coordinates (a box covering pixel columns 3..9 is
x1 = 3, x2 = 10), as torchvision and Detectron2 use them. VOC XML stores 1-based inclusive pixel indices
(xmin = x1 + 1, xmax = x2), as Detectron2's `pascal_voc.py` converts them; COCO JSON stores [x1, y1, w, h].

The embedded set (`fmnist_det`) is built from real images: Fashion-MNIST items (train items for the train
canvases, test items for the test canvases) pasted at random positions and scales on a black canvas, boxes
from each item's non-zero extent, the 10 Fashion-MNIST classes. It is written once to disk in both layouts
(VOCdevkit XML and COCO JSON over the same JPEG files) so both readers and both evaluators run on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

from benchmark.data.files import cache_root
from benchmark.errors import DatasetError

FMNIST_CLASSES: tuple[str, ...] = (
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
)  # fmt: skip


@dataclass(frozen=True)
class DetectionSet:
    """Images with boxes. Lists are aligned: image i has boxes[i] (n_i, 4), labels[i] (n_i,), difficult[i] (n_i,)."""

    name: str
    classes: tuple[str, ...]
    images: Sequence[Tensor]  # uint8 (C, H, W), sizes may differ (a list, or `LazyImages` read on access)
    boxes: list[Tensor]  # float32 (n_i, 4) x1, y1, x2, y2 (continuous, 0-based)
    labels: list[Tensor]  # int64 (n_i,) indices into `classes`
    difficult: list[Tensor]  # bool (n_i,): ignored by both evaluators (neither hit nor miss)
    ids: list[str]  # image ids (VOC file stem / COCO file name stem)
    fingerprint: str  # sha256 prefix of the annotation and image bytes it was read from

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return int(self.images[0].shape[0]) if self.images else 0

    def subset(self, idx: list[int]) -> DetectionSet:
        pick = [int(i) for i in idx]
        return DetectionSet(self.name, self.classes, _take(self.images, pick), [self.boxes[i] for i in pick],
                            [self.labels[i] for i in pick], [self.difficult[i] for i in pick],
                            [self.ids[i] for i in pick], f"{self.fingerprint}-{_digest(str(pick).encode())[:8]}")


@dataclass(frozen=True)
class Detections:
    """A detector's output on a `DetectionSet`, aligned with its images."""

    boxes: list[Tensor]  # float32 (m_i, 4) x1, y1, x2, y2 (continuous, 0-based)
    scores: list[Tensor]  # float32 (m_i,)
    labels: list[Tensor]  # int64 (m_i,) class indices

    @staticmethod
    def of_ground_truth(gt: DetectionSet) -> Detections:
        """The ground truth as detections with score 1 (a perfect detector: AP 1 under both evaluators)."""
        return Detections([b.clone() for b in gt.boxes], [torch.ones(len(b)) for b in gt.boxes], [y.clone() for y in gt.labels])


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- images on disk


class LazyImages(Sequence[Tensor]):
    """Image files decoded on access (VOC07+12 or COCO do not fit in memory as tensors): uint8 (C, H, W).

    `channels` 1 reads grey ("L"), 3 reads RGB; None keeps grey files grey and makes everything else RGB.
    """

    def __init__(self, paths: Sequence[Path], channels: int | None = None) -> None:
        self.paths = list(paths)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[Tensor]: ...

    def __getitem__(self, i: int | slice) -> Tensor | list[Tensor]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return read_image(self.paths[i], self.channels)

    def take(self, idx: Sequence[int]) -> LazyImages:
        return LazyImages([self.paths[i] for i in idx], self.channels)


def read_image(path: Path, channels: int | None = None) -> Tensor:
    """One image file as uint8 (C, H, W); `DatasetError` naming the file if it is missing or corrupt."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = {1: "L", 3: "RGB"}.get(channels or 0, "L" if im.mode in ("L", "1", "I;16") else "RGB")
            arr = np.array(im.convert(mode))
    except OSError as e:  # FileNotFoundError, PIL.UnidentifiedImageError, truncated files
        raise DatasetError(f"image {path} is missing, unreadable or corrupt: {e}") from None
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _take(images: Sequence[Tensor], idx: list[int]) -> Sequence[Tensor]:
    return images.take(idx) if isinstance(images, LazyImages) else [images[i] for i in idx]


def concat(sets: Sequence[DetectionSet], name: str) -> DetectionSet:
    """One set from several with the same classes (VOC07+12 trainval)."""
    if len({s.classes for s in sets}) != 1:
        raise DatasetError(f"cannot combine detection sets with different classes: {[s.name for s in sets]}")
    images: Sequence[Tensor]
    if all(isinstance(s.images, LazyImages) for s in sets):
        images = LazyImages([p for s in sets for p in s.images.paths], sets[0].images.channels)  # type: ignore[attr-defined]
    else:
        images = [im for s in sets for im in s.images]
    def cat(attr: str) -> list[Any]:
        return [t for s in sets for t in getattr(s, attr)]

    fp = _digest("+".join(s.fingerprint for s in sets).encode())[:16]
    return DetectionSet(name, sets[0].classes, images, cat("boxes"), cat("labels"), cat("difficult"), cat("ids"), fp)


# --------------------------------------------------------------------------- VOC layout


def read_voc(root: str | Path, year: str | int, image_set: str, classes: tuple[str, ...] | None = None) -> DetectionSet:
    """`VOC<year>/ImageSets/Main/<image_set>.txt` with its `Annotations/*.xml` and `JPEGImages/*.jpg` (decoded lazily).

    `classes` defaults to the 20 VOC classes; an object of another class is an error naming the file.
    """
    from benchmark.data.voc import VOC_CLASSES, _parse_annotation_bytes, _read_bytes, read_image_set, voc_dir

    classes = classes or VOC_CLASSES
    index = {c: i for i, c in enumerate(classes)}
    base = voc_dir(root, year)
    ids = read_image_set(base, year, image_set)
    h = hashlib.sha256((base / "ImageSets" / "Main" / f"{image_set}.txt").read_bytes())
    boxes, labels, difficult = [], [], []
    for i in ids:
        path = base / "Annotations" / f"{i}.xml"
        data = _read_bytes(path, "annotation")
        h.update(data)
        ann = _parse_annotation_bytes(data, path)
        unknown = sorted({o.name for o in ann.objects} - set(index))
        if unknown:
            raise DatasetError(f"annotation {path}: unknown class {unknown[0]!r}; classes: {', '.join(classes)}")
        b = [(o.box[0] - 1, o.box[1] - 1, o.box[2], o.box[3]) for o in ann.objects]  # 1-based inclusive -> continuous
        boxes.append(torch.tensor(b, dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor([index[o.name] for o in ann.objects], dtype=torch.int64))
        difficult.append(torch.tensor([o.difficult for o in ann.objects], dtype=torch.bool))
    images = LazyImages([base / "JPEGImages" / f"{i}.jpg" for i in ids])
    missing = next((p for p in images.paths if not p.is_file()), None)
    if missing is not None:
        raise DatasetError(f"image {missing} is missing (listed in {image_set}.txt of {base})")
    return DetectionSet(f"voc{year}_{image_set}", classes, images, boxes, labels, difficult, ids, h.hexdigest()[:16])


def write_voc_annotation(path: Path, image_id: str, size: tuple[int, int, int], boxes: Tensor, labels: Tensor,
                         classes: tuple[str, ...]) -> None:
    """One `Annotations/<id>.xml` (size = (C, H, W)); continuous boxes become VOC's 1-based inclusive integers."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    sz = ET.SubElement(root, "size")
    for tag, v in zip(("width", "height", "depth"), (size[2], size[1], size[0])):
        ET.SubElement(sz, tag).text = str(v)
    for b, y in zip(boxes.tolist(), labels.tolist()):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[y]
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), (b[0] + 1, b[1] + 1, b[2], b[3])):
            ET.SubElement(bb, tag).text = str(int(round(v)))
    ET.indent(root)
    path.write_bytes(ET.tostring(root, encoding="utf-8"))


# --------------------------------------------------------------------------- COCO layout


def read_coco(annotations: str | Path, image_dir: str | Path) -> DetectionSet:
    """A COCO instances file (`annotations/instances_val2017.json`) and its image folder (decoded lazily).

    Classes are the categories in id order; `iscrowd` boxes are marked difficult (ignored by both evaluators
    and left out of training, as Detectron2 does); boxes with no area are dropped.
    """
    path, image_dir = Path(annotations), Path(image_dir)
    try:
        data = path.read_bytes()
        doc = json.loads(data)
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        images = sorted(doc["images"], key=lambda im: im["id"])
        anns = doc["annotations"]
    except OSError as e:
        raise DatasetError(f"COCO annotation file {path} is missing or unreadable: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"COCO annotation file {path} is not a COCO instances file ({type(e).__name__}: {e})") from None
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    per_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in images}
    for a in anns:
        if a.get("image_id") not in per_image or a.get("category_id") not in cat_index:
            raise DatasetError(f"{path}: annotation {a.get('id')} names an unknown image or category")
        if a["bbox"][2] > 0 and a["bbox"][3] > 0:
            per_image[a["image_id"]].append(a)
    boxes, labels, difficult = [], [], []
    for im in images:
        objs = per_image[im["id"]]
        boxes.append(torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (o["bbox"] for o in objs)], dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor([cat_index[o["category_id"]] for o in objs], dtype=torch.int64))
        difficult.append(torch.tensor([bool(o.get("iscrowd", 0)) for o in objs], dtype=torch.bool))
    files = LazyImages([image_dir / im["file_name"] for im in images])
    missing = next((p for p in files.paths if not p.is_file()), None)
    if missing is not None:
        raise DatasetError(f"image {missing} is missing (listed in {path}); pass the folder holding the images")
    ids = [Path(im["file_name"]).stem for im in images]
    return DetectionSet(path.stem, tuple(c["name"] for c in cats), files, boxes, labels, difficult, ids, _digest(data)[:16])


def coco_json(ds: DetectionSet, file_names: Sequence[str]) -> dict[str, Any]:
    """`ds` as a COCO instances document (image ids 1..N, category ids 1..K, difficult -> iscrowd)."""
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i, (im, b, y, d, name) in enumerate(zip(ds.images, ds.boxes, ds.labels, ds.difficult, file_names), 1):
        images.append({"id": i, "file_name": name, "height": int(im.shape[1]), "width": int(im.shape[2])})
        for (x1, y1, x2, y2), k, hard in zip(b.tolist(), y.tolist(), d.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": k + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": int(hard)})
    return {"images": images, "annotations": anns, "categories": [{"id": k + 1, "name": c} for k, c in enumerate(ds.classes)]}


# --------------------------------------------------------------------------- the embedded set

EMBEDDED_VERSION = "1"  # bump when the generator changes: the cache folder name includes it
_EXTENT_THRESHOLD = 8  # a pixel belongs to the item where the resized item is >= this (of 255)


@dataclass(frozen=True)
class EmbeddedSpec:
    """How `fmnist_det` is drawn. Everything here is part of its cache key and fingerprint."""

    n_train: int = 2000  # canvases made from Fashion-MNIST train items (written as VOC `trainval`)
    n_test: int = 500  # canvases made from Fashion-MNIST test items (VOC `test`)
    canvas: int = 128  # square canvas side, pixels
    max_objects: int = 4  # 1..max_objects items per canvas (fewer where no free place is found)
    scale: tuple[float, float] = (1.0, 2.0)  # item side = 28 px x U(scale)
    seed: int = 0  # the draw (not the evaluation seed: every cell sees the same set)


def _draw_canvas(items: np.ndarray, classes: np.ndarray, rng: np.random.Generator, spec: EmbeddedSpec
                 ) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int]]:
    """One canvas: items pasted (pixel-wise max) where their boxes touch no earlier box; 20 tries per item."""
    from PIL import Image

    s = spec.canvas
    img = np.zeros((s, s), dtype=np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        j = int(rng.integers(len(items)))
        side = min(s, round(28 * rng.uniform(*spec.scale)))
        item = np.asarray(Image.fromarray(items[j]).resize((side, side), Image.Resampling.BILINEAR))
        ys, xs = np.nonzero(item >= _EXTENT_THRESHOLD)
        if len(xs) == 0:
            continue
        for _try in range(20):
            ox, oy = (int(v) for v in rng.integers(0, s - side + 1, size=2))
            box = (ox + int(xs.min()), oy + int(ys.min()), ox + int(xs.max()) + 1, oy + int(ys.max()) + 1)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                img[oy : oy + side, ox : ox + side] = np.maximum(img[oy : oy + side, ox : ox + side], item)
                boxes.append(box)
                labels.append(int(classes[j]))
                break
    return img, boxes, labels


def build_embedded(spec: EmbeddedSpec = EmbeddedSpec(), fmnist_root: str | None = None, cache: Path | None = None) -> Path:
    """Write `fmnist_det` once (VOCdevkit XML + COCO JSON over the same JPEGs) and return its folder.

    The folder is built under a temporary name and renamed when complete, so a reader never sees half of it;
    an existing complete folder (same spec, same Fashion-MNIST files, same generator version) is reused.
    """
    from PIL import Image

    from benchmark.data.datasets import load_raw

    raw = load_raw("fashion_mnist", fmnist_root)
    key = _digest(repr((spec, raw.source_hash, EMBEDDED_VERSION)).encode())[:12]
    out = (cache or cache_root()) / "detection" / f"fmnist_det-{key}"
    if (out / "DONE").is_file():
        return out
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    voc = tmp / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    (tmp / "annotations").mkdir()
    rng = np.random.default_rng(spec.seed)
    for split, source, n in (("trainval", raw.train, spec.n_train), ("test", raw.test, spec.n_test)):
        items, classes = source.x[:, 0].numpy(), source.y.numpy()
        ids, boxes, labels, images = [], [], [], []
        for i in range(n):
            img, b, y = _draw_canvas(items, classes, rng, spec)
            image_id = f"{split}_{i:05d}"
            Image.fromarray(img).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
            bt, yt = torch.tensor(b, dtype=torch.float32).reshape(-1, 4), torch.tensor(y, dtype=torch.int64)
            write_voc_annotation(voc / "Annotations" / f"{image_id}.xml", image_id, (1, spec.canvas, spec.canvas), bt, yt, FMNIST_CLASSES)
            ids.append(image_id)
            boxes.append(bt)
            labels.append(yt)
            images.append(torch.zeros(1, spec.canvas, spec.canvas))
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        ds = DetectionSet(split, FMNIST_CLASSES, images, boxes, labels, [torch.zeros(len(y), dtype=torch.bool) for y in labels], ids, "")
        doc = coco_json(ds, [f"VOCdevkit/VOC2007/JPEGImages/{i}.jpg" for i in ids])
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    (tmp / "DONE").write_text(json.dumps({"spec": repr(spec), "fashion_mnist": raw.source_hash, "version": EMBEDDED_VERSION}))
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "DONE").is_file():
            raise
    return out


def load_embedded(spec: EmbeddedSpec = EmbeddedSpec(), fmnist_root: str | None = None, layout: str = "voc",
                  cache: Path | None = None) -> tuple[DetectionSet, DetectionSet]:
    """(train, test) of `fmnist_det`, read back from disk through the VOC or the COCO reader."""
    root = build_embedded(spec, fmnist_root, cache)
    if layout == "voc":
        sets = [read_voc(root / "VOCdevkit", 2007, s, FMNIST_CLASSES) for s in ("trainval", "test")]
    elif layout == "coco":
        sets = [read_coco(root / "annotations" / f"instances_{s}.json", root) for s in ("trainval", "test")]
    else:
        raise ValueError(f"layout must be 'voc' or 'coco', got {layout!r}")
    return sets[0], sets[1]


# --------------------------------------------------------------------------- datasets by name

DETECTION_DATASETS = ("fmnist_det", "voc07", "voc0712", "coco")
_HOW = {
    "voc07": "a folder holding VOCdevkit/VOC2007 (trainval + test tarballs extracted together)",
    "voc0712": "a folder holding VOCdevkit/VOC2007 (trainval + test) and VOCdevkit/VOC2012 (trainval)",
    "coco": "a COCO 2017 folder: annotations/instances_{train,val}2017.json, train2017/, val2017/",
}


def load_detection(name: str, root: str | None, spec: EmbeddedSpec = EmbeddedSpec()) -> tuple[DetectionSet, DetectionSet]:
    """(train, test) of a detection dataset: `fmnist_det` (embedded; `root` = Fashion-MNIST's folder or None),
    `voc07` (VOC07 trainval -> VOC07 test), `voc0712` (VOC07+12 trainval -> VOC07 test, MoCo's protocol) or
    `coco` (train2017 -> val2017). Nothing is downloaded."""
    if name == "fmnist_det":
        return load_embedded(spec, root)
    if name not in _HOW:
        raise DatasetError(f"unknown detection dataset {name!r}; known: {', '.join(DETECTION_DATASETS)}")
    if root is None:
        raise DatasetError(f"detection dataset {name!r} needs detection.data_root: {_HOW[name]}")
    base = Path(root).expanduser()
    if name == "coco":
        return (read_coco(base / "annotations" / "instances_train2017.json", base / "train2017"),
                read_coco(base / "annotations" / "instances_val2017.json", base / "val2017"))
    base = base / "VOCdevkit" if (base / "VOCdevkit").is_dir() else base
    train = read_voc(base, 2007, "trainval")
    if name == "voc0712":
        train = concat([train, read_voc(base, 2012, "trainval")], "voc0712_trainval")
    return train, read_voc(base, 2007, "test")
