from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.evaluate.protocol import EvalContext
from benchmark.registry import PROTOCOLS
from protocols.lowshot_svm import Config, draw_generator, draw_multi_label, draw_single_label, lowshot_svm
from protocols.svm import class_targets
from tests.protocols.test_knn import Flatten, blobs, frozen
from tests.protocols.test_svm import multilabel_blobs

TINY = Config(k_values=(1, 4), draws=2, costs=(0.1, 1.0, 10.0))


def _ids(ids: np.ndarray | None) -> list[int]:
    assert ids is not None
    return [int(i) for i in ids]


def test_single_label_draws_have_exactly_k_per_class_and_follow_the_seed() -> None:
    y = np.repeat(np.arange(5), [7, 9, 4, 12, 6])
    draws = [draw_single_label(y, 5, 3, draw_generator(0, 3, d)) for d in range(3)]
    for ids in draws:
        assert ids is not None and len(ids) == 15 and len(np.unique(ids)) == 15 and (np.diff(ids) > 0).all()
        assert np.bincount(y[ids], minlength=5).tolist() == [3] * 5
    a, b, c = (d.tolist() for d in draws if d is not None)
    assert a == _ids(draw_single_label(y, 5, 3, draw_generator(0, 3, 0)))  # reproducible
    assert a != b and b != c  # independent draws
    assert a != _ids(draw_single_label(y, 5, 3, draw_generator(1, 3, 0)))  # the seed matters
    assert a != _ids(draw_single_label(y, 5, 3, draw_generator(0, 4, 0)))  # and so does k
    assert draw_single_label(y, 5, 5, draw_generator(0, 5, 0)) is None  # class 2 has only 4 samples


def test_multi_label_draws_give_each_class_k_positives_and_k_per_other_class_negatives() -> None:
    targets = class_targets(multilabel_blobs(difficult=-1).train.y, 3)
    targets[5, 0] = -1  # "difficult" images are never drawn for that class
    per_class = draw_multi_label(targets, 2, draw_generator(0, 2, 0))
    assert per_class is not None
    for c, ids in enumerate(per_class):
        assert len(ids) == 6 and len(np.unique(ids)) == 6
        assert (targets[ids[:2], c] == 1).all() and (targets[ids[2:], c] == 0).all()
    assert draw_multi_label(targets, 40, draw_generator(0, 40, 0)) is None


def test_rows_carry_the_spread_over_draws_and_separable_blobs_reach_one() -> None:
    rows = lowshot_svm(frozen(Flatten(16), 16), blobs(), TINY, seed=0)
    by = {r.metric: r for r in rows}
    assert list(by) == ["map_k1", "top1_k1", "mean_class_acc_k1", "map_k4", "top1_k4", "mean_class_acc_k4"]
    assert by["map_k4"].value == 1.0 and by["top1_k4"].value == 1.0
    for r in rows:
        assert r.std is not None and r.min is not None and r.max is not None and r.ci95 is not None
        assert r.min <= r.value <= r.max and r.ci95 == pytest.approx(1.96 * r.std / math.sqrt(2))
    assert by["map_k1"].n_train == 4 and by["map_k4"].n_train == 16
    assert by["map_k1"].selection.startswith("fixed C=1 (1 positive: no CV)")
    assert by["map_k4"].selection.startswith("3-fold CV AP per class on each draw")


def test_draws_are_saved_deterministic_and_differ_across_draws(tmp_path: Path, digits: Splits) -> None:
    ctx = EvalContext(out=tmp_path)
    cfg = Config(k_values=(2,), draws=2, costs=(1.0,))
    first = lowshot_svm(frozen(Flatten(256), 256), digits, cfg, seed=7, ctx=ctx)
    again = lowshot_svm(frozen(Flatten(256), 256), digits, cfg, seed=7, ctx=ctx)  # same files: no "different draw" error
    assert first == again
    files = sorted((tmp_path / "splits").glob("digits-*-lowshot-k2-draw*-s7.json"))
    ids = [json.loads(p.read_text())["ids"] for p in files]
    assert len(ids) == 2 and ids[0] != ids[1]
    y = digits.trainval().y  # the ids index train + val
    for i in ids:
        assert torch.bincount(y[i], minlength=10).tolist() == [2] * 10
    other = lowshot_svm(frozen(Flatten(256), 256), digits, cfg, seed=8, ctx=ctx)
    assert other != first


def test_k_beyond_the_smallest_class_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="protocols.lowshot_svm"):
        rows = lowshot_svm(frozen(Flatten(16), 16), blobs(), Config(k_values=(2, 60), draws=1, costs=(1.0,)), seed=0)
    assert {r.metric for r in rows} == {"map_k2", "top1_k2", "mean_class_acc_k2"}
    assert "skipping k=60" in caplog.text


def test_multilabel_data_gives_map_rows_only() -> None:
    rows = lowshot_svm(frozen(Flatten(16), 16), multilabel_blobs(difficult=-1), Config(k_values=(3,), draws=2, costs=(1.0, 10.0)), seed=0)
    assert [r.metric for r in rows] == ["map_k3"]
    assert rows[0].value == 1.0 and rows[0].n_train <= 3 * 3 * 3
    assert PROTOCOLS.entry("lowshot_svm").meta["multilabel"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k_values": ()}, "lowshot_svm.k_values"),
    ({"k_values": (0, 2)}, "lowshot_svm.k_values"),
    ({"k_values": (2, 2)}, "lowshot_svm.k_values"),
    ({"draws": 0}, "lowshot_svm.draws"),
    ({"fallback_cost": 0.0}, "lowshot_svm.fallback_cost"),
    ({"costs": ()}, "lowshot_svm.costs"),
    ({"folds": 1}, "lowshot_svm.folds"),
])
def test_config_validation_names_the_field(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        Config(**kwargs)  # type: ignore[arg-type]


def test_digits_pixels_improve_with_more_shots(digits: Splits) -> None:
    rows = {r.metric: r for r in lowshot_svm(frozen(Flatten(256), 256), digits, Config(k_values=(1, 8), draws=2, costs=(0.1, 1.0, 10.0)), seed=0)}
    # measured: map_k1 0.70, map_k8 0.93 (the full 11-cost grid with 5 draws: 0.71 / 0.93)
    assert 0.5 < rows["map_k1"].value < rows["map_k8"].value and rows["map_k8"].value > 0.85
    assert rows["top1_k8"].value > 0.7
