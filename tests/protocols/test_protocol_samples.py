"""Every classification protocol's test rows carry the predictions they were scored from, and those re-score them."""

from __future__ import annotations

import dataclasses

import torch

from benchmark.data.sets import Splits
from benchmark.store.predictions import Predictions, base_metric, rescore
from benchmark.store.results import Row
from protocols import finetune, knn, linear, lowshot_svm, semisup, svm
from tests.protocols.test_knn import Flatten, blobs, frozen
from tests.protocols.test_semisup import tiny_encoder
from tests.protocols.test_svm import multilabel_blobs


def rescored(rows: list[Row]) -> list[Predictions]:
    """Check that every test row carries samples that give back its value, and no other row does; the distinct sets."""
    sets: list[Predictions] = []
    for r in rows:
        if r.split != "test":
            assert r.samples is None, r
            continue
        assert r.samples is not None, r
        assert abs(rescore(r.samples, base_metric(r.metric)) - r.value) <= 1e-6, (r.metric, r.value)
        if not any(r.samples is s for s in sets):
            sets.append(r.samples)
    return sets


def small(digits: Splits, n: int = 300) -> Splits:
    return dataclasses.replace(digits, train=digits.train.subset(torch.arange(n)))


def test_knn_and_linear_on_digits_pixels(digits: Splits) -> None:
    rows = knn.knn(frozen(Flatten(256), 256), digits, knn.Config(k=5), seed=0)
    (p,) = rescored(rows)
    assert p.kind == "single" and p.y.shape == (len(digits.test),) and p.top.shape == (len(digits.test), 5)
    assert 0.9 < rows[0].value < 1.0  # not a trivial 1.0
    (p,) = rescored(linear.linear(frozen(Flatten(256), 256), small(digits), linear.Config(grid_points=2), seed=0))
    assert p.kind == "single"


def test_svm_single_label_rows_share_one_full_score_set(digits: Splits) -> None:
    rows = svm.svm(frozen(Flatten(256), 256), small(digits), svm.Config(costs=(1.0,)), seed=0)
    assert [r.metric for r in rows if r.split == "test"] == ["map", "top1", "mean_class_acc"]
    (p,) = rescored(rows)
    assert p.kind == "multilabel" and p.scores.shape == (len(digits.test), 10) and set(p.y.ravel().tolist()) == {0, 1}
    assert all(0.8 < r.value < 1.0 for r in rows)


def test_svm_multilabel_map_row_keeps_the_difficult_images() -> None:
    rows = svm.svm(frozen(Flatten(16), 16), multilabel_blobs(difficult=-1), svm.Config(costs=(1.0, 10.0)), seed=0)
    (p,) = rescored(rows)
    assert p.kind == "multilabel" and (p.y == -1).sum() == 2


def test_svm_layers_get_one_set_each(digits: Splits) -> None:
    enc = frozen(Flatten(256), 256)
    rows = [r for layer in range(2) for r in svm._probe(enc, small(digits), svm.Config(costs=(1.0,)), 0, f"_l{layer}")]
    assert len(rescored(rows)) == 2


def test_lowshot_rows_carry_none() -> None:
    rows = lowshot_svm.lowshot_svm(frozen(Flatten(16), 16), blobs(), lowshot_svm.Config(k_values=(2,), draws=2, costs=(1.0,)), 0)
    assert rows and all(r.samples is None for r in rows)


def test_semisup_and_finetune_rows() -> None:
    fast = {"batch_size": 16, "lrs": (0.05,), "crop_scale": 1.0}
    rows = semisup.semisup(tiny_encoder(), blobs(), semisup.Config(epochs=(1, 1), **fast), 0)
    sets = rescored(rows)
    assert len(sets) == 2  # one per label fraction
    assert {r.metric for r in rows if r.split == "test"} == {"top1_1pct", "mean_class_acc_1pct", "top1_10pct",
                                                              "mean_class_acc_10pct"}
    assert len(rescored(finetune.finetune(tiny_encoder(), blobs(), finetune.Config(epochs=1, **fast), 0))) == 1
