"""Multi-view augmentation on batches of tensors, with per-sample random parameters.

Every op works on a whole (N, C, H, W) float batch on any device, drawing its randomness from an
explicit `torch.Generator`, so the same code runs on the CPU today and on the GPU without a
DataLoader, and a resumed run draws exactly the same views. Distributions follow torchvision's
`RandomResizedCrop`, `ColorJitter`, `RandomGrayscale`, `GaussianBlur` and `RandomSolarize`, with the
differences noted inline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view. Probabilities are per sample."""

    size: int  # output side in pixels
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2  # no effect on one-channel images
    hue: float = 0.1  # no effect on one-channel images
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of a 224 px image, scaled to `size`
    solarize_p: float = 0.0


def byol_pair(size: int, scale: tuple[float, float]) -> list[ViewSpec]:
    """BYOL's two views (Grill et al. 2020, table 6): the same crop and jitter, blur 1.0 / 0.1 and
    solarisation 0.0 / 0.2. Also the views of MoCo v3, Barlow Twins, VICReg and DINO's global crops."""
    v = ViewSpec(size=size, scale=scale, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2)
    return [dataclasses.replace(v, blur_p=1.0), dataclasses.replace(v, blur_p=0.1, solarize_p=0.2)]


def moco_v2_pair(size: int, scale: tuple[float, float]) -> list[ViewSpec]:
    """MoCo v2's `aug_plus` (Chen et al. 2020b), two draws of one pipeline: crop, jitter 0.4/0.4/0.4/0.1 with
    p 0.8, grayscale 0.2, blur 0.5, flip. Also the views of SimSiam, DenseCL and PCL."""
    v = ViewSpec(size=size, scale=scale, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                 gray_p=0.2, blur_p=0.5, flip_p=0.5)
    return [v, v]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _coin(n: int, p: float, g: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=g, device=device) < p


def resized_crop(x: Tensor, spec: ViewSpec, g: torch.Generator, tries: int = 10) -> Tensor:
    """Random resized crop plus horizontal flip, one affine resample per sample.

    torchvision's `RandomResizedCrop.get_params`, batched: per sample up to `tries` (area, log-ratio) draws, the first
    whose rounded box fits the image is used, at a uniform integer position; when none fits, the centre crop at the
    nearest allowed aspect ratio. All draws are made at once (branch-free), so the GPU never waits on the host.
    """
    n, dev = x.shape[0], x.device
    hh, ww = x.shape[-2:]
    area = _uniform(n * tries, *spec.scale, g, dev).view(n, tries) * (hh * ww)
    r = torch.exp(_uniform(n * tries, math.log(spec.ratio[0]), math.log(spec.ratio[1]), g, dev)).view(n, tries)
    w_try, h_try = torch.sqrt(area * r).round(), torch.sqrt(area / r).round()
    fits = (w_try > 0) & (w_try <= ww) & (h_try > 0) & (h_try <= hh)
    first = fits.float().argmax(1, keepdim=True)  # the first fitting draw (0 when none fits)
    w, h = w_try.gather(1, first).squeeze(1), h_try.gather(1, first).squeeze(1)
    ok = fits.any(1)
    in_ratio = ww / hh  # the fallback: the whole image cropped to the nearest allowed ratio, centred
    if in_ratio < min(spec.ratio):
        fw, fh = float(ww), float(round(ww / min(spec.ratio)))
    elif in_ratio > max(spec.ratio):
        fw, fh = float(round(hh * max(spec.ratio))), float(hh)
    else:
        fw, fh = float(ww), float(hh)
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    u, v = _uniform(n, 0, 1, g, dev), _uniform(n, 0, 1, g, dev)
    left = torch.where(ok, torch.floor(u * (ww - w + 1)).clamp(max=ww - w), torch.div(ww - w, 2, rounding_mode="floor"))
    top = torch.where(ok, torch.floor(v * (hh - h + 1)).clamp(max=hh - h), torch.div(hh - h, 2, rounding_mode="floor"))
    flip = torch.where(_coin(n, spec.flip_p, g, dev), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = w / ww * flip
    theta[:, 0, 2] = (left + w / 2) / ww * 2 - 1
    theta[:, 1, 1] = h / hh
    theta[:, 1, 2] = (top + h / 2) / hh * 2 - 1
    grid = F.affine_grid(theta, [n, x.shape[1], spec.size, spec.size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def color_jitter(x: Tensor, spec: ViewSpec, g: torch.Generator) -> Tensor:
    """Brightness, contrast, saturation, hue with per-sample factors, applied with prob `jitter_p`.

    torchvision applies the four in a random order per call; here the order is fixed
    (brightness, contrast, saturation, hue). Hue is a rotation in YIQ space, a close, cheap
    stand-in for torchvision's HSV shift.
    """
    n, dev = x.shape[0], x.device
    on = _coin(n, spec.jitter_p, g, dev).view(n, 1, 1, 1)
    b = _uniform(n, max(0.0, 1 - spec.brightness), 1 + spec.brightness, g, dev).view(n, 1, 1, 1)
    c = _uniform(n, max(0.0, 1 - spec.contrast), 1 + spec.contrast, g, dev).view(n, 1, 1, 1)
    s = _uniform(n, max(0.0, 1 - spec.saturation), 1 + spec.saturation, g, dev).view(n, 1, 1, 1)
    h = _uniform(n, -spec.hue, spec.hue, g, dev)
    y = (x * b).clamp(0, 1)
    m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - m) * c + m).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(y)
        y = ((y - gray) * s + gray).clamp(0, 1)
        y = _hue_rotate(y, h * 2 * math.pi).clamp(0, 1)
    return torch.where(on, y, x)


def _hue_rotate(x: Tensor, angle: Tensor) -> Tensor:
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(angle), 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = from_yiq @ rot @ to_yiq  # (N, 3, 3)
    return torch.einsum("nij,njhw->nihw", m, x)


def gaussian_blur(x: Tensor, spec: ViewSpec, g: torch.Generator) -> Tensor:
    """Blur with per-sample sigma; kernel about 10% of the image side (SimCLR), odd."""
    n, c, hh, ww = x.shape
    dev = x.device
    on = _coin(n, spec.blur_p, g, dev).view(n, 1, 1, 1)
    sigma = _uniform(n, *spec.blur_sigma, g, dev) * (spec.size / 224)
    k = max(3, int(0.1 * spec.size) // 2 * 2 + 1)
    t = torch.arange(k, device=dev, dtype=x.dtype) - k // 2
    kern = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.clamp_min(1e-3).view(-1, 1) ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, k)
    y = x.reshape(1, n * c, hh, ww)
    y = F.pad(y, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c)
    return torch.where(on, y.view(n, c, hh, ww), x)


def augment(x: Tensor, spec: ViewSpec, mean: Tensor, std: Tensor, g: torch.Generator) -> Tensor:
    """One view of a uint8 (N, C, H, W) batch: normalised float (N, C, size, size)."""
    n, dev = x.shape[0], x.device
    y = resized_crop(x.float().div_(255), spec, g)
    if spec.jitter_p > 0:
        y = color_jitter(y, spec, g)
    if spec.gray_p > 0:
        y = torch.where(_coin(n, spec.gray_p, g, dev).view(n, 1, 1, 1), _gray(y), y)
    if spec.blur_p > 0:
        y = gaussian_blur(y, spec, g)
    if spec.solarize_p > 0:
        y = torch.where(_coin(n, spec.solarize_p, g, dev).view(n, 1, 1, 1) & (y >= 0.5), 1 - y, y)
    return (y - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def make_views(x: Tensor, specs: list[ViewSpec], mean: tuple[float, ...], std: tuple[float, ...], g: torch.Generator) -> list[Tensor]:
    """All views of a batch, in the order of `specs` (e.g. 2 global + V local crops)."""
    m = torch.tensor(mean, device=x.device)
    s = torch.tensor(std, device=x.device)
    return [augment(x, spec, m, s, g) for spec in specs]


def torchvision_view(spec: ViewSpec, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Tensor], Tensor]:
    """The reference pipeline of `spec`, per image, with torchvision.transforms.v2: uint8 (C, H, W) -> normalised float.

    What a CPU DataLoader runs (the throughput command's baseline, and the distributions `augment` is tested
    against): RandomResizedCrop + flip, ColorJitter with probability `jitter_p` (random op order, HSV hue),
    RandomGrayscale, GaussianBlur with the same kernel-size rule and sigma scaling as `gaussian_blur`, RandomSolarize
    at 0.5, Normalize.
    """
    from torchvision.transforms import v2

    k = max(3, int(0.1 * spec.size) // 2 * 2 + 1)
    sigma = (spec.blur_sigma[0] * spec.size / 224, spec.blur_sigma[1] * spec.size / 224)
    ops: list[Callable[[Tensor], Tensor]] = [
        v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
    ]
    if spec.jitter_p > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p))
    if spec.gray_p > 0:
        ops.append(v2.RandomGrayscale(spec.gray_p))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if spec.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(v2.RandomSolarize(0.5, p=spec.solarize_p))
    ops.append(v2.Normalize(list(mean), list(std)))
    out: Callable[[Tensor], Tensor] = v2.Compose(ops)
    return out
