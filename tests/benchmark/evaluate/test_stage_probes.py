"""Per-stage probe features (Goyal et al. 2019): documented shapes, Goyal's pooling, ViT last blocks, the protocols'
per-layer rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmark.backbones import build_backbone
from benchmark.config import PretrainConfig
from benchmark.errors import ConfigError, NotApplicable
from benchmark.evaluate.encoder import FrozenEncoder, extract_features
from benchmark.evaluate.layers import at_layer, layer_names, pool_grid
from protocols import linear as linear_mod
from protocols import svm as svm_mod
from tests.protocols.test_knn import blobs


def encoder(backbone: str, channels: int, size: int, seed: int = 0) -> FrozenEncoder:
    torch.manual_seed(seed)
    net = build_backbone(PretrainConfig(backbone=backbone), channels, size)
    return FrozenEncoder(net, int(getattr(net, "dim")), (0.5,) * channels, (0.25,) * channels, key=f"{backbone}-{seed}")


def images(n: int, channels: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_resnet50_at_224_has_goyals_nine_thousand_dims_and_pooling() -> None:
    enc = encoder("resnet50", 3, 224)
    assert layer_names(enc.module) == ("conv1", "res2", "res3", "res4", "res5", "out")
    dims = {n: at_layer(enc, n, 224).dim for n in layer_names(enc.module)}
    assert dims == {"conv1": 64 * 12 * 12, "res2": 256 * 6 * 6, "res3": 512 * 4 * 4, "res4": 1024 * 3 * 3,
                    "res5": 2048 * 2 * 2, "out": 2048}  # Goyal's table (VISSL / mmselfsup MultiPooling)
    # res4 is layer3's 14x14 map through AvgPool(8, stride 3), computed here by hand from torchvision's modules
    x = images(2, 3, 224)
    r = enc.module.net
    with torch.inference_mode():
        h = r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(enc.normalise(x))))))))
        want = torch.flatten(F.avg_pool2d(h, 8, 3), 1)
        stem = torch.flatten(F.avg_pool2d(r.relu(r.bn1(r.conv1(enc.normalise(x)))), 10, 10, 4), 1)
    torch.testing.assert_close(at_layer(enc, "res4", 224).features(x), want)
    torch.testing.assert_close(at_layer(enc, "conv1", 224).features(x), stem)  # conv1: before the max-pool


def test_small_maps_pool_adaptively_to_about_the_target() -> None:
    assert pool_grid(16, 28, 9216) == 24 and pool_grid(128, 4, 9216) == 4 and pool_grid(2048, 7, 9216) == 2
    enc = encoder("convnet", 1, 28)
    assert layer_names(enc.module) == ("block1", "block2", "block3", "block4", "out")
    got = {n: at_layer(enc, n, 28, dims=512).dim for n in layer_names(enc.module)[:-1]}
    assert got == {"block1": 16 * 6 * 6, "block2": 32 * 4 * 4, "block3": 64 * 3 * 3, "block4": 128 * 2 * 2}
    x = images(3, 1, 28)
    with torch.inference_mode():
        b2 = enc.module.body[:6](enc.normalise(x))  # two conv-BN-ReLU blocks
    torch.testing.assert_close(at_layer(enc, "block2", 28, dims=512).features(x), torch.flatten(F.adaptive_avg_pool2d(b2, 4), 1))


def test_vit_last_blocks_are_the_normed_class_tokens() -> None:
    enc = encoder("vit_tiny", 3, 32)
    x = images(2, 3, 32)
    torch.testing.assert_close(at_layer(enc, "last1", 32).features(x), enc.features(x))  # the last block = the output
    last4 = at_layer(enc, "last4", 32)
    assert last4.dim == 4 * enc.dim
    vit = enc.module.net
    with torch.inference_mode():
        t = vit.patch_embed(enc.normalise(x))
        t = vit.norm_pre(vit._pos_embed(t))
        cls = []
        for blk in vit.blocks:
            t = blk(t)
            cls.append(vit.norm(t)[:, 0])
    torch.testing.assert_close(last4.features(x), torch.cat(cls[-4:], 1))


def test_layers_have_their_own_cache_keys_and_memo_entries() -> None:
    enc = encoder("convnet", 1, 28)
    x = images(4, 1, 28)
    from benchmark.data.sets import ImageSet

    s = ImageSet(x, torch.zeros(4, dtype=torch.long))
    out = extract_features(enc, s, name="set")
    b1 = extract_features(at_layer(enc, "block1", 28, dims=64), s, name="set")  # same name, same memo dict
    assert out.shape == (4, 128) and b1.shape == (4, 16 * 2 * 2)
    assert at_layer(enc, "block1", 28, dims=64).cache_key != at_layer(enc, "block1", 28, dims=128).cache_key != enc.cache_key


def test_linear_and_svm_report_one_set_of_rows_per_layer(digits) -> None:  # type: ignore[no-untyped-def]
    enc = encoder("convnet_tiny", 1, 16)
    before = {k: v.clone() for k, v in enc.module.state_dict().items()}
    cfg = linear_mod.Config(grid_points=3, layers=("block1", "block3", "out"), layer_dims=256)
    rows = linear_mod.linear(enc, digits, cfg, seed=0)
    test = {r.metric: r.value for r in rows if r.split == "test"}
    assert set(test) == {f"{m}{s}" for m in ("top1", "top5", "mean_class_acc") for s in ("_block1", "_block3", "")}
    assert {r.metric for r in rows if r.split == "val"} == {"top1_block1", "top1_block3", "top1"}
    # the usual output's rows equal those of a run without layers (a layer list adds rows, changes none)
    plain = {r.metric: r.value for r in linear_mod.linear(enc, digits, linear_mod.Config(grid_points=3), 0) if r.split == "test"}
    assert plain == {k: v for k, v in test.items() if "_block" not in k}
    assert all(torch.equal(v, enc.module.state_dict()[k]) for k, v in before.items())
    srows = svm_mod.svm(enc, digits, svm_mod.Config(costs=(0.1, 1.0), layers=("block2",), layer_dims=256, dual=False), seed=0)
    assert {(r.split, r.metric) for r in srows} >= {("test", "map_block2"), ("test", "top1_block2"), ("val", "map_block2")}


def test_bad_layer_names_fail_clearly() -> None:
    with pytest.raises(NotApplicable, match="layer 'res4' does not exist in a ConvNet backbone; it has block1"):
        linear_mod.linear(encoder("convnet", 1, 28), blobs(), linear_mod.Config(layers=("res4",)), seed=0)
    with pytest.raises(ConfigError, match="duplicates"):
        linear_mod.Config(layers=("out", "out"))
    with pytest.raises(ConfigError, match="at least one layer"):
        svm_mod.Config(layers=())
