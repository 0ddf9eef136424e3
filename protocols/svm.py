"""Linear SVMs on frozen features: the VOC07 protocol of Goyal et al. 2019 as VISSL runs it (docs/protocols.md#svm).

Goyal, Mahajan, Gupta, Misra, "Scaling and Benchmarking Self-Supervised Visual Representation Learning",
ICCV 2019, https://arxiv.org/abs/1905.01235; code: facebookresearch/fair_self_supervision_benchmark
`tools/svm/{train_svm_kfold,test_svm,svm_helper}.py`; VISSL `vissl/utils/svm_utils/{svm_trainer,evaluate}.py`
with `configs/config/benchmark/linear_image_classification/voc07/eval_resnet_8gpu_transfer_voc07_svm.yaml`.

One binary LinearSVC per class (one-vs-rest, labels +1/-1, "difficult" samples are negatives) on
L2-normalised train+val features. Each class picks its own cost C by k-fold cross-validated average
precision on train+val, is refit there with it, and scores the test set once. Reported: `map`, the mean
over classes of VOC-style AP (difficult test samples excluded from their class), plus `top1` (argmax over
the class scores) for single-label data, and a `val` row holding the mean of the selected CV APs.
Variants: `svm` (VISSL), `svm_goyal` (Goyal's script), `svm_mmselfsup` (mmselfsup's `eval_svm_full.sh`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from joblib import Parallel, delayed

from benchmark.config import check, hashed_if_set, nohash
from benchmark.data.sets import Splits
from benchmark.evaluate.encoder import Encoder, split_features
from benchmark.evaluate.layers import GOYAL_DIMS, check_layers, layer_encoders
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext
from benchmark.registry import register_protocol
from benchmark.store.predictions import Predictions, mean_average_precision, multilabel, rescore
from benchmark.store.predictions import average_precision as average_precision
from benchmark.store.results import Row

log = logging.getLogger(__name__)

VISSL_COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)
# Goyal's and mmselfsup's `svm_helper.parse_cost_list` append 0.5**4 ... 0.5**19 to the costs given on the command line
_HALVES = tuple(0.5**p for p in range(4, 20))
GOYAL_COSTS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0) + _HALVES
MMSELFSUP_COSTS = (1.0, 10.0, 100.0) + _HALVES


@dataclass(frozen=True)
class Config:
    costs: tuple[float, ...] = VISSL_COSTS  # VISSL voc07 svm yaml `costs_list`; per-class choice by CV AP
    folds: int = 3  # VISSL `cross_val_folds: 3`; Goyal/mmselfsup `cross_val_score(cv=3)`
    class_weight_pos: float = 2.0  # LinearSVC class_weight={1: 2, -1: 1} in all three anchors
    l2_normalize: bool = True  # features / (||f|| + 1e-5): VISSL `normalize: True`, Goyal/mmselfsup `normalize_features`
    max_iter: int = 2000  # LinearSVC max_iter in all three anchors
    tol: float = 1e-4  # LinearSVC tol in all three anchors
    dual: bool = True  # liblinear dual coordinate descent, as all three anchors
    n_jobs: int = nohash(1)  # joblib workers over classes (results do not depend on it)
    # probed layers, one set of rows each (metric suffix _<layer>): out = the encoder's output; conv1, res2..res5
    # (ResNets), block1..block4 (ConvNet), last<k> (ViTs: class tokens of the last k blocks); benchmark/evaluate/layers.py
    layers: tuple[str, ...] = hashed_if_set(("out",))
    layer_dims: int = hashed_if_set(GOYAL_DIMS)  # values a stage map is average-pooled to (Goyal et al. 2019: ~9k)

    name: ClassVar[str] = "svm"  # the registry name used in validation messages

    def __post_init__(self) -> None:
        n = self.name
        check(len(self.costs) > 0, f"{n}.costs must hold at least one cost")
        check(all(np.isfinite(c) and c > 0 for c in self.costs), f"{n}.costs must all be finite and > 0, got {self.costs}")
        check(self.folds >= 2, f"{n}.folds must be >= 2, got {self.folds}")
        check(self.class_weight_pos > 0, f"{n}.class_weight_pos must be > 0, got {self.class_weight_pos}")
        check(self.max_iter > 0, f"{n}.max_iter must be > 0, got {self.max_iter}")
        check(self.tol > 0, f"{n}.tol must be > 0, got {self.tol}")
        check(self.n_jobs != 0, f"{n}.n_jobs must be a positive worker count or -1 (all cores), got 0")
        check_layers(n, self.layers, self.layer_dims)


# --------------------------------------------------------------------------- metrics
# VOC AP (`average_precision`, `mean_average_precision`) lives in benchmark/store/predictions.py, so that the stored
# test predictions re-score with this very code; `average_precision` stays importable from here.


def class_targets(y: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """(N, K) int array with 1 = present, 0 = absent, -1 = difficult, from (N,) class ids or multi-label (N, K) y."""
    y = np.asarray(y)
    if y.ndim == 2:
        return y.astype(np.int64)
    out = np.zeros((len(y), num_classes), dtype=np.int64)
    out[np.arange(len(y)), y] = 1
    return out


# --------------------------------------------------------------------------- fitting


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by (L2 norm + 1e-5), as VISSL and Goyal's `normalize_features`."""
    out: np.ndarray = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)
    return out


def linear_svc(C: float, cfg: Config, seed: int):  # type: ignore[no-untyped-def]  # sklearn is untyped
    """The anchors' LinearSVC at cost C; `random_state` fixes liblinear's coordinate order (anchors: unseeded)."""
    from sklearn.svm import LinearSVC

    return LinearSVC(C=C, class_weight={1: cfg.class_weight_pos, -1: 1.0}, loss="squared_hinge", penalty="l2", dual=cfg.dual,
                     tol=cfg.tol, max_iter=cfg.max_iter, intercept_scaling=1.0, random_state=seed)


@dataclass(frozen=True)
class ClassFit:
    """One class's SVM: w (D,), b, the cost used, mean CV AP per cost (None: not cross-validated)."""

    w: np.ndarray
    b: float
    cost: float
    cv_ap: np.ndarray | None
    folds: int  # folds used for CV (0: none)
    not_converged: int  # liblinear fits that hit max_iter (CV folds included)


def _fit(x: np.ndarray, t: np.ndarray, C: float, cfg: Config, seed: int) -> tuple[np.ndarray, float, bool]:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svc = linear_svc(C, cfg, seed).fit(x, t)
    missed = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return svc.coef_.ravel().copy(), float(svc.intercept_[0]), missed


def cv_average_precision(x: np.ndarray, t: np.ndarray, cfg: Config, seed: int, folds: int) -> tuple[np.ndarray, int]:
    """Mean AP over `folds` stratified folds for every cost in `cfg.costs`; returns (APs (n_costs,), non-converged fits).

    Scored with scikit-learn's `average_precision_score` (non-interpolated), as the anchors'
    `cross_val_score(..., scoring="average_precision")` does; folds are shuffled with `seed`.
    """
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold

    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, t))
    aps, missed = np.zeros(len(cfg.costs)), 0
    for j, C in enumerate(cfg.costs):
        fold_ap = []
        for tr, te in splits:
            w, b, m = _fit(x[tr], t[tr], C, cfg, seed)
            missed += m
            fold_ap.append(average_precision_score(t[te], x[te] @ w + b))
        aps[j] = float(np.mean(fold_ap))
    return aps, missed


def fit_class(x: np.ndarray, t: np.ndarray, cfg: Config, seed: int, fallback_cost: float | None = None) -> ClassFit:
    """Select C by CV AP (first best in `cfg.costs` order on ties) and refit on all of (x, t).

    Args:
        x: (N, D) float64 features; t: (N,) +1/-1 targets.
        fallback_cost: used when a class has a single positive (CV impossible); None raises instead.
    Folds are min(cfg.folds, positives, negatives); a single cost skips CV.
    """
    n_pos, n_neg = int((t == 1).sum()), int((t == -1).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"svm: a class has {n_pos} positives and {n_neg} negatives in training; both are needed")
    folds = min(cfg.folds, n_pos, n_neg)
    cv_ap, missed = None, 0
    if len(cfg.costs) == 1:
        cost, folds = cfg.costs[0], 0
    elif folds < 2:
        if fallback_cost is None:
            raise ValueError(f"svm: a class has {n_pos} positive(s) in train+val; cross-validation needs at least 2")
        cost, folds = fallback_cost, 0
    else:
        cv_ap, missed = cv_average_precision(x, t, cfg, seed, folds)
        cost = cfg.costs[int(np.argmax(cv_ap))]
    w, b, m = _fit(x, t, cost, cfg, seed)
    return ClassFit(w, b, float(cost), cv_ap, folds, missed + m)


def fit_classes(x: np.ndarray, targets: np.ndarray, cfg: Config, seed: int, rows: list[np.ndarray] | None = None,
                fallback_cost: float | None = None) -> list[ClassFit]:
    """One `fit_class` per column of `targets` (N, K) (1 -> +1; 0 and -1 "difficult" -> -1), in parallel.

    `rows[c]`, when given, selects the training samples of class c (low-shot draws differ per class).
    """
    def job(c: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rows[c] if rows is not None else slice(None)
        return x[idx], np.where(targets[idx, c] == 1, 1, -1)

    jobs = (delayed(fit_class)(*job(c), cfg, seed, fallback_cost) for c in range(targets.shape[1]))
    fits: list[ClassFit] = Parallel(n_jobs=cfg.n_jobs)(jobs)
    return fits


def decision_values(fits: list[ClassFit], x: np.ndarray) -> np.ndarray:
    """(N, K) SVM scores x·w_c + b_c."""
    scores: np.ndarray = x @ np.stack([f.w for f in fits]).T + np.array([f.b for f in fits])
    return scores


def features_np(x: torch.Tensor, cfg: Config) -> np.ndarray:
    """Float64 numpy features (liblinear's precision, as VISSL casts), L2-normalised if `cfg` says so."""
    a = x.double().numpy()
    return l2_normalize(a) if cfg.l2_normalize else a


def predictions_on(fits: list[ClassFit], x_test: np.ndarray, y_test: torch.Tensor, num_classes: int) -> Predictions:
    """The test set's targets (N, K) and SVM scores (N, K), from which every test row is scored."""
    return multilabel(decision_values(fits, x_test), class_targets(y_test, num_classes))


def evaluate(fits: list[ClassFit], x_test: np.ndarray, y_test: torch.Tensor, num_classes: int,
             preds: Predictions | None = None) -> dict[str, float]:
    """{"map": ..., "top1", "mean_class_acc": ... (single-label only), "classes_without_positives": n} on the test set
    (scored from `preds`, `predictions_on(...)` when not given)."""
    p = preds if preds is not None else predictions_on(fits, x_test, y_test, num_classes)
    m, aps = mean_average_precision(p.scores, p.y)  # = rescore(p, "map"), by the same code
    out = {"map": m, "classes_without_positives": float(np.isnan(aps).sum())}
    if y_test.ndim == 1:
        out.update({name: rescore(p, name) for name in ("top1", "mean_class_acc")})
    return out


def describe_costs(fits: list[ClassFit]) -> str:
    c = np.array([f.cost for f in fits])
    return f"C median={np.median(c):.4g} range=[{c.min():.4g}, {c.max():.4g}]"


# --------------------------------------------------------------------------- protocol


@register_protocol("svm", config=Config, version="1", multilabel=True)
def svm(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    del ctx  # nothing written; liblinear runs on CPU
    return [row for suffix, enc in layer_encoders(encoder, cfg.layers, data.image_size, cfg.layer_dims)
            for row in _probe(enc, data, cfg, seed, suffix)]


def _probe(encoder: Encoder, data: Splits, cfg: Config, seed: int, suffix: str) -> list[Row]:
    """The rows of one layer: CV mAP (val), test mAP, and top1 / mean_class_acc for single-label data."""
    f = split_features(encoder, data)
    x = features_np(torch.cat([f["train"][0], f["val"][0]]), cfg)
    y = torch.cat([f["train"][1], f["val"][1]])
    fits = fit_classes(x, class_targets(y, data.num_classes), cfg, seed)
    x_test = features_np(f["test"][0], cfg)
    preds = predictions_on(fits, x_test, f["test"][1], data.num_classes)
    test = evaluate(fits, x_test, f["test"][1], data.num_classes, preds)
    folds = sorted({fit.folds for fit in fits})
    how = f"{'/'.join(map(str, folds))}-fold CV AP per class" if folds != [0] else "fixed"
    sel = f"{how}: {describe_costs(fits)} of {len(cfg.costs)}"
    extra = {k: int(v) for k, v in (("not_converged", sum(fit.not_converged for fit in fits)),
                                    ("classes_without_test_positives", test["classes_without_positives"])) if v}
    if extra.get("not_converged"):
        log.warning("svm: %d LinearSVC fits stopped at max_iter=%d without converging", extra["not_converged"], cfg.max_iter)
    n = len(y)
    rows = []
    if all(fit.cv_ap is not None for fit in fits):
        cv_map = float(np.mean([fit.cv_ap.max() for fit in fits if fit.cv_ap is not None]))
        rows.append(Row(f"map{suffix}", cv_map, split="val", selection=sel, n_train=n, extra=extra))
    rows += [Row(f"{m}{suffix}", test[m], selection=sel, n_train=n, extra=extra, samples=preds)
             for m in ("map", "top1", "mean_class_acc") if m in test]
    return rows


@dataclass(frozen=True)
class GoyalConfig(Config):
    """Goyal'19 `train_svm_kfold.py` as run in GETTING_STARTED.md: 10 listed costs plus the 16 halves its
    `parse_cost_list` appends (26 in all); its scripts L2-normalise too (`svm_helper.normalize_features`)."""

    costs: tuple[float, ...] = GOYAL_COSTS
    name: ClassVar[str] = "svm_goyal"


@dataclass(frozen=True)
class MMSelfSupConfig(Config):
    """mmselfsup `eval_svm_full.sh`: costs "1.0,10.0,100.0" plus the same appended halves; 3-fold CV; L2-normalised."""

    costs: tuple[float, ...] = MMSELFSUP_COSTS
    name: ClassVar[str] = "svm_mmselfsup"


register_protocol("svm_goyal", config=GoyalConfig, version="1", multilabel=True)(svm)
register_protocol("svm_mmselfsup", config=MMSelfSupConfig, version="1", multilabel=True)(svm)
