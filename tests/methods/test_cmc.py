"""CMC: RGB -> Lab on known colours, the two views' split on hand images, the loss against loops, symmetry and
batch order, the two encoders and the evaluated concatenation, training on real data, two processes against one."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

import methods.cmc  # noqa: F401  (registers "cmc")
from benchmark.backbones import ConvNet, Pixels, TorchvisionResNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.colour import rgb_to_lab
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.cmc import (
    CMC,
    LAB_MEAN,
    LAB_STD,
    Config,
    FrequencySplit,
    LabSplit,
    TwoViewEncoder,
    cmc_loss,
    in_channels,
)
from tests.methods.steps import assert_loss_falls

SMALL = Config(feat_dim=8)


def _lab(*rgb: float) -> list[float]:
    return [float(v) for v in rgb_to_lab(torch.tensor(rgb).view(1, 3, 1, 1)).flatten()]


def test_rgb_to_lab_on_known_colours() -> None:
    for rgb, want in [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),  # D65 white
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.241, 80.092, 67.203)),  # sRGB red, CIE reference values
        ((0.0, 1.0, 0.0), (87.735, -86.183, 83.179)),  # green: the official a minimum
        ((1.0, 0.0, 1.0), (60.324, 98.233, -60.825)),  # magenta: the official a maximum
        ((0.0, 0.0, 1.0), (32.297, 79.188, -107.860)),  # blue: the official b minimum
        ((1.0, 1.0, 0.0), (97.139, -21.554, 94.478)),  # yellow: the official b maximum
    ]:
        for got, w in zip(_lab(*rgb), want):
            assert abs(got - w) < 0.01, (rgb, _lab(*rgb), want)
    # mid grey by hand: sRGB 0.5 -> linear ((0.5 + 0.055) / 1.055)^2.4 = Y; L = 116 Y^(1/3) - 16; a = b = 0
    y = ((0.5 + 0.055) / 1.055) ** 2.4
    lab = _lab(0.5, 0.5, 0.5)
    assert abs(lab[0] - (116 * y ** (1 / 3) - 16)) < 1e-3 and abs(lab[1]) < 0.01 and abs(lab[2]) < 0.01
    # dark values use the linear branches of both the sRGB curve and f(t)
    dark = 0.01 / 12.92 * 0.212671 + 0 * 0.715160  # Y of (0.01, 0, 0)
    assert abs(_lab(0.01, 0.0, 0.0)[0] - (116 * (dark / (3 * (6 / 29) ** 2) + 4 / 29) - 16)) < 1e-3


def test_lab_split_of_a_hand_image() -> None:
    img = torch.tensor([[[1.0, 1.0], [0.0, 0.5]], [[1.0, 0.0], [0.0, 0.5]], [[1.0, 0.0], [0.0, 0.5]]])[None]  # white red / black grey
    split = LabSplit()
    split.mean.zero_()
    split.std.fill_(1.0)
    lum, ab = split(img)
    assert lum.shape == (1, 1, 2, 2) and ab.shape == (1, 2, 2, 2)
    norm = [[(v - m) / s for v, m, s in zip(_lab(*img[0, :, i, j].tolist()), LAB_MEAN, LAB_STD)] for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert math.isclose(float(lum[0, 0, i, j]), norm[k][0], abs_tol=1e-5)
        assert math.isclose(float(ab[0, 0, i, j]), norm[k][1], abs_tol=1e-5)
        assert math.isclose(float(ab[0, 1, i, j]), norm[k][2], abs_tol=1e-5)
    assert math.isclose(float(lum[0, 0, 0, 0]), 1.0, abs_tol=1e-4) and math.isclose(float(lum[0, 0, 1, 0]), -1.0, abs_tol=1e-4)
    assert math.isclose(float(lum[0, 0, 0, 1]), (53.241 - 50) / 50, abs_tol=1e-4)  # red
    # white and grey have a = b = 0, i.e. minus the official mean over the official std
    for i, j in [(0, 0), (1, 1)]:
        assert math.isclose(float(ab[0, 0, i, j]), -LAB_MEAN[1] / LAB_STD[1], abs_tol=1e-3)
        assert math.isclose(float(ab[0, 1, i, j]), -LAB_MEAN[2] / LAB_STD[2], abs_tol=1e-3)
    # inputs normalised by the dataset: before_epoch records mean/std and the split undoes them
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = CMC(ConvNet(3, (4, 8)), SMALL)
    model.before_epoch(0, SimpleNamespace(mean=mean, std=std), torch.device("cpu"), 0)
    x = (img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    l2, ab2 = model.halves.split(x)
    torch.testing.assert_close(l2, lum, atol=1e-4, rtol=0)
    torch.testing.assert_close(ab2, ab, atol=1e-4, rtol=0)
    assert torch.equal(model.encoder().state_dict()["split.std"], torch.tensor(std))  # saved with the encoder


def test_frequency_split_of_hand_images() -> None:
    split = FrequencySplit(1, 1 / 14)
    flat = torch.full((2, 1, 16, 16), 0.7)
    low, high = split(flat)
    torch.testing.assert_close(low, flat)  # a blur keeps a constant image; nothing is left for the high-pass view
    assert float(high.abs().max()) < 1e-6
    dot = torch.zeros(1, 1, 16, 16)
    dot[0, 0, 8, 8] = 1.0
    low, high = split(dot)
    # far from the border the low-pass of an impulse is the Gaussian kernel: sigma = 16/14 px, radius ceil(3 sigma) = 4
    s = 16 / 14
    w = [math.exp(-(t**2) / (2 * s**2)) for t in range(-4, 5)]
    k = [v / sum(w) for v in w]
    assert math.isclose(float(low[0, 0, 8, 8]), k[4] ** 2, rel_tol=1e-5)
    assert math.isclose(float(low[0, 0, 8, 10]), k[4] * k[6], rel_tol=1e-5)
    assert float(low[0, 0, 8, 13]) == 0.0  # outside the radius
    assert math.isclose(float(high[0, 0, 8, 8]), 1 - k[4] ** 2, rel_tol=1e-5)
    # the views add up to the image, and the split commutes with normalisation (it is linear)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    low, high = split(x)
    torch.testing.assert_close(low + high, x)
    low_n, high_n = split((x - 0.3) / 0.2)
    torch.testing.assert_close(low_n, (low - 0.3) / 0.2, atol=1e-5, rtol=0)
    torch.testing.assert_close(high_n, high / 0.2, atol=1e-5, rtol=0)


def test_splits_stay_float32_under_bf16_autocast() -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for split in (LabSplit(), FrequencySplit(3, 1 / 14)):
        ref = split(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = split(x)
        for a, b in zip(out, ref):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b)


def _reference(z1: Tensor, z2: Tensor, t: float) -> float:
    """Both directions as loops: -1/N sum_i log exp(a_i.b_i/t) / sum_j exp(a_i.b_j/t), unit vectors."""

    def unit(v: Tensor) -> list[float]:
        xs = v.double().tolist()
        norm = math.sqrt(sum(a * a for a in xs))
        return [a / norm for a in xs]

    def one_way(a: list[list[float]], b: list[list[float]]) -> float:
        total = 0.0
        for i, ai in enumerate(a):
            logits = [sum(x * y for x, y in zip(ai, bj)) / t for bj in b]
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
        return total / len(a)

    u1, u2 = [unit(v) for v in z1], [unit(v) for v in z2]
    return one_way(u1, u2) + one_way(u2, u1)


def _pair(n: int = 6, d: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    return z1, z1 + 0.8 * torch.randn(n, d, generator=g)


def test_loss_hand_cases_and_loop_formula() -> None:
    # orthonormal pairs: every row's logits are [1/t, 0]; each direction gives log(1 + e^(-1/t))
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # scale does not matter: embeddings are normalised
    assert math.isclose(float(cmc_loss(z, z.clone(), 0.5)), 2 * math.log(1 + math.exp(-2)), rel_tol=1e-5)
    # all embeddings equal: uniform softmax over N candidates, 2 log N
    ones = torch.ones(5, 3)
    assert math.isclose(float(cmc_loss(ones, ones, 0.07)), 2 * math.log(5), rel_tol=1e-5)
    for t in (0.07, 0.5):
        z1, z2 = _pair()
        assert math.isclose(float(cmc_loss(z1, z2, t)), _reference(z1, z2, t), rel_tol=1e-5)


def test_symmetric_and_invariant_to_batch_order() -> None:
    z1, z2 = _pair(n=8)
    ref = float(cmc_loss(z1, z2, 0.07))
    assert math.isclose(float(cmc_loss(z2, z1, 0.07)), ref, rel_tol=1e-6)  # L->ab + ab->L is symmetric
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    assert math.isclose(float(cmc_loss(z1[perm], z2[perm], 0.07)), ref, rel_tol=1e-5)
    assert not math.isclose(float(cmc_loss(z1[perm], z2, 0.07)), ref, rel_tol=1e-3)  # pairing matters


def test_gradients_reach_both_views_and_every_parameter() -> None:
    z1, z2 = (z.requires_grad_(True) for z in _pair())
    cmc_loss(z1, z2, 0.07).backward()
    assert z1.grad is not None and z2.grad is not None and z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    torch.manual_seed(0)
    for c in (1, 3):  # no stop-gradient: both encoders and both heads learn
        model = CMC(ConvNet(c, (4, 8)), SMALL)
        model.loss([torch.rand(6, c, 8, 8)], 0.0).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (c, name)


def test_two_encoders_split_channels_and_the_evaluated_concatenation() -> None:
    torch.manual_seed(0)
    resnet = CMC(TorchvisionResNet("resnet18", 3, True), SMALL)  # conv1 rebuilt for L and for ab
    assert (in_channels(resnet.halves.f1), in_channels(resnet.halves.f2)) == (1, 2)
    assert resnet.halves.f2.net.conv1.in_channels == 2 and resnet.encoder().dim == 2 * 512
    for c, split, channels in [(1, FrequencySplit, (1, 1)), (3, LabSplit, (1, 2))]:
        model = CMC(ConvNet(c, (4, 8)), SMALL)
        halves = model.halves
        assert isinstance(halves.split, split)
        assert (in_channels(halves.f1), in_channels(halves.f2)) == channels
        assert (model.head1.out_features, model.head2.out_features) == (8, 8)
        enc = model.encoder()
        assert isinstance(enc, TwoViewEncoder) and enc.dim == 2 * 8
        assert not any(k.startswith("head") for k in enc.state_dict())  # heads are not evaluated
        x = torch.randn(4, c, 16, 16)  # the full image, as protocols pass it
        enc.eval()
        with torch.no_grad():
            out = enc(x)
            v1, v2 = halves.split(x)
            assert out.shape == (4, 16)
            torch.testing.assert_close(out, torch.cat([halves.f1(v1), halves.f2(v2)], dim=1))
    # the second half is re-drawn from the same initial values: same multiset, different placement
    model = CMC(ConvNet(1, (4, 8)), SMALL)
    w1, w2 = model.halves.f1.body[3].weight, model.halves.f2.body[3].weight
    assert not torch.equal(w1, w2) and torch.equal(w1.flatten().sort().values, w2.flatten().sort().values)
    # the saved encoder loads into a freshly built one (what evaluation does), buffers included
    fresh = CMC(ConvNet(1, (4, 8)), SMALL).encoder()
    fresh.load_state_dict(model.encoder().state_dict(), strict=True)


def test_views_defaults_and_config() -> None:
    model = CMC(ConvNet(1, (4, 8)), Config())
    (view,) = model.views(28)  # one crop; the two views are its channel split
    assert (view.size, view.scale, view.flip_p, view.jitter_p, view.gray_p, view.blur_p) == (28, (0.08, 1.0), 0.5, 0.0, 0.0, 0.0)
    assert (Config().feat_dim, Config().temperature, Config().min_scale) == (128, 0.07, 0.08)
    assert METHODS.entry("cmc").meta["pretrain"] == dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, warmup_epochs=0)
    views = [torch.randn(6, 1, 8, 8)]
    torch.testing.assert_close(model.loss(views, 0.0), model.loss(views, 1.0))  # no schedule
    for bad in (dict(feat_dim=0), dict(temperature=0.0), dict(split="rgb"), dict(blur_sigma=0.0), dict(min_scale=1.5)):
        with pytest.raises(ConfigError, match="cmc"):
            Config(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="3-channel"):
        CMC(ConvNet(1, (4, 8)), Config(split="lab"))  # no colour to split
    with pytest.raises(ConfigError, match="Conv2d"):
        CMC(Pixels(1, 8), Config())  # no first conv to rebuild
    rgb_freq = CMC(ConvNet(3, (4, 8)), Config(split="frequency"))
    assert (in_channels(rgb_freq.halves.f1), in_channels(rgb_freq.halves.f2)) == (3, 3)


def test_loss_falls_within_20_sgd_steps_on_real_data(digits: Splits) -> None:
    torch.manual_seed(0)
    model = build_method(METHODS.get("cmc"), Config(feat_dim=32), PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:32], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    assert_loss_falls(model, views)


def test_loss_falls_on_colour_tinted_digits(digits: Splits) -> None:
    """The Lab path on real shapes: each digit painted in a random colour (ab then carries the shape too)."""
    g = torch.Generator().manual_seed(0)
    tint = torch.rand(32, 3, 1, 1, generator=g)
    x = (digits.train.x[:32].float() * tint).round().to(torch.uint8)  # (32, 3, 16, 16)
    torch.manual_seed(0)
    model = CMC(ConvNet(3, (8, 16, 32)), Config(feat_dim=32))
    mean = tuple(x.float().div(255).mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.float().div(255).std(dim=(0, 2, 3)).tolist())
    model.before_epoch(0, SimpleNamespace(mean=mean, std=std), torch.device("cpu"), 0)
    assert_loss_falls(model, make_views(x, model.views(16), mean, std, g))


def test_two_processes_equal_one_process_on_the_global_batch() -> None:
    from tests.ddp import pair_loss_in_processes

    z1, z2 = _pair(n=8, d=5)
    losses, ref = pair_loss_in_processes(cmc_loss, z1, z2, 0.07)  # also checks the DDP-averaged gradients
    # each process averages over its own anchors: the mean over processes is the global-batch loss
    assert math.isclose(sum(losses) / len(losses), ref, rel_tol=1e-5)
