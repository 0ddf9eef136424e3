from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.utils import save_image

from benchmark.backbones import build_backbone
from benchmark.config import DataConfig, PretrainConfig
from benchmark.data.datasets import load_raw, make_splits
from benchmark.data.sets import Splits
from benchmark.registry import BACKBONES


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_maps_images_to_dim_features(name: str) -> None:
    module = build_backbone(PretrainConfig(backbone=name), in_channels=1, image_size=16).eval()
    with torch.no_grad():
        f = module(torch.randn(2, 1, 16, 16))
    assert f.shape == (2, module.dim) and torch.isfinite(f).all()


def test_small_stem_keeps_resolution_for_small_images() -> None:
    small = build_backbone(PretrainConfig(backbone="resnet18"), 3, 32)  # auto: small stem below 64 px
    large = build_backbone(PretrainConfig(backbone="resnet18", small_stem=False), 3, 32)
    assert small.net.conv1.kernel_size == (3, 3) and isinstance(small.net.maxpool, torch.nn.Identity)
    assert large.net.conv1.kernel_size == (7, 7)
    assert set(large.state_dict()) == set(small.state_dict())  # torchvision key names either way


def test_imagefolder_reads_a_class_tree(tmp_path: Path, digits: Splits) -> None:
    for split, images in (("train", digits.train), ("val", digits.test)):
        for i in range(40):
            d = tmp_path / split / f"class{int(images.y[i])}"
            d.mkdir(parents=True, exist_ok=True)
            save_image(images.x[i].float() / 255, d / f"{i}.png")
    raw = load_raw("imagefolder", str(tmp_path))
    assert len(raw.train) == 40 and len(raw.test) == 40
    splits = make_splits("imagefolder", raw, DataConfig(val_fraction=0.25))
    assert len(splits.val) == 10 and splits.storage == "memory"  # small: decoded once, at 64 px by default
    assert splits.train.x.shape[1:] == (3, 64, 64) and splits.train.x.dtype == torch.uint8
    # class indices follow train's class names even when the test folder lacks a class
    names = sorted(p.name for p in (tmp_path / "train").iterdir())
    for path in (tmp_path / "val" / names[0]).iterdir():
        path.unlink()
    (tmp_path / "val" / names[0]).rmdir()
    raw2 = load_raw("imagefolder", str(tmp_path))
    assert raw2.num_classes == len(names) and int(raw2.test.y.min()) >= 1
    assert torch.equal(raw2.test.y, raw.test.y[raw.test.y != 0])
