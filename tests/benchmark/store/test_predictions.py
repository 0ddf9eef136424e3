"""Per-sample predictions: re-scoring against scikit-learn and the VOC AP the svm protocol used to compute, the .npz
round trip, and the paired test on known cases."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score

from benchmark.evaluate.protocol import classification_rows
from benchmark.store.predictions import (
    Predictions,
    average_precision,
    base_metric,
    holm,
    load_samples,
    mean_average_precision,
    multilabel,
    paired_bootstrap,
    record_samples,
    rescore,
    save_samples,
    single_label,
)
from benchmark.store.results import Row, row_dict


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


def voc_targets(n: int, k: int, seed: int) -> np.ndarray:
    """(n, k) targets with about 30% positives and 5% difficult, every class with a positive."""
    g = np.random.default_rng(seed)
    t = (g.random((n, k)) < 0.3).astype(np.int8)
    t[g.random((n, k)) < 0.05] = -1
    t[0] = 1
    return t


def vissl_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """protocols/svm.py's `average_precision` before it moved to the store (VISSL's `svm_utils/evaluate.py`), kept
    verbatim as the reference."""
    keep = labels != -1
    s, pos = np.asarray(scores, dtype=np.float64)[keep], np.asarray(labels)[keep] > 0
    if not pos.any():
        return float("nan")
    hit = pos[np.argsort(s, kind="stable")[::-1]]
    tp = np.cumsum(hit)
    precision = tp / np.arange(1, len(hit) + 1)
    recall = tp / tp[-1]
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(((mrec[step] - mrec[step - 1]) * mpre[step]).sum())


# ----------------------------------------------------------------------------- re-scoring


def test_rescore_matches_scikit_learn_and_the_rows() -> None:
    g = torch.Generator().manual_seed(0)
    scores, y = torch.randn(500, 12, generator=g), torch.randint(0, 12, (500,), generator=g)
    rows = classification_rows(scores, y, "_1pct", selection="x")
    p = rows[0].samples
    assert p is not None and p.kind == "single" and all(r.samples is p for r in rows)
    assert rescore(p, "top1") == pytest.approx(accuracy_score(y, scores.argmax(1)), abs=1e-12)
    assert rescore(p, "top5") == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=range(12)), abs=1e-12)
    assert rescore(p, "mean_class_acc") == pytest.approx(balanced_accuracy_score(y, scores.argmax(1)), abs=1e-12)
    for r in rows:
        assert rescore(p, base_metric(r.metric)) == r.value  # the rows are computed from the stored set
    assert [r.samples for r in classification_rows(scores, y, split="val")] == [None] * 3  # test rows only


def test_base_metric() -> None:
    assert [base_metric(m) for m in ("top1", "top1_1pct", "top5_res4", "mean_class_acc_k2", "map", "map_res5", "AP")] == \
        ["top1", "top1", "top5", "mean_class_acc", "map", "map", "AP"]


def test_voc_ap_equals_the_svm_protocols_former_code_with_ties_and_difficult_images() -> None:
    from protocols.svm import average_precision as from_svm

    assert from_svm is average_precision  # moved, not copied
    g = np.random.default_rng(0)
    for trial in range(30):
        n = int(g.integers(2, 60))
        scores = np.round(g.normal(size=n), 1)  # rounded: many ties, which VISSL orders by descending index
        labels = g.integers(-1, 2, n)
        ref = vissl_ap(scores, labels)
        assert average_precision(scores, labels) == pytest.approx(ref, abs=1e-12, nan_ok=True), trial
    scores, t = np.random.default_rng(1).normal(size=(300, 6)), voc_targets(300, 6, 1)
    m, aps = mean_average_precision(scores, t)
    assert aps == pytest.approx([vissl_ap(scores[:, c], t[:, c]) for c in range(6)], abs=1e-12)
    p = multilabel(scores, t)
    assert p.kind == "multilabel" and rescore(p, "map") == m == pytest.approx(np.mean(aps), abs=1e-15)


def test_resampled_ap_equals_ap_of_the_materialised_resample() -> None:
    """The bootstrap scores AP from draw counts; with distinct scores that is the AP of the drawn images listed out."""
    from benchmark.store.predictions import _class_aps

    scores, t = np.random.default_rng(2).normal(size=(200, 4)), voc_targets(200, 4, 2)
    idx = np.random.default_rng(3).integers(0, 200, (5, 200))
    counts = np.stack([np.bincount(i, minlength=200) for i in idx]).astype(float)
    got = _class_aps(scores, t)(counts)
    want = [[vissl_ap(scores[i, c], t[i, c]) for c in range(4)] for i in idx]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_multilabel_sets_score_top1_only_with_one_positive_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    scores, y = torch.randn(300, 7, generator=g).double(), torch.randint(0, 7, (300,), generator=g)
    p = multilabel(scores, np.eye(7, dtype=np.int8)[y.numpy()])
    assert rescore(p, "top1") == pytest.approx(accuracy_score(y, scores.argmax(1)), abs=1e-12)
    assert rescore(p, "mean_class_acc_res4") == pytest.approx(balanced_accuracy_score(y, scores.argmax(1)), abs=1e-12)
    with pytest.raises(ValueError, match="one positive per image"):
        rescore(multilabel(scores, voc_targets(300, 7, 0)), "top1")
    with pytest.raises(ValueError, match="multi-label"):
        rescore(single_label(scores, y), "map")
    with pytest.raises(ValueError, match="re-score"):
        rescore(p, "AP")


def test_multilabel_scores_are_float32_unless_that_reorders_the_labels_of_a_class() -> None:
    t = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.int8)
    assert multilabel(np.random.default_rng(0).normal(size=(4, 2)), t).scores.dtype == np.float32
    # 1 + 1e-12 and 1.0 are one float32: tied, the later image would rank first (VISSL's order), a negative before
    # the positive it followed in float64
    close = np.array([[1.0 + 1e-12, 0.1], [1.0, 0.2], [0.5, 0.3], [0.0, 0.4]])
    p = multilabel(close, t)
    assert p.scores.dtype == np.float64 and np.array_equal(p.scores, close)
    assert rescore(p, "map") == mean_average_precision(close, t)[0] != mean_average_precision(close.astype(np.float32), t)[0]
    same_label = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=np.int8)  # the merged pair shares its label: harmless
    kept = multilabel(close, same_label)
    assert kept.scores.dtype == np.float32
    from benchmark.store.predictions import _class_aps

    counts = np.random.default_rng(0).integers(0, 3, (50, 4)).astype(float)  # and so is every resample's AP
    np.testing.assert_array_equal(_class_aps(kept.scores, same_label)(counts), _class_aps(close, same_label)(counts))


# ----------------------------------------------------------------------------- files


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    a = designed(300, 0.7, 1)
    m = multilabel(np.random.default_rng(0).normal(size=(300, 4)), voc_targets(300, 4, 0))
    path = tmp_path / "x.samples.npz"
    save_samples(path, {"s0": a, "s1": m})
    back = load_samples(path)
    assert set(back) == {"s0", "s1"} and list(tmp_path.iterdir()) == [path]
    got = back["s0"]
    assert got.kind == "single" and got.y.dtype == np.int64 and got.top.dtype == np.int32 and got.scores.dtype == np.float32
    assert got.y.shape == (300,) and got.top.shape == got.scores.shape == (300, 5)
    ml = back["s1"]
    assert ml.kind == "multilabel" and ml.y.dtype == np.int8 and ml.top.dtype == np.int32 and ml.scores.dtype == np.float32
    assert ml.y.shape == ml.scores.shape == (300, 4) and ml.top.shape == (300, 4)
    for want, have in ((a, got), (m, ml)):
        assert all(np.array_equal(getattr(want, f), getattr(have, f)) for f in ("y", "top", "scores"))
    assert rescore(ml, "map") == rescore(m, "map")


def test_record_samples_maps_metrics_and_survives_a_lost_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = designed(50, 0.7, 1)
    save_samples(tmp_path / "r.samples.npz", {"s0": a})
    rec = {"samples": {"file": "r.samples.npz", "metrics": {"top1_1pct": "s0", "mean_class_acc_1pct": "s0"}}}
    got = record_samples(rec, tmp_path / "r.json")
    assert set(got) == {"top1_1pct", "mean_class_acc_1pct"} and np.array_equal(got["top1_1pct"].top, a.top)
    assert record_samples({"rows": []}, tmp_path / "r.json") == {}
    (tmp_path / "r.samples.npz").write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING):
        assert record_samples(rec, tmp_path / "r.json") == {}
        (tmp_path / "r.samples.npz").unlink()
        assert record_samples(rec, tmp_path / "r.json") == {}
    assert caplog.text.count("unreadable") == 2


def test_rows_carry_samples_outside_their_columns_and_equality() -> None:
    a = designed(20, 0.5, 0)
    row = Row("top1", 0.5, samples=a)
    assert row == Row("top1", 0.5) and "samples" not in repr(row)
    d = row_dict(row, {"run_id": "x"})
    assert "samples" not in d and d["metric"] == "top1" and d["value"] == 0.5


# ----------------------------------------------------------------------------- paired test


def test_identical_predictions_are_no_difference() -> None:
    a = designed(5000, 0.8, 0)
    r = paired_bootstrap([a], [a], "top1")
    assert r.delta == 0 and r.low == 0 and r.high == 0 and r.p == 1.0 and (r.n, r.n_boot) == (5000, 1000)


def test_a_five_point_gap_on_5000_images_is_significant() -> None:
    a, b = designed(5000, 0.80, 0), designed(5000, 0.75, 1)
    assert rescore(a, "top1") - rescore(b, "top1") == pytest.approx(0.05)
    r = paired_bootstrap([a], [b], "top1", n_boot=1000)
    assert r.delta == pytest.approx(0.05) and 0 < r.low < 0.05 < r.high
    assert holm([r.p, 0.5, 0.2])[0] < 0.01
    for metric in ("top1", "mean_class_acc"):  # and the other way round
        back = paired_bootstrap([b], [a], metric)
        assert back.p < 0.01 and back.high < 0


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
    r = paired_bootstrap([a], [Predictions("single", a.y, top, a.scores)], "top1")
    assert r.delta == pytest.approx(0.001) and r.p < 0.05 and r.low > 0


def test_seeds_are_averaged_on_each_side() -> None:
    a1, a2, b = designed(2000, 0.80, 0), designed(2000, 0.70, 1), designed(2000, 0.74, 2)
    r = paired_bootstrap([a1, a2], [b], "top1", n_boot=200)
    assert r.delta == pytest.approx(0.75 - 0.74)


def test_map_gaps_are_tested_on_the_same_images() -> None:
    t = voc_targets(1000, 5, 0)
    noise = np.random.default_rng(1).normal(size=t.shape)
    good, bad = multilabel(2.0 * (t == 1) + noise, t), multilabel(0.5 * (t == 1) + noise, t)
    assert paired_bootstrap([good], [good], "map_res4", n_boot=100).p == 1.0
    r = paired_bootstrap([good], [bad], "map", n_boot=200)
    assert r.delta == pytest.approx(rescore(good, "map") - rescore(bad, "map")) and r.delta > 0.1
    assert r.low > 0 and r.p < 0.01


def test_different_test_sets_are_refused() -> None:
    with pytest.raises(ValueError, match="different test sets"):
        paired_bootstrap([designed(100, 0.5, 0)], [designed(99, 0.5, 1)], "top1")
    with pytest.raises(ValueError, match="different test sets"):
        paired_bootstrap([designed(100, 0.5, 0)], [designed(100, 0.5, 1, k=7)], "top1")  # same size, other labels


def test_holm_against_a_hand_worked_case() -> None:
    # sorted 0.01, 0.02, 0.04, 0.5 -> 4*0.01, 3*0.02, max(0.06, 2*0.04), max(0.08, 0.5)
    assert holm([0.04, 0.5, 0.01, 0.02]) == pytest.approx([0.08, 0.5, 0.04, 0.06])
    # monotone: 3*0.01 = 0.03, 2*0.012 = 0.024 lifted to 0.03; capped at 1
    assert holm([0.012, 0.01, 0.9]) == pytest.approx([0.03, 0.03, 0.9])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([]) == []
