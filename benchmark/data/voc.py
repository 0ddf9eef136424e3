"""Pascal VOC read from a local VOCdevkit: annotation parser, image-set reader, and the `voc2007` dataset.

Layout (the official tarballs extracted into one folder; nothing is downloaded):
    VOCdevkit/VOC2007/Annotations/<id>.xml  ImageSets/Main/{trainval,test}.txt  JPEGImages/<id>.jpg

`voc2007` is the multi-label classification set of the VOC07 SVM protocol (Goyal et al. 2019,
https://arxiv.org/abs/1905.01235; github.com/facebookresearch/fair_self_supervision_benchmark and VISSL):
train = trainval (5,011 images), test = test (4,952); y (N, 20) with 1 = at least one non-difficult
object of the class, -1 = only difficult objects, 0 = absent (the values of VOC's per-class
ImageSets/Main/<class>_<set>.txt files, recomputed here from the XML). Images are resized as VISSL's
`eval_resnet_8gpu_transfer_voc07_svm.yaml` does (Resize(256) then Resize((224, 224)), bilinear on PIL, no
crop; Goyal's `[scale, global_resize]` is the same pair: the `vissl` transform of `benchmark.data.stream`); they are
decoded once into memory as uint8 (N, 3, 224, 224) (1.5 GB), or streamed with data.storage=stream.

The XML is parsed with `xml.etree.ElementTree`, not defusedxml (not a dependency): the files are local
copies of the official tarballs, expat never fetches external entities, and expat >= 2.4.1 refuses
entity-expansion bombs.
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmark.data.files import fingerprint_files
from benchmark.data.sets import DatasetSpec, RawDataset
from benchmark.data.stream import EvalTransform, StreamSet
from benchmark.errors import DatasetError
from benchmark.registry import register_dataset

if TYPE_CHECKING:
    pass

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
_CLASS_INDEX = {c: i for i, c in enumerate(VOC_CLASSES)}

SCALE = 256  # VISSL/Goyal: shorter side to 256 first ...
SIZE = 224  # ... then squash the whole image to 224 x 224 (no crop)


@dataclass(frozen=True)
class VocObject:
    name: str
    box: tuple[float, float, float, float]  # (xmin, ymin, xmax, ymax), VOC's 1-based inclusive pixel coordinates
    difficult: bool
    truncated: bool


@dataclass(frozen=True)
class Annotation:
    filename: str
    width: int
    height: int
    objects: list[VocObject]


# --------------------------------------------------------------------------- annotations


def parse_annotation(path: str | Path) -> Annotation:
    """Parse one `Annotations/<id>.xml`. Raises `DatasetError` naming the file if it is missing or malformed."""
    path = Path(path)
    return _parse_annotation_bytes(_read_bytes(path, "annotation"), path)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{what} {path} is missing or unreadable: {e.strerror or e}") from None


def _parse_annotation_bytes(data: bytes, path: Path) -> Annotation:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DatasetError(f"annotation {path} is malformed XML ({e})") from None
    if root.tag != "annotation":
        raise DatasetError(f"annotation {path}: root element is <{root.tag}>, expected <annotation>")
    objects = []
    for obj in root.findall("object"):
        box = tuple(_number(obj, f"bndbox/{k}", path) for k in ("xmin", "ymin", "xmax", "ymax"))
        if box[0] > box[2] or box[1] > box[3]:
            raise DatasetError(f"annotation {path}: box {box} has xmin > xmax or ymin > ymax")
        objects.append(VocObject(_text(obj, "name", path), (box[0], box[1], box[2], box[3]),
                                 _flag(obj, "difficult", path), _flag(obj, "truncated", path)))
    return Annotation(_text(root, "filename", path), int(_number(root, "size/width", path)),
                      int(_number(root, "size/height", path)), objects)


def _text(node: ET.Element, tag: str, path: Path) -> str:
    el = node.find(tag)
    if el is None or el.text is None or not el.text.strip():
        raise DatasetError(f"annotation {path} lacks <{node.tag}>/<{tag}>")
    return el.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    s = _text(node, tag, path)
    try:
        return float(s)
    except ValueError:
        raise DatasetError(f"annotation {path}: <{tag}> is {s!r}, not a number") from None


def _flag(node: ET.Element, tag: str, path: Path) -> bool:
    # a missing flag means 0, as py-faster-rcnn's pascal_voc.py reads it (some VOC2012 objects lack <difficult>)
    if node.find(tag) is None:
        return False
    s = _text(node, tag, path)
    if s not in ("0", "1"):
        raise DatasetError(f"annotation {path}: <{tag}> is {s!r}, expected 0 or 1")
    return s == "1"


def image_labels(ann: Annotation, path: str | Path = "") -> list[int]:
    """The 20 VOC class labels of one image: 1 present (a non-difficult object), -1 only difficult, 0 absent."""
    y = [0] * len(VOC_CLASSES)
    for o in ann.objects:
        k = _CLASS_INDEX.get(o.name)
        if k is None:
            raise DatasetError(f"annotation {path}: unknown class {o.name!r}; VOC classes: {', '.join(VOC_CLASSES)}")
        if not o.difficult:
            y[k] = 1
        elif y[k] == 0:
            y[k] = -1
    return y


# --------------------------------------------------------------------------- layout


def voc_dir(root: str | Path, year: str | int) -> Path:
    """The `VOC<year>` folder, given `.../VOCdevkit`, `.../VOCdevkit/VOC<year>` or the folder holding `VOCdevkit`."""
    root = Path(root)
    for cand in (root / f"VOC{year}", root, root / "VOCdevkit" / f"VOC{year}"):
        if (cand / "ImageSets" / "Main").is_dir():
            return cand
    raise DatasetError(f"no VOC{year} folder under {root}: expected {root}/VOC{year}/ImageSets/Main/ "
                       f"(root = VOCdevkit) or {root}/ImageSets/Main/ (root = VOCdevkit/VOC{year})")


def read_image_set(root: str | Path, year: str | int, image_set: str) -> list[str]:
    """Image ids listed in `VOC<year>/ImageSets/Main/<image_set>.txt` (first column; per-class files work too)."""
    path = voc_dir(root, year) / "ImageSets" / "Main" / f"{image_set}.txt"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DatasetError(f"image set {path} is unreadable: {e.strerror or e}") from None
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DatasetError(f"image set {path} lists no images")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"image set {path} lists some image ids twice: corrupt file")
    return ids


# --------------------------------------------------------------------------- images


# --------------------------------------------------------------------------- dataset

_TARBALLS = {("2007", "trainval"): "VOCtrainval_06-Nov-2007.tar", ("2007", "test"): "VOCtest_06-Nov-2007.tar"}


def load_voc_classification(root: Path, year: str = "2007", sets: tuple[str, str] = ("trainval", "test")) -> RawDataset:
    """Multi-label VOC classification: train = `sets[0]`, test = `sets[1]`, labels from the annotation XML."""
    base = voc_dir(root, year)
    h = hashlib.sha256()
    parts = []
    for name in sets:
        listing = base / "ImageSets" / "Main" / f"{name}.txt"
        if not listing.is_file():
            tar = _TARBALLS.get((str(year), name), f"the tarball holding VOC{year} {name}")
            raise DatasetError(f"{listing} is missing: extract {tar} into the same VOCdevkit")
        ids = read_image_set(base, year, name)
        h.update(listing.read_bytes())
        parts.append((name, ids))
    both = set(parts[0][1]) & set(parts[1][1])
    if both:
        raise DatasetError(f"{sets[0]} and {sets[1]} share {len(both)} image ids (e.g. {min(both)}): wrong image-set files")
    sets_out, paths = [], []
    for _, ids in parts:
        labels = []
        for i in ids:
            path = base / "Annotations" / f"{i}.xml"
            data = _read_bytes(path, "annotation")
            h.update(data)
            labels.append(image_labels(_parse_annotation_bytes(data, path), path))
        y = torch.tensor(labels, dtype=torch.int64).reshape(len(ids), len(VOC_CLASSES))
        files = [str(base / "JPEGImages" / f"{i}.jpg") for i in ids]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) missing, e.g. {missing[0]}")
        paths += files
        n = len(files)
        sets_out.append(StreamSet(tuple(files), torch.full((n,), -1, dtype=torch.int64), torch.zeros(n, dtype=torch.int64), y,
                                  EvalTransform.named("vissl", SIZE)))
    source = fingerprint_files(paths, base, extra=h.hexdigest())  # every image file, and the listings and annotations
    return RawDataset(sets_out[0], sets_out[1], len(VOC_CLASSES), source, default_size=SIZE, default_transform="vissl")


register_dataset("voc2007")(
    DatasetSpec(
        load=lambda root: load_voc_classification(root, "2007"),
        default_root=None,
        how_to_get="Nothing is downloaded: get VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar from "
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/, extract both in one folder (they share VOCdevkit/VOC2007/), "
        "then pass --data-root DIR/VOCdevkit (or DIR/VOCdevkit/VOC2007) or set $SSLBENCH_DATA_VOC2007.",
    )
)
