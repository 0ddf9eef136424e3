"""Low-shot linear SVMs on frozen features: Goyal et al. 2019's VOC07 / Places205 low-shot protocol (docs/protocols.md#lowshot-svm).

Goyal et al., ICCV 2019, https://arxiv.org/abs/1905.01235; code: fair_self_supervision_benchmark
`extra_scripts/create_{voc,places}_low_shot_samples.py`, `tools/svm/{train,test}_svm_low_shot.py`,
`aggregate_low_shot_svm_stats.py`; VISSL `svm_utils/svm_low_shot_trainer.py` and
`configs/config/benchmark/low_shot_transfer/voc07/eval_resnet_8gpu_transfer_voc07_low_shot_svm.yaml`.

For each k in `k_values` and each of `draws` independent draws from train+val, the `svm` protocol's
per-class SVMs (protocols/svm.py) are trained on the draw and tested on the full test set; each k gives
`map_k{k}` (and `top1_k{k}`, `mean_class_acc_k{k}` for single-label data): the mean over draws, with std/min/max/ci95 over draws.
Single-label: k images of every class, shared by all K one-vs-rest SVMs. Multi-label (Goyal's VOC
sampling): class c's SVM sees its own k positives and (K-1)·k negatives (images without c).
Unlike the anchors, which report the cost with the best *test* mAP, C is chosen per class by CV on the
draw (folds = min(folds, positives)); with a single positive, C = `fallback_cost`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tqdm import tqdm

from benchmark.config import check
from benchmark.data.sets import Splits
from benchmark.evaluate.encoder import Encoder, split_features
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext, save_subset_file, spread
from benchmark.registry import register_protocol
from benchmark.store.results import Row
from protocols import svm as svm_protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config(svm_protocol.Config):
    """The `svm` fields (VISSL defaults, which its low-shot yaml repeats) plus the low-shot draws."""

    k_values: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96)  # Goyal / VISSL `low_shot.k_values`
    draws: int = 5  # independent samples per k: Goyal `--num_samples 5`, VISSL `sample_inds: [1..5]`
    fallback_cost: float = 1.0  # C when a class has 1 positive and CV is impossible (anchors pick C on test instead)

    name: ClassVar[str] = "lowshot_svm"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.k_values) > 0 and all(k > 0 for k in self.k_values),
              f"lowshot_svm.k_values must be a non-empty list of integers > 0, got {self.k_values}")
        check(len(set(self.k_values)) == len(self.k_values), f"lowshot_svm.k_values has duplicates: {self.k_values}")
        check(self.draws > 0, f"lowshot_svm.draws must be > 0, got {self.draws}")
        check(bool(np.isfinite(self.fallback_cost)) and self.fallback_cost > 0,
              f"lowshot_svm.fallback_cost must be finite and > 0, got {self.fallback_cost}")


def draw_generator(seed: int, k: int, draw: int) -> np.random.Generator:
    """The generator of one draw: derived from (seed, k, draw), so draws are independent and reproducible."""
    return np.random.default_rng(np.random.SeedSequence([seed, k, draw]))


def draw_single_label(y: np.ndarray, num_classes: int, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted ids of exactly k samples of each class of `y` (N,), without replacement; None if a class has fewer."""
    groups = [np.flatnonzero(y == c) for c in range(num_classes)]
    if min(len(g) for g in groups) < k:
        return None
    return np.sort(np.concatenate([rng.choice(g, size=k, replace=False) for g in groups]))


def draw_multi_label(targets: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray] | None:
    """Per class c: k ids with c present (1) then (K-1)·k ids with c absent (0), as Goyal's VOC sampler
    (`create_voc_low_shot_samples.py`); "difficult" (-1) images are never drawn. None if a class has too few."""
    n_neg = (targets.shape[1] - 1) * k
    pos = [np.flatnonzero(targets[:, c] == 1) for c in range(targets.shape[1])]
    neg = [np.flatnonzero(targets[:, c] == 0) for c in range(targets.shape[1])]
    if min(len(p) for p in pos) < k or min(len(n) for n in neg) < n_neg:
        return None
    return [np.concatenate([rng.choice(p, size=k, replace=False), rng.choice(n, size=n_neg, replace=False)])
            for p, n in zip(pos, neg)]


def draw_rows(targets: np.ndarray, y: torch.Tensor, k: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray] | None:
    """(training ids per class, ids to save) of one draw; the saved ids are all classes' blocks concatenated."""
    if y.ndim == 1:
        ids = draw_single_label(y.numpy(), targets.shape[1], k, rng)
        return None if ids is None else ([ids] * targets.shape[1], ids)
    per_class = draw_multi_label(targets, k, rng)
    return None if per_class is None else (per_class, np.concatenate(per_class))


def _k_rows(k: int, runs: list[dict[str, float]], costs: list[float], n_train: int, cfg: Config, missed: int) -> list[Row]:
    # every class's SVM sees exactly k positives, so the folds are the same for all classes and draws
    folds = min(cfg.folds, k)
    how = f"{folds}-fold CV AP per class on each draw" if folds >= 2 else f"fixed C={cfg.fallback_cost:g} (1 positive: no CV)"
    if len(cfg.costs) == 1:
        how = f"fixed C={cfg.costs[0]:g}"
    sel = f"{how}: C median={np.median(costs):.4g} of {len(cfg.costs)}; {len(runs)} draws"
    extra = {"not_converged": missed} if missed else {}
    rows = []
    for metric in ("map", "top1", "mean_class_acc"):
        if metric in runs[0]:
            s = spread([r[metric] for r in runs])
            rows.append(Row(f"{metric}_k{k}", s.mean, selection=sel, n_train=n_train, ci95=s.ci95, std=s.std, min=s.min,
                            max=s.max, extra=extra))
    return rows


@register_protocol("lowshot_svm", config=Config, version="1", multilabel=True, label_efficiency="suffix")
def lowshot_svm(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    """Saved draws (`save_subset_file`, tag `lowshot-k{k}-draw{d}-s{seed}`) index `data.trainval()` (train then val);
    for multi-label data they are K blocks of K·k ids, block c = class c's k positives then its negatives."""
    f = split_features(encoder, data)
    x = svm_protocol.features_np(torch.cat([f["train"][0], f["val"][0]]), cfg)
    y = torch.cat([f["train"][1], f["val"][1]])
    targets = svm_protocol.class_targets(y, data.num_classes)
    x_test = svm_protocol.features_np(f["test"][0], cfg)
    rows: list[Row] = []
    bar = tqdm(total=len(cfg.k_values) * cfg.draws, desc="lowshot_svm", disable=not ctx.progress, leave=False)
    for k in cfg.k_values:
        runs, costs, missed, n_train = [], [], 0, 0
        for d in range(cfg.draws):
            drawn = draw_rows(targets, y, k, draw_generator(seed, k, d))
            if drawn is None:
                log.warning("lowshot_svm: skipping k=%d: some class has fewer than k usable training samples", k)
                break
            per_class, ids = drawn
            save_subset_file(ctx, data, f"lowshot-k{k}-draw{d}-s{seed}", torch.from_numpy(ids), of="trainval")
            fits = svm_protocol.fit_classes(x, targets, cfg, seed, rows=per_class, fallback_cost=cfg.fallback_cost)
            runs.append(svm_protocol.evaluate(fits, x_test, f["test"][1], data.num_classes))
            costs += [fit.cost for fit in fits]
            missed += sum(fit.not_converged for fit in fits)
            n_train = len(np.unique(ids))
            bar.update()
        if runs:
            rows += _k_rows(k, runs, costs, n_train, cfg, missed)
    bar.close()
    return rows
