from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from benchmark.data.sets import Splits
from protocols.knn import topk_accuracy
from protocols.linear import Config, c_grid, fit_logistic, linear
from tests.protocols.test_knn import Flatten, blobs, frozen


def test_grid_is_the_45_point_ssl_transfer_grid() -> None:
    grid = c_grid(Config())
    assert len(grid) == 45
    assert math.isclose(grid[0], 1e-5) and math.isclose(grid[-1], 1e6)
    assert grid == sorted(grid)


def test_separable_blobs_give_top1_of_one() -> None:
    rows = linear(frozen(Flatten(16), 16), blobs(), Config(grid_points=5), seed=0)
    test = {r.metric: r.value for r in rows if r.split == "test"}
    assert test == {"top1": 1.0, "mean_class_acc": 1.0}
    assert rows[0].selection.startswith("val top1: C=")


@pytest.mark.parametrize("C", [0.01, 0.3])  # larger C: same check, minutes of solver time on 2 cores
def test_agrees_with_scikit_learn_on_real_features(digits: Splits, C: float) -> None:
    x = digits.train.x.flatten(1).double() / 255
    xt = digits.test.x.flatten(1).double() / 255
    y, yt = digits.train.y, digits.test.y
    W, b = fit_logistic(x, y, 10, C, max_iter=2000, tol=1e-9)
    ours = topk_accuracy(xt @ W + b, yt, 1)
    sk = LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit(x.numpy(), y.numpy())
    theirs = float((sk.predict(xt.numpy()) == yt.numpy()).mean())
    assert abs(ours - theirs) <= 0.005, (ours, theirs)
    # same objective, so the same solution up to solver tolerance
    np.testing.assert_allclose((x @ W + b).softmax(1).numpy(), sk.predict_proba(x.numpy()), atol=2e-3)


def test_selection_uses_val_and_reports_it(digits: Splits) -> None:
    rows = linear(frozen(Flatten(256), 256), digits, Config(grid_points=4), seed=0)
    val = [r for r in rows if r.split == "val"]
    test = {r.metric: r for r in rows if r.split == "test"}
    assert len(val) == 1 and val[0].n_train == len(digits.train)
    assert test["top1"].n_train == len(digits.train) + len(digits.val)
    assert test["top1"].value > 0.9 and test["top5"].value >= test["top1"].value


def test_a_large_problem_is_fitted_in_row_chunks_to_the_same_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: ImageNet-sized fits (1.28M x 1000 logits) sum the objective over row chunks and fold the
    standardisation into W, never copying the features; the optimum is the direct path's."""
    import protocols.linear as linear_module

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 12, generator=g, dtype=torch.float64) * 3 + 1
    y = torch.randint(0, 5, (600,), generator=g)
    mu, sd = x.mean(0), x.std(0)
    direct = fit_logistic(x, y, 5, 0.5, max_iter=500, tol=1e-10, shift=mu, scale=sd)
    monkeypatch.setattr(linear_module, "LARGE", 400)  # 600 x 5 > 400: chunks of 20 rows
    chunked = fit_logistic(x, y, 5, 0.5, max_iter=500, tol=1e-10, shift=mu, scale=sd)
    torch.testing.assert_close(chunked[0], direct[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked[1], direct[1], rtol=1e-6, atol=1e-7)
    scores = linear_module.scores_of(x, *chunked, mu, sd, chunk=64)
    torch.testing.assert_close(scores, ((x - mu) / sd) @ direct[0] + direct[1], rtol=1e-6, atol=1e-6)
