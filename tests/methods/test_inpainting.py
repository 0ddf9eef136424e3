"""Context Encoders: the mask geometry at 16, 28 and 128 px, the masked input, the weighted loss on hand cases,
gradient flow, the plugin's wiring and config validation."""

from __future__ import annotations

import math

import pytest
import torch

import methods.inpainting  # noqa: F401  (registers "inpainting")
from benchmark.backbones import ConvNet, Pixels
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.inpainting import (
    Config,
    ContextEncoder,
    center_square,
    dilate,
    erode,
    inpainting_loss,
    mask_context,
    overlap_px,
    random_blobs,
)
from tests.methods.steps import assert_loss_falls


def _model(channels: int = 1, **cfg: object) -> ContextEncoder:
    torch.manual_seed(0)
    return ContextEncoder(ConvNet(channels, (4, 8)), Config(decoder_width=4, decoder_stages=2, **cfg))  # type: ignore[arg-type]


def _box(size: int, lo: int, hi: int) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[lo:hi, lo:hi] = True
    return m


@pytest.mark.parametrize(("size", "top", "side", "ring"), [(16, 4, 8, 1), (28, 7, 14, 1), (32, 8, 16, 1), (128, 32, 64, 4)])
def test_centre_geometry(size: int, top: int, side: int, ring: int) -> None:
    # official train.lua at 128 px: the square is rows/cols 33..96 (1-based), the filled part 37..92 (overlapPred=4)
    assert center_square(size, 0.25) == (top, side)
    assert overlap_px(size, 4 / 128) == ring
    region, hidden = _model().masks(3, size, torch.device("cpu"))
    assert region.shape == hidden.shape == (1, size, size)  # one mask for the batch
    assert torch.equal(region[0], _box(size, top, top + side))
    assert torch.equal(hidden[0], _box(size, top + ring, top + side - ring))
    # the overlap ring: region minus hidden, `ring` pixels wide on every side
    assert int((region & ~hidden).sum()) == side**2 - (side - 2 * ring) ** 2
    assert _model().geometry(size) == (top, side, ring)


def test_overlap_px_rounds_and_never_vanishes() -> None:
    assert overlap_px(16, 0.0) == 0
    assert overlap_px(16, 4 / 128) == 1  # 0.5 px rounds up to the 1 px minimum
    assert overlap_px(64, 4 / 128) == 2 and overlap_px(224, 4 / 128) == 7
    region, hidden = _model(overlap=0.0).masks(2, 16, torch.device("cpu"))
    assert torch.equal(region, hidden)  # no ring: everything predicted is hidden


def test_erode_and_dilate_by_hand() -> None:
    m = _box(7, 1, 6)[None]  # a 5x5 square in a 7x7 image
    assert torch.equal(erode(m, 1)[0], _box(7, 2, 5))
    assert torch.equal(erode(m, 2)[0], _box(7, 3, 4))
    assert torch.equal(dilate(_box(7, 3, 4)[None], 2)[0], _box(7, 1, 6))
    assert torch.equal(dilate(m, 1)[0], torch.ones(7, 7, dtype=torch.bool))
    # the image border is not outside the region: a full image does not erode
    full = torch.ones(1, 5, 5, dtype=torch.bool)
    assert torch.equal(erode(full, 1), full)


@pytest.mark.parametrize("size", [16, 28])
def test_random_regions(size: int) -> None:
    torch.manual_seed(0)
    blobs = random_blobs(64, size, 0.25, 4)
    assert blobs.shape == (64, size, size) and blobs.dtype == torch.bool
    assert (blobs.flatten(1).sum(1) == round(0.25 * size * size)).all()  # exactly the area, every image
    assert len({tuple(b.flatten().tolist()) for b in blobs}) == 64  # one mask per image
    # blobs, not scattered pixels: most hidden pixels have a hidden 4-neighbour
    pad = torch.nn.functional.pad(blobs, (1, 1, 1, 1))
    nbr = pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
    assert (nbr & blobs).sum() > 0.9 * blobs.sum()
    # no pile-up at the border or the corners: every pixel is hidden in 10-45% of the draws
    freq = random_blobs(2000, size, 0.25, 4).float().mean(0)
    assert 0.1 < float(freq.min()) and float(freq.max()) < 0.45
    region, hidden = _model(region="random").masks(8, size, torch.device("cpu"))
    assert region.shape == hidden.shape == (8, size, size)
    assert (hidden.flatten(1).sum(1) == round(0.25 * size * size)).all()  # the blobs are hidden
    assert torch.equal(region, dilate(hidden, 1)) and bool((region & hidden).eq(hidden).all())


def test_masked_input_fills_the_hidden_pixels_only() -> None:
    x = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    region, hidden = _model().masks(3, 16, torch.device("cpu"))
    out = mask_context(x, hidden)
    inside = hidden[0]
    assert (out[:, :, inside] == 0).all()  # the dataset mean, in every channel and image
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])  # the ring and the rest untouched
    assert bool((region[0] & ~inside).any())  # (the ring exists and is visible)
    # per-image masks (random regions) fill each image's own pixels
    hid = random_blobs(3, 16, 0.25, 4)
    out = mask_context(x, hid)
    for i in range(3):
        assert (out[i][:, hid[i]] == 0).all() and torch.equal(out[i][:, ~hid[i]], x[i][:, ~hid[i]])


def test_loss_on_a_hand_case() -> None:
    # 4x4 window: the inner 2x2 hidden (weight 1), the 12-pixel ring (weight 10); a weighted mean
    region, hidden = torch.ones(1, 4, 4, dtype=torch.bool), _box(4, 1, 3)[None]
    pred, target = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    assert math.isclose(float(inpainting_loss(pred, target, region, hidden, 10.0)), 1.0)  # the same error everywhere
    # error only in one hidden pixel (3^2) and one ring pixel (2^2), two channels, overlap weight 5:
    # (1 * 9 + 5 * 4) / (2 channels x (4 hidden x 1 + 12 ring x 5))
    pred = torch.zeros(1, 2, 4, 4)
    target = torch.zeros(1, 2, 4, 4)
    target[0, 1, 1, 2], target[0, 0, 0, 3] = 3.0, 2.0
    assert math.isclose(float(inpainting_loss(pred, target, region, hidden, 5.0)), (9 + 5 * 4) / (2 * 64), rel_tol=1e-6)
    # the same errors, both in the ring or both hidden: the ring's pixels count 5x
    target[0, 1, 1, 2], target[0, 1, 0, 0] = 0.0, 3.0
    assert math.isclose(float(inpainting_loss(pred, target, region, hidden, 5.0)), (5 * 9 + 5 * 4) / (2 * 64), rel_tol=1e-6)
    # overlap weight 1: the plain mean squared error over the region (the official MSECriterion without overlap)
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    torch.testing.assert_close(inpainting_loss(p, t, region, hidden, 1.0), (p - t).pow(2).mean())


def test_loss_counts_only_the_region() -> None:
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    hidden = random_blobs(4, 16, 0.25, 4)
    region = dilate(hidden, 1)
    ref = inpainting_loss(pred, target, region, hidden, 10.0)
    out = ~region.unsqueeze(1).expand_as(pred)
    p2, t2 = pred.clone(), target.clone()
    p2[out], t2[out] = 100.0, -100.0  # anything outside the region
    torch.testing.assert_close(inpainting_loss(p2, t2, region, hidden, 10.0), ref)
    p2[~out] += 0.1  # inside it, the loss changes
    assert not torch.allclose(inpainting_loss(p2, t2, region, hidden, 10.0), ref)
    # the ring is weighted by the factor: the ring's share of the loss scales with it, the hidden share does not
    ring = region & ~hidden
    err = (pred - target).pow(2).sum(1)  # (N, H, W)
    for w in (0.0, 1.0, 10.0):
        expected = (err[hidden].sum() + w * err[ring].sum()) / (3 * (hidden.sum() + w * ring.sum()))
        torch.testing.assert_close(inpainting_loss(pred, target, region, hidden, w), expected)
    # invariant to the order of the batch (images permuted with their masks)
    perm = torch.randperm(4, generator=g)
    torch.testing.assert_close(inpainting_loss(pred[perm], target[perm], region[perm], hidden[perm], 10.0), ref)


def test_the_module_loss_is_the_weighted_error_on_the_centre_window() -> None:
    model = _model()
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    region, hidden = model.masks(5, 16, torch.device("cpu"))
    pred = model.decoder(model.backbone(mask_context(x, hidden)), (8, 8))
    assert pred.shape == (5, 1, 8, 8)
    w = (slice(None), slice(4, 12), slice(4, 12))
    torch.testing.assert_close(model.loss([x], 0.0), inpainting_loss(pred, x[:, :, 4:12, 4:12], region[w], hidden[w], 10.0))
    torch.testing.assert_close(model.loss([x], 0.0), model.loss([x], 1.0))  # no schedule
    # the target's hidden pixels are never seen by the encoder: changing them changes only the target
    x2 = x.clone()
    x2[:, :, 5:11, 5:11] += 1.0
    torch.testing.assert_close(model.decoder(model.backbone(mask_context(x2, hidden)), (8, 8)), pred)
    assert not torch.allclose(model.loss([x2], 0.0), model.loss([x], 0.0))


def test_gradients_reach_the_decoder_and_the_backbone() -> None:
    for region in ("center", "random"):
        model = _model(region=region)
        model.loss([torch.randn(6, 1, 16, 16)], 0.0).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (region, name)


def test_decoder_sizes_views_encoder_and_config() -> None:
    model = _model()
    h = torch.randn(3, 8)
    for size in ((8, 8), (14, 14), (28, 28), (3, 3), (5, 7)):
        assert model.decoder(h, size).shape == (3, 1, *size)
    assert model.encoder() is model.backbone
    (view,) = model.views(28)  # one mild view: square crop and flip, no colour or grey-scale changes
    assert (view.size, view.scale, view.ratio, view.flip_p, view.jitter_p, view.gray_p, view.blur_p, view.solarize_p) == \
        (28, (0.75, 1.0), (1.0, 1.0), 0.5, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="inpainting"):
        _model(overlap=0.25).views(16)  # an 8 px square with a 4 px ring hides nothing
    entry = METHODS.entry("inpainting")
    assert entry.meta["pretrain"] == dict(optimizer="adamw", lr=8e-3, weight_decay=0.0, momentum=0.5, warmup_epochs=0)
    cfg = Config()
    assert (cfg.region, cfg.mask_area, cfg.overlap, cfg.overlap_weight, cfg.adv_weight) == ("center", 0.25, 4 / 128, 10.0, 0.0)
    for bad in (dict(region="blocks"), dict(mask_area=0.0), dict(mask_area=1.0), dict(overlap=-0.1), dict(overlap=0.5),
                dict(overlap_weight=-1.0), dict(adv_weight=0.001), dict(adv_weight=-1.0), dict(random_cells=1),
                dict(decoder_width=0), dict(decoder_stages=0), dict(min_scale=0.0), dict(min_scale=1.5)):
        with pytest.raises(ConfigError, match="inpainting"):
            Config(**bad)  # type: ignore[arg-type]


def test_three_channels_at_28_px_and_a_backbone_without_convs() -> None:
    for region in ("center", "random"):
        model = _model(channels=3, region=region)
        x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        views = make_views(x, model.views(28), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.Generator().manual_seed(0))
        assert views[0].shape == (4, 3, 28, 28)
        assert torch.isfinite(model.loss(views, 0.0))
        assert model.decoder.out.out_channels == 3
    with pytest.raises(ConfigError, match="Conv2d"):
        ContextEncoder(Pixels(1, 16), Config())


@pytest.mark.parametrize("region", ["center", "random"])
def test_loss_falls_within_20_sgd_steps_on_real_data(digits: Splits, region: str) -> None:
    torch.manual_seed(0)
    cfg = Config(region=region, decoder_width=8, decoder_stages=2)  # type: ignore[arg-type]
    model = build_method(METHODS.get("inpainting"), cfg, PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:16], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    # random regions are redrawn each step: the same draws for every step keep the batch fixed
    losses = assert_loss_falls(model, views, before_step=lambda: torch.manual_seed(0))
    assert losses[-1] < 0.5 * losses[0], losses  # not only the first steps: it keeps falling (~0.15 x at step 20)
