"""segmentation_fcn@1: the poly schedule, the FCN on (dilated) stages, it learns the synthetic regions, the encoder
passed in is unchanged (a trainable copy is trained), diverged lrs are failed candidates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmark.backbones import ConvNet, TimmViT, TorchvisionResNet
from benchmark.errors import ConfigError, NotApplicable
from benchmark.evaluate.encoder import FrozenEncoder
from benchmark.evaluate.segmentation import segment_confusions, segmentation_scores
from protocols.segmentation_fcn import Config, build_fcn, segmentation_fcn, train_fcn
from tests.protocols.test_segmentation import FMNIST, _splits, regions

CPU = torch.device("cpu")
SMALL = dict(batch_size=8, crop_size=32, img_size=None, eval_size=None, stride=32, scale_range=(0.75, 1.5))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


@pytest.mark.parametrize("bad", [dict(lrs=()), dict(min_lr=0.05), dict(output_stride=4), dict(dataset="coco"),
                                 dict(inference="tta"), dict(stride=0), dict(aux_weight=-1.0)])
def test_bad_config_is_one_clear_error(bad: dict) -> None:
    with pytest.raises(ConfigError, match="segmentation_fcn"):
        Config(**bad)


def test_poly_schedule_is_mmcvs() -> None:
    cfg = Config()  # mmseg schedule_20k: lr 0.01, power 0.9, min_lr 1e-4
    assert cfg.lr_at(0.01, 0) == pytest.approx(0.01) and cfg.lr_at(0.01, 20000) == pytest.approx(1e-4)
    assert cfg.lr_at(0.01, 10000) == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    assert (cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.aux_weight, cfg.crop_size) == (0.9, 5e-4, 16, 0.4, 512)


def test_fcn_heads_sit_on_the_last_two_stages_at_output_stride_8() -> None:
    x = torch.randn(2, 1, 64, 64)
    model, converted = build_fcn(ConvNet(1), 1, 5, 8, seed=0)  # strides 1, 2, 2, 2: already 8, nothing converted
    out, aux = model(x)
    assert converted == [] and out.shape == (2, 5, 8, 8) and aux.shape == (2, 5, 16, 16)  # stage 3: stride 4
    assert model.head[0].in_channels == 128 and model.aux[0].in_channels == 64  # torchvision FCNHead: 3x3 conv first
    r18, converted = build_fcn(TorchvisionResNet("resnet18", 1, False), 1, 5, 8, seed=0)
    out, aux = r18(x)
    assert converted == ["layer3", "layer4"] and out.shape == aux.shape == (2, 5, 8, 8)
    assert (r18.head[0].in_channels, r18.head[0].out_channels, r18.aux[0].in_channels) == (512, 128, 256)
    again, _ = build_fcn(ConvNet(1), 1, 5, 8, seed=0)
    assert torch.equal(again.head[4].weight, model.head[4].weight)  # the heads' init is the seed's
    with pytest.raises(NotApplicable, match="segmentation_fcn needs a convolutional backbone"):
        build_fcn(TimmViT("vit_tiny_patch16_224", 1, 32, True), 1, 5, 8, seed=0)


def test_fcn_learns_regions_and_trains_the_whole_network() -> None:
    torch.manual_seed(0)
    backbone = ConvNet(1, (8, 16, 32))
    model, _ = build_fcn(backbone, 1, 3, 8, seed=0)
    first = backbone.body[0].weight.detach().clone()
    cfg = Config(lrs=(0.05,), iterations=80, **SMALL)  # type: ignore[arg-type]
    stats = train_fcn(model, regions(64, 0), cfg, 0.05, 1, (0.3,), (0.3,), seed=0, device=CPU)
    assert not torch.equal(first, backbone.body[0].weight)  # fine-tuned, nothing frozen
    model.eval()
    (cm,) = segment_confusions(model.features, [model.head], regions(16, 1), 1, (0.3,), (0.3,), cfg.eval(), CPU)
    # measured: 0.79 after 80 iterations at lr 0.05 (3 classes; 0.47 at lr 0.01)
    assert segmentation_scores(cm).miou > 0.6 and stats["s_per_iter"] > 0


def test_end_to_end_the_encoder_is_unchanged_and_a_diverged_lr_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path))
    torch.manual_seed(0)
    enc = FrozenEncoder(ConvNet(1, (8, 16, 32)), 32, (0.3,), (0.3,), key="test")
    before = {k: v.clone() for k, v in enc.module.state_dict().items()}
    cfg = Config(lrs=(0.01, 1e30), iterations=6, batch_size=2, crop_size=64, img_size=None, eval_size=None,
                 embedded_train=8, embedded_val=4, embedded_test=4)
    rows = segmentation_fcn(enc, _splits(), cfg, seed=0)
    assert all(torch.equal(v, enc.module.state_dict()[k]) for k, v in before.items())  # a trainable copy was trained
    assert [(r.metric, r.split) for r in rows[:4]] == [("mIoU", "val"), ("mIoU", "test"), ("aAcc", "test"), ("mAcc", "test")]
    assert all(0 <= r.value <= 1 and r.n_train == 8 for r in rows) and rows[4].metric == "IoU.background"
    assert "lr=0.01 of 2" in rows[0].selection and "1e+30:diverged" in rows[0].selection
    again = segmentation_fcn(enc, _splits(), cfg, seed=0)
    assert [r.value for r in again] == [r.value for r in rows]
