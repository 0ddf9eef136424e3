"""What every protocol plugin shares: its call context, accuracy and interval helpers, transfer data.

A protocol is `fn(encoder, data, cfg, seed, ctx) -> list[Row]`: `encoder` is frozen (fine-tuning
protocols train `encoder.trainable_copy()`), `data` is the pretraining dataset's splits, `cfg` the
protocol's frozen config dataclass, `ctx` where files may be written and whether to show progress.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from benchmark.config import DataConfig
from benchmark.data.colour import convert_channels
from benchmark.data.datasets import load_splits
from benchmark.data.sets import Images, ImageSet, Splits, resize
from benchmark.data.stream import EvalTransform, StreamSet
from benchmark.store.io import atomic_write_text
from benchmark.store.predictions import rescore, single_label
from benchmark.store.results import Row


@dataclass(frozen=True)
class EvalContext:
    """Where a protocol may write shared artifacts (split files) and how it reports progress."""

    out: Path | None = None  # results root; split files go to out/"splits" (None: nothing is written)
    progress: bool = False  # tqdm bars for long protocols
    device: torch.device = torch.device("cpu")  # where trainable copies are trained


NO_CONTEXT = EvalContext()  # the default `ctx` of a protocol called outside the runner (tests, notebooks)


def topk_accuracy(scores: Tensor, y: Tensor, k: int) -> float:
    """Fraction of rows of `scores` (N, K) whose top-k classes contain `y` (N,)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return float((top == y.view(-1, 1)).any(dim=1).float().mean())


def classification_rows(scores: Tensor, y: Tensor, suffix: str = "", **row: object) -> list[Row]:
    """The test rows every single-label classification protocol reports from its scores (N, K): top1, top5 (more
    than 5 classes), and `mean_class_acc` (for imbalanced test sets); `suffix` tags the metric names (`_1pct`,
    `_res4`), `row` the remaining `Row` fields (selection, n_train, extra, split).

    The values are computed from the per-sample predictions that test rows carry (`Row.samples`), so a stored set
    re-scores its rows exactly; every accuracy reads one `topk` ranking (at tied scores an argmax may pick another of
    the tied classes)."""
    p = single_label(scores, y)
    names = ["top1", *(["top5"] if scores.shape[1] > 5 else []), "mean_class_acc"]
    samples = p if row.get("split", "test") == "test" else None
    return [Row(f"{m}{suffix}", rescore(p, m), samples=samples, **row) for m in names]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Spread:
    """Summary of repeated draws or episodes of one protocol: mean, sample std, min, max, 95% CI half-width."""

    mean: float
    std: float
    min: float
    max: float
    ci95: float
    n: int


def spread(values: list[float] | Tensor) -> Spread:
    """Mean ± 1.96·std/√n (ssl-transfer's few-shot interval); std uses n-1 (0 for a single value)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    n = len(v)
    std = float(v.std(unbiased=True)) if n > 1 else 0.0
    return Spread(float(v.mean()), std, float(v.min()), float(v.max()), 1.96 * std / math.sqrt(n), n)


def to_channels(images: Images, channels: int) -> Images:
    """Grey -> RGB by repeating the channel, RGB -> grey by the ITU-R 601 luma weights (a streamed set: decoded so)."""
    if isinstance(images, StreamSet):
        return images.with_channels(channels)
    return ImageSet(convert_channels(images.x, channels), images.y)


def transfer_splits(name: str, target: Splits, data: DataConfig | None = None) -> Splits:
    """Dataset `name` adapted to the encoder's input (`target`'s image size and channel count).

    The encoder keeps its own normalisation (the pretraining data's mean/std), as transfer protocols do.
    """
    cfg = replace(data or DataConfig(), image_size=target.image_size)
    s = load_splits(name, cfg)
    if s.channels == target.channels:
        return s
    tr, va, te = (to_channels(x, target.channels) for x in (s.train, s.val, s.test))
    return replace(s, train=tr, val=va, test=te, fingerprint=f"{s.fingerprint}-c{target.channels}")


def resized(images: Images, size: int) -> Images:
    if images.image_size == size:
        return images
    if isinstance(images, StreamSet):
        return images.with_transform(EvalTransform.named("resize", size) if images.transform.kind != "resize_crop"
                                     else EvalTransform.named("resize_crop", size))
    return resize(images, size)


def class_balanced_fraction(y: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of round(fraction·N) samples (at least one per class), class-balanced, fixed by `seed`."""
    from benchmark.data.sets import balanced_subset

    classes = int(y.max()) + 1 if len(y) else 0
    n = max(classes, round(fraction * len(y)))
    return balanced_subset(y, n, torch.Generator().manual_seed(seed))


def save_subset_file(ctx: EvalContext, data: Splits, tag: str, ids: Tensor, of: str = "train") -> Path | None:
    """Write a subset (indices into `data.train`, or what `of` names) to out/splits/<dataset>-<fingerprint>-<tag>.json, once.

    An existing file with different indices means the draw is not reproducible: that is an error.
    """
    if ctx.out is None:
        return None
    path = Path(ctx.out) / "splits" / f"{data.name}-{data.fingerprint}-{tag}.json"
    info = {"dataset": data.name, "fingerprint": data.fingerprint, "subset": tag, "of": of,
            "n": len(ids), "ids": [int(i) for i in ids], "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("ids") != info["ids"]:
            raise RuntimeError(f"split file {path} holds a different draw than this run made; delete it to redraw")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(info))
    return path
