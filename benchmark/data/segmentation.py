"""Semantic segmentation data: one in-memory form, readers for the VOC12 (+ SBD), Cityscapes and ADE20K layouts, and
the embedded Fashion-MNIST set (`fmnist_seg`).

A mask is (H, W) class ids (uint8, or int64 for sets built in memory), 255 = ignore, as mmseg and DINOv3 read them:
- VOC12: `SegmentationClass/*.png` are palette PNGs whose palette *indices* are the classes (0 = background,
  1..20 the VOC classes, 255 = the object borders, ignored); SBD's `SegmentationClassAug/*.png` are grey PNGs of the same
  indices ("voc12aug": mmseg's `pascal_voc12_aug.py`, DeepLab's `train_aug.txt`).
- Cityscapes: `*_gtFine_labelIds.png` hold the 34 label ids; they are mapped to the 19 train ids of cityscapesScripts'
  `helpers/labels.py` (`CITYSCAPES_TRAIN_ID` below), every other id to 255.
- ADE20K (SceneParsing `ADEChallengeData2016`): 0 = "other" -> 255, class c in 1..150 -> c - 1 (mmseg's and DINOv3's
  `reduce_zero_label`).

Real datasets are read lazily (file paths, decoded on access). Their published evaluation split (VOC12 val,
Cityscapes val, ADE20K validation) is the *test* split here; the split protocols select on (val) is a fixed, seeded
fraction of train (`carve_val`), so nothing is chosen on the test images.

`fmnist_seg` is `fmnist_det`'s canvases (`benchmark.data.detection`, the same draw for the same sizes and seed) with a
pixel mask: each pasted item's visible pixels (the resized item >= the extent threshold that defines its box) carry its
class + 1, the rest is background 0 (11 classes). It is written once, lossless (PNG images, palette-PNG masks, VOC's
`SegmentationClass` layout), and read back with the VOC reader. Train and val are the train-item canvases (the first
`n_train` and the last `n_val` of the draw; the two share no canvas, though a Fashion-MNIST item may appear in both at
another place and scale), test is drawn from Fashion-MNIST test items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import overload

import numpy as np
import torch
from torch import Tensor

from benchmark.data.detection import FMNIST_CLASSES, LazyImages
from benchmark.data.files import cache_root, fingerprint_files
from benchmark.errors import DatasetError

log = logging.getLogger(__name__)

IGNORE = 255  # ignored label (mmseg, DINOv3, VOC borders)

FMNIST_SEG_CLASSES: tuple[str, ...] = ("background", *FMNIST_CLASSES)
VOC_SEG_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
# labelId -> trainId, the `labels` table of github.com/mcordts/cityscapesScripts cityscapesscripts/helpers/labels.py
# (ids 0-6 void, 9 parking, 10 rail track, 14 guard rail, 15 bridge, 16 tunnel, 18 polegroup, 29 caravan, 30 trailer
# and license plate (-1) have trainId 255: ignored in training and evaluation)
CITYSCAPES_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
# the 150 SceneParsing classes in label order 1..150 (objectInfo150.csv's first names, as mmseg's ADE20KDataset)
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill",
    "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- the in-memory form


@dataclass(frozen=True)
class SegmentationSet:
    """Images with per-pixel class ids; image i has mask i of its height and width."""

    name: str
    classes: tuple[str, ...]
    images: Sequence[Tensor]  # uint8 (C, H, W), sizes may differ (a list, or `LazyImages` read on access)
    masks: Sequence[Tensor]  # uint8 or int64 (H, W) class ids, 255 = ignore (a list, or `LazyMasks`)
    ids: list[str]  # image ids (file stems)
    fingerprint: str  # sha256 prefix of the files (or pixels) it was read from and the selection made

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.masks) == len(self.ids)):
            raise ValueError(f"{self.name}: {len(self.images)} images, {len(self.masks)} masks, {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images[0].shape[0]) if len(self.images) else 0

    @property
    def lazy(self) -> bool:
        """True when images are decoded from files on access (worth decoding in parallel)."""
        return isinstance(self.images, LazyImages) or isinstance(self.masks, LazyMasks)

    def subset(self, idx: Sequence[int], name: str | None = None) -> SegmentationSet:
        pick = [int(i) for i in idx]
        return SegmentationSet(name or self.name, self.classes, _take(self.images, pick), _take(self.masks, pick),
                               [self.ids[i] for i in pick], f"{self.fingerprint}-{_digest(str(pick).encode())[:8]}")

    def loaded(self) -> SegmentationSet:
        """The same set decoded into memory (small sets: `fmnist_seg`)."""
        return SegmentationSet(self.name, self.classes, [self.images[i] for i in range(len(self))],
                               [self.masks[i] for i in range(len(self))], list(self.ids), self.fingerprint)


def _take(items: Sequence[Tensor], idx: list[int]) -> Sequence[Tensor]:
    if isinstance(items, (LazyImages, LazyMasks)):
        return items.take(idx)
    return [items[i] for i in idx]


class LazyMasks(Sequence[Tensor]):
    """Mask PNGs decoded on access as uint8 (H, W) class ids, through an optional 256-entry lookup table."""

    def __init__(self, paths: Sequence[Path], lut: Tensor | None = None) -> None:
        self.paths = list(paths)
        self.lut = lut

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[Tensor]: ...

    def __getitem__(self, i: int | slice) -> Tensor | list[Tensor]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return read_mask(self.paths[i], self.lut)

    def take(self, idx: Sequence[int]) -> LazyMasks:
        return LazyMasks([self.paths[i] for i in idx], self.lut)


def read_mask(path: Path, lut: Tensor | None = None) -> Tensor:
    """One mask PNG as uint8 (H, W): palette PNGs give their indices (not colours), grey PNGs their values.

    Raises:
        DatasetError: the file is missing, corrupt, a colour image or holds values above 255.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA"):
                raise DatasetError(f"mask {path} is a {im.mode} colour image, not class indices: use the dataset's "
                                   "index PNGs (VOC SegmentationClass/, Cityscapes *_labelIds.png, ADE annotations/)")
            arr = np.array(im.convert("L") if im.mode == "1" else im)
    except OSError as e:
        raise DatasetError(f"mask {path} is missing, unreadable or corrupt: {e}") from None
    if arr.ndim != 2 or (arr.size and int(arr.max()) > 255):
        raise DatasetError(f"mask {path}: expected one channel of class ids 0..255, got shape {arr.shape}")
    t = torch.from_numpy(arr.astype(np.uint8))
    return lut[t.long()] if lut is not None else t


def lookup_table(mapping: dict[int, int], default: int = IGNORE) -> Tensor:
    """uint8 (256,) table: value v -> mapping.get(v, default)."""
    lut = torch.full((256,), default, dtype=torch.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


def voc_palette() -> list[int]:
    """The VOC colour map (768 ints, RGB per index): index bits spread over the colour channels' high bits."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_mask(path: Path, mask: np.ndarray) -> None:
    """A (H, W) uint8 mask as a VOC palette PNG (lossless; the indices are the class ids)."""
    from PIL import Image

    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def check_mask(mask: Tensor, num_classes: int, where: str) -> None:
    """DatasetError naming `where` if `mask` holds an id that is neither a class nor 255."""
    bad = (mask >= num_classes) & (mask != IGNORE)
    if bool(bad.any()):
        raise DatasetError(f"mask {where} holds class id {int(mask[bad][0])}, but the set has {num_classes} classes "
                           f"(0..{num_classes - 1}, 255 = ignore)")


def carve_val(train: SegmentationSet, fraction: float, seed: int) -> tuple[SegmentationSet, SegmentationSet]:
    """(train minus val, val): val is round(fraction x N) images (at least 1) drawn with `seed`, both in file order.

    The drawn ids are part of both fingerprints, so results say which images were held out.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction}")
    n = len(train)
    if n < 2:
        raise DatasetError(f"{train.name} has {n} image(s): too few to hold out a validation split")
    k = min(n - 1, max(1, round(fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx = sorted(int(i) for i in perm[:k])
    held = set(val_idx)
    return (train.subset([i for i in range(n) if i not in held], f"{train.name}-train"),
            train.subset(val_idx, f"{train.name}-val"))


def _files_fingerprint(images: LazyImages, masks: LazyMasks, base: Path, extra: bytes) -> str:
    paths = [str(p) for p in images.paths] + [str(p) for p in masks.paths]
    return fingerprint_files(paths, base, extra=_digest(extra))[:16]


def _first_missing(paths: Sequence[Path]) -> Path | None:
    return next((p for p in paths if not p.is_file()), None)


# --------------------------------------------------------------------------- VOC layout

_VOC_HOW = "extract VOCtrainval_11-May-2012.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) so that " \
           "ROOT/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation} exist"
_SBD_HOW = "put SBD's SegmentationClassAug/ (grey index PNGs) and ImageSets/Segmentation/train_aug.txt (or mmseg's " \
           "aug.txt) into VOCdevkit/VOC2012 (mmseg tools/dataset_converters/voc_aug.py builds both from SBD's benchmark.tgz)"


def voc12_dir(root: str | Path) -> Path:
    """The `VOC2012` folder, given the folder holding `VOCdevkit`, `VOCdevkit` itself or `VOC2012` itself."""
    root = Path(root).expanduser()
    for cand in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    raise DatasetError(f"no VOC2012 segmentation under {root}: {_VOC_HOW}")


def read_voc_segmentation(root: str | Path, image_set: str, classes: tuple[str, ...] = VOC_SEG_CLASSES,
                          mask_dir: str = "SegmentationClass", image_ext: str = "jpg", channels: int | None = 3
                          ) -> SegmentationSet:
    """`VOC2012/ImageSets/Segmentation/<image_set>.txt` with `JPEGImages/<id>.<image_ext>` and `<mask_dir>/<id>.png`.

    A listing line's first column gives the id (its file stem), so DeepLab's "/JPEGImages/x.jpg /SegmentationClassAug/x.png"
    lines work as well as plain ids. `channels`: 3 decodes every image as RGB, None keeps grey files grey.
    """
    base = voc12_dir(root)
    listing = base / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    try:
        data = listing.read_bytes()
    except OSError:
        how = _SBD_HOW if mask_dir != "SegmentationClass" else _VOC_HOW
        raise DatasetError(f"{listing} is missing: {how}") from None
    ids = [Path(line.split()[0]).stem for line in data.decode().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{listing} lists no images")
    if not (base / mask_dir).is_dir():
        raise DatasetError(f"{base / mask_dir} is missing: {_SBD_HOW if mask_dir != 'SegmentationClass' else _VOC_HOW}")
    images = LazyImages([base / "JPEGImages" / f"{i}.{image_ext}" for i in ids], channels)
    masks = LazyMasks([base / mask_dir / f"{i}.png" for i in ids])
    missing = _first_missing(images.paths) or _first_missing(masks.paths)
    if missing is not None:
        raise DatasetError(f"{missing} is missing (listed in {listing}); the extraction is incomplete")
    fp = _files_fingerprint(images, masks, base, data + repr(classes).encode())
    return SegmentationSet(f"voc12_{image_set}", classes, images, masks, ids, fp)


def read_voc12(root: str | Path, aug: bool) -> tuple[SegmentationSet, SegmentationSet]:
    """(train, test): VOC12 `train` (1,464) or, with `aug`, SBD's train_aug (10,582; mmseg's aug.txt) -> VOC12 `val`
    (1,449). Ids of the test list found in the aug list are dropped from training, with a warning."""
    test = read_voc_segmentation(root, "val")
    if not aug:
        return read_voc_segmentation(root, "train"), test
    base = voc12_dir(root)
    listing = next((n for n in ("train_aug", "aug") if (base / "ImageSets" / "Segmentation" / f"{n}.txt").is_file()), "train_aug")
    train = read_voc_segmentation(root, listing, mask_dir="SegmentationClassAug")
    overlap = set(train.ids) & set(test.ids)
    if overlap:
        log.warning("voc12aug: %d ids of VOC12 val are in %s.txt; they are left out of training", len(overlap), listing)
        train = train.subset([i for i, x in enumerate(train.ids) if x not in overlap], train.name)
    return train, test


# --------------------------------------------------------------------------- Cityscapes layout

_CITYSCAPES_HOW = "extract leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip " \
                  "(https://www.cityscapes-dataset.com/downloads/) into ROOT: ROOT/leftImg8bit/{train,val}/<city>/ and ROOT/gtFine/..."


def read_cityscapes(root: str | Path, split: str) -> SegmentationSet:
    """`leftImg8bit/<split>/<city>/*_leftImg8bit.png` with `gtFine/<split>/<city>/*_gtFine_labelIds.png` -> 19 train ids."""
    base = Path(root).expanduser()
    folder = base / "leftImg8bit" / split
    images = LazyImages(sorted(folder.glob("*/*_leftImg8bit.png")), channels=3)
    if not images.paths:
        raise DatasetError(f"no Cityscapes images in {folder}/<city>/*_leftImg8bit.png: {_CITYSCAPES_HOW}")
    stems = [p.name[: -len("_leftImg8bit.png")] for p in images.paths]
    masks = LazyMasks([base / "gtFine" / split / p.parent.name / f"{s}_gtFine_labelIds.png" for p, s in zip(images.paths, stems)],
                      lookup_table(CITYSCAPES_TRAIN_ID))
    missing = _first_missing(masks.paths)
    if missing is not None:
        raise DatasetError(f"{missing} is missing (the label map of a {split} image): {_CITYSCAPES_HOW}")
    fp = _files_fingerprint(images, masks, base, repr(sorted(CITYSCAPES_TRAIN_ID.items())).encode())
    return SegmentationSet(f"cityscapes_{split}", CITYSCAPES_CLASSES, images, masks, stems, fp)


# --------------------------------------------------------------------------- ADE20K layout

_ADE_HOW = "extract ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu/) into ROOT: " \
           "ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}/"


def read_ade20k(root: str | Path, split: str) -> SegmentationSet:
    """`ADEChallengeData2016/images/<split>/*.jpg` with `annotations/<split>/*.png`, reduce_zero_label (0 -> 255, c -> c - 1)."""
    base = Path(root).expanduser()
    base = base / "ADEChallengeData2016" if (base / "ADEChallengeData2016").is_dir() else base
    folder = base / "images" / split
    images = LazyImages(sorted(folder.glob("*.jpg")), channels=3)
    if not images.paths:
        raise DatasetError(f"no ADE20K images in {folder}/*.jpg: {_ADE_HOW}")
    masks = LazyMasks([base / "annotations" / split / f"{p.stem}.png" for p in images.paths],
                      lookup_table({c: c - 1 for c in range(1, len(ADE20K_CLASSES) + 1)}))
    missing = _first_missing(masks.paths)
    if missing is not None:
        raise DatasetError(f"{missing} is missing (the annotation of a {split} image): {_ADE_HOW}")
    fp = _files_fingerprint(images, masks, base, b"reduce_zero_label")
    return SegmentationSet(f"ade20k_{split}", ADE20K_CLASSES, images, masks, [p.stem for p in images.paths], fp)


# --------------------------------------------------------------------------- the embedded set

SEG_VERSION = "1"  # bump when the mask generator changes: the cache folder name includes it


@dataclass(frozen=True)
class SegmentationSpec:
    """What `load_segmentation` reads. The embedded fields define `fmnist_seg` (its cache key); `val_fraction` and
    `split_seed` carve the selection split out of a real dataset's train split."""

    n_train: int = 1600  # fmnist_seg train canvases (Fashion-MNIST train items)
    n_val: int = 400  # fmnist_seg val canvases, drawn after the train ones from the same items (n_train + n_val = 2000:
    # the canvases of fmnist_det's default trainval)
    n_test: int = 500  # fmnist_seg test canvases (Fashion-MNIST test items; fmnist_det's default test)
    canvas: int = 128  # canvas side, pixels
    max_objects: int = 4  # 1..max_objects items per canvas
    scale: tuple[float, float] = (1.0, 2.0)  # item side = 28 px x U(scale)
    seed: int = 0  # the canvas draw
    val_fraction: float = 0.1  # real datasets: fraction of train held out as val
    split_seed: int = 0  # ... drawn with this seed

    def __post_init__(self) -> None:
        if min(self.n_train, self.n_val, self.n_test) <= 0:
            raise ValueError(f"fmnist_seg sizes must be > 0, got {self.n_train}/{self.n_val}/{self.n_test}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def embedded_key(self) -> tuple[object, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in ("val_fraction", "split_seed"))


def item_mask(img: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], labels: Sequence[int]) -> np.ndarray:
    """A canvas's mask from `_draw_canvas`'s output: inside each (disjoint) box, the pixels >= the extent threshold
    are that item's class + 1 (another item's pixels there are all below it: its box is its thresholded extent, and
    the paste is a pixel-wise max), everything else background 0."""
    from benchmark.data.detection import _EXTENT_THRESHOLD

    mask = np.zeros(img.shape, dtype=np.uint8)
    for (x1, y1, x2, y2), y in zip(boxes, labels):
        on = img[y1:y2, x1:x2] >= _EXTENT_THRESHOLD
        mask[y1:y2, x1:x2][on] = y + 1
    return mask


def _write_canvases(voc: Path, raw_split: tuple[np.ndarray, np.ndarray], prefix: str, n: int,
                    rng: np.random.Generator, spec: SegmentationSpec) -> list[str]:
    from PIL import Image

    from benchmark.data.detection import EmbeddedSpec, _draw_canvas

    det = EmbeddedSpec(n_train=spec.n_train + spec.n_val, n_test=spec.n_test, canvas=spec.canvas,
                       max_objects=spec.max_objects, scale=spec.scale, seed=spec.seed)
    items, classes = raw_split
    ids = []
    for i in range(n):
        img, boxes, labels = _draw_canvas(items, classes, rng, det)
        image_id = f"{prefix}_{i:05d}"  # fmnist_det's ids: the same canvas under the same name
        Image.fromarray(img).save(voc / "JPEGImages" / f"{image_id}.png")
        write_mask(voc / "SegmentationClass" / f"{image_id}.png", item_mask(img, boxes, labels))
        ids.append(image_id)
    return ids


def build_embedded(spec: SegmentationSpec = SegmentationSpec(), fmnist_root: str | None = None,
                   cache: Path | None = None) -> Path:
    """Write `fmnist_seg` once (VOCdevkit/VOC2012 layout, PNG) and return its folder; reused when complete.

    Built under a temporary name and renamed when complete, so a reader never sees half of it. The key covers the
    embedded spec, the Fashion-MNIST files and both generator versions (this one and fmnist_det's canvas drawer).
    """
    from benchmark.data.datasets import load_raw
    from benchmark.data.detection import EMBEDDED_VERSION

    raw = load_raw("fashion_mnist", fmnist_root)
    key = _digest(repr((spec.embedded_key(), raw.source_hash, SEG_VERSION, EMBEDDED_VERSION)).encode())[:12]
    out = (cache or cache_root()) / "segmentation" / f"fmnist_seg-{key}"
    if (out / "DONE").is_file():
        return out
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    voc = tmp / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(spec.seed)  # one stream, trainval then test, as fmnist_det draws it
    trainval = _write_canvases(voc, (raw.train.x[:, 0].numpy(), raw.train.y.numpy()), "trainval", spec.n_train + spec.n_val, rng, spec)
    test = _write_canvases(voc, (raw.test.x[:, 0].numpy(), raw.test.y.numpy()), "test", spec.n_test, rng, spec)
    for name, ids in (("train", trainval[: spec.n_train]), ("val", trainval[spec.n_train :]), ("test", test)):
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    (tmp / "DONE").write_text(json.dumps({"spec": repr(spec.embedded_key()), "fashion_mnist": raw.source_hash,
                                          "version": SEG_VERSION, "canvas_version": EMBEDDED_VERSION}))
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "DONE").is_file():
            raise
    return out


def load_embedded(spec: SegmentationSpec = SegmentationSpec(), fmnist_root: str | None = None,
                  cache: Path | None = None) -> tuple[SegmentationSet, SegmentationSet, SegmentationSet]:
    """(train, val, test) of `fmnist_seg`, read back through the VOC reader and decoded into memory."""
    root = build_embedded(spec, fmnist_root, cache)
    out = [read_voc_segmentation(root, s, FMNIST_SEG_CLASSES, image_ext="png", channels=1).loaded() for s in ("train", "val", "test")]
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------- datasets by name

SEGMENTATION_DATASETS = ("fmnist_seg", "voc12", "voc12aug", "cityscapes", "ade20k")
_HOW = {
    "voc12": f"a folder holding VOCdevkit/VOC2012 ({_VOC_HOW})",
    "voc12aug": f"a folder holding VOCdevkit/VOC2012 with SBD's augmentation ({_VOC_HOW}; {_SBD_HOW})",
    "cityscapes": f"the Cityscapes folder ({_CITYSCAPES_HOW})",
    "ade20k": f"the folder holding ADEChallengeData2016 ({_ADE_HOW})",
}


def load_segmentation(name: str, root: str | None, spec: SegmentationSpec = SegmentationSpec()
                      ) -> tuple[SegmentationSet, SegmentationSet, SegmentationSet]:
    """(train, val, test) of a segmentation dataset; nothing is downloaded.

    `fmnist_seg` (embedded; `root` = Fashion-MNIST's folder or None), `voc12` (train -> val), `voc12aug` (SBD
    train_aug -> VOC12 val; MoCo's / mmselfsup's), `cityscapes` (train -> val), `ade20k` (training -> validation). For
    the real datasets the published evaluation split is the test split and val is `spec.val_fraction` of train
    (`carve_val`, seed `spec.split_seed`).
    """
    if name == "fmnist_seg":
        return load_embedded(spec, root)
    if name not in _HOW:
        raise DatasetError(f"unknown segmentation dataset {name!r}; known: {', '.join(SEGMENTATION_DATASETS)}")
    if root is None:
        raise DatasetError(f"segmentation dataset {name!r} needs its folder in the config's data_root: {_HOW[name]}")
    if name in ("voc12", "voc12aug"):
        source, test = read_voc12(root, aug=name == "voc12aug")
    elif name == "cityscapes":
        source, test = read_cityscapes(root, "train"), read_cityscapes(root, "val")
    else:
        source, test = read_ade20k(root, "training"), read_ade20k(root, "validation")
    train, val = carve_val(source, spec.val_fraction, spec.split_seed)
    return train, val, test
