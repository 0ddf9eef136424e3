from __future__ import annotations

import torch

from benchmark.data.augment import ViewSpec, augment, gaussian_blur, make_views, resized_crop

PLAIN = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)


def _images(n: int = 8, c: int = 3, s: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, s, s), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_full_crop_without_flip_is_the_identity() -> None:
    x = _images().float() / 255
    y = resized_crop(x, PLAIN, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_flip_probability_one_mirrors_every_image() -> None:
    x = _images().float() / 255
    y = resized_crop(x, ViewSpec(**{**PLAIN.__dict__, "flip_p": 1.0}), torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x.flip(-1), atol=1e-5, rtol=0)


def test_crop_area_follows_the_scale_range() -> None:
    # a one-pixel column at x = 12.5/64 = 0.195; crops of area 0.25 and ratio 1 are half the side wide,
    # centred uniformly in [0.25, 0.75], so they contain the column iff centre < 0.445 (probability 0.39),
    # and then magnify it 2x (two output pixels per row)
    x = torch.zeros(4000, 1, 64, 64)
    x[..., 12] = 1
    spec = ViewSpec(size=64, scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    y = resized_crop(x, spec, torch.Generator().manual_seed(0))
    seen = y.sum(dim=(1, 2, 3)) / 64  # output pixels per row covered by the column
    inside = seen > 1.0
    assert abs(inside.float().mean() - 0.39) < 0.04
    assert abs(seen[inside].median() - 2.0) < 0.1


def test_views_are_reproducible_from_the_generator() -> None:
    x = _images()
    spec = ViewSpec(size=12, blur_p=0.5, solarize_p=0.5)
    a = make_views(x, [spec, spec], (0.5,) * 3, (0.25,) * 3, torch.Generator().manual_seed(3))
    b = make_views(x, [spec, spec], (0.5,) * 3, (0.25,) * 3, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert a[0].shape == (8, 3, 12, 12)
    assert not torch.equal(a[0], a[1])  # two views differ


def test_blur_preserves_constant_images_and_mean() -> None:
    x = torch.full((4, 3, 16, 16), 0.3)
    y = gaussian_blur(x, ViewSpec(size=16, blur_p=1.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x)
    z = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    b = gaussian_blur(z, ViewSpec(size=32, blur_p=1.0, blur_sigma=(20.0, 20.0)), torch.Generator().manual_seed(0))
    assert b.std() < z.std() / 2


def test_grayscale_views_of_one_channel_images_are_valid() -> None:
    x = _images(c=1)
    y = augment(x, ViewSpec(size=16, gray_p=1.0, jitter_p=1.0), torch.tensor([0.5]), torch.tensor([0.5]), torch.Generator())
    assert y.shape == (8, 1, 16, 16) and torch.isfinite(y).all()
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
