"""File-based datasets, registered by name and read as lists of files (or tar members) with their labels: ImageFolder
trees at native resolution, the ILSVRC2012 layout (`imagenet`, `imagenet100`) and WebDataset tar shards
(`webdataset`). `make_splits` streams them (decoded in DataLoader workers) or decodes them into memory, by size.

Each reader checks its layout before anything runs and names the expected layout in its one-line error. The source
fingerprint covers every file (path, size, sha256; cached by path, size and mtime) and the labels.
"""

from __future__ import annotations

import csv
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import torch

from benchmark.data.files import fingerprint_files
from benchmark.data.sets import DatasetSpec, RawDataset
from benchmark.data.stream import EvalTransform, StreamSet, decode
from benchmark.errors import DatasetError
from benchmark.registry import register_dataset

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")  # what torchvision.io decodes (libjpeg-turbo, libpng, libwebp)


def _files(paths: list[str], labels: list[int], channels: int = 3) -> StreamSet:
    n = len(paths)
    return StreamSet(tuple(paths), torch.full((n,), -1, dtype=torch.int64), torch.zeros(n, dtype=torch.int64),
                     torch.tensor(labels, dtype=torch.int64), EvalTransform("native"), channels)


def _with_native_size(s: StreamSet, probe: int = 8) -> StreamSet:
    """Record the images' side when the first `probe` are square and of one size (what data.transform=native uses)."""
    sizes = {tuple(decode(s.paths[i], int(s.offsets[i]), int(s.sizes[i]), s.channels).shape[1:]) for i in range(min(probe, len(s)))}
    if len(sizes) == 1:
        (h, w), = sizes
        if h == w:
            return replace(s, native_size=int(h))
    return s


def _images_in(d: Path) -> list[str]:
    with os.scandir(d) as it:
        return sorted(e.path for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))


def _class_folders(d: Path) -> list[str]:
    with os.scandir(d) as it:
        return sorted(e.name for e in it if e.is_dir())


def _scan(d: Path, class_to_idx: dict[str, int]) -> tuple[list[str], list[int]]:
    paths: list[str] = []
    labels: list[int] = []
    for c in _class_folders(d):
        if c not in class_to_idx:
            continue
        found = _images_in(d / c)
        paths += found
        labels += [class_to_idx[c]] * len(found)
    return paths, labels


def _raw(root: Path, train: StreamSet, test: StreamSet, classes: list[str], size: int, progress: bool = True) -> RawDataset:
    labels = ",".join(map(str, train.y.tolist())) + ";" + ",".join(map(str, test.y.tolist()))
    source = fingerprint_files(list(train.paths) + list(test.paths), root, extra="\n".join(classes) + "\n" + labels, progress=progress)
    return RawDataset(_with_native_size(train), _with_native_size(test), len(classes), source, default_size=size)


# --------------------------------------------------------------------------- ImageFolder


def _load_imagefolder(root: Path) -> RawDataset:
    """`root/train/<class>/*.jpg` and `root/val/<class>/*` (or `test/`), at native resolution; class indices from
    train's sorted class names, so a test folder that lacks a class still maps every other class to the same index."""
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DatasetError(f"imagefolder root {root} must hold train/<class>/ and val/<class>/ (or test/<class>/)")
    classes = _class_folders(root / "train")
    extra = sorted(set(_class_folders(test_dir)) - set(classes))
    if extra:
        raise DatasetError(f"{test_dir} has class folders that train/ lacks: {', '.join(extra[:5])}; remove them or add them to train/")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    sets = []
    for d in (root / "train", test_dir):
        paths, labels = _scan(d, class_to_idx)
        if not paths:
            raise DatasetError(f"no {'/'.join(IMAGE_EXTS)} images found under {d}/<class>/")
        sets.append(_files(paths, labels))
    return _raw(root, sets[0], sets[1], classes, size=64)


register_dataset("imagefolder")(
    DatasetSpec(_load_imagefolder, None, "Pass --data-root DIR with DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg.")
)


# --------------------------------------------------------------------------- ILSVRC2012

ILSVRC_LAYOUT = ("the ILSVRC2012 layout: DIR/train/<wnid>/*.JPEG (1000 class folders) and DIR/val/ either in <wnid>/ folders "
                 "or flat (ILSVRC2012_val_*.JPEG) with LOC_val_solution.csv, or with the devkit's "
                 "ILSVRC2012_devkit_t12/data/{ILSVRC2012_validation_ground_truth.txt,meta.mat}, in DIR or next to it")

# The 100-class subset of CMC (Tian et al. 2019) used by solo-learn and most ImageNet-100 results; the list as
# published in https://github.com/HobbitLong/CMC/issues/21 (the order there; class indices follow the sorted wnids).
IMAGENET100 = (
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797 n01735189 n07831146 "
    "n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653 n02086910 n02859443 n13040303 n03594734 "
    "n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 "
    "n01692333 n07714571 n02974003 n02114855 n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 "
    "n02701002 n03379051 n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 "
    "n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 n02113978 n03787032 "
    "n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 n03837869 n03494278 n04136333 n03794056 "
    "n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 "
    "n02108089 n03424325 n01855672 n02090622"
).split()


def _val_ground_truth(root: Path) -> dict[str, str]:
    """wnid of each flat val image (by file stem), from LOC_val_solution.csv or the devkit, searched in root and its parent."""
    for base in (root, root.parent):
        loc = base / "LOC_val_solution.csv"
        if loc.is_file():
            with open(loc, newline="") as f:
                return {r["ImageId"]: r["PredictionString"].split()[0] for r in csv.DictReader(f) if r.get("PredictionString")}
        devkit = base / "ILSVRC2012_devkit_t12" / "data"
        gt, meta = devkit / "ILSVRC2012_validation_ground_truth.txt", devkit / "meta.mat"
        if gt.is_file() and meta.is_file():
            from scipy.io import loadmat

            synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
            id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
            ids = [int(line) for line in gt.read_text().split()]
            return {f"ILSVRC2012_val_{i + 1:08d}": id_to_wnid[k] for i, k in enumerate(ids)}
        if gt.is_file() != meta.is_file():
            raise DatasetError(f"{devkit} holds only one of ILSVRC2012_validation_ground_truth.txt and meta.mat; both are needed")
    raise DatasetError(f"{root / 'val'} is flat but no ground truth was found: expected {ILSVRC_LAYOUT}")


def _load_ilsvrc(root: Path, subset: list[str] | None, name: str) -> RawDataset:
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise DatasetError(f"{name}: {root} lacks {'train/' if not train_dir.is_dir() else 'val/'}; expected {ILSVRC_LAYOUT}")
    wnids = _class_folders(train_dir)
    if subset is None:
        if len(wnids) != 1000:
            raise DatasetError(f"{name}: {train_dir} has {len(wnids)} class folders, ILSVRC2012 has 1000; expected {ILSVRC_LAYOUT}")
        classes = wnids
    else:
        missing = sorted(set(subset) - set(wnids))
        if missing:
            raise DatasetError(f"{name}: {train_dir} lacks {len(missing)} of its {len(subset)} classes ({', '.join(missing[:3])}, ...); "
                               f"point --data-root at a full ImageNet in {ILSVRC_LAYOUT}")
        classes = sorted(subset)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    tr_paths, tr_labels = _scan(train_dir, class_to_idx)
    val_folders = _class_folders(val_dir)
    if val_folders:
        extra = sorted(set(val_folders) - set(wnids))
        if extra:
            raise DatasetError(f"{name}: {val_dir} has class folders that train/ lacks: {', '.join(extra[:5])}")
        te_paths, te_labels = _scan(val_dir, class_to_idx)
    else:
        files = _images_in(val_dir)
        stems = [Path(p).name.split(".")[0] for p in files]
        gt = _val_ground_truth(root)
        te_paths, te_labels = [], []
        for p, stem in zip(files, stems):
            if stem not in gt:
                raise DatasetError(f"{name}: {p} has no entry in the validation ground truth; remove it or fix the ground-truth file")
            if gt[stem] not in wnids:
                raise DatasetError(f"{name}: {p} is labelled {gt[stem]}, a class train/ lacks")
            if gt[stem] in class_to_idx:
                te_paths.append(p)
                te_labels.append(class_to_idx[gt[stem]])
    for paths, d in ((tr_paths, train_dir), (te_paths, val_dir)):
        if not paths:
            raise DatasetError(f"{name}: no {'/'.join(IMAGE_EXTS)} images under {d}; expected {ILSVRC_LAYOUT}")
    return _raw(root, _files(tr_paths, tr_labels), _files(te_paths, te_labels), classes, size=224)


def _ilsvrc_hint(env: str) -> str:
    return f"Nothing is downloaded: point --data-root (or ${env}) at a local ImageNet in {ILSVRC_LAYOUT}."


register_dataset("imagenet")(DatasetSpec(lambda root: _load_ilsvrc(root, None, "imagenet"), None, _ilsvrc_hint("SSLBENCH_DATA_IMAGENET")))
register_dataset("imagenet100")(
    DatasetSpec(lambda root: _load_ilsvrc(root, IMAGENET100, "imagenet100"), None,
                _ilsvrc_hint("SSLBENCH_DATA_IMAGENET100") + " Its 100 classes (CMC's list) are read from the full tree."))


# --------------------------------------------------------------------------- file lists: Places205, iNaturalist 2018

PLACES205_LAYOUT = ("Places205 as VISSL reads it: DIR/trainvalsplit_places205/{train,val}_places205.csv (or the two csv "
                    "files in DIR), lines 'a/abbey/00000001.jpg 0', the images under DIR/images256/ (or DIR/data/vision/"
                    "torralba/deeplearning/images256/)")
INAT2018_LAYOUT = ("iNaturalist 2018: DIR/train2018.json and DIR/val2018.json (the official COCO-style annotations) and "
                   "the images they name (train_val2018/<kingdom>/<id>/*.jpg) under DIR")


def _listed(base: Path, entries: list[tuple[str, int]], what: str, layout: str) -> StreamSet:
    if not entries:
        raise DatasetError(f"{what} lists no images; expected {layout}")
    return _files([str(base / rel.lstrip("/")) for rel, _ in entries], [y for _, y in entries])


def _load_places205(root: Path) -> RawDataset:
    lists = next((d for d in (root / "trainvalsplit_places205", root) if (d / "train_places205.csv").is_file()), None)
    base = next((d for d in (root / "images256", root / "data/vision/torralba/deeplearning/images256") if d.is_dir()), None)
    if lists is None or not (lists / "val_places205.csv").is_file() or base is None:
        raise DatasetError(f"places205: {root} is incomplete; expected {PLACES205_LAYOUT}")
    sets = []
    for name in ("train_places205.csv", "val_places205.csv"):
        entries = []
        for n, line in enumerate((lists / name).read_text().splitlines(), 1):
            if not line.strip():
                continue
            rel, _, label = line.strip().rpartition(" ")
            if not rel or not label.isdigit():
                raise DatasetError(f"{lists / name} line {n}: {line[:60]!r} is not 'PATH LABEL'; expected {PLACES205_LAYOUT}")
            entries.append((rel, int(label)))
        sets.append(_listed(base, entries, str(lists / name), PLACES205_LAYOUT))
    return _raw(root, sets[0], sets[1], [str(i) for i in range(205)], size=224)


def _load_inat2018(root: Path) -> RawDataset:
    import json

    files = [root / "train2018.json", root / "val2018.json"]
    if not all(f.is_file() for f in files):
        raise DatasetError(f"inat2018: {root} lacks {', '.join(f.name for f in files if not f.is_file())}; expected {INAT2018_LAYOUT}")
    sets, classes = [], 0
    for f in files:
        try:
            ann = json.loads(f.read_text())
            label = {a["image_id"]: int(a["category_id"]) for a in ann["annotations"]}
            entries = [(im["file_name"], label[im["id"]]) for im in ann["images"]]
            classes = max(classes, len(ann.get("categories", [])))
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{f} is not the official annotation file ({type(e).__name__}: {e}); expected {INAT2018_LAYOUT}") from None
        sets.append(_listed(root, entries, str(f), INAT2018_LAYOUT))
    classes = max(classes, int(sets[0].y.max()) + 1)
    return _raw(root, sets[0], sets[1], [str(i) for i in range(classes)], size=224)


register_dataset("places205")(DatasetSpec(_load_places205, None, f"Point --data-root at {PLACES205_LAYOUT}."))
register_dataset("inat2018")(DatasetSpec(_load_inat2018, None, f"Point --data-root at {INAT2018_LAYOUT}."))


# --------------------------------------------------------------------------- WebDataset shards

WDS_LAYOUT = ("WebDataset shards: DIR/train-*.tar and DIR/val-*.tar (or test-*.tar), or the brace patterns in "
              "DIR/shards.json ({\"train\": \"train-{000000..000146}.tar\", \"test\": \"val-{000000..000006}.tar\"}, relative "
              "to DIR); each sample an image member (KEY.jpg/.jpeg/.png/.webp) and its class index (KEY.cls, as text); "
              "optional DIR/classes.txt, one name per line")


def _index_shard(path: str) -> tuple[list[int], list[int], list[int]]:
    """(offsets, sizes, labels) of the samples of one uncompressed tar shard, in member order, grouped by key as
    webdataset groups them (`base_plus_ext`)."""
    from webdataset.tariterators import base_plus_ext

    size_on_disk = os.path.getsize(path)
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    last = "the shard's start"
    try:
        with tarfile.open(path, "r:") as tf:
            while True:
                m = tf.next()
                if m is None:
                    break
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size_on_disk:
                    raise DatasetError(f"{path}: truncated shard: member {m.name} at byte offset {m.offset_data} needs "
                                       f"{m.size} bytes, the file ends at {size_on_disk}; rewrite the shard")
                key, ext = base_plus_ext(m.name)
                if key is None or ext is None:
                    continue
                ext = ext.lower()
                if key not in images and key not in labels:
                    order.append(key)
                if "." + ext in IMAGE_EXTS:
                    images[key] = (m.offset_data, m.size)
                elif ext == "cls":
                    f = tf.extractfile(m)
                    text = f.read().decode().strip() if f else ""
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise DatasetError(f"{path}: {m.name} (byte offset {m.offset_data}) holds {text[:20]!r}, not a class index") from None
                last = f"member {m.name} (byte offset {m.offset_data})"
    except tarfile.ReadError as e:
        raise DatasetError(f"{path}: truncated or corrupt shard after {last} ({e}); rewrite the shard") from None
    offsets, sizes, ys = [], [], []
    for key in order:
        if key not in images:
            continue
        if key not in labels:
            raise DatasetError(f"{path}: sample {key} has an image but no {key}.cls label")
        offsets.append(images[key][0])
        sizes.append(images[key][1])
        ys.append(labels[key])
    return offsets, sizes, ys


def _shards(root: Path, prefixes: tuple[str, ...]) -> list[str]:
    for prefix in prefixes:
        found = sorted(str(p) for p in root.glob(f"{prefix}*.tar"))
        if found:
            return found
    return []


def _patterns(root: Path) -> tuple[list[str], list[str]]:
    """The shard lists of DIR/shards.json: brace patterns (webdataset's, via braceexpand) expanded, each shard present."""
    import json

    from braceexpand import braceexpand

    f = root / "shards.json"
    try:
        spec = json.loads(f.read_text())
        lists = [[str(root / p) for p in braceexpand(spec[split])] for split in ("train", "test")]
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{f} must hold {{\"train\": PATTERN, \"test\": PATTERN}} ({type(e).__name__}: {e})") from None
    for shards in lists:
        missing = [p for p in shards if not os.path.isfile(p)]
        if missing:
            raise DatasetError(f"{f}: {len(missing)} of its {len(shards)} shards are missing ({missing[0]}, ...)")
    return lists[0], lists[1]


def _load_webdataset(root: Path) -> RawDataset:
    if not root.is_dir():
        raise DatasetError(f"webdataset root {root} is not a folder; expected {WDS_LAYOUT}")
    if (root / "shards.json").is_file():
        train, test = _patterns(root)
    else:
        train, test = _shards(root, ("train",)), _shards(root, ("val", "test"))
    if not train or not test:
        raise DatasetError(f"webdataset root {root} has no {'train' if not train else 'val/test'} shards; expected {WDS_LAYOUT}")
    sets = []
    for shards in (train, test):
        paths: list[str] = []
        offsets: list[int] = []
        sizes: list[int] = []
        ys: list[int] = []
        for shard in shards:
            o, s, y = _index_shard(shard)
            paths += [shard] * len(o)
            offsets += o
            sizes += s
            ys += y
        if not ys:
            raise DatasetError(f"webdataset shards {shards[0]}... hold no image samples; expected {WDS_LAYOUT}")
        sets.append(StreamSet(tuple(paths), torch.tensor(offsets, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64),
                              torch.tensor(ys, dtype=torch.int64), EvalTransform("native")))
    names_file = root / "classes.txt"
    classes = names_file.read_text().split("\n") if names_file.is_file() else []
    classes = [c for c in classes if c.strip()] or [str(i) for i in range(int(sets[0].y.max()) + 1)]
    return _raw(root, sets[0], sets[1], classes, size=224)


register_dataset("webdataset")(DatasetSpec(_load_webdataset, None, f"Point --data-root at {WDS_LAYOUT}."))
