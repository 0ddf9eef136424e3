"""Streamed image sets: images decoded from files (or members of tar shards) in DataLoader worker processes, behind the
interface of the in-memory `ImageSet` (`len`, `y`, `subset`, `take`, `batches`, `channels`, `image_size`), so a protocol
does not know whether its images are in memory or on disk.

An image is addressed by (path, offset, size): offset -1 is a whole file, else `size` bytes at `offset` inside a tar
shard. Decoding is torchvision.io's (libjpeg-turbo, libpng, libwebp) and the evaluation transform is applied to the
decoded uint8 tensor, in the worker; the same two functions build the in-memory copy of a file-based dataset
(`materialise`), so the two paths give bit-identical images.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from benchmark.data.colour import convert_channels
from benchmark.errors import DatasetError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec, which the pinned GPU machine (torchvision
# 0.26) lacks; they are the same libjpeg-turbo / libpng / libwebp. Move to torchcodec once every target machine has it.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

IMAGENET_CROP_RATIO = 0.875  # resize 256 -> centre crop 224 (torchvision references, VISSL, DINO, MoCo, MAE)


@dataclass(frozen=True)
class EvalTransform:
    """A named evaluation transform of a decoded uint8 (C, H, W) image.

    kind: "resize_crop" (shorter side to `resize`, centre crop `size`: ImageNet's 256 -> 224), "resize" (both sides to
    `size`, aspect not kept), "vissl" (VISSL's VOC07 SVM setting on PIL images: shorter side to `resize`, then the
    whole image squashed to `size`, bilinear; decoded with PIL as VISSL does), "native" (unchanged: every image must
    share a size).
    """

    kind: Literal["resize_crop", "resize", "vissl", "native"]
    size: int | None = None
    resize: int | None = None

    @staticmethod
    def named(kind: str, size: int | None) -> EvalTransform:
        if kind == "native":
            return EvalTransform("native")
        if size is None:
            raise DatasetError(f"data.transform={kind} needs data.image_size")
        if kind == "resize_crop":
            return EvalTransform("resize_crop", size, round(size / IMAGENET_CROP_RATIO))
        if kind == "resize":
            return EvalTransform("resize", size)
        if kind == "vissl":
            return EvalTransform("vissl", size, round(size / IMAGENET_CROP_RATIO))
        raise DatasetError(f"unknown data.transform {kind!r}: use resize_crop, resize, vissl or native")

    def describe(self) -> str:
        """What the row and the feature key record: 'resize256-crop224', 'resize224', 'native'."""
        if self.kind == "resize_crop":
            return f"resize{self.resize}-crop{self.size}"
        if self.kind == "vissl":
            return f"vissl-resize{self.resize}-squash{self.size}"
        return f"resize{self.size}" if self.kind == "resize" else "native"

    def __call__(self, img: Tensor) -> Tensor:
        import torchvision.transforms.v2.functional as TF

        if self.kind == "vissl":
            raise TypeError("the vissl transform works on PIL images: use load_image")
        if self.kind == "resize_crop":
            assert self.resize is not None and self.size is not None
            out: Tensor = TF.center_crop(TF.resize(img, [self.resize], antialias=True), [self.size, self.size])
            return out
        if self.kind == "resize":
            assert self.size is not None
            out = TF.resize(img, [self.size, self.size], antialias=True)
            return out
        return img


def _clean(e: BaseException) -> str:
    """torchvision's C++ error without its source location ('decode_jpeg, /path/x.cpp:171, Image is ...')."""
    return re.sub(r"^\w+, \S+:\d+, ", "", str(e)).strip().splitlines()[0] if str(e) else type(e).__name__


def where(path: str, offset: int) -> str:
    return path if offset < 0 else f"{path} (member at byte offset {offset})"


def read_bytes(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        if offset < 0:
            return f.read()
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise DatasetError(f"{where(path, offset)}: truncated shard ({len(data)} of {size} bytes); rewrite the shard")
    return data


def decode(path: str, offset: int, size: int, channels: int) -> Tensor:
    """uint8 (channels, H, W), or DatasetError naming the file (and the offset in its shard)."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        data = read_bytes(path, offset, size)
    except OSError as e:
        raise DatasetError(f"{where(path, offset)}: cannot be read ({e.strerror or e}); check the file") from None
    if not data:
        raise DatasetError(f"{where(path, offset)}: empty file; remove or replace it")
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        img: Tensor = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        return img
    except RuntimeError as e:
        raise DatasetError(f"{where(path, offset)}: not a decodable image ({_clean(e)}); remove or replace it") from None


def vissl_resize(img: PILImage, scale: int = 256, size: int = 224) -> PILImage:
    """VISSL's VOC07 SVM transform on a PIL image: torchvision Resize(scale) then Resize((size, size)), bilinear."""
    from PIL import Image

    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(scale * long / short)  # torchvision truncates the long side
    new = (scale, new_long) if w <= h else (new_long, scale)
    if new != img.size:
        img = img.resize(new, Image.Resampling.BILINEAR)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return img


def _pil_vissl(path: str, offset: int, size: int, t: EvalTransform) -> Tensor:
    import numpy as np
    from PIL import Image

    try:
        data = read_bytes(path, offset, size)
        with Image.open(io.BytesIO(data)) as im:
            assert t.resize is not None and t.size is not None
            arr = np.array(vissl_resize(im.convert("RGB"), t.resize, t.size))  # a writable copy for torch
    except OSError as e:  # PIL.UnidentifiedImageError and truncated files included
        raise DatasetError(f"{where(path, offset)}: not a decodable image ({e}); remove or replace it") from None
    return torch.from_numpy(arr).permute(2, 0, 1)


def load_image(s: StreamSet, i: int) -> Tensor:
    """Image `i` of `s`, decoded and transformed, with `s.channels` channels (what both storage paths hand out)."""
    path, offset, size = s.paths[i], int(s.offsets[i]), int(s.sizes[i])
    if s.transform.kind == "vissl":
        img = _pil_vissl(path, offset, size, s.transform)
    else:
        img = s.transform(decode(path, offset, size, s.source_channels))
    return convert_channels(img, s.channels)  # as the in-memory path converts its decoded images


class _Decoded(torch.utils.data.Dataset[Tensor | str]):
    """Index -> transformed uint8 image, or the one-line error as a string (a worker's exception would reach the
    main process wrapped in its traceback; the string is raised there as one line)."""

    def __init__(self, s: StreamSet) -> None:
        self.s = s

    def __len__(self) -> int:
        return len(self.s)

    def __getitem__(self, i: int) -> Tensor | str:
        try:
            return load_image(self.s, i)
        except DatasetError as e:
            return str(e)


def _collate(items: list[Tensor | str]) -> Tensor | str:
    for it in items:
        if isinstance(it, str):
            return it
    shapes = {tuple(t.shape) for t in items if isinstance(t, Tensor)}
    if len(shapes) > 1:
        return (f"images of different sizes in one batch ({', '.join(map(str, sorted(shapes)[:3]))}) with "
                "data.transform=native; use data.transform=resize_crop (or resize) with data.image_size")
    return torch.stack([t for t in items if isinstance(t, Tensor)])


@dataclass(frozen=True)
class CropSpec:
    """The random-resized crop a worker takes from a full decoded image for one pretraining view."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def rrc_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop of an h x w image: torchvision's
    `RandomResizedCrop.get_params` (10 tries of area and log-ratio, else the centre crop at the nearest allowed
    ratio), drawing from `g` instead of the global generator."""
    area, lo, hi = h * w, math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=g).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        ar = math.exp(lo + u[1] * (hi - lo))
        cw, ch = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        cw, ch = round(h * max(ratio)), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class _Cropped(torch.utils.data.Dataset[tuple[Tensor, ...] | str]):
    """Index -> one uint8 crop per `CropSpec`, taken from the full decoded image (pretraining at full resolution).
    Each image's draws come from a generator seeded by (`seed`, index): the same whatever the number of workers."""

    def __init__(self, s: StreamSet, crops: Sequence[CropSpec], seed: int) -> None:
        self.s, self.crops, self.seed = s, list(crops), seed

    def __len__(self) -> int:
        return len(self.s)

    def __getitem__(self, i: int) -> tuple[Tensor, ...] | str:
        import torchvision.transforms.v2.functional as TF

        s = self.s
        try:
            img = decode(s.paths[i], int(s.offsets[i]), int(s.sizes[i]), s.source_channels)
        except DatasetError as e:
            return str(e)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + i) % 2**63)
        out = []
        for c in self.crops:
            top, left, h, w = rrc_box(int(img.shape[-2]), int(img.shape[-1]), c.scale, c.ratio, g)
            crop = TF.resized_crop(img, top, left, h, w, [c.size, c.size], antialias=True)
            out.append(convert_channels(crop, s.channels))
        return tuple(out)


def _collate_views(items: list[tuple[Tensor, ...] | str]) -> list[Tensor] | str:
    for it in items:
        if isinstance(it, str):
            return it
    return [torch.stack(list(v)) for v in zip(*items)]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one decode per core: the workers, not intra-op threads, are the parallelism


@dataclass(frozen=True)
class StreamSet:
    """Images on disk and their labels: the streamed counterpart of `ImageSet`.

    paths, offsets, sizes: where each image's bytes are (offset -1: the whole file). y: (N,) int64.
    transform: applied after decoding. source_channels: decoded as RGB (3) or grey (1); channels: what is handed out
    (converted by `convert_channels` after the transform, as the in-memory path converts). workers: DataLoader processes.
    """

    paths: tuple[str, ...]
    offsets: Tensor  # (N,) int64
    sizes: Tensor  # (N,) int64
    y: Tensor
    transform: EvalTransform
    channels: int = 3
    workers: int = 2
    source_channels: int = 3
    native_size: int | None = None  # the side of the images when every one has the same (square) size

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_size(self) -> int:
        size = self.transform.size if self.transform.kind != "native" else self.native_size
        if size is None:
            raise DatasetError("the images differ in size: set data.transform=resize_crop (or resize) and data.image_size")
        return int(size)

    @property
    def x(self) -> Tensor:
        raise TypeError("a streamed set has no tensor of images: use take(idx) or batches(n) (or data.storage=memory)")

    def subset(self, idx: Tensor) -> StreamSet:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        paths = tuple(self.paths[i] for i in idx.tolist())
        return replace(self, paths=paths, offsets=self.offsets[idx], sizes=self.sizes[idx], y=self.y[idx])

    def concat(self, other: StreamSet) -> StreamSet:
        return replace(self, paths=self.paths + other.paths, offsets=torch.cat([self.offsets, other.offsets]),
                       sizes=torch.cat([self.sizes, other.sizes]), y=torch.cat([self.y, other.y]))

    def with_channels(self, channels: int) -> StreamSet:
        return replace(self, channels=channels)

    def with_transform(self, transform: EvalTransform) -> StreamSet:
        return replace(self, transform=transform)

    def _run(self, dataset: torch.utils.data.Dataset[Any], collate: Any, batches: Sequence[Tensor], pin: bool) -> Iterator[Any]:
        """`dataset`'s items for each index batch, collated, made ahead in `workers` processes, in order; an item's
        one-line error (a string) is raised here as DatasetError."""
        if not batches:
            return
        dl = torch.utils.data.DataLoader(
            dataset, batch_sampler=[b.tolist() for b in batches], num_workers=self.workers, collate_fn=collate,
            pin_memory=pin, worker_init_fn=_worker_init if self.workers else None,
            prefetch_factor=4 if self.workers else None)
        for out in dl:
            if isinstance(out, str):
                raise DatasetError(out)
            yield out

    def loader(self, batches: Sequence[Tensor], pin: bool = False) -> Iterator[Tensor]:
        """uint8 (B, C, H, W) for each index batch in `batches`, decoded ahead in `workers` processes, in order."""
        yield from self._run(_Decoded(self), _collate, batches, pin)

    def crops(self, batches: Sequence[Tensor], crops: Sequence[CropSpec], seed: int, pin: bool = False) -> Iterator[list[Tensor]]:
        """For each index batch, one uint8 (B, C, size, size) tensor per `CropSpec`, cropped from the full decoded images
        in `workers` processes (pretraining with pretrain.crops=worker)."""
        yield from self._run(_Cropped(self, crops, seed), _collate_views, batches, pin)

    def batches(self, batch_size: int, pin: bool = False) -> Iterator[Tensor]:
        n = len(self)
        yield from self.loader([torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)], pin)

    def take(self, idx: Tensor) -> Tensor:
        """uint8 images `idx`, decoded here (no worker start-up: for small, scattered reads)."""
        items = [_Decoded(self)[int(i)] for i in idx.tolist()]
        out = _collate(items)
        if isinstance(out, str):
            raise DatasetError(out)
        return out

    def materialise(self, progress: bool = False, desc: str = "decode", batch_size: int = 256) -> Tensor:
        """Every image decoded and transformed, as one uint8 (N, C, H, W) tensor (the in-memory path)."""
        from tqdm import tqdm

        n = len(self)
        out: Tensor | None = None
        with tqdm(total=n, desc=desc, disable=None if progress else True, leave=False, unit="img") as bar:
            i = 0
            for xb in self.batches(batch_size):
                if out is None:
                    out = torch.empty((n, *xb.shape[1:]), dtype=torch.uint8)
                elif xb.shape[1:] != out.shape[1:]:
                    raise DatasetError(str(_collate([out[0], xb[0]])))
                out[i : i + len(xb)] = xb
                i += len(xb)
                bar.update(len(xb))
        return out if out is not None else torch.empty(0, self.channels, 0, 0, dtype=torch.uint8)
