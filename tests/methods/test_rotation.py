"""RotNet: the rotated batch against hand-rotated images and the official numpy rotations, the loss
against hand-computed cross entropy, and the plugin's wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import methods.rotation  # noqa: F401  (registers "rotation")
from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.rotation import Config, RotNet, rotate_batch, rotation_loss
from tests.methods.steps import assert_loss_falls


def _official_rotation(img: np.ndarray, k: int) -> np.ndarray:
    """FeatureLearningRotNet's `rotate_img` on an (H, W, C) array, k quarter turns."""
    if k == 0:
        return img
    if k == 1:
        return np.flipud(np.transpose(img, (1, 0, 2)))
    if k == 2:
        return np.fliplr(np.flipud(img))
    return np.transpose(np.flipud(img), (1, 0, 2))


def _model(channels: int = 1, **cfg: int) -> RotNet:
    torch.manual_seed(0)
    return RotNet(ConvNet(channels, (4, 8)), Config(**{"head_hidden_dim": 16, **cfg}))  # type: ignore[arg-type]


def test_rotations_of_a_2x2_image_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out, labels = rotate_batch(x)
    expected = [
        [[1, 2], [3, 4]],  # 0
        [[2, 4], [1, 3]],  # 90 counter-clockwise: the top-right corner moves to the top-left
        [[4, 3], [2, 1]],  # 180
        [[3, 1], [4, 2]],  # 270
    ]
    torch.testing.assert_close(out[:, 0], torch.tensor(expected, dtype=torch.float32))
    assert labels.tolist() == [0, 1, 2, 3]


def test_matches_the_official_numpy_rotations() -> None:
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    out, labels = rotate_batch(x)
    for i in range(2):
        img = x[i].permute(1, 2, 0).numpy()  # (H, W, C) as the official loader sees it
        for k in range(4):
            ref = torch.from_numpy(_official_rotation(img, k).copy()).permute(2, 0, 1)
            torch.testing.assert_close(out[4 * i + k], ref)
            assert labels[4 * i + k] == k


def test_every_image_appears_once_at_every_angle() -> None:
    n = 5
    x = torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    out, labels = rotate_batch(x)
    assert out.shape == (4 * n, 1, 6, 6) and labels.shape == (4 * n,) and labels.dtype == torch.long
    assert torch.bincount(labels).tolist() == [n] * 4
    # undo each row's rotation: row 4i + k must give back image i, for every k
    back = torch.stack([torch.rot90(out[r], -int(labels[r]), dims=(-2, -1)) for r in range(4 * n)])
    torch.testing.assert_close(back, x.repeat_interleave(4, dim=0))
    # the four copies of one image are all different (the images are not rotation-symmetric)
    for i in range(n):
        rows = out[4 * i : 4 * i + 4].flatten(1)
        assert torch.cdist(rows, rows).add(torch.eye(4)).min() > 0


def test_loss_is_cross_entropy_on_a_hand_case() -> None:
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    labels = torch.tensor([0, 3, 1])
    # row 0: p = 2 / 5; row 1: p = 1 / 4; row 2: p = 1 / (3 + e^3)
    expected = (-math.log(2 / 5) + math.log(4) + math.log(3 + math.e**3)) / 3
    assert math.isclose(float(rotation_loss(logits, labels)), expected, rel_tol=1e-6)
    # confident and right: ~0; confident and wrong: ~ the margin
    assert float(rotation_loss(torch.tensor([[50.0, 0, 0, 0]]), torch.tensor([0]))) < 1e-6
    assert math.isclose(float(rotation_loss(torch.tensor([[50.0, 0, 0, 0]]), torch.tensor([2]))), 50.0, rel_tol=1e-6)


def test_loss_is_invariant_to_batch_order() -> None:
    g = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(12, 4, generator=g), torch.randint(0, 4, (12,), generator=g)
    perm = torch.randperm(12, generator=g)
    torch.testing.assert_close(rotation_loss(logits[perm], labels[perm]), rotation_loss(logits, labels))
    # the module too: BN statistics over the 4N rotated images do not depend on the images' order
    model = _model()
    v = torch.randn(6, 1, 8, 8, generator=g)
    torch.testing.assert_close(model.loss([v[torch.randperm(6, generator=g)]], 0.0), model.loss([v], 0.0))


def test_a_rotation_invariant_backbone_cannot_beat_chance() -> None:
    """The four copies of each image are in the batch with all four labels: features that ignore
    rotation give four identical rows per image, and cross entropy over them is at least ln 4."""

    class MeanPool(nn.Module):
        dim = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    torch.manual_seed(0)
    v = torch.randn(8, 3, 6, 6)
    for layers in (1, 3):  # BN in the MLP head keeps identical rows identical
        model = RotNet(MeanPool(), Config(head_layers=layers, head_hidden_dim=16))
        nn.init.normal_(model.head[0].weight, std=3.0)
        assert float(model.loss([v], 0.0).detach()) >= math.log(4) - 1e-6, layers


def test_gradients_reach_the_head_and_every_backbone_parameter() -> None:
    for layers in (1, 3):
        model = _model(head_layers=layers)
        model.loss([torch.randn(6, 1, 8, 8)], 0.0).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (layers, name)


def test_head_views_encoder_and_config() -> None:
    assert (Config().head_layers, Config().head_hidden_dim) == (3, 4096)  # the official AlexNet fc6-fc8
    model = _model()
    kinds = [type(m) for m in model.head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, 8), (16, 16), (4, 16)]
    assert [m.bias is not None for m in linears] == [False, False, True]  # bias-free before BN, as the official fc6/fc7
    (linear,) = _model(head_layers=1).head  # the official CIFAR head: one Linear (with bias) on the pooled features
    assert isinstance(linear, nn.Linear) and tuple(linear.weight.shape) == (4, 8) and linear.bias is not None
    assert model.encoder() is model.backbone
    (view,) = model.views(28)  # one mild view: crop and flip, no colour or grey-scale changes
    assert (view.size, view.scale, view.ratio, view.flip_p, view.jitter_p, view.gray_p, view.blur_p, view.solarize_p) == \
        (28, (0.75, 1.0), (1.0, 1.0), 0.5, 0.0, 0.0, 0.0, 0.0)
    # the loss is wired as cross entropy of head(backbone(rotated batch)); no schedule
    v = torch.randn(6, 1, 8, 8)
    x, rot = rotate_batch(v)
    torch.testing.assert_close(model.loss([v], 0.0), rotation_loss(model.head(model.backbone(x)), rot))
    torch.testing.assert_close(model.loss([v], 0.0), model.loss([v], 1.0))
    entry = METHODS.entry("rotation")
    assert entry.meta["pretrain"] == dict(optimizer="sgd", lr=0.2, weight_decay=5e-4, warmup_epochs=0)
    for bad in (dict(head_layers=0), dict(head_hidden_dim=0), dict(min_scale=0.0), dict(min_scale=1.5)):
        with pytest.raises(ConfigError, match="rotation"):
            Config(**bad)  # type: ignore[arg-type]


def test_three_channels_at_28_px() -> None:
    model = _model(channels=3)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    views = make_views(x, model.views(28), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.Generator().manual_seed(0))
    assert views[0].shape == (4, 3, 28, 28)
    assert torch.isfinite(model.loss(views, 0.0))


def test_loss_falls_within_20_sgd_steps_on_real_data(digits: Splits) -> None:
    torch.manual_seed(0)
    model = build_method(METHODS.get("rotation"), Config(head_hidden_dim=64), PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:16], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    losses = assert_loss_falls(model, views)
    assert losses[0] > 1.0  # starts near chance (ln 4 = 1.39): the task is not solved by construction
