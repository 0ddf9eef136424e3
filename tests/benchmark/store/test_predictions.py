"""Per-sample predictions: re-scoring against scikit-learn, the .npz round trip, and the paired test on known cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

from benchmark.evaluate.protocol import classification_rows
from benchmark.store.predictions import (
    Predictions,
    base_metric,
    holm,
    load_samples,
    paired_bootstrap,
    rescore,
    save_samples,
    single_label,
)


def designed(n: int, accuracy: float, seed: int, k: int = 10) -> Predictions:
    """`n` test images of `k` classes (the same for every seed), exactly round(accuracy * n) of them right, at places
    drawn with `seed`: two seeds make two models with independent errors."""
    y = np.random.default_rng(1234).integers(0, k, n)
    g = np.random.default_rng(seed)
    right = np.zeros(n, bool)
    right[g.permutation(n)[: round(accuracy * n)]] = True
    pred = np.where(right, y, (y + 1 + g.integers(0, k - 1, n)) % k)
    scores = torch.rand(n, k, generator=torch.Generator().manual_seed(seed))
    scores[torch.arange(n), torch.as_tensor(pred)] = 2.0
    return single_label(scores, torch.as_tensor(y))


def test_rescore_matches_scikit_learn_and_the_rows() -> None:
    g = torch.Generator().manual_seed(0)
    scores, y = torch.randn(500, 12, generator=g), torch.randint(0, 12, (500,), generator=g)
    rows = classification_rows(scores, y, "_1pct", selection="x")
    p = rows[0].samples
    assert p is not None and all(r.samples is p for r in rows)
    assert rescore(p, "top1") == pytest.approx(accuracy_score(y, scores.argmax(1)), abs=1e-12)
    assert rescore(p, "top5") == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=range(12)), abs=1e-12)
    assert rescore(p, "mean_class_acc") == pytest.approx(balanced_accuracy_score(y, scores.argmax(1)), abs=1e-12)
    for r in rows:
        assert rescore(p, r.metric) == pytest.approx(r.value, abs=1e-6)  # the rows are float32 means
    assert [r.samples for r in classification_rows(scores, y, split="val")] == [None] * 3  # test rows only


def test_base_metric() -> None:
    assert [base_metric(m) for m in ("top1", "top1_1pct", "top5_res4", "mean_class_acc_k2", "map")] == \
        ["top1", "top1", "top5", "mean_class_acc", "map"]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    a, b = designed(300, 0.7, 1), designed(300, 0.6, 2)
    path = tmp_path / "x.samples.npz"
    save_samples(path, {"s0": a, "s1": b})
    back = load_samples(path)
    assert set(back) == {"s0", "s1"} and list(tmp_path.iterdir()) == [path]
    for name, want in (("s0", a), ("s1", b)):
        got = back[name]
        assert got.y.dtype == np.int64 and got.top.dtype == np.int32 and got.scores.dtype == np.float16
        assert np.array_equal(got.y, want.y) and np.array_equal(got.top, want.top) and np.array_equal(got.scores, want.scores)


def test_identical_predictions_are_no_difference() -> None:
    a = designed(5000, 0.8, 0)
    r = paired_bootstrap([a], [a], "top1")
    assert r.delta == 0 and r.low == 0 and r.high == 0 and r.p == 1.0


def test_a_five_point_gap_on_5000_images_is_significant() -> None:
    a, b = designed(5000, 0.80, 0), designed(5000, 0.75, 1)
    assert rescore(a, "top1") - rescore(b, "top1") == pytest.approx(0.05)
    r = paired_bootstrap([a], [b], "top1", n_boot=1000)
    assert r.delta == pytest.approx(0.05) and 0 < r.low < 0.05 < r.high
    assert holm([r.p])[0] < 0.01
    # and the other way round, for every base metric
    for metric in ("top1", "top5", "mean_class_acc"):
        assert paired_bootstrap([b], [a], metric).p < 0.01 or metric == "top5"


def test_a_tenth_of_a_point_is_within_noise() -> None:
    a, b = designed(5000, 0.800, 0), designed(5000, 0.799, 1)  # 5 images of 5,000 apart, errors independent
    r = paired_bootstrap([a], [b], "top1")
    assert r.delta == pytest.approx(0.001) and r.p > 0.05 and r.low <= 0 <= r.high


def test_a_one_sided_handful_of_flips_is_not_noise() -> None:
    """The test is paired: b = a with 5 right images turned wrong (and none the other way) is a consistent loss,
    which an unpaired comparison of two 80% accuracies could never see."""
    a = designed(5000, 0.80, 0)
    top = a.top.copy()
    flip = np.flatnonzero(a.top[:, 0] == a.y)[:5]
    top[flip, 0] = (a.y[flip] + 1) % 10
    r = paired_bootstrap([a], [Predictions(a.y, top, a.scores)], "top1")
    assert r.delta == pytest.approx(0.001) and r.p < 0.05 and r.low > 0


def test_seeds_are_averaged_on_each_side() -> None:
    a1, a2, b = designed(2000, 0.80, 0), designed(2000, 0.70, 1), designed(2000, 0.74, 2)
    r = paired_bootstrap([a1, a2], [b], "top1")
    assert r.delta == pytest.approx(0.75 - 0.74)


def test_different_test_sets_are_refused() -> None:
    with pytest.raises(ValueError, match="different test sets"):
        paired_bootstrap([designed(100, 0.5, 0)], [designed(99, 0.5, 1)], "top1")


def test_holm_against_a_hand_worked_case() -> None:
    # sorted 0.01, 0.02, 0.04, 0.5 -> 4*0.01, 3*0.02, max(0.06, 2*0.04), max(0.08, 0.5)
    assert holm([0.04, 0.5, 0.01, 0.02]) == pytest.approx([0.08, 0.5, 0.04, 0.06])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([]) == []
