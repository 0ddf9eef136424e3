"""Per-sample test predictions beside each evaluation record, and the paired test that compares two rows on them.

A protocol's test rows carry the predictions they were scored from (`Predictions`: the true classes and the top-5
classes per image, or for multi-label data the VOC targets and every class score); the runner writes them as
`<record>.samples.npz` next to the record's JSON (lm-eval's `--log_samples`), so a row can be re-scored (`rescore`)
and two rows compared image by image without rerunning: `paired_bootstrap` resamples the test images, the same draw
for both sides and every seed, and `holm` corrects a column's p-values for its number of pairs. The VOC AP the svm
protocols report lives here too (`average_precision`), so that a stored set re-scores with the protocol's own code.
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmark.store.io import atomic_write_bytes

log = logging.getLogger(__name__)

# the metrics a `Predictions` re-scores; a row's metric is a base plus a suffix (`top1_1pct`, `map_res4`)
BASES = ("mean_class_acc", "top1", "top5", "map")
KINDS = ("single", "multilabel")
PARTS = ("y", "top", "scores")


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value; a set is compared by identity
class Predictions:
    """One protocol's test predictions, N images of K classes.

    kind "single": y (N,) int64 true classes; top (N, k) int32 classes by descending score, k = min(5, K);
        scores (N, k) float32, the scores of those classes (float32, not float16: kNN vote scores reach
        k·exp(1/T) ≈ 3e7, past float16's 65504; no metric reads them).
    kind "multilabel": y (N, K) int8 targets, 1 present, 0 absent, -1 difficult (as the svm protocols score them);
        top as above; scores (N, K) every class score, float32 where that keeps each class's labels in the same rank
        order (VOC AP depends only on it), else float64 (a float32 cast merges a pair of neighbouring decision
        values in about half the classes of 5,000 test images; a pair of two labels in the wrong order moves AP).
    """

    kind: str
    y: np.ndarray
    top: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Predictions.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


def _top(scores: Tensor) -> tuple[Tensor, Tensor]:
    """(values, classes) of the min(5, K) best classes per row, where the scores are (so rows and stored sets agree:
    every metric is computed from these classes)."""
    s = scores.detach()
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()  # exact upcast, same order
    val, idx = s.topk(min(5, s.shape[1]), dim=1)
    return val.cpu(), idx.cpu()


def single_label(scores: Tensor | np.ndarray, y: Tensor | np.ndarray) -> Predictions:
    """From class scores (N, K) and true classes (N,)."""
    val, idx = _top(torch.as_tensor(scores))
    y_ = torch.as_tensor(y).detach().cpu().numpy().astype(np.int64)
    return Predictions("single", y_, idx.numpy().astype(np.int32), val.float().numpy())


def multilabel(scores: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> Predictions:
    """From class scores (N, K) and targets (N, K) in {1, 0, -1 (difficult)}."""
    s = torch.as_tensor(scores).detach()
    _, idx = _top(s)
    t = torch.as_tensor(targets).detach().cpu().numpy()
    if t.shape != tuple(s.shape) or not np.isin(t, (-1, 0, 1)).all():
        raise ValueError(f"multi-label targets must be (N, K) = {tuple(s.shape)} in {{1, 0, -1}}, got {t.shape}")
    y = t.astype(np.int8)
    return Predictions("multilabel", y, idx.numpy().astype(np.int32), _ranking_dtype(s.cpu().numpy(), y))


def _ranking_dtype(s: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`s` as float32 when every class keeps its sequence of labels in rank order (then every AP, of the full set or
    of a resample, is the same: rounding is monotone and only merges neighbours, and two merged neighbours of one
    label may swap freely), else as float64."""
    s32 = s.astype(np.float32)
    if s.dtype in (np.float16, np.float32):
        return s32
    same = all(np.array_equal(_rank(s[:, c], targets[:, c])[1], _rank(s32[:, c], targets[:, c])[1])
               for c in range(targets.shape[1]))
    return s32 if same else s.astype(np.float64)


def base_metric(metric: str) -> str:
    """The base a row's metric is scored by, its longest known prefix: `top1_1pct` -> `top1`, `map_res4` -> `map`."""
    for base in sorted(BASES, key=len, reverse=True):
        if metric == base or metric.startswith(base + "_"):
            return base
    return metric


# --------------------------------------------------------------------------- metrics on weighted samples
# Every metric is computed on counts w (B, N): how often each test image is drawn in each of B resamples. The full
# test set is w = 1 (the row's value); a bootstrap resample is the bincount of its drawn indices.


def _weighted_ap(hits: np.ndarray, w: np.ndarray) -> np.ndarray:
    """VOC AP per row of w. hits (N,) bool: positives in rank order (best first, difficult dropped); w (B, N) counts in
    the same order. Area under the monotone precision envelope: each drawn positive adds w/N_pos of recall at the
    best precision reached at or after it (copies of one image are its own consecutive points, as unmerged ties)."""
    tp = np.cumsum(w * hits, axis=1)
    seen = np.cumsum(w, axis=1)
    point = hits & (w > 0)  # only drawn positives are points of the curve; the others cannot raise the envelope
    precision = np.where(point, tp / np.maximum(seen, 1), 0.0)
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    n_pos = tp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ap: np.ndarray = np.where(n_pos > 0, (w * hits * envelope).sum(axis=1) / n_pos, np.nan)
    return ap


def _rank(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept images in rank order, hits in that order) of one class: as VISSL's `svm_utils/evaluate.py`, difficult
    (-1) images are dropped, labels > 0 are positives and images are ranked by a stable ascending sort of the scores,
    reversed, so tied scores are not merged but ordered by descending index."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")[::-1]
    order = order[np.asarray(labels)[order] != -1]
    return order, np.asarray(labels)[order] > 0


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """VOC-style AP of one class, VISSL's: area under the monotone precision envelope of the P/R curve.

    Args:
        scores: (N,) decision values.
        labels: (N,) 1 = positive, 0 = negative, -1 = ignored ("difficult").
    Returns:
        AP in [0, 1]; NaN when no positive remains.
    """
    order, hits = _rank(scores, labels)
    return float(_weighted_ap(hits, np.ones((1, len(order))))[0])


def _nanmean(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries (NaN where none), without numpy's empty-slice warning."""
    ok = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: np.ndarray = np.where(ok, x, 0.0).sum(axis=-1) / ok.sum(axis=-1)
    return out


def _class_aps(scores: np.ndarray, targets: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """counts (B, N) -> per-class AP (B, K); the rankings are computed once."""
    ranked = [_rank(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]

    def aps(w: np.ndarray) -> np.ndarray:
        return np.stack([_weighted_ap(hits, w[:, order]) for order, hits in ranked], axis=1)

    return aps


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """(mAP over classes that have a test positive, per-class AP (K,) with NaN for the others)."""
    aps = _class_aps(np.asarray(scores), np.asarray(targets))(np.ones((1, len(scores))))[0]
    return float(_nanmean(aps)), aps


def _classes(p: Predictions) -> np.ndarray:
    """(N,) true classes: `y` itself, or the one positive of each multi-label target row."""
    if p.kind == "single":
        return p.y
    if not ((p.y == 1).sum(axis=1) == 1).all() or (p.y == -1).any():
        raise ValueError("top-k accuracy needs one positive per image; these multi-label targets have several")
    classes: np.ndarray = p.y.argmax(axis=1).astype(np.int64)
    return classes


def _scorer(p: Predictions, base: str) -> Callable[[np.ndarray], np.ndarray]:
    """counts (B, N) -> the metric `base` on each of the B weightings of the test images."""
    if base == "map":
        if p.kind != "multilabel":
            raise ValueError("map needs the full class scores of a multi-label prediction set (kind 'multilabel')")
        aps = _class_aps(p.scores, p.y)
        return lambda w: _nanmean(aps(w))
    if base not in BASES:
        raise ValueError(f"per-sample predictions re-score {', '.join(BASES)}, not {base!r}")
    y = _classes(p)
    k = 5 if base == "top5" else 1
    hit = (p.top[:, :k] == y[:, None]).any(axis=1).astype(np.float64)  # (N,)
    if base in ("top1", "top5"):
        return lambda w: (w @ hit) / w.sum(axis=1)
    onehot = np.zeros((len(y), int(y.max(initial=0)) + 1))
    onehot[np.arange(len(y)), y] = 1.0

    def recall(w: np.ndarray) -> np.ndarray:  # top-1 recall of each drawn class, averaged over those classes
        total, hits = w @ onehot, w @ (onehot * hit[:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            return _nanmean(np.where(total > 0, hits / total, np.nan))

    return recall


def rescore(p: Predictions, metric: str) -> float:
    """The row value of `metric` (or its base) recomputed from the stored predictions."""
    return float(_scorer(p, base_metric(metric))(np.ones((1, len(p.y))))[0])


# --------------------------------------------------------------------------- files


def save_samples(path: Path, sets: dict[str, Predictions]) -> None:
    """The named prediction sets as one compressed .npz (`<name>.kind`, `.y`, `.top`, `.scores`), written atomically."""
    arrays: dict[str, np.ndarray] = {}
    for name, p in sets.items():
        arrays[f"{name}.kind"] = np.array(p.kind)
        arrays.update({f"{name}.{part}": getattr(p, part) for part in PARTS})
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types the kwargs narrowly
    atomic_write_bytes(path, buf.getvalue())


def load_samples(path: Path) -> dict[str, Predictions]:
    with np.load(path, allow_pickle=False) as z:
        names = sorted({k.rsplit(".", 1)[0] for k in z.files})
        return {n: Predictions(str(z[f"{n}.kind"]) if f"{n}.kind" in z.files else "single",
                               *(z[f"{n}.{part}"] for part in PARTS)) for n in names}


def samples_path(record_path: Path) -> Path:
    """Where a record's predictions go: `x.json` -> `x.samples.npz`."""
    return record_path.with_suffix(".samples.npz")


def record_samples(record: dict[str, Any], record_path: Path) -> dict[str, Predictions]:
    """Row metric -> its stored predictions, for a record read from `record_path` ({} when it stored none; a missing
    or unreadable file is warned about)."""
    meta = record.get("samples")
    if not isinstance(meta, dict) or not isinstance(meta.get("file"), str):
        return {}
    path = record_path.parent / meta["file"]
    try:
        sets = load_samples(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("per-sample predictions of %s unreadable (%s): no paired tests for its rows", record_path, e)
        return {}
    metrics = meta.get("metrics")
    return {m: sets[s] for m, s in (metrics.items() if isinstance(metrics, dict) else ()) if s in sets}


# --------------------------------------------------------------------------- paired test


@dataclass(frozen=True)
class Paired:
    """A paired comparison of two rows: the difference a - b, its 95% bootstrap interval and two-sided p-value."""

    delta: float
    low: float
    high: float
    p: float
    n: int  # test images
    n_boot: int


def _same_test_set(sets: Sequence[Predictions]) -> None:
    first = sets[0]
    for p in sets[1:]:
        if p.kind != first.kind or p.y.shape != first.y.shape or not np.array_equal(p.y, first.y):
            raise ValueError("paired test on different test sets: the true labels differ (another subset, order or "
                             "dataset)")


def paired_bootstrap(a: Sequence[Predictions], b: Sequence[Predictions], metric: str, n_boot: int = 1000, seed: int = 0,
                     chunk: int = 200) -> Paired:
    """Paired bootstrap over test images of (mean over a's seeds) - (mean over b's seeds) of `metric`.

    Each resample draws N image indices with replacement and scores every seed of both sides on the same draw,
    `chunk` resamples at a time. The interval is the 2.5/97.5 percentiles of the resampled differences; the p-value is
    two-sided, min(1, 2 min((1 + #{d <= 0}) / (B + 1), (1 + #{d >= 0}) / (B + 1))). Raises ValueError when the sides
    were not scored on the same test images."""
    if not a or not b:
        raise ValueError("paired_bootstrap needs at least one prediction set per side")
    _same_test_set([*a, *b])
    base, n = base_metric(metric), len(a[0].y)
    score_a, score_b = [_scorer(p, base) for p in a], [_scorer(p, base) for p in b]

    def diff(w: np.ndarray) -> np.ndarray:
        d: np.ndarray = np.mean([s(w) for s in score_a], axis=0) - np.mean([s(w) for s in score_b], axis=0)
        return d

    delta = float(diff(np.ones((1, n)))[0])
    rng = np.random.default_rng(seed)
    d = []
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        counts = np.bincount((np.arange(m)[:, None] * n + idx).ravel(), minlength=m * n).reshape(m, n)
        d.append(diff(counts.astype(np.float64)))
    ds = np.concatenate(d)
    low, high = np.percentile(ds, [2.5, 97.5])
    p = min(1.0, 2 * min((1 + int((ds <= 0).sum())) / (n_boot + 1), (1 + int((ds >= 0).sum())) / (n_boot + 1)))
    return Paired(delta, float(low), float(high), p, n, n_boot)


def holm(p: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: the i-th smallest times (m - i), made monotone, capped
    at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [math.nan] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
