"""Dataset trees the streaming tests write for themselves from real images (Fashion-MNIST): an ImageFolder tree, the
ILSVRC2012 layout (class folders, or a flat val/ with LOC_val_solution.csv or the devkit), and WebDataset shards."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.data.readers import read_idx

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def fmnist(n_per_class: int) -> list[tuple[np.ndarray, int]]:
    """`n_per_class` real 28x28 images of each of the 10 classes, in class order."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    x = read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    y = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    return [(x[i], c) for c in range(10) for i in np.nonzero(y == c)[0][:n_per_class]]


def jpeg(img: np.ndarray, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert("RGB").resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def imagefolder(root: Path, n_train: int = 24, n_val: int = 8, size: int = 48, classes: list[str] | None = None,
                val: str = "val") -> Path:
    """root/train/<class>/NNNN.jpg and root/<val>/<class>/NNNN.jpg; class i draws Fashion-MNIST class i % 10."""
    names = classes or [f"class{c}" for c in range(10)]
    per = max(1, -(-len(names) // 10))
    pool = fmnist((n_train + n_val) * per)
    by_class: dict[int, list[np.ndarray]] = {}
    for img, c in pool:
        by_class.setdefault(c, []).append(img)
    for i, name in enumerate(names):
        imgs = by_class[i % 10][(i // 10) * (n_train + n_val):][: n_train + n_val]
        for j, img in enumerate(imgs):
            d = root / ("train" if j < n_train else val) / name
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{name}_{j:04d}.JPEG").write_bytes(jpeg(img, size))
    return root


def wnids(n: int) -> list[str]:
    return [f"n{10000000 + 7919 * i:08d}" for i in range(n)]


def flatten_val(root: Path, how: str) -> None:
    """Move val/<wnid>/*.JPEG to a flat val/ of ILSVRC2012_val_NNNNNNNN.JPEG with its ground truth (`how`: "loc"
    for LOC_val_solution.csv, "devkit" for the devkit's ground-truth file and meta.mat)."""
    files = sorted((root / "val").glob("*/*.JPEG"))
    labels = []
    for i, p in enumerate(files):
        labels.append(p.parent.name)
        p.rename(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    for d in (root / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    if how == "loc":
        lines = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4" for i, w in enumerate(labels)]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    else:
        from scipy.io import savemat

        ids = sorted(set(labels), reverse=True)  # ILSVRC2012_IDs in an order other than the sorted wnids
        devkit = root / "ILSVRC2012_devkit_t12" / "data"
        devkit.mkdir(parents=True)
        synsets = np.array([(i + 1, w) for i, w in enumerate(ids)], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
        savemat(str(devkit / "meta.mat"), {"synsets": synsets})
        (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(str(ids.index(w) + 1) for w in labels) + "\n")


def shards(images: Path, out: Path, per_shard: int = 100) -> Path:
    """WebDataset shards out/train-NNNNNN.tar and out/val-NNNNNN.tar holding the images of an ImageFolder tree
    `images`, in its listing order (sorted classes, sorted files), with their class indices as KEY.cls."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(d.name for d in (images / "train").iterdir())
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    for split in ("train", "val"):
        files = [(p, i) for i, c in enumerate(classes) for p in sorted((images / split / c).glob("*.JPEG"))]
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for p, label in files:
                sink.write({"__key__": f"{p.parent.name}/{p.stem}", "jpg": p.read_bytes(), "cls": str(label).encode()})
    return out
