"""Detection protocol: schedule, flip, the torchvision detectors on stage-wise backbones, scores, end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from benchmark.backbones import ConvNet, Pixels, TorchvisionResNet, stages
from benchmark.data.detection import Detections, DetectionSet, EmbeddedSpec, load_embedded
from benchmark.errors import ConfigError, NotApplicable
from benchmark.evaluate.encoder import FrozenEncoder
from protocols.detection import Config, build_faster_rcnn, detection, hflip, predict, score, train_detector

SMALL = dict(min_size_train=(64,), min_size_test=64, max_size=64, anchor_sizes=(8, 16, 32, 64), rois_per_image=32,
             proposals_train=64, proposals_test=64, warmup_iters=2)


def test_lr_schedule_is_detectron2s_warmup_multistep() -> None:
    cfg = Config(iterations=100, steps=(0.5, 0.8), warmup_iters=10, lr=1.0)
    assert cfg.lr_at(0) == pytest.approx(1e-3)
    assert cfg.lr_at(5) == pytest.approx(1e-3 + 0.999 * 0.5)  # linear from lr/1000
    assert [cfg.lr_at(i) for i in (10, 49, 50, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # MoCo's VOC recipe: x0.1 at 18k and 22k of 24k
    moco = Config()
    assert [round(s * moco.iterations) for s in moco.steps] == [18000, 22000]


@pytest.mark.parametrize("bad", [dict(backend="mmdet"), dict(head="c5"), dict(steps=(0.9, 0.5)), dict(steps=(1.0,)),
                                 dict(dataset="voc2099"), dict(max_size=100), dict(lr=float("nan")), dict(iterations=0)])
def test_bad_config_is_one_clear_error(bad: dict) -> None:
    with pytest.raises(ConfigError, match="detection"):
        Config(**bad)


def test_hflip_mirrors_boxes_with_the_pixels() -> None:
    x = torch.zeros(1, 8, 32)
    x[0, 4:20, 3:10] = 1  # covers continuous box (3, 4, 10, 20)
    y, b = hflip(x, torch.tensor([[3.0, 4.0, 10.0, 20.0]]))
    assert b.tolist() == [[22.0, 4.0, 29.0, 20.0]]
    cols = y[0].nonzero()[:, 1]
    assert (cols.min(), cols.max() + 1) == (22, 29)


def test_stages_are_the_backbone_and_refuse_what_has_none() -> None:
    net = ConvNet(1)
    parts = stages(net)
    x = x0 = torch.randn(2, 1, 28, 28)
    net.eval()
    for p in parts:
        x = p(x)
    assert torch.allclose(x.mean(dim=(2, 3)), net(x0))
    assert sum(p.numel() for s in parts for p in s.parameters()) == sum(p.numel() for p in net.parameters())
    assert len(stages(TorchvisionResNet("resnet18", 3, False))) == 5
    with pytest.raises(NotApplicable, match="convolutional backbone"):
        stages(Pixels(1, 28))


@pytest.mark.parametrize("head", ["c4", "fpn"])
@pytest.mark.parametrize("arch", ["convnet", "resnet18"])
def test_faster_rcnn_trains_the_backbone_copy(head: str, arch: str) -> None:
    torch.manual_seed(0)
    net = ConvNet(1) if arch == "convnet" else TorchvisionResNet("resnet18", 1, False)
    cfg = Config(head=head, **{**SMALL, "anchor_sizes": (8, 16, 32, 64, 128)})  # type: ignore[arg-type]
    model = build_faster_rcnn(net, 1, 3, cfg, (0.5,), (0.25,))
    backbone_ids = {id(p) for p in net.parameters()}
    assert backbone_ids <= {id(p) for p in model.parameters()}  # fine-tuned, nothing frozen (MoCo: FREEZE_AT 0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    model.train()
    losses = model([torch.rand(1, 64, 64)], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([2])}])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(before[n], p) for n, p in net.named_parameters())
    model.eval()
    out = model([torch.rand(1, 64, 80)])[0]
    assert out["boxes"].shape[1] == 4 and (out["labels"] >= 1).all() and (out["labels"] <= 3).all()


def _squares(n: int, seed: int) -> DetectionSet:
    """Bright squares (one class) of side 12-24 on a black 64 px canvas."""
    g = torch.Generator().manual_seed(seed)
    images, boxes = [], []
    for _ in range(n):
        im = torch.zeros(1, 64, 64, dtype=torch.uint8)
        s = int(torch.randint(12, 25, (1,), generator=g))
        x, y = (int(v) for v in torch.randint(0, 64 - s, (2,), generator=g))
        im[0, y : y + s, x : x + s] = 255
        images.append(im)
        boxes.append(torch.tensor([[x, y, x + s, y + s]], dtype=torch.float32))
    return DetectionSet("squares", ("square",), images, boxes, [torch.zeros(1, dtype=torch.int64)] * n,
                        [torch.zeros(1, dtype=torch.bool)] * n, [str(i) for i in range(n)], f"squares{seed}")


def test_a_detector_learns_squares_and_scores_rise() -> None:
    torch.manual_seed(0)
    train, test = _squares(64, 0), _squares(16, 1)
    cfg = Config(iterations=60, batch_size=4, lr=0.05, **SMALL)  # type: ignore[arg-type]
    model = build_faster_rcnn(ConvNet(1, (8, 16, 32, 32)), 1, 1, cfg, (0.1,), (0.3,))
    untrained = score(test, predict(model, test, cfg, 1, torch.device("cpu")))
    stats = train_detector(model, train, cfg, 1, seed=0, device=torch.device("cpu"))
    trained = score(test, predict(model, test, cfg, 1, torch.device("cpu")))
    assert stats["s_per_iter"] > 0 and torch.isfinite(torch.tensor(stats["last_loss"]))
    # measured: AP50 0.007 untrained -> 0.35 after 60 iterations (150 iterations at lr 0.02: 0.53)
    assert trained["AP50"] > 0.25 > 0.05 > untrained["AP50"], (untrained, trained)
    assert trained["voc07_AP50"] > 0.25


def test_score_of_perfect_detections_is_one(tmp_path: Path) -> None:
    _, test = load_embedded(EmbeddedSpec(n_train=4, n_test=12), cache=tmp_path)
    s = score(test, Detections.of_ground_truth(test))
    for k in ("AP", "AP50", "AP75", "voc07_AP", "voc07_AP50", "voc07_AP75"):
        assert s[k] == pytest.approx(1.0), k


def _encoder() -> FrozenEncoder:
    torch.manual_seed(0)
    return FrozenEncoder(ConvNet(1, (8, 16, 32)), 32, (0.3,), (0.3,), key="test")


def test_protocol_end_to_end_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmnist_small) -> None:  # noqa: ANN001
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path))
    cfg = Config(backend="torchvision", iterations=6, batch_size=2, embedded_train=12, embedded_test=6,
                 **{**SMALL, "min_size_train": (128,), "min_size_test": 128, "max_size": 128})  # type: ignore[arg-type]
    rows = detection(_encoder(), fmnist_small, cfg, seed=0)
    names = [r.metric for r in rows]
    assert {"AP", "AP50", "AP75", "voc07_AP", "voc07_AP50", "voc07_AP75"} <= set(names)
    assert all(0 <= r.value <= 1 and r.extra == {"backend": "torchvision"} and r.n_train == 12 for r in rows)
    again = detection(_encoder(), fmnist_small, cfg, seed=0)
    assert [r.value for r in again] == [r.value for r in rows]
    assert "s/it" in rows[0].selection and "torchvision faster_rcnn c4" in rows[0].selection


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed here")
def test_detectron2_backend_without_detectron2_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path))
    from benchmark.data.sets import ImageSet, Splits

    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    data = Splits("t", ImageSet(x, torch.zeros(4, dtype=torch.int64)), ImageSet(x, torch.zeros(4, dtype=torch.int64)),
                  ImageSet(x, torch.zeros(4, dtype=torch.int64)), 2, (0.3,), (0.3,), "fp", torch.arange(0))
    enc = FrozenEncoder(TorchvisionResNet("resnet18", 1, False), 512, (0.3,), (0.3,), key="r18")
    cfg = Config(backend="detectron2", variant="coco_r50fpn_1x", iterations=2, batch_size=1, embedded_train=4, embedded_test=2,
                 **{**SMALL, "anchor_sizes": (8, 16, 32, 64, 128)})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs Detectron2: build it from source"):
        detection(enc, data, cfg, seed=0)
