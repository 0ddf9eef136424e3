"""The shared protocol helpers: intervals, channel/size adaptation, subset draws and their files,
the supervised loop, the content-addressed feature cache key, and the pixels baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmark.backbones import Pixels
from benchmark.data.sets import ImageSet, Splits
from benchmark.evaluate.encoder import FrozenEncoder, extract_features
from benchmark.evaluate.finetune import Classifier, Recipe, predict, train_classifier
from benchmark.evaluate.protocol import (
    EvalContext,
    class_balanced_fraction,
    save_subset_file,
    spread,
    to_channels,
    transfer_splits,
)
from benchmark.store.results import fmt
from tests.protocols.test_knn import blobs


def test_spread_matches_its_formula() -> None:
    v = [0.5, 0.7, 0.9, 0.6]
    s = spread(v)
    mean = sum(v) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / 3)
    assert s.mean == pytest.approx(mean) and s.std == pytest.approx(std)
    assert s.ci95 == pytest.approx(1.96 * std / 2) and (s.min, s.max, s.n) == (0.5, 0.9, 4)
    assert spread([0.3]).std == 0.0 and spread([0.3]).ci95 == 0.0


def test_leaderboard_cell_shows_seed_std_or_the_protocols_interval() -> None:
    assert fmt(0.8123, 0.01, 3) == "81.23 ± 1.00"
    assert fmt(0.8123, 0.0, 1, 0.0049) == "81.23 (±0.49)"
    assert fmt(0.8123, 0.0, 1) == "81.23"


def test_channel_conversion() -> None:
    grey = ImageSet(torch.tensor([[[[10, 200]]]], dtype=torch.uint8), torch.tensor([0]))
    rgb = to_channels(grey, 3)
    assert rgb.x.shape == (1, 3, 1, 2) and torch.equal(rgb.x[:, 1], grey.x[:, 0])
    back = to_channels(rgb, 1)
    assert torch.equal(back.x, grey.x)  # luma weights sum to 1
    red = ImageSet(torch.tensor([[[[255]], [[0]], [[0]]]], dtype=torch.uint8), torch.tensor([0]))
    assert int(to_channels(red, 1).x) == round(0.299 * 255)


def test_transfer_splits_match_the_encoders_input(fmnist_small: Splits) -> None:
    s = transfer_splits("digits", fmnist_small)
    assert s.image_size == fmnist_small.image_size == 16 and s.channels == 1 and s.name == "digits"
    rgb_target = Splits("t", *(to_channels(x, 3) for x in (fmnist_small.train, fmnist_small.val, fmnist_small.test)),
                        10, (0.5,) * 3, (0.2,) * 3, "t", torch.arange(0))
    s3 = transfer_splits("digits", rgb_target)
    assert s3.channels == 3 and s3.fingerprint != s.fingerprint


def test_fraction_subsets_are_balanced_stable_and_saved(tmp_path: Path, digits: Splits) -> None:
    y = digits.train.y
    ids = class_balanced_fraction(y, 0.05, seed=0)
    assert len(ids) == round(0.05 * len(y))
    counts = torch.bincount(y[ids], minlength=10)
    assert int(counts.max() - counts.min()) <= 1
    assert torch.equal(ids, class_balanced_fraction(y, 0.05, seed=0))
    assert not torch.equal(ids, class_balanced_fraction(y, 0.05, seed=1))
    assert len(class_balanced_fraction(y, 0.0001, seed=0)) == 10  # at least one per class
    ctx = EvalContext(out=tmp_path)
    path = save_subset_file(ctx, digits, "test-5pct", ids)
    assert path is not None and json.loads(path.read_text())["ids"] == ids.tolist()
    assert save_subset_file(ctx, digits, "test-5pct", ids) == path  # same draw: accepted
    with pytest.raises(RuntimeError, match="different draw"):
        save_subset_file(ctx, digits, "test-5pct", class_balanced_fraction(y, 0.05, seed=1))
    assert save_subset_file(EvalContext(), digits, "x", ids) is None


def test_recipe_schedules() -> None:
    step = Recipe(epochs=100, batch_size=256, lr=30, schedule="step", milestones=(0.6, 0.8))
    assert [step.lr_at(s, 100) for s in (0, 59, 60, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = Recipe(epochs=10, batch_size=256, lr=0.1)
    assert cos.lr_at(0, 100) == 1.0 and cos.lr_at(50, 100) == pytest.approx(0.5) and cos.lr_at(100, 100) == pytest.approx(0.0)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())  # keeps position: blobs differ by where they light up
        self.dim = 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # type: ignore[no-any-return]


def test_frozen_backbone_and_its_bn_statistics_stay_untouched() -> None:
    torch.manual_seed(0)
    data = blobs()
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = Classifier(net, nn.Linear(128, 4), train_backbone=False)
    losses = train_classifier(model, data.train, Recipe(epochs=3, batch_size=32, lr=0.5, crop_scale=1.0), (0.0,), (1.0,),
                              torch.device("cpu"), seed=0)
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_fine_tuning_learns_separable_data_and_is_deterministic() -> None:
    data = blobs()

    def run() -> tuple[torch.Tensor, list[float]]:
        torch.manual_seed(0)
        model = Classifier(TinyNet(), nn.Linear(128, 4), train_backbone=True)
        losses = train_classifier(model, data.train, Recipe(epochs=15, batch_size=32, lr=0.5, crop_scale=1.0), (0.0,), (255.0,),
                                  torch.device("cpu"), seed=0)
        return predict(model, data.test, (0.0,), (255.0,), torch.device("cpu")), losses

    logits, losses = run()
    assert float((logits.argmax(1) == data.test.y).float().mean()) == 1.0
    logits2, losses2 = run()
    assert losses == losses2 and torch.equal(logits, logits2)


def test_feature_cache_is_keyed_by_weights_layer_and_transform(tmp_path: Path) -> None:
    images = ImageSet(torch.randint(0, 255, (8, 1, 4, 4), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    a = FrozenEncoder(Pixels(1, 4), 16, (0.0,), (1.0,), key="w1", cache_dir=tmp_path)
    b = FrozenEncoder(Pixels(1, 4), 16, (0.5,), (0.25,), key="w1", cache_dir=tmp_path)  # same weights, other transform
    fa, fb = extract_features(a, images, name="d-train"), extract_features(b, images, name="d-train")
    assert not torch.equal(fa, fb) and len(list(tmp_path.glob("*/manifest.json"))) == 2

    class NeverCalled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("features of a complete store are read, not recomputed")

    c = FrozenEncoder(NeverCalled(), 16, (0.0,), (1.0,), key="w1", cache_dir=tmp_path)  # a new process: read from disk
    assert torch.equal(extract_features(c, images, name="d-train"), fa) and len(list(tmp_path.glob("*/manifest.json"))) == 2


def test_pixels_baseline_features_are_the_normalised_image() -> None:
    x = torch.randint(0, 255, (3, 1, 4, 4), dtype=torch.uint8)
    enc = FrozenEncoder(Pixels(1, 4), 16, (0.5,), (0.25,), key="p")
    torch.testing.assert_close(enc.features(x), ((x.float() / 255 - 0.5) / 0.25).flatten(1))


def test_mean_class_accuracy_is_sklearns_balanced_accuracy() -> None:
    from sklearn.metrics import balanced_accuracy_score

    from benchmark.evaluate.protocol import classification_rows

    def mean_class_accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:  # the row classification_rows reports
        return next(r.value for r in classification_rows(scores, y) if r.metric == "mean_class_acc")

    # hand case: class 0 (4 images) 3 right, class 1 (1 image) wrong -> top1 3/5, mean over classes (3/4 + 0) / 2
    y = torch.tensor([0, 0, 0, 0, 1])
    scores = torch.tensor([[1.0, 0.0]] * 4 + [[1.0, 0.0]])
    scores[3] = torch.tensor([0.0, 1.0])
    assert mean_class_accuracy(scores, y) == pytest.approx(0.375)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (500,), generator=g) ** 2 % 7  # imbalanced
    s = torch.randn(500, 7, generator=g)
    assert mean_class_accuracy(s, y) == pytest.approx(balanced_accuracy_score(y.numpy(), s.argmax(1).numpy()))
    rows = classification_rows(s, y, "_res4", selection="x", n_train=3)
    assert [r.metric for r in rows] == ["top1_res4", "top5_res4", "mean_class_acc_res4"]
    assert all(r.selection == "x" and r.n_train == 3 and r.split == "test" for r in rows)
