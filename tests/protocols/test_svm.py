from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from sklearn.svm import LinearSVC

from benchmark.backbones import build_backbone
from benchmark.config import PretrainConfig
from benchmark.data.sets import ImageSet, Splits
from benchmark.errors import ConfigError
from benchmark.registry import PROTOCOLS
from protocols.svm import (
    Config,
    GoyalConfig,
    MMSelfSupConfig,
    average_precision,
    class_targets,
    decision_values,
    fit_class,
    fit_classes,
    l2_normalize,
    mean_average_precision,
    svm,
)
from tests.protocols.test_knn import Flatten, blobs, frozen

# ----------------------------------------------------------------------------- AP


def test_average_precision_hand_worked_ranking() -> None:
    # ranked: + - - + +  -> precision at the hits 1, 2/4, 3/5; the envelope lifts 2/4 to 3/5 (VOC interpolation)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 0, 1, 1])
    assert average_precision(scores, labels) == pytest.approx((1 + 0.6 + 0.6) / 3)
    # scikit-learn's AP does not interpolate: (1 + 0.5 + 0.6) / 3
    assert average_precision_score(labels, scores) == pytest.approx(0.7)


def test_average_precision_ties_follow_vissl_order() -> None:
    # VISSL ranks with argsort(scores)[::-1]: tied scores come out in descending index order, each its own point.
    # Here the negative (index 1) is ranked before the tied positive (index 0): P = 0, 1/2, 2/3 at R = 0, 1/2, 1.
    assert average_precision(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 1])) == pytest.approx(2 / 3)
    # the mirrored order puts the positive first: P = 1, 1/2, 2/3 -> 1/2 + 1/2 * 2/3
    assert average_precision(np.array([0.5, 0.5, 0.1]), np.array([0, 1, 1])) == pytest.approx(5 / 6)


def test_average_precision_matches_its_definition_on_random_rankings() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores, labels = rng.normal(size=40), rng.integers(0, 2, 40)
        labels[0] = 1
        hits = labels[np.argsort(-scores)] == 1
        precision = np.cumsum(hits) / np.arange(1, 41)
        # AP = mean over positives of the best precision at this recall or beyond
        ref = np.mean([precision[i:].max() for i in np.flatnonzero(hits)])
        assert average_precision(scores, labels) == pytest.approx(ref)


def test_difficult_samples_are_excluded_and_empty_classes_are_nan() -> None:
    # the top-ranked sample is "difficult": counted as a negative it would halve the AP
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([-1, 1, 0])) == 1.0
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([0, 1, 0])) == 0.5
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, -1])))
    m, aps = mean_average_precision(np.array([[0.9, 0.1], [0.1, 0.9]]), np.array([[1, 0], [0, 0]]))
    assert m == 1.0 and math.isnan(aps[1])


# ----------------------------------------------------------------------------- fitting


def test_per_class_svms_match_a_direct_scikit_learn_fit(digits: Splits) -> None:
    x = digits.train.x[:300].flatten(1).double().numpy()
    targets = class_targets(digits.train.y[:300], 10)[:, :3]
    targets[::7, 0] = -1  # "difficult": trained as negatives, as VISSL does
    cfg = Config(costs=(0.5,))
    xn = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)
    ours = decision_values(fit_classes(l2_normalize(x), targets, cfg, seed=3), xn)
    for c in range(3):
        t = np.where(targets[:, c] == 1, 1, -1)
        for seed, atol in ((3, 1e-10), (11, 1e-3)):  # same liblinear order: identical; another order: same optimum
            ref = LinearSVC(C=0.5, class_weight={1: 2, -1: 1}, loss="squared_hinge", penalty="l2", dual=True, tol=1e-4,
                            max_iter=2000, intercept_scaling=1, random_state=seed).fit(xn, t)
            np.testing.assert_allclose(ours[:, c], ref.decision_function(xn), atol=atol)


def _needs_weak_regularisation(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # dim 0 separates the classes exactly with a small margin; dim 1 has a bigger mean shift but large noise.
    # A small C stays near the class-mean direction (dominated by dim 1); a large C finds the separating dim 0.
    r = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.where(np.arange(n) % 3 == 0, 1, -1)
        return np.stack([t * 0.1, t * 1.0 + r.normal(0, 4, n)], 1), t

    return *make(90), *make(300)


def _needs_strong_regularisation(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # one informative dimension among 99 noise dimensions and 120 samples: a large C fits the noise
    r = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.where(np.arange(n) % 2 == 0, 1, -1)
        x = r.normal(size=(n, 100))
        x[:, 0] += t
        return x, t

    return *make(120), *make(1000)


@pytest.mark.parametrize(("make", "want"), [(_needs_weak_regularisation, 100.0), (_needs_strong_regularisation, 1e-3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_cross_validation_picks_the_cost_that_generalises(make, want: float, seed: int) -> None:  # type: ignore[no-untyped-def]
    x, t, xt, tt = make(seed)
    cfg = Config(costs=(1e-3, 100.0), l2_normalize=False)
    fit = fit_class(x, t, cfg, seed)
    assert fit.cost == want and fit.folds == 3 and fit.cv_ap is not None
    held_out = {C: average_precision(xt @ f.w + f.b, (tt == 1).astype(int))
                for C in cfg.costs for f in [fit_class(x, t, Config(costs=(C,), l2_normalize=False), seed)]}
    assert held_out[want] > max(held_out.values()) - 1e-12  # the chosen cost is also the better one on fresh data


def test_cross_validation_needs_two_positives_unless_a_fallback_is_given() -> None:
    x = np.random.default_rng(0).normal(size=(12, 3))
    t = np.array([1] + [-1] * 11)
    with pytest.raises(ValueError, match="at least 2"):
        fit_class(x, t, Config(costs=(0.1, 1.0)), seed=0)
    fit = fit_class(x, t, Config(costs=(0.1, 1.0)), seed=0, fallback_cost=0.7)
    assert fit.cost == 0.7 and fit.cv_ap is None and fit.folds == 0
    t[1] = 1  # two positives: two folds
    assert fit_class(x, t, Config(costs=(0.1, 1.0)), seed=0).folds == 2


# ----------------------------------------------------------------------------- protocol


def test_separable_blobs_give_map_and_top1_of_one() -> None:
    rows = svm(frozen(Flatten(16), 16), blobs(), Config(costs=(0.1, 1.0, 10.0)), seed=0)
    test = {r.metric: r.value for r in rows if r.split == "test"}
    val = [r for r in rows if r.split == "val"]
    assert test == {"map": 1.0, "top1": 1.0, "mean_class_acc": 1.0}
    assert len(val) == 1 and val[0].metric == "map" and val[0].value == 1.0
    assert rows[-1].selection.startswith("3-fold CV AP per class: C median=") and rows[-1].n_train == 200


def multilabel_blobs(difficult: int) -> Splits:
    """3 classes, pixel block c lit iff class c present; the test set adds two class-0 "difficult" images:
    one that looks like class 0 (hurts AP if counted negative) and one that does not (hurts if counted positive)."""
    g = torch.Generator().manual_seed(0)

    def make(n: int, extra: bool) -> ImageSet:
        y = torch.zeros(n, 3, dtype=torch.int64)
        y[torch.arange(n), torch.arange(n) % 3] = 1
        y[::4, 1] = 1
        if extra:
            y = torch.cat([y, torch.tensor([[difficult, 1, 0], [difficult, 1, 0]])])
        x = torch.randint(0, 40, (len(y), 1, 4, 4), generator=g)
        lit = y.clone()
        if extra:
            lit[-2, 0] = 1  # the first difficult image shows class 0, the second does not
            lit[-1, 0] = 0
        x.view(len(y), -1)[:, [0, 4, 8]] += 200 * lit
        return ImageSet(x.to(torch.uint8), y)

    return Splits("mlblobs", make(60, False), make(15, False), make(30, True), 3, (0.0,), (1.0,), "mlblobs", torch.arange(0))


def test_multilabel_map_excludes_difficult_test_samples() -> None:
    enc, cfg = frozen(Flatten(16), 16), Config(costs=(1.0, 10.0))
    rows = svm(enc, multilabel_blobs(difficult=-1), cfg, seed=0)
    assert {(r.metric, r.split) for r in rows} == {("map", "val"), ("map", "test")}  # no top1 for multi-label data
    assert next(r.value for r in rows if r.split == "test") == 1.0
    for as_label in (0, 1):  # the same images scored as negatives or positives would cost AP on class 0
        worse = next(r.value for r in svm(enc, multilabel_blobs(difficult=as_label), cfg, seed=0) if r.split == "test")
        assert worse < 1.0


def test_same_seed_same_rows_and_registered_variants(digits: Splits) -> None:
    small = dataclasses.replace(digits, train=digits.train.subset(torch.arange(300)))
    cfg = Config(costs=(0.1, 10.0))
    five = svm(frozen(Flatten(256), 256), small, cfg, seed=5)
    assert five == svm(frozen(Flatten(256), 256), small, cfg, seed=5)
    # and the seed is used (CV folds, liblinear's order): equality above is determinism, not a constant
    other = svm(frozen(Flatten(256), 256), small, cfg, seed=6)
    assert [r.value for r in five if r.split == "val"] != [r.value for r in other if r.split == "val"]
    for name, config in (("svm", Config), ("svm_goyal", GoyalConfig), ("svm_mmselfsup", MMSelfSupConfig)):
        entry = PROTOCOLS.entry(name)
        assert entry.config is config and entry.meta["multilabel"] and entry.obj is svm
    assert Config().costs == (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)
    assert len(GoyalConfig().costs) == 26 and min(GoyalConfig().costs) == 1e-7 and 0.5**19 in GoyalConfig().costs
    assert MMSelfSupConfig().costs[:3] == (1.0, 10.0, 100.0) and len(MMSelfSupConfig().costs) == 19


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (Config, {"costs": ()}, "svm.costs"),
    (Config, {"costs": (1.0, -2.0)}, "svm.costs"),
    (Config, {"folds": 1}, "svm.folds"),
    (Config, {"class_weight_pos": 0.0}, "svm.class_weight_pos"),
    (Config, {"max_iter": 0}, "svm.max_iter"),
    (Config, {"tol": 0.0}, "svm.tol"),
    (GoyalConfig, {"folds": 0}, "svm_goyal.folds"),
])
def test_config_validation_names_the_field(cls: type, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        cls(**kwargs)


def test_frozen_encoder_is_bit_identical_after_the_protocol(digits: Splits) -> None:
    module = build_backbone(PretrainConfig(backbone="convnet_tiny"), 1, 16)
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    svm(frozen(module, getattr(module, "dim")), digits, Config(costs=(1.0,)), seed=0)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_digits_pixels_give_a_high_map(digits: Splits) -> None:
    rows = svm(frozen(Flatten(256), 256), digits, Config(costs=(0.1, 1.0, 10.0)), seed=0)
    test = {r.metric: r.value for r in rows if r.split == "test"}
    # measured: map 0.981, top1 0.969 (kNN on the same pixels: ~0.97 top1)
    assert 0.95 < test["map"] <= 1.0 and 0.93 < test["top1"] <= 1.0
