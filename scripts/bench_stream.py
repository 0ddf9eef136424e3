"""Benchmarks of the streamed data path (issue 19): commands that print figures, not tests.

    python scripts/bench_stream.py make DIR --n 80000 --size 224     # an ImageFolder tree of real Fashion-MNIST JPEGs
    python scripts/bench_stream.py make DIR --n 4000 --size 500x375 --noise 12   # photograph-like sizes (~100 KB)
    python scripts/bench_stream.py decode DIR --images 4000 --workers 2
    python scripts/bench_stream.py memory DIR --n 20000               # peak RSS of planning + extraction + kNN + linear

`decode` times, in one run and in turn, three loaders over the same files with the same workers: this project's
streamed path (torchvision.io decode + resize 256 / centre crop 224), torchvision's ImageFolder + DataLoader with the
same transform (PIL), and bare PIL decoding (no transform: the per-core limit). `memory` runs the streamed path on
the first `--n` images of the tree (class-balanced) and prints the peak resident memory of the main process and of
the worker processes: it grows with the feature store, not with the images.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import resource
import sys
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _write(job: tuple[str, bytes, tuple[int, int], float]) -> None:
    import numpy as np
    from PIL import Image

    path, raw, (w, h), noise = job
    img = Image.frombytes("L", (28, 28), raw).convert("RGB").resize((w, h), Image.BILINEAR)
    if noise:  # texture, so that files are as large as photographs (an upscaled 28 px item compresses to a few KB)
        rng = np.random.default_rng(abs(hash(path)) % 2**32)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, (h, w, 3))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    Path(path).write_bytes(buf.getvalue())


def make(root: Path, n: int, shape: tuple[int, int], noise: float, val_fraction: float = 0.1) -> None:
    import numpy as np

    from benchmark.data.readers import read_idx

    src = Path("/usr/share/datasets/fashion-mnist")
    x = np.concatenate([read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "t10k-images-idx3-ubyte.gz")])
    y = np.concatenate([read_idx(src / "train-labels-idx1-ubyte.gz"), read_idx(src / "t10k-labels-idx1-ubyte.gz")])
    jobs = []
    for i in range(n):
        k = i % len(x)  # beyond 70,000 images the pictures repeat (as files they are distinct)
        split = "val" if i % round(1 / val_fraction) == 0 else "train"
        d = root / split / f"class{int(y[k])}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"{i:07d}.jpg"), x[k].tobytes(), shape, noise))
    t0 = time.perf_counter()
    with Pool(os.cpu_count() or 2) as pool:
        pool.map(_write, jobs, chunksize=256)
    total = sum(p.stat().st_size for p in root.rglob("*.jpg"))
    print(f"wrote {n} JPEGs of {shape[0]}x{shape[1]} px, noise {noise} ({total / 2**20:,.0f} MiB, {total / n / 1024:.0f} KiB each) "
          f"under {root} in {time.perf_counter() - t0:.0f} s")


class _BarePIL:
    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> int:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            im.convert("RGB").load()
        return 0


def _rate(batches: object, n: int) -> float:
    t0 = time.perf_counter()
    for _ in batches:  # type: ignore[attr-defined]
        pass
    return n / (time.perf_counter() - t0)


def decode(root: Path, images: int, workers: int, batch: int, rounds: int) -> None:
    import torch
    import torchvision.datasets as tvd
    import torchvision.transforms.v2 as T

    from benchmark.data.layouts import _load_imagefolder
    from benchmark.data.stream import EvalTransform

    torch.set_num_threads(1)
    raw = _load_imagefolder(root)
    s = raw.train.subset(torch.arange(min(images, len(raw.train)))).with_transform(EvalTransform.named("resize_crop", 224))
    s = dataclasses.replace(s, workers=workers)
    n = len(s)
    paths = list(s.paths)
    tv = tvd.ImageFolder(str(root / "train"), transform=T.Compose([T.PILToTensor(), T.Resize(256, antialias=True), T.CenterCrop(224)]))
    index = {p: i for i, (p, _) in enumerate(tv.samples)}
    tv_sub = torch.utils.data.Subset(tv, [index[p] for p in paths])
    kw = {"batch_size": batch, "num_workers": workers, "prefetch_factor": 4 if workers else None}
    loaders = {
        "sslbench streamed (torchvision.io decode + resize256-crop224)": lambda: s.batches(batch),
        "torchvision ImageFolder + DataLoader (PIL + Resize(256) + CenterCrop(224))": lambda: torch.utils.data.DataLoader(tv_sub, **kw),
        "bare PIL decode (no transform)": lambda: torch.utils.data.DataLoader(_BarePIL(paths), **kw),
    }
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(rounds):  # in turn, so that a change in the machine's load hits all three alike
        for name, make_loader in loaders.items():
            rates[name].append(_rate(make_loader(), n))
    print(f"decode at 224 px: {n} JPEGs from {root}, {workers} workers, batch {batch}, median of {rounds} rounds in turn "
          f"(torch threads 1 per worker; {os.cpu_count()} CPUs)")
    bare = sorted(rates["bare PIL decode (no transform)"])[rounds // 2]
    for name, r in rates.items():
        med = sorted(r)[rounds // 2]
        print(f"  {med:8.0f} images/s  ({med / bare:5.2f}x bare decode)  {name}   [{', '.join(f'{v:.0f}' for v in r)}]")


def memory(root: Path, n: int, workers: int) -> None:
    import torch

    import protocols  # noqa: F401  (registers the protocols)
    from benchmark.config import DataConfig
    from benchmark.data.datasets import load_splits
    from benchmark.evaluate.encoder import FrozenEncoder
    from benchmark.evaluate.protocol import EvalContext
    from benchmark.registry import PROTOCOLS

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    full = len(list((root / "train").rglob("*.jpg"))) + len(list((root / "val").rglob("*.jpg")))
    cfg = DataConfig(root=str(root), storage="stream", workers=workers, image_size=224,
                     train_size=round(n * 0.9) if n < full else None, test_size=round(n * 0.1) if n < full else None)
    splits = load_splits("imagefolder", cfg)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.AvgPool2d(7), torch.nn.Conv2d(3, 32, 3, stride=2), torch.nn.ReLU(),
                                 torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())  # 128-d: the bound is the data path
    cache = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-stream-features-{n}"
    enc = FrozenEncoder(module, 128, splits.mean, splits.std, key=f"bench{n}", cache_dir=cache, batch_size=256,
                        feature_dtype="float16", shard_rows=8192)
    timings = {}
    for proto in ("knn", "linear"):
        t = time.perf_counter()
        rows = PROTOCOLS.get(proto)(enc, splits, PROTOCOLS.default_config(proto), 0, EvalContext())
        timings[proto] = (time.perf_counter() - t, rows[0].value)
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    images = len(splits.train) + len(splits.val) + len(splits.test)
    print(f"memory, {images} images at 224 px streamed ({splits.storage}, {splits.transform}); decoded they would take "
          f"{images * 3 * 224 * 224 / 2**30:.1f} GiB; features {images} x 128 float16 = {images * 128 * 2 / 2**20:.1f} MiB")
    print(f"  peak RSS: main process {self_mb:,.0f} MiB, largest worker {kids_mb:,.0f} MiB; "
          + ", ".join(f"{k} {v[0]:.0f} s (top1 {v[1]:.4f})" for k, v in timings.items())
          + f"; {time.perf_counter() - t0:.0f} s in all")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("root", type=Path)
    m.add_argument("--n", type=int, default=80_000)
    m.add_argument("--size", default="224", help="SIDE or WIDTHxHEIGHT (ImageNet's typical photo: 500x375)")
    m.add_argument("--noise", type=float, default=0.0, help="Gaussian texture (std in grey levels): photograph-sized files")
    d = sub.add_parser("decode")
    d.add_argument("root", type=Path)
    d.add_argument("--images", type=int, default=4000)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--batch", type=int, default=256)
    d.add_argument("--rounds", type=int, default=3)
    r = sub.add_parser("memory")
    r.add_argument("root", type=Path)
    r.add_argument("--n", type=int, default=20_000)
    r.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    if a.cmd == "make":
        w, _, h = a.size.partition("x")
        make(a.root, a.n, (int(w), int(h or w)), a.noise)
    elif a.cmd == "decode":
        decode(a.root, a.images, a.workers, a.batch, a.rounds)
    else:
        memory(a.root, a.n, a.workers)


if __name__ == "__main__":
    main()
