from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import protocols.fewshot as fs
from benchmark.backbones import build_backbone
from benchmark.config import PretrainConfig, apply_overrides
from benchmark.data.sets import ImageSet, Splits
from benchmark.errors import ConfigError
from benchmark.evaluate.encoder import FrozenEncoder
from protocols.fewshot import Config, episode_accuracies, episode_generator, fewshot, proto_scores, sample_episodes
from tests.protocols.test_knn import Flatten, frozen

UseData = Callable[[Splits], None]


def pool_data(sizes: list[int], noise: float, seed: int = 0) -> Splits:
    """2x4 'images' whose test split has sizes[c] images of class c around a random class centre."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randint(40, 216, (len(sizes), 8), generator=g).float()

    def make(counts: list[int]) -> ImageSet:
        y = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
        x = centres[y] + noise * torch.randn(len(y), 8, generator=g)
        return ImageSet(x.round().clamp(0, 255).to(torch.uint8).view(-1, 1, 2, 4), y)

    ones = [1] * len(sizes)
    return Splits("pool", make(ones), make(ones), make(sizes), len(sizes), (0.0,), (1.0,), f"pool{seed}-{noise}", torch.arange(0))


@pytest.fixture
def use_data(monkeypatch: pytest.MonkeyPatch) -> UseData:
    """Make `fewshot` episode over a given Splits instead of loading its transfer dataset."""

    def use(s: Splits) -> None:
        monkeypatch.setattr(fs, "transfer_splits", lambda name, target, data=None: s)

    return use


def test_proto_scores_hand_worked_episode_beats_one_nn() -> None:
    # class A support (0,0),(6,0) -> prototype (3,0); class B support (7,1),(9,-1) -> prototype (8,0)
    support = torch.tensor([[[[0.0, 0.0], [6.0, 0.0]], [[7.0, 1.0], [9.0, -1.0]]]], dtype=torch.float64)
    query = torch.tensor([[[6.5, 0.0], [3.0, 0.0]]], dtype=torch.float64)  # true classes B, A
    # 1-NN: (6.5,0) is 0.5 from A's (6,0) but sqrt(1.25) from B's (7,1): 1-NN says A (wrong)
    flat = support.view(4, 2)
    assert int(torch.cdist(query[0, :1], flat).argmin()) // 2 == 0
    # prototypes: d_A = 3.5² = 12.25, d_B = 1.5² = 2.25 -> B; the second query: d_A = 0, d_B = 25 -> A
    scores = proto_scores(support, query)
    expected = torch.log_softmax(-torch.tensor([[[12.25, 2.25], [0.0, 25.0]]], dtype=torch.float64), dim=-1)
    torch.testing.assert_close(scores, expected)
    assert scores.argmax(-1).tolist() == [[1, 0]]
    idx = torch.tensor([[[0, 1, 5], [2, 3, 4]]])  # rows of f: support A, support B, then one query per class
    f = torch.cat([flat, query[0, 1:], query[0, :1]]).float()  # f[4] = (3,0) (class A), f[5] = (6.5,0) (class B)
    assert episode_accuracies(f, idx, 2).tolist() == [0.0]  # (6.5,0) filed as A's query -> wrong, (3,0) as B's -> wrong
    idx = torch.tensor([[[0, 1, 4], [2, 3, 5]]])
    assert episode_accuracies(f, idx, 2).tolist() == [1.0]


def test_two_well_separated_clusters_give_accuracy_one() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat_interleave(40)
    f = torch.randn(80, 8, generator=g) + 10 * (2 * y.view(-1, 1) - 1)  # centres at ±10 in every coordinate
    idx = sample_episodes(y, torch.tensor([0, 1]), 2, 5 + 15, 50, torch.Generator().manual_seed(0))
    assert torch.equal(episode_accuracies(f, idx, 5), torch.ones(50))


def test_sample_episodes_draws_distinct_classes_and_images() -> None:
    y = torch.tensor([0] * 9 + [1] * 30 + [2] * 12 + [3] * 3)
    classes = torch.tensor([0, 1, 2])  # class 3 is too small and left out
    idx = sample_episodes(y, classes, 2, 8, 200, torch.Generator().manual_seed(1))
    assert idx.shape == (200, 2, 8)
    lab = y[idx]
    assert (lab == lab[:, :, :1]).all()  # each row holds one class
    assert (lab[:, 0, 0] != lab[:, 1, 0]).all()  # distinct classes per episode
    assert set(lab.flatten().tolist()) == {0, 1, 2}
    assert all(len(set(r)) == 8 for r in idx.view(-1, 8).tolist())  # distinct images per class
    assert torch.equal(idx, sample_episodes(y, classes, 2, 8, 200, torch.Generator().manual_seed(1)))


def test_separable_data_rows(use_data: UseData) -> None:
    use_data(pool_data([30] * 6, noise=2.0))
    rows = fewshot(frozen(Flatten(8), 8), pool_data([2] * 2, 0.0), Config(shots=(1, 5), episodes=40, pool="test"), seed=0)
    assert [r.metric for r in rows] == ["top1_1shot", "top1_5shot"]
    for r, k in zip(rows, (1, 5)):
        assert (r.value, r.ci95, r.std, r.min, r.max) == (1.0, 0.0, 0.0, 1.0, 1.0)
        assert r.split == "test" and r.n_train == 5 * k
        assert r.selection == "prototypes, 40 episodes, 5-way 15 queries"
        assert r.extra == {"transfer": "digits", "pool": "test"}


def test_interval_is_196_std_over_sqrt_episodes(use_data: UseData) -> None:
    data = pool_data([40] * 8, noise=60.0)  # overlapping classes: accuracies vary across episodes
    use_data(data)
    cfg = Config(shots=(3,), n_query=10, episodes=150, pool="test")
    (row,) = fewshot(frozen(Flatten(8), 8), pool_data([2] * 2, 0.0), cfg, seed=4)
    f = data.test.x.flatten(1).float() / 255
    idx = sample_episodes(data.test.y, torch.arange(8), 5, 13, 150, episode_generator(4, 3))
    accs = episode_accuracies(f, idx, 3).double().numpy()
    std = float(np.std(accs, ddof=1))
    assert 0.3 < row.value < 0.95 and std > 0.05
    assert row.value == pytest.approx(accs.mean())
    assert row.std == pytest.approx(std)
    assert row.ci95 == pytest.approx(1.96 * std / math.sqrt(150))
    assert (row.min, row.max) == (pytest.approx(accs.min()), pytest.approx(accs.max()))


def test_rows_are_deterministic_under_the_seed_and_differ_across_seeds(use_data: UseData) -> None:
    use_data(pool_data([40] * 8, noise=60.0))
    cfg = Config(shots=(1, 5), episodes=100, pool="test")
    enc, target = frozen(Flatten(8), 8), pool_data([2] * 2, 0.0)
    a, b, c = (fewshot(enc, target, cfg, seed=s) for s in (0, 0, 1))
    assert a == b
    assert all(x.value != y.value for x, y in zip(a, c))


def test_classes_too_small_for_k_are_skipped(use_data: UseData, caplog: pytest.LogCaptureFixture) -> None:
    use_data(pool_data([40, 40, 40, 12], noise=2.0))
    cfg = Config(n_way=3, shots=(5, 10, 36), n_query=5, episodes=30, pool="test")
    with caplog.at_level(logging.WARNING, logger="protocols.fewshot"):
        rows = fewshot(frozen(Flatten(8), 8), pool_data([2] * 2, 0.0), cfg, seed=0)
    # K=5 needs 10 images: all 4 classes; K=10 needs 15: class 3 (12) left out; K=36 needs 41: none
    assert [r.metric for r in rows] == ["top1_5shot", "top1_10shot"]
    assert "skipped_classes" not in rows[0].extra and rows[1].extra["skipped_classes"] == 1
    assert "skipping 36-shot: only 0 classes" in caplog.text
    assert "10-shot episodes leave out 1 classes" in caplog.text


@pytest.mark.parametrize(("kw", "match"), [
    ({"shots": (50,)}, r"fewshot.shots=\[50\]: none fits .* smallest of its 4 largest classes has 30 images, .* allow K <= 25"),
    ({"n_way": 5}, "fewshot.n_way=5: .* has only 4 classes"),
    ({"n_query": 40}, "fewshot.n_query=40: .* smallest of its 4 largest classes has 30 images, so n_way=4 needs n_query < 30"),
])
def test_error_names_what_the_data_allows_when_nothing_fits(use_data: UseData, kw: dict[str, Any], match: str) -> None:
    use_data(pool_data([30, 30, 40, 50], noise=2.0))
    cfg = dataclasses.replace(Config(n_way=4, shots=(5,), n_query=5, episodes=10, pool="test"), **kw)
    with pytest.raises(ConfigError, match=match):
        fewshot(frozen(Flatten(8), 8), pool_data([2] * 2, 0.0), cfg, seed=0)


@pytest.mark.parametrize(("kw", "match"), [
    ({"n_way": 1}, "fewshot.n_way"), ({"shots": ()}, "fewshot.shots"), ({"shots": (5, 0)}, "fewshot.shots"),
    ({"shots": (5, 5)}, "fewshot.shots has duplicates"), ({"n_query": 0}, "fewshot.n_query"),
    ({"episodes": 0}, "fewshot.episodes"), ({"pool": "train"}, "fewshot.pool"),
    ({"dataset": "digts"}, "fewshot.dataset: unknown dataset 'digts'; did you mean 'digits'"),
])
def test_config_validation(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Config(**kw)


def test_yaml_overrides_build_a_config() -> None:
    cfg = apply_overrides(Config(), {"shots": [1, 5], "pool": "test", "episodes": 10}, "fewshot")
    assert (cfg.shots, cfg.pool, cfg.episodes) == ((1, 5), "test", 10)


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: Tensor) -> Tensor:
        self.seen += len(x)
        return x.flatten(1)


@pytest.mark.parametrize("pool", ["test", "all"])
def test_features_are_extracted_once_per_split(use_data: UseData, pool: str) -> None:
    data = pool_data([30] * 5, noise=20.0)
    use_data(data)
    m = Counting()
    fewshot(frozen(m, 8), pool_data([2] * 2, 0.0), Config(shots=(1, 5, 10), episodes=20, pool=pool), seed=0)
    assert m.seen == (len(data.test) if pool == "test" else len(data.train) + len(data.val) + len(data.test))


def test_real_digits_pixels_and_random_convnet(fmnist_small: Splits) -> None:
    """Digits episodes for encoders built for Fashion-MNIST's input (1 channel, 16 px)."""
    cfg = Config(shots=(5, 20), pool="test")
    pix = fewshot(frozen(Flatten(256), 256), fmnist_small, cfg, seed=0)
    assert pix[0].value > 0.9 and pix[1].value > pix[0].value  # measured 0.910, 0.944
    assert 0.002 < pix[0].ci95 < 0.01 and pix[0].extra["transfer"] == "digits"
    torch.manual_seed(0)
    module = build_backbone(PretrainConfig(backbone="convnet_tiny"), 1, 16)
    module.train()  # a protocol must not update BN statistics even if handed a module in train mode
    before = {k: v.clone() for k, v in module.state_dict().items()}
    enc = FrozenEncoder(module, module.dim, fmnist_small.mean, fmnist_small.std, key="rand")  # type: ignore[arg-type]
    conv = fewshot(enc, fmnist_small, dataclasses.replace(cfg, pool="all", shots=(5,)), seed=0)
    assert 0.3 < conv[0].value < pix[0].value  # chance is 0.2; random conv features are weaker than pixels
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_rgb_encoder_gets_digits_as_rgb_at_its_size() -> None:
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    target = Splits("rgb8", ImageSet(x, torch.arange(4)), ImageSet(x, torch.arange(4)), ImageSet(x, torch.arange(4)),
                    4, (0.0,) * 3, (1.0,) * 3, "rgb8", torch.arange(0))
    rows = fewshot(frozen(Flatten(192), 192), target, Config(shots=(5,), episodes=50, pool="test"), seed=0)
    assert rows[0].value > 0.8  # grey digits repeated over 3 channels at 8 px still separate
