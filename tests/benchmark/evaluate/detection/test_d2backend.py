"""Detectron2 backend: the key conversion (always), the built models and a tiny training run (with Detectron2 only)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn

from benchmark.data.detection import DetectionSet
from benchmark.errors import ConfigError
from benchmark.evaluate.detection import d2backend
from benchmark.evaluate.detection.d2backend import VARIANTS, Schedule, to_detectron2

D2_MISSING = "detectron2 not installed (build it from source: see its INSTALL.md)"


def _resnet50_state(in_channels: int = 3) -> dict[str, Tensor]:
    net = torchvision.models.resnet50(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net.state_dict()


@pytest.fixture(scope="module")
def r50() -> dict[str, Tensor]:
    return _resnet50_state()


# --------------------------------------------------------------------------- conversion (no Detectron2 needed)


EXPECTED = {  # hand-written from Detectron2's ResNet / Res5ROIHeads module names
    "c4": {
        "conv1.weight": "backbone.stem.conv1.weight",
        "bn1.running_var": "backbone.stem.conv1.norm.running_var",
        "layer1.0.conv2.weight": "backbone.res2.0.conv2.weight",
        "layer1.0.bn3.weight": "backbone.res2.0.conv3.norm.weight",
        "layer1.0.downsample.0.weight": "backbone.res2.0.shortcut.weight",
        "layer1.0.downsample.1.running_mean": "backbone.res2.0.shortcut.norm.running_mean",
        "layer2.3.bn1.bias": "backbone.res3.3.conv1.norm.bias",
        "layer3.5.conv3.weight": "backbone.res4.5.conv3.weight",
        "layer4.0.downsample.1.weight": "roi_heads.res5.0.shortcut.norm.weight",
        "layer4.2.bn2.running_mean": "roi_heads.res5.2.conv2.norm.running_mean",
    },
    "fpn": {
        "conv1.weight": "backbone.bottom_up.stem.conv1.weight",
        "bn1.bias": "backbone.bottom_up.stem.conv1.norm.bias",
        "layer1.0.downsample.0.weight": "backbone.bottom_up.res2.0.shortcut.weight",
        "layer3.0.downsample.1.running_var": "backbone.bottom_up.res4.0.shortcut.norm.running_var",
        "layer4.0.downsample.0.weight": "backbone.bottom_up.res5.0.shortcut.weight",
        "layer4.2.bn3.weight": "backbone.bottom_up.res5.2.conv3.norm.weight",
    },
}


@pytest.mark.parametrize("head", ["c4", "fpn"])
def test_every_key_maps_once_with_the_same_tensor(r50: dict[str, Tensor], head: str) -> None:
    out = to_detectron2(r50, head)
    kept = [k for k in r50 if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert len(kept) == 265 and len(out) == len(kept)  # 53 convs + 53 norms x 4; no collisions
    by_tensor = {id(v): k for k, v in out.items()}
    for k in kept:  # each kept key lands on exactly one new key, holding the very same tensor
        new = by_tensor[id(r50[k])]
        assert out[new] is r50[k] and out[new].shape == r50[k].shape
    for old, new in EXPECTED[head].items():
        assert torch.equal(out[new], r50[old])
    assert not any("num_batches_tracked" in k or "fc" in k for k in out)


def test_c4_and_fpn_differ_only_in_prefixes(r50: dict[str, Tensor]) -> None:
    c4, fpn = to_detectron2(r50, "c4"), to_detectron2(r50, "fpn")
    assert {k for k in c4 if k.startswith("roi_heads.res5.")} == {k.replace("backbone.bottom_up.res5", "roi_heads.res5")
                                                                 for k in fpn if ".res5." in k}
    assert all(k.startswith("backbone.bottom_up.") for k in fpn)


def test_unknown_key_is_an_error_naming_it(r50: dict[str, Tensor]) -> None:
    with pytest.raises(ConfigError, match="layer1.0.se.fc1.weight"):
        to_detectron2({**r50, "layer1.0.se.fc1.weight": torch.zeros(1)}, "c4")
    with pytest.raises(ConfigError, match="module.conv1.weight"):
        to_detectron2({"module." + k: v for k, v in r50.items()}, "fpn")
    with pytest.raises(ConfigError, match="unknown detection head"):
        to_detectron2(r50, "c5")


def test_small_stem_is_refused(r50: dict[str, Tensor]) -> None:
    with pytest.raises(ConfigError, match="small stem"):
        to_detectron2({**r50, "conv1.weight": torch.zeros(64, 3, 3, 3)}, "fpn")


def test_resnet18_needs_fpn() -> None:
    sd = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(ConfigError, match="bottleneck"):
        to_detectron2(sd, "c4")
    out = to_detectron2(sd, "fpn")
    assert len(out) == 20 + 20 * 4  # stem + 16 block convs + 3 shortcuts, each with a norm of 4 tensors
    assert out["backbone.bottom_up.res3.0.conv2.norm.weight"] is sd["layer2.0.bn2.weight"]
    assert out["backbone.bottom_up.res3.0.shortcut.weight"] is sd["layer2.0.downsample.0.weight"]


def test_checkpoint_file_format(r50: dict[str, Tensor], tmp_path: Path) -> None:
    d2 = to_detectron2(r50, "c4")
    d2backend.write_detectron2_checkpoint(d2, tmp_path / "r50.pkl")
    data = pickle.loads((tmp_path / "r50.pkl").read_bytes())
    assert data["__author__"] == "sslbench" and data["matching_heuristics"] is False
    assert data["model"].keys() == d2.keys()
    assert (data["model"]["backbone.stem.conv1.weight"] == r50["conv1.weight"].numpy()).all()
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ConfigError, match=".pkl"):
        d2backend.write_detectron2_checkpoint(d2, tmp_path / "r50.pth")


def test_schedule_and_variant_errors() -> None:
    with pytest.raises(ConfigError, match="schedule"):
        Schedule(iterations=10, batch_size=2, lr=0.01, steps=(12,), warmup_iters=0, min_size_train=(64,),
                 min_size_test=64, max_size=128)
    with pytest.raises(ConfigError, match="did you mean 'voc07_r50c4'"):
        d2backend.head_of("voc07_r50c5")


# --------------------------------------------------------------------------- with Detectron2


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_keys_are_exactly_the_models_backbone(r50: dict[str, Tensor], variant: str) -> None:
    pytest.importorskip("detectron2", reason=D2_MISSING)
    from detectron2.modeling import build_model

    head = d2backend.head_of(variant)
    cfg = d2backend.detectron2_cfg(variant, r50, num_classes=20, mean=d2backend.TORCHVISION_MEAN, std=d2backend.TORCHVISION_STD)
    state = build_model(cfg).state_dict()
    if head == "c4":
        backbone = {k for k in state if k.startswith(("backbone.", "roi_heads.res5.")) and not k.startswith("roi_heads.res5.norm.")}
        assert {k for k in state if k.startswith("roi_heads.res5.norm.")}  # MoCo's extra norm is there (a head)
    else:
        backbone = {k for k in state if k.startswith("backbone.bottom_up.")}
    backbone = {k for k in backbone if not k.endswith("num_batches_tracked")}
    d2 = to_detectron2(r50, head)
    assert d2.keys() == backbone
    assert all(d2[k].shape == state[k].shape for k in d2)
    assert cfg.MODEL.RESNETS.NORM == "BN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0 and not cfg.MODEL.MASK_ON
    other = to_detectron2(r50, "fpn" if head == "c4" else "c4")
    with pytest.raises(ConfigError, match="do not fit"):
        d2backend.load_backbone(build_model(cfg), other, head)


def test_resnet18_fpn_builds_and_loads() -> None:
    pytest.importorskip("detectron2", reason=D2_MISSING)
    from detectron2.modeling import build_model

    sd = torchvision.models.resnet18(weights=None).state_dict()
    cfg = d2backend.detectron2_cfg("coco_r50fpn_1x", sd, num_classes=3, mean=d2backend.TORCHVISION_MEAN,
                                   std=d2backend.TORCHVISION_STD)
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 64
    model = build_model(cfg)
    assert d2backend.load_backbone(model, to_detectron2(sd, "fpn"), "fpn") == 100
    assert torch.equal(model.state_dict()["backbone.bottom_up.res5.1.conv2.weight"], sd["layer4.1.conv2.weight"])


def test_detection_checkpointer_loads_every_backbone_key(r50: dict[str, Tensor], tmp_path: Path) -> None:
    pytest.importorskip("detectron2", reason=D2_MISSING)
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = d2backend.detectron2_cfg("voc0712_r50c4@moco", r50, num_classes=20, mean=d2backend.TORCHVISION_MEAN,
                                   std=d2backend.TORCHVISION_STD)
    model = build_model(cfg)
    d2 = to_detectron2(r50, "c4")
    d2backend.write_detectron2_checkpoint(d2, tmp_path / "r50.pkl")
    DetectionCheckpointer(model).load(str(tmp_path / "r50.pkl"))
    state = model.state_dict()
    backbone = [k for k in state if k.startswith(("backbone.", "roi_heads.res5.")) and ".res5.norm." not in k
                and not k.endswith("num_batches_tracked")]
    assert len(backbone) == len(d2) == 265
    assert all(torch.equal(state[k], d2[k]) for k in backbone)  # every backbone tensor came from the file
    assert torch.equal(state["roi_heads.res5.norm.weight"], torch.ones(2048))  # the extra norm starts fresh


def _boxes_set(n: int, seed: int, size: int = 32) -> DetectionSet:
    """n grey size x size images, each with one bright rectangle on a dark background (class 0)."""
    g = torch.Generator().manual_seed(seed)
    images, boxes = [], []
    for _ in range(n):
        x1, y1 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        w, h = (int(v) for v in torch.randint(size // 5, size // 2, (2,), generator=g))
        img = torch.randint(0, 40, (1, size, size), generator=g, dtype=torch.uint8)
        img[:, y1 : y1 + h, x1 : x1 + w] = 220
        images.append(img)
        boxes.append(torch.tensor([[x1, y1, x1 + w, y1 + h]], dtype=torch.float32))
    return DetectionSet("rects", ("rect",), images, boxes, [torch.zeros(1, dtype=torch.int64)] * n,
                        [torch.zeros(1, dtype=torch.bool)] * n, [f"r{i}" for i in range(n)], f"rects{seed}")


def test_tiny_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("detectron2", reason=D2_MISSING)
    torch.set_num_threads(2)
    sd = _resnet50_state(in_channels=1)
    train, test = _boxes_set(4, 0), _boxes_set(2, 1)
    schedule = Schedule(iterations=3, batch_size=2, lr=0.005, steps=(2,), warmup_iters=1, min_size_train=(32,),
                        min_size_test=32, max_size=48)
    dets, stats = d2backend.train_and_predict(sd, variant="voc0712_r50c4@moco", train=train, test=test, mean=(0.2,),
                                              std=(0.3,), schedule=schedule, seed=0, workdir=tmp_path)
    assert len(dets.boxes) == len(dets.scores) == len(dets.labels) == len(test)
    for b, s, y in zip(dets.boxes, dets.scores, dets.labels):
        assert b.ndim == 2 and b.shape[1] == 4 and b.shape[0] == s.shape[0] == y.shape[0] <= 100
        assert b.dtype == s.dtype == torch.float32 and y.dtype == torch.int64
        assert (b >= 0).all() and (b <= 32).all() and (y == 0).all()  # in the original 32x32 frame, class 0
    assert stats["iterations"] == 3 and float(stats["s_per_iter"]) > 0 and stats["detectron2"]
    assert (tmp_path / "metrics.json").exists()
