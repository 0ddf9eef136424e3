"""The batched augmentations draw the same distributions as torchvision.transforms.v2, image by image.

Each test builds an input from which every sample's random parameters can be read back exactly:
coordinate ramps give the crop box, grey levels give the jitter factors, and a delta gives the blur
sigma. It then draws torchvision's parameters the same number of times and compares the two samples.
The seeds are fixed, so every run gives the same result. Each bound is set so that a correct
implementation would exceed it with probability about 1e-4 or less under some other seed:
- distributions: two-sample Kolmogorov-Smirnov, D < c(a) sqrt((n + m) / (n m)),
  with c(a) = sqrt(-ln(a / 2) / 2) = 2.23 at a = 1e-4.
- means: |mean_a - mean_b| < 5 standard errors of the difference.
- rates: a binomial count, |k/n - p| < 5 sqrt(p (1 - p) / n).
- correlations of independent pairs: |r| < 5 / sqrt(n), since r is about N(0, 1/n).
Each test's comment gives its own numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from benchmark.data.augment import (
    ViewSpec,
    augment,
    byol_pair,
    color_jitter,
    gaussian_blur,
    make_views,
    resized_crop,
    torchvision_view,
)

N = 4000  # draws per distribution: KS bound about 0.05 against as many reference draws
ALPHA = 1e-4
REF_SIDE = 1000  # torchvision's boxes are whole pixels: at 1000 px, rounding moves them by at most 1e-3
# How far apart two crop statistics may be and still count as equal in the KS and mean checks. It is torchvision's
# rounding to pixels: up to 1e-3 for area and centre, and up to 4e-3 for the log ratio of the smallest (245 px) boxes.
PIXEL_TOL = 5 / REF_SIDE
# spec with every op off: a full, unflipped crop (which is the identity) and nothing else
PLAIN = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
CROP = ViewSpec(size=16, flip_p=0.5, jitter_p=0.0, gray_p=0.0)  # default scale (0.08, 1) and ratio (3/4, 4/3)
EXTREME = ViewSpec(size=16, scale=(0.5, 1.0), ratio=(3.0, 4.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)  # no box fits


def _ks(a: Tensor, b: Tensor, tol: float = 0.0) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup_t |F_a(t) - F_b(t)|, counting values `tol` apart as equal:
    sup_t max(F_a(t) - F_b(t + tol), F_b(t) - F_a(t + tol)). That is never larger than the plain statistic,
    so the plain statistic's bound still holds for it."""
    a, b = a.double().sort().values, b.double().sort().values

    def one_side(u: Tensor, v: Tensor) -> Tensor:  # sup_t F_u(t) - F_v(t + tol) is reached at a point of u
        return (torch.searchsorted(u, u, right=True) / len(u) - torch.searchsorted(v, u + tol, right=True) / len(v)).max()

    return float(torch.maximum(one_side(a, b), one_side(b, a)))


def _ks_bound(n: int, m: int) -> float:
    return math.sqrt(-math.log(ALPHA / 2) / 2) * math.sqrt((n + m) / (n * m))


def _assert_same_distribution(a: Tensor, b: Tensor, what: str, tol: float = 0.0) -> None:
    d, bound = _ks(a, b, tol), _ks_bound(len(a), len(b))
    assert d < bound, f"{what}: KS {d:.4f} >= {bound:.4f} (means {a.mean():.4f} vs {b.mean():.4f})"
    se = math.sqrt(a.double().var() / len(a) + b.double().var() / len(b))
    assert abs(float(a.mean() - b.mean())) < 5 * se + tol, f"{what}: means {a.mean():.4f} vs {b.mean():.4f} (se {se:.4f})"


def _assert_rate(hits: Tensor, p: float, what: str) -> None:
    rate, tol = hits.float().mean().item(), 5 * math.sqrt(p * (1 - p) / len(hits))
    assert abs(rate - p) < tol, f"{what}: rate {rate:.4f}, expected {p} +- {tol:.4f}"


def _corr(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def _changed(y: Tensor, x: Tensor, tol: float = 1e-6) -> Tensor:
    """(N,) bool: the sample differs from its input anywhere."""
    return (y - x).abs().flatten(1).amax(1) > tol


def _coordinates(side: int) -> Tensor:
    """(2, side, side): channel 0 holds each pixel centre's x in [0, 1], channel 1 its y. Both are linear,
    so bilinear resampling reproduces them exactly away from the border."""
    u = (torch.arange(side) + 0.5) / side
    return torch.stack([u.view(1, side).expand(side, side), u.view(side, 1).expand(side, side)])


def _boxes(y: Tensor) -> dict[str, Tensor]:
    """Crop box of each sample, as fractions of the image side, read back from a crop of `_coordinates`.

    Only columns/rows 1 and S-2 are used. Their source points stay in the linear part of a W px ramp (at least
    half a pixel from the border) for boxes wider than S / (3 W) of the side: 0.08 for 16 px crops of 64 px,
    0.17 of 32 px. Default boxes are at least sqrt(0.08 * 3/4) = 0.24 wide.
    """
    s = y.shape[-1]
    x0, x1 = y[:, 0, :, 1].mean(1), y[:, 0, :, s - 2].mean(1)
    y0, y1 = y[:, 1, 1, :].mean(1), y[:, 1, s - 2, :].mean(1)
    span = (s - 3) / s  # output-pixel distance between the two samples, as a fraction of the box
    w, h = (x1 - x0) / span, (y1 - y0) / span  # w < 0: the box was mirrored
    return {"w": w.abs(), "h": h.abs(), "cx": (x0 + x1) / 2, "cy": (y0 + y1) / 2, "flipped": w < 0}


def _crop_stats(b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"area": b["w"] * b["h"], "log ratio": (b["w"] / b["h"]).log(), "centre x": b["cx"], "centre y": b["cy"]}


def _batched_boxes(spec: ViewSpec, n: int = N, seed: int = 0) -> dict[str, Tensor]:
    x = _coordinates(64).expand(n, 2, 64, 64)
    return _boxes(resized_crop(x, spec, torch.Generator().manual_seed(seed)))


def _torchvision_boxes(spec: ViewSpec, n: int = N, seed: int = 0) -> dict[str, Tensor]:
    """n boxes from `v2.RandomResizedCrop.get_params` on a square image, as fractions of its side."""
    img = torch.empty(1, 1, 1).expand(1, REF_SIDE, REF_SIDE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        p = [v2.RandomResizedCrop.get_params(img, list(spec.scale), list(spec.ratio)) for _ in range(n)]
    top, left, h, w = (torch.tensor(p, dtype=torch.float64) / REF_SIDE).T
    return {"w": w, "h": h, "cx": left + w / 2, "cy": top + h / 2}


def _reference_factors(transform: v2.Transform, x: Tensor, n: int, seed: int = 0) -> Tensor:
    """(n, *x.shape): the per-image torchvision transform applied n times to x."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(x) for _ in range(n)])


# --- RandomResizedCrop + RandomHorizontalFlip ------------------------------------------------------------------


def test_crop_boxes_that_fit_follow_torchvision() -> None:
    # For boxes that fit, the docstring says the area is distributed as in torchvision, and so are the
    # aspect ratio and the position. torchvision's accepted boxes are the draws of (area, log ratio)
    # conditioned on fitting (rejection sampling: only 0.14**10 of the draws use up all 10 tries). So the
    # unclamped batched boxes must match them. There are about 3450 of them against 4000 reference
    # boxes, which gives a KS bound of 0.052.
    a, t = _batched_boxes(CROP), _crop_stats(_torchvision_boxes(CROP))
    fit = (a["w"] < 1 - 1e-4) & (a["h"] < 1 - 1e-4)
    for what, stat in _crop_stats(a).items():
        _assert_same_distribution(stat[fit], t[what], what, PIXEL_TOL)
    _assert_rate(a["flipped"], 0.5, "flip")
    # Flipping mirrors the box around its own centre, so it is independent of the box.
    assert abs(_corr(a["flipped"], a["w"] * a["h"])) < 5 / math.sqrt(N)


def test_crop_boxes_follow_torchvision() -> None:
    spec = CROP
    # All boxes this time, so the clamped ones count too. Each statistic uses n = m = 4000 and a KS bound of 0.050.
    a, t = _crop_stats(_batched_boxes(spec)), _crop_stats(_torchvision_boxes(spec))
    for what in a:
        _assert_same_distribution(a[what], t[what], what, PIXEL_TOL)


def test_when_no_box_fits_the_crop_is_centred_at_the_nearest_ratio() -> None:
    # Ratio (3, 4) on a square image: sqrt(area * r) > side for every draw, so no box ever fits and torchvision
    # falls back to the centre crop at ratio 3: full width, height round(64 / 3) = 21 px, centred.
    a = _batched_boxes(EXTREME)
    torch.testing.assert_close(a["w"], torch.ones(N), atol=1e-3, rtol=0)
    torch.testing.assert_close(a["h"], torch.full((N,), 21 / 64), atol=1e-3, rtol=0)
    torch.testing.assert_close(a["cx"], torch.full((N,), 0.5), atol=1e-3, rtol=0)
    torch.testing.assert_close(a["cy"], torch.full((N,), (21 + 10.5) / 64), atol=1e-3, rtol=0)  # top = (64 - 21) // 2
    # torchvision's own fallback on a 64 px image: top 21, left 0, height 21, width 64
    img = torch.empty(1, 1, 1).expand(1, 64, 64)
    assert v2.RandomResizedCrop.get_params(img, list(EXTREME.scale), list(EXTREME.ratio)) == (21, 0, 21, 64)


def test_flip_rate_and_flips_are_exact_mirrors() -> None:
    # p = 0.3 (not 0.5, so flipping when rand > p would fail): 5 sigma = 5 sqrt(.21 / 4000) = 0.036.
    x = torch.rand(N, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = resized_crop(x, ViewSpec(**{**PLAIN.__dict__, "size": 8, "flip_p": 0.3}), torch.Generator().manual_seed(1))
    same = ~_changed(y, x, 1e-5)
    mirrored = ~_changed(y, x.flip(-1), 1e-5)
    assert (same ^ mirrored).all()  # every sample is either the image or its exact mirror
    _assert_rate(mirrored, 0.3, "flip")


# --- ColorJitter -------------------------------------------------------------------------------------------------


def test_brightness_and_contrast_factors_follow_torchvision() -> None:
    # The input is a grey image with two levels, 0.4 and 0.6. Saturation and hue do nothing to grey, and
    # brightness and contrast commute when nothing clips (b * (c * (x - m) + m) either way; the largest value
    # is 1.4 * 0.64 < 1). So this input gives b = mean / 0.5 and c = (hi - lo) / (0.2 b), whatever order
    # torchvision draws. The reference leaves out saturation and hue, since torchvision's HSV hue costs
    # several ms an image. Jittered samples: about 3200 batched against 1600 reference, KS bound 0.068.
    # Mean of U[0.6, 1.4]: 5 se = 5 * 0.231 / sqrt(3200) = 0.020.
    x = torch.full((3, 2, 2), 0.4)
    x[:, 1] = 0.6
    y = color_jitter(x.expand(N, 3, 2, 2), ViewSpec(size=2, jitter_p=0.8), torch.Generator().manual_seed(0))
    ref = _reference_factors(v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8), x, N // 2)
    assert (y.amax(1) - y.amin(1)).max() < 1e-5  # still grey

    def factors(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        on = _changed(z, x)
        b = z[on].mean((1, 2, 3)) / 0.5
        c = (z[on][:, :, 1] - z[on][:, :, 0]).mean((1, 2)) / (0.2 * b)
        return on, b, c

    on, b, c = factors(y)
    on_t, b_t, c_t = factors(ref)
    _assert_rate(on, 0.8, "jitter")
    _assert_rate(on_t, 0.8, "torchvision jitter")
    _assert_same_distribution(b, b_t, "brightness")
    _assert_same_distribution(c, c_t, "contrast")
    for f in (b, c):
        assert 0.6 - 1e-4 < f.min() and f.max() < 1.4 + 1e-4
        assert abs(f.mean() - 1.0) < 5 * 0.8 / math.sqrt(12 * len(f))
    assert abs(_corr(b, c)) < 5 / math.sqrt(len(b))  # drawn independently


def test_saturation_factor_follows_torchvision() -> None:
    # Saturation blends towards the luma grey, so out_R - out_B = s (in_R - in_B) for any luma weights,
    # and s can be read back on one colour pixel (0.6, 0.5, 0.4), which never clips for s in [0.8, 1.2].
    # Jitter is always on here: 4000 batched against 2000 reference, KS bound 0.061.
    x = torch.tensor([0.6, 0.5, 0.4]).view(3, 1, 1)
    spec = ViewSpec(size=1, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.2, hue=0.0)
    y = color_jitter(x.expand(N, 3, 1, 1), spec, torch.Generator().manual_seed(0))
    ref = _reference_factors(v2.ColorJitter(saturation=0.2), x, N // 2)
    s, s_t = (y[:, 0] - y[:, 2]).flatten() / 0.2, (ref[:, 0] - ref[:, 2]).flatten() / 0.2
    _assert_same_distribution(s, s_t, "saturation")
    assert 0.8 - 1e-4 < s.min() and s.max() < 1.2 + 1e-4


def test_hue_rotation_angle_follows_torchvision_hue_factor() -> None:
    # Documented difference: the hue shift is a rotation in YIQ space, not an HSV shift. So here only the
    # parameter is compared. The rotation angle, read back from the (I, Q) of a pale pixel that never clips,
    # must be 2 pi times torchvision's hue_factor. The reference draws come from ColorJitter.make_params,
    # because the transform costs several ms an image. 4000 against 4000, KS bound 0.050. The chroma |(I, Q)|
    # is kept.
    x = torch.tensor([0.55, 0.5, 0.45]).view(3, 1, 1)
    spec = ViewSpec(size=1, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.1)
    y = color_jitter(x.expand(N, 3, 1, 1), spec, torch.Generator().manual_seed(0))
    to_iq = torch.tensor([[0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    iq_in, iq = to_iq @ x.view(3), torch.einsum("ij,nj->ni", to_iq, y.view(N, 3))
    angle = torch.atan2(iq[:, 1], iq[:, 0]) - torch.atan2(iq_in[1], iq_in[0])
    angle = (angle + math.pi) % (2 * math.pi) - math.pi
    cj = v2.ColorJitter(hue=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hue_t = torch.tensor([cj.make_params([x])["hue_factor"] for _ in range(N)])
    _assert_same_distribution(angle / (2 * math.pi), hue_t, "hue")
    torch.testing.assert_close(iq.norm(dim=1), iq_in.norm().expand(N), atol=1e-5, rtol=0)


# --- RandomGrayscale, RandomSolarize (inside `augment`, after an identity crop) -------------------------------------


def test_grayscale_rate_and_luma_match_torchvision() -> None:
    # p = 0.2 over 4000 samples: 5 sigma = 0.032. torchvision weighs R by 0.2989 and this module by 0.299, so the
    # grey values may differ by up to 1e-4.
    x = torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    spec = ViewSpec(**{**PLAIN.__dict__, "size": 8, "gray_p": 0.2})
    y = augment(x.expand(N, 3, 8, 8), spec, torch.zeros(3), torch.ones(3), torch.Generator().manual_seed(1))
    xf = x.float() / 255
    gray = (y.amax(1) - y.amin(1)).flatten(1).amax(1) < 1e-6
    _assert_rate(gray, 0.2, "grayscale")
    ref = TF.rgb_to_grayscale(xf, num_output_channels=3)
    torch.testing.assert_close(y[gray], ref.expand_as(y[gray]), atol=2e-4, rtol=0)
    torch.testing.assert_close(y[~gray], xf.expand_as(y[~gray]), atol=1e-5, rtol=0)


def test_solarize_rate_and_threshold_match_torchvision() -> None:
    # Every uint8 level appears once in the 16x16 ramp, so 127/255 < 0.5 <= 128/255 are both tested. That gap
    # (0.004) is far above the 1e-5 error of the identity crop. p = 0.3: 5 sigma = 0.036.
    x = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    spec = ViewSpec(**{**PLAIN.__dict__, "solarize_p": 0.3})
    y = augment(x.expand(N, 1, 16, 16), spec, torch.zeros(1), torch.ones(1), torch.Generator().manual_seed(0))
    xf = x.float() / 255
    solarized = _changed(y, xf, 1e-4)
    _assert_rate(solarized, 0.3, "solarize")
    ref = v2.RandomSolarize(0.5, p=1.0)(xf)
    assert torch.equal(ref, TF.solarize(xf, 0.5))
    torch.testing.assert_close(y[solarized], ref.expand_as(y[solarized]), atol=1e-5, rtol=0)


# --- GaussianBlur --------------------------------------------------------------------------------------------------


def _reference_blur(spec: ViewSpec) -> tuple[float, v2.GaussianBlur]:
    """The blur step of the reference pipeline `torchvision_view(spec)`: its probability and transform."""
    pipeline = torchvision_view(spec, (0.0,), (1.0,))
    assert isinstance(pipeline, v2.Compose)
    for t in pipeline.transforms:
        if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur):
            return t.p, t.transforms[0]
    raise AssertionError("no GaussianBlur in the reference pipeline")


@pytest.mark.parametrize(("size", "k"), [(16, 3), (32, 3), (64, 7), (96, 9), (224, 23)])
def test_blur_kernel_size_and_output_match_torchvision(size: int, k: int) -> None:
    # The kernel is about 10% of the side, made odd, with at least 3 taps: 23 at 224 px, as in SimCLR. A huge
    # sigma makes every tap non-zero, so the support of a blurred delta is the kernel size. At a fixed sigma the
    # output equals torchvision's GaussianBlur with the reference pipeline's kernel size, reflected borders
    # included.
    _, ref = _reference_blur(ViewSpec(size=size, blur_p=0.5))
    assert ref.kernel_size == (k, k)
    delta = torch.zeros(1, 1, k + 4, k + 4)
    delta[..., (k + 4) // 2, (k + 4) // 2] = 1
    wide = gaussian_blur(delta, ViewSpec(size=size, blur_p=1.0, blur_sigma=(1e4, 1e4)), torch.Generator())
    assert int((wide[0, 0].sum(0) > 0).sum()) == k
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    sigma = 1.5  # in 224 px pixels
    y = gaussian_blur(x, ViewSpec(size=size, blur_p=1.0, blur_sigma=(sigma, sigma)), torch.Generator())
    torch.testing.assert_close(y, TF.gaussian_blur(x, [k, k], [sigma * size / 224] * 2), atol=1e-5, rtol=0)


def test_blur_sigma_and_rate_follow_torchvision() -> None:
    # Each sample's sigma is read back from a blurred delta: taps 0 and 1 of the kernel give
    # t1 / t0 = exp(-1 / (2 sigma^2)), and the normalisation cancels. The default range goes down to
    # 0.03 px at 64 px, where t1 underflows in float32 (and float64 convolutions take a minute). So the range
    # here is (2, 8) in 224 px pixels, which is 0.57 to 2.29 px, recovered to about 1e-6. The reference sigmas
    # come from the GaussianBlur of `torchvision_view` (make_params), which also checks the scaling to the
    # view size. p = 0.3: 5 sigma = 0.036. About 1200 blurred against 4000 draws: KS bound 0.073.
    spec = ViewSpec(size=64, blur_p=0.3, blur_sigma=(2.0, 8.0))
    p_ref, ref = _reference_blur(spec)
    assert p_ref == spec.blur_p
    delta = torch.zeros(N, 1, 9, 9)
    delta[..., 4, 4] = 1
    y = gaussian_blur(delta, spec, torch.Generator().manual_seed(0))
    on = _changed(y, delta)
    _assert_rate(on, 0.3, "blur")
    taps = y[on, 0].sum(1).double()  # (n, 9): the 1-D kernel, centred at 4
    sigma = (-0.5 / (taps[:, 5] / taps[:, 4]).log()).sqrt()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sigma_t = torch.tensor([ref.make_params([delta[0]])["sigma"][0] for _ in range(N)], dtype=torch.float64)
    _assert_same_distribution(sigma, sigma_t, "sigma")
    lo, hi = 2.0 * 64 / 224, 8.0 * 64 / 224
    assert lo - 1e-4 < sigma.min() < lo + 0.02 and hi - 0.02 < sigma.max() < hi + 1e-4


# --- independence, seeds, shapes -----------------------------------------------------------------------------------


def test_views_and_samples_draw_independent_parameters() -> None:
    # Two views of the same batch, and neighbouring samples within one view, must draw independent boxes and flips.
    # A Pearson r over n independent pairs is about N(0, 1/n): bound 5 / sqrt(4000) = 0.079. Two independent fair
    # flips agree with probability 0.5: 5 sigma = 0.040. The uint8 ramp runs 0, 8, ..., 248 over 32 px; it is
    # mapped back to pixel-centre coordinates before `_boxes`.
    ramp = torch.arange(32, dtype=torch.uint8) * 8
    x = torch.stack([ramp.view(1, 32).expand(32, 32), ramp.view(32, 1).expand(32, 32)]).expand(N, 2, 32, 32)
    views = make_views(x, [CROP, CROP], (0.0, 0.0), (1.0, 1.0), torch.Generator().manual_seed(0))
    a, b = (_boxes((v * 255 / 8 + 0.5) / 32) for v in views)
    area_a, area_b = a["w"] * a["h"], b["w"] * b["h"]
    bound = 5 / math.sqrt(N)
    assert abs(_corr(area_a, area_b)) < bound  # view 1 vs view 2 of each image
    assert abs(_corr(area_a[:-1], area_a[1:])) < bound  # sample i vs sample i + 1
    assert abs(_corr(a["cx"][:-1], a["cx"][1:])) < bound
    _assert_rate(a["flipped"] == b["flipped"], 0.5, "flip agreement between views")
    _assert_rate(a["flipped"][:-1] == a["flipped"][1:], 0.5, "flip agreement between neighbours")


def test_different_seeds_give_different_views() -> None:
    # Crop boxes are continuous, so two independent draws give the same sample with probability 0. Each sample
    # is checked, so a seed that reached only part of the batch would fail.
    x = torch.randint(0, 256, (16, 3, 24, 24), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    spec = byol_pair(16, (0.08, 1.0))[1]
    a, b = (make_views(x, [spec], (0.5,) * 3, (0.25,) * 3, torch.Generator().manual_seed(s))[0] for s in (0, 1))
    assert _changed(a, b).all()
    g = torch.Generator().manual_seed(0)
    first, second = augment(x, spec, torch.zeros(3), torch.ones(3), g), augment(x, spec, torch.zeros(3), torch.ones(3), g)
    assert _changed(first, second).all()  # the generator advances between calls


@pytest.mark.parametrize("channels", [1, 3])
def test_multi_crop_views_have_the_reference_shapes_and_range(channels: int) -> None:
    # DINO-style views: two 32 px global crops (blur 1.0 / 0.1, solarisation 0 / 0.2) and three 12 px local
    # crops, with every op on. With mean 0 and std 1 the output is the augmented image itself. Every op maps
    # [0, 1] to [0, 1]: resampling and blur are convex combinations, and jitter clamps. The reference pipeline
    # must agree on shape and dtype.
    x = torch.randint(0, 256, (32, channels, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    local = ViewSpec(size=12, scale=(0.05, 0.4), blur_p=0.5)
    specs = byol_pair(32, (0.4, 1.0)) + [local] * 3
    mean, std = (0.0,) * channels, (1.0,) * channels
    views = make_views(x, specs, mean, std, torch.Generator().manual_seed(0))
    assert len(views) == len(specs)
    for spec, v in zip(specs, views):
        ref = torchvision_view(spec, mean, std)(x[0])
        assert v.shape == (32, *ref.shape) == (32, channels, spec.size, spec.size)
        assert v.dtype == ref.dtype == torch.float32
        assert torch.isfinite(v).all()
        assert v.min() >= -1e-6 and v.max() <= 1 + 1e-6
        assert ref.min() >= 0 and ref.max() <= 1
