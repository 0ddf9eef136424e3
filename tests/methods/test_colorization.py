"""Colorization: Lab conversion, ab bins, soft encoding, rebalancing and the loss against hand-computed cases;
the colour-blind backbone; NotApplicable on grey data; the loss falls on real colour images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods.colorization  # noqa: F401  (registers "colorization")
from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.colour import rgb_to_lab
from benchmark.data.sets import ImageSet, Splits
from benchmark.errors import ConfigError, NotApplicable
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.colorization import (
    Colorization,
    Config,
    ab_bins,
    colorization_loss,
    rebalance_weights,
    smooth_prior,
    soft_encode,
)
from tests.methods.steps import assert_loss_falls

TINY = dict(decoder_dim=16)


def _lab(rgb: tuple[float, float, float]) -> list[float]:
    return rgb_to_lab(torch.tensor(rgb).view(1, 3, 1, 1)).flatten().tolist()


def _lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Reference inverse (CIE formulas, D65): (N, 3, H, W) Lab -> sRGB in [0, 1]."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    xyz = torch.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * torch.tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
    m = torch.linalg.inv(torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                                       [0.019334, 0.119193, 0.950227]]))
    linear = torch.einsum("ij,njhw->nihw", m, xyz)
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0) ** (1 / 2.4) - 0.055, 12.92 * linear)


@pytest.fixture(scope="module")
def colour_patches() -> Splits:
    """Real colour images: scikit-learn's china.jpg and flower.jpg, halved, cut into 16 px patches (label: photo)."""
    from sklearn.datasets import load_sample_images

    xs, ys = [], []
    for label, img in enumerate(load_sample_images().images):
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().unsqueeze(0)
        t = F.avg_pool2d(t, 2)[0].round().to(torch.uint8)  # (3, 213, 320)
        patches = t.unfold(1, 16, 16).unfold(2, 16, 16).permute(1, 2, 0, 3, 4).reshape(-1, 3, 16, 16)
        xs.append(patches)
        ys.append(torch.full((len(patches),), label))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    mean = tuple((x.float() / 255).mean(dim=(0, 2, 3)).tolist())
    std = tuple((x.float() / 255).std(dim=(0, 2, 3)).tolist())
    tr, va = ImageSet(x[:400], y[:400]), ImageSet(x[400:], y[400:])
    return Splits("sample_images", tr, va, va, 2, mean, std, "test", torch.arange(400, len(y)))


def _model(c: int = 3, **kw: object) -> Colorization:
    torch.manual_seed(0)
    return Colorization(ConvNet(c, (8, 16, 32)), Config(**{**TINY, **kw}))  # type: ignore[arg-type]


def test_lab_of_known_colours() -> None:
    for rgb, lab in [((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)), ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
                     ((1.0, 0.0, 0.0), (53.2406, 80.0924, 67.2032)), ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
                     ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602))]:
        assert _lab(rgb) == pytest.approx(lab, abs=1e-2), rgb
    # any grey has a = b = 0 (to the 1e-2 that the matrix's rounded white point allows); mid-grey has L = 53.585
    assert _lab((128 / 255,) * 3) == pytest.approx([53.585, 0.0, 0.0], abs=1e-2)


def test_lab_round_trip() -> None:
    rgb = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-4, rtol=0)


def test_ab_bins_are_the_in_gamut_grid_cells() -> None:
    bins = ab_bins(10.0)
    assert bins.shape == (261, 2)  # the official ImageNet hull has 313
    assert (bins.abs() <= 110).all() and torch.equal(bins, (bins / 10).round() * 10)
    assert (bins == 0).all(1).any()  # grey
    # every 8-bit colour's nearest grid cell is a bin (the sample's levels are not the ones the bins were built from)
    rgb = torch.randint(0, 256, (1, 3, 4000, 1), generator=torch.Generator().manual_seed(0)).float() / 255
    cells = (rgb_to_lab(rgb)[0, 1:, :, 0].T / 10).round() * 10
    assert (torch.cdist(cells, bins).min(1).values == 0).all()
    # pure red's ab (80.1, 67.2) lies in the cell of (80, 70); a point outside the sRGB gamut has no bin
    assert ((bins == torch.tensor([80.0, 70.0])).all(1)).any()
    assert not ((bins == torch.tensor([-110.0, -110.0])).all(1)).any()


def test_soft_encoding_hand_case() -> None:
    bins = ab_bins(10.0)
    ab = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)  # on a bin; its 4 grid neighbours are 10 away
    z = soft_encode(ab, bins, k=5, sigma=5.0)[0, :, 0, 0]
    assert z.shape == (len(bins),) and int((z > 0).sum()) == 5
    e = math.exp(-(10**2) / (2 * 5**2))
    centre = int(((bins == 0).all(1)).nonzero())
    assert float(z[centre]) == pytest.approx(1 / (1 + 4 * e), rel=1e-5)
    around = z[(bins.abs().sum(1) == 10)]
    assert around.tolist() == pytest.approx([e / (1 + 4 * e)] * 4, rel=1e-5)


def test_soft_encoding_nearest_bins_sum_to_one_and_sigma_flattens() -> None:
    bins = ab_bins(10.0)
    ab = torch.tensor([[23.0, -41.0], [-7.0, 3.0], [60.0, 12.0]]).T.reshape(1, 2, 3, 1)
    z = soft_encode(ab, bins, k=5, sigma=5.0)  # (1, Q, 3, 1)
    torch.testing.assert_close(z.sum(1), torch.ones(1, 3, 1))
    for i in range(3):
        d = torch.cdist(ab[0, :, i, 0].view(1, 2), bins)[0]
        on = z[0, :, i, 0] > 0
        assert int(on.sum()) == 5 and d[on].max() <= d[~on].min()  # exactly the 5 nearest bins
        w = z[0, on, i, 0]
        ref = torch.exp(-d[on] ** 2 / 50)
        torch.testing.assert_close(w, ref / ref.sum())
    flat = soft_encode(ab, bins, k=5, sigma=50.0)
    assert (flat.max(1).values < z.max(1).values).all()  # a wider kernel spreads the weight
    one_hot = soft_encode(ab, bins, k=1, sigma=5.0)
    assert torch.equal(one_hot.max(1).values, torch.ones(1, 3, 1))


def test_rebalance_weights_hand_case() -> None:
    # p = (0.75, 0.25), lam = 0.5: mix = (0.625, 0.375), 1/mix = (1.6, 8/3), E_p[1/mix] = 1.2 + 2/3
    w = rebalance_weights(torch.tensor([0.75, 0.25]), 0.5)
    z = 1.2 + 2 / 3
    assert w.tolist() == pytest.approx([1.6 / z, (8 / 3) / z], rel=1e-5)
    assert float((torch.tensor([0.75, 0.25]) * w).sum()) == pytest.approx(1.0)
    assert rebalance_weights(torch.full((7,), 1 / 7), 0.5).tolist() == pytest.approx([1.0] * 7)  # uniform prior
    assert rebalance_weights(torch.tensor([0.9, 0.1]), 1.0).tolist() == pytest.approx([1.0, 1.0])  # lam = 1: off


def test_smooth_prior_spreads_to_neighbours() -> None:
    bins = ab_bins(10.0)
    counts = torch.zeros(len(bins))
    counts[int(((bins == 0).all(1)).nonzero())] = 10  # every pixel grey
    p = smooth_prior(counts, bins, 5.0)
    assert float(p.sum()) == pytest.approx(1.0)
    # the grey bin and its 4 neighbours (10 away) get 1 : e^-2, the 4 diagonal ones (14.1 away) e^-4
    ratio = p[(bins.abs().sum(1) == 10)] / p.max()
    assert ratio.tolist() == pytest.approx([math.exp(-2)] * 4, rel=1e-4)


def test_loss_hand_case() -> None:
    z = torch.zeros(2, 4, 1, 2)
    z[:, 0] = 1.0  # every pixel's target: class 0
    logits = torch.zeros(2, 4, 1, 2)  # uniform prediction: CE = log 4 everywhere
    ones = torch.ones(2, 1, 2)
    assert float(colorization_loss(logits, z, ones)) == pytest.approx(math.log(4))
    w = torch.tensor([[[2.0, 0.0]], [[1.0, 1.0]]])  # the mean over the 4 pixels of w * CE
    assert float(colorization_loss(logits, z, w)) == pytest.approx(math.log(4) * 4 / 4)
    logits[0, 0, 0, 0] = math.log(3)  # pixel (0, 0, 0): p(class 0) = 3 / 6
    soft = z.clone()
    soft[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0])  # CE = -0.5 log(1/2) - 0.5 log(1/6)
    ref = (0.5 * math.log(2) + 0.5 * math.log(6) + 3 * math.log(4)) / 4
    assert float(colorization_loss(logits, soft, ones)) == pytest.approx(ref, rel=1e-6)
    # invariant to the batch order
    perm = torch.tensor([1, 0])
    assert float(colorization_loss(logits[perm], soft[perm], ones)) == pytest.approx(ref, rel=1e-6)


def test_grey_data_is_not_applicable() -> None:
    for target in ("lab", "channel"):
        with pytest.raises(NotApplicable, match=r"colorization needs colour \(3-channel\) images; the dataset has 1 channel"):
            _model(1, target=target)
    with pytest.raises(NotApplicable, match="target=channel"):
        _model(4)  # not RGB: Lab is undefined, the substitute is named
    _model(4, target="channel", input_channel=3)


def test_backbone_is_colour_blind_during_and_after_training(colour_patches: Splits) -> None:
    model = _model(3)
    x = make_views(colour_patches.train.x[:16], model.views(16), colour_patches.mean, colour_patches.std,
                   torch.Generator().manual_seed(0))[0]
    model.before_epoch(0, colour_patches, torch.device("cpu"), 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # per-weight steps leave the tied set; encoder() re-ties
    for _ in range(3):
        opt.zero_grad()
        model.loss([x], 0.0).backward()
        opt.step()
    enc = model.encoder().eval()
    with torch.no_grad():
        # an RGB image gives exactly the features of its grey version (what the backbone was trained on)
        torch.testing.assert_close(enc(x), enc(model.grey(x)), atol=1e-5, rtol=1e-5)
        # the same luma with the chroma inverted (2 Y' - RGB): other colours, other targets, the same features
        mean, std = model.mean.view(1, 3, 1, 1), model.std.view(1, 3, 1, 1)
        raw = x * std + mean
        luma = (raw * model.alpha.view(1, 3, 1, 1)).sum(1, keepdim=True)
        inverted = (2 * luma - raw - mean) / std
        assert not torch.allclose(model.targets(inverted, 4)[0], model.targets(x, 4)[0])
        torch.testing.assert_close(enc(inverted), enc(x), atol=1e-5, rtol=1e-5)
    assert model.encoder() is model.backbone


def test_channel_target_sees_one_channel_and_regresses_the_others(colour_patches: Splits) -> None:
    model = _model(3, target="channel", input_channel=1)
    x = torch.randn(6, 3, 16, 16)
    g = model.grey(x)
    torch.testing.assert_close(g[:, 0] * model.std[0] + model.mean[0], x[:, 1] * model.std[1] + model.mean[1])
    model.eval()
    with torch.no_grad():
        y = x.clone()
        y[:, [0, 2]] = torch.randn(6, 2, 16, 16)  # other channels changed: same features
        torch.testing.assert_close(model.backbone(x), model.backbone(y), atol=1e-5, rtol=1e-5)
    model.train()
    views = make_views(colour_patches.train.x[:32], model.views(16), colour_patches.mean, colour_patches.std,
                       torch.Generator().manual_seed(0))
    assert_loss_falls(model, views)


def test_before_epoch_estimates_the_prior_and_rebalances(colour_patches: Splits) -> None:
    model = _model(3)
    assert float(model.prior.max()) == pytest.approx(1 / len(model.bins))  # uniform until estimated: weights 1
    model.before_epoch(0, colour_patches, torch.device("cpu"), 0)
    assert model.mean.tolist() == pytest.approx(list(colour_patches.mean))
    assert float(model.prior.sum()) == pytest.approx(1.0) and "prior" in model.state_dict()
    w = rebalance_weights(model.prior, 0.5)
    common, rare = int(model.prior.argmax()), int(model.prior.argmin())
    assert w[rare] > 1 > w[common]
    before = model.prior.clone()
    model.before_epoch(1, colour_patches, torch.device("cpu"), 1)
    assert torch.equal(model.prior, before)  # only the first epoch estimates it (then checkpoints carry it)


def test_grey_images_get_no_loss() -> None:
    model = _model(3)
    x = model.grey(torch.randn(2, 3, 16, 16))  # grey images (R = G = B), normalised
    x[1, 0] += 1.0  # image 1 made reddish
    z, w = model.targets(x, 4)
    assert z.shape == (2, len(model.bins), 4, 4) and w.shape == (2, 4, 4)
    assert (w[0] == 0).all() and (w[1] > 0).all()


def test_wiring_shapes_gradients_and_config() -> None:
    model = _model(3)
    (v,) = model.views(28)
    assert (v.size, v.scale, v.ratio, v.jitter_p, v.gray_p) == (28, (0.47, 1.0), (1.0, 1.0), 0.0, 0.0)
    for side, s in ((16, 4), (28, 7)):
        h = model.backbone(torch.randn(4, 3, side, side))
        assert model.decoder(h, side // 4).shape == (4, len(model.bins), s, s)
    model.loss([torch.randn(6, 3, 16, 16)], 0.0).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert Config().soft_neighbors == 10 and Config().soft_sigma == 5.0 and Config().rebalance_lambda == 0.5
    for bad in (dict(target="rgb"), dict(grid=0.0), dict(soft_neighbors=0), dict(soft_sigma=0.0),
                dict(rebalance_lambda=1.5), dict(out_stride=0), dict(decoder_dim=0), dict(min_scale=0.0),
                dict(gray_threshold=-1.0), dict(prior_sigma=0.0), dict(input_channel=-1)):
        with pytest.raises(ConfigError, match=f"colorization.{next(iter(bad))}"):
            Config(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="colorization.input_channel"):
        _model(3, target="channel", input_channel=3)


def test_loss_falls_within_20_sgd_steps_on_real_colour_images(colour_patches: Splits) -> None:
    torch.manual_seed(0)
    model = build_method(METHODS.get("colorization"), Config(**TINY), PretrainConfig(backbone="convnet_tiny"),  # type: ignore[arg-type]
                         colour_patches, seed=0)
    model.before_epoch(0, colour_patches, torch.device("cpu"), 0)  # type: ignore[operator]
    views = make_views(colour_patches.train.x[:32], model.views(16), colour_patches.mean, colour_patches.std,  # type: ignore[operator]
                       torch.Generator().manual_seed(0))
    assert_loss_falls(model, views)
