"""Segmentation evaluation: the confusion matrix and mmseg's metrics (hand-worked and against scikit-learn), sliding
windows against whole-image inference, the training views, dense backbone features and ResNet dilation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from benchmark.backbones import ConvNet, Pixels, TimmViT, TorchvisionResNet, stages
from benchmark.data.segmentation import SegmentationSet
from benchmark.errors import NotApplicable
from benchmark.evaluate.segmentation import (
    Inference,
    PatchGrid,
    TrainAugment,
    augment_pair,
    confusion_matrix,
    dense_features,
    dilate,
    output_stride,
    photometric_distortion,
    random_crop,
    resized_shape,
    segment_confusions,
    segmentation_rows,
    segmentation_scores,
    slide_logits,
    slide_windows,
)

# 3 classes, one ignored pixel. Rows true, columns predicted: [[2, 1, 1], [1, 2, 0], [1, 0, 1]]
TARGET = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 255])
PRED = torch.tensor([0, 0, 1, 2, 1, 1, 0, 2, 0, 1])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention



def test_confusion_matrix_and_metrics_by_hand() -> None:
    cm = confusion_matrix(PRED.view(2, 5), TARGET.view(2, 5), 3)
    assert cm.tolist() == [[2, 1, 1], [1, 2, 0], [1, 0, 1]]
    s = segmentation_scores(cm)
    # IoU = TP / (label + predicted - TP): 2 / (4 + 4 - 2), 2 / (3 + 3 - 2), 1 / (2 + 2 - 1)
    assert s.iou == pytest.approx((1 / 3, 1 / 2, 1 / 3))
    assert s.miou == pytest.approx(7 / 18) and s.aacc == pytest.approx(5 / 9)
    assert s.acc == pytest.approx((2 / 4, 2 / 3, 1 / 2)) and s.macc == pytest.approx(5 / 9)
    # a 4th class nobody has: NaN, out of the means; a class only predicted: IoU 0 (in), accuracy NaN (out)
    s4 = segmentation_scores(confusion_matrix(PRED, TARGET, 4))
    assert math.isnan(s4.iou[3]) and s4.miou == pytest.approx(7 / 18)
    only_predicted = segmentation_scores(confusion_matrix(torch.tensor([3, 0]), torch.tensor([0, 0]), 4))
    assert only_predicted.iou[3] == 0 and math.isnan(only_predicted.acc[3]) and only_predicted.miou == pytest.approx(0.25)


def test_perfect_predictions_score_one_and_rows_are_fractions() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 16, 16), generator=g)
    target[:, 0] = 255
    pred = target.clone()
    pred[:, 0] = 4  # ignored pixels do not count, whatever is predicted there
    s = segmentation_scores(confusion_matrix(pred, target, 6))  # class 5: absent, left out
    assert (s.miou, s.aacc, s.macc) == (1.0, 1.0, 1.0)
    rows = segmentation_rows(s, ("bg", "a", "b", "c", "chest of drawers", "never"), split="test", selection="x")
    assert [r.metric for r in rows] == ["mIoU", "aAcc", "mAcc", "IoU.bg", "IoU.a", "IoU.b", "IoU.c", "IoU.chest_of_drawers"]
    assert all(r.value == 1.0 and r.split == "test" and r.selection == "x" for r in rows)


def test_metrics_match_scikit_learn_on_random_labels() -> None:
    from sklearn.metrics import confusion_matrix as sk_confusion
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, size=(4, 32, 32))
    target[rng.random(target.shape) < 0.1] = 255
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 6, size=target.shape)) % 256
    pred[pred == 255] = 0
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 6)
    keep = target.reshape(-1) != 255
    t, p = target.reshape(-1)[keep], pred.reshape(-1)[keep]
    assert (cm.numpy() == sk_confusion(t, p, labels=list(range(6)))).all()
    s = segmentation_scores(cm)
    sk_iou = jaccard_score(t, p, labels=list(range(6)), average=None)
    assert np.allclose(s.iou, sk_iou, rtol=0, atol=1e-12) and s.miou == pytest.approx(sk_iou.mean(), abs=1e-12)
    assert s.aacc == pytest.approx(float((t == p).mean()), abs=1e-12)


def test_labels_out_of_range_are_errors() -> None:
    with pytest.raises(ValueError, match="labels must be in 0..2 or 255"):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="predictions must be in 0..2"):
        confusion_matrix(torch.tensor([5]), torch.tensor([0]), 3)


def test_slide_windows_are_mmsegs_grid() -> None:
    # ADE-sized image (short side 512) with DINOv3's window 512 and stride 341: two windows, the last pushed back
    assert slide_windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert slide_windows(100, 120, 512, 341) == [(0, 100, 0, 120)]  # window larger than the image: the image
    grid = slide_windows(50, 40, 32, 20)  # rows: ceil(18 / 20) + 1 = 2, columns: ceil(8 / 20) + 1 = 2
    assert grid == [(0, 32, 0, 32), (0, 32, 8, 40), (18, 50, 0, 32), (18, 50, 8, 40)]


def test_slide_equals_whole_where_the_window_covers_the_image_and_averages_overlaps() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1)).eval()
    x = torch.randn(2, 3, 20, 30)
    with torch.no_grad():
        assert torch.equal(slide_logits(net, x, 32, 21), net(x))  # one window covering the image
        pointwise = nn.Conv2d(3, 5, 1)  # no context: overlapping windows agree, so the average is the whole map
        big = torch.randn(1, 3, 50, 40)
        assert torch.allclose(slide_logits(pointwise, big, 32, 20), pointwise(big), atol=1e-6)
    calls = iter(range(4))

    def window_index(w: torch.Tensor) -> torch.Tensor:  # logits = the window's number
        return torch.full((1, 1, *w.shape[-2:]), float(next(calls)))

    out = slide_logits(window_index, torch.zeros(1, 1, 50, 40), 32, 20)  # the grid of the test above
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 20] == 0.5 and out[0, 0, 25, 20] == 1.5 and out[0, 0, 49, 39] == 3


def _tiles(n: int, size: int) -> SegmentationSet:
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (1, size, size), generator=g, dtype=torch.uint8) for _ in range(n)]
    return SegmentationSet("tiles", ("a", "b", "c"), images, [(im[0] // 86).to(torch.uint8) for im in images],
                           [str(i) for i in range(n)], "t")


def test_segment_confusions_slide_equals_whole_and_heads_share_windows() -> None:
    torch.manual_seed(0)
    feats = nn.Sequential(*stages(ConvNet(1, (8, 16)))).eval()
    heads = [nn.Conv2d(16, 3, 1), nn.Conv2d(16, 3, 1)]
    ds = _tiles(5, 24)
    slide = segment_confusions(feats, heads, ds, 1, (0.5,), (0.25,), Inference("slide", 32, 20, None, 2), torch.device("cpu"))
    whole = segment_confusions(feats, heads, ds, 1, (0.5,), (0.25,), Inference("whole", 32, 20, None, 4), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(slide, whole)) and int(slide[0].sum()) == 5 * 24 * 24
    alone = segment_confusions(feats, heads[1:], ds, 1, (0.5,), (0.25,), Inference("whole", 32, 20, None, 4), torch.device("cpu"))
    assert torch.equal(alone[0], whole[1])


def test_resize_rules_of_dinov3_and_mmseg() -> None:
    assert resized_shape(400, 300, 512) == (683, 512)  # DINOv3 FixedSideResize's own example (w 300, h 400)
    assert resized_shape(375, 500, 512) == (512, 683)  # a VOC image
    assert resized_shape(375, 500, 512, long_cap=4.0) == (512, 683)  # the 2048 cap does not bind
    assert resized_shape(100, 1000, 512, long_cap=4.0) == (205, 2048)  # it does: long side 2048


def test_training_view_pads_flips_and_normalises() -> None:
    image = torch.arange(20 * 30, dtype=torch.int64).remainder(251).to(torch.uint8).view(1, 20, 30)
    mask = (torch.arange(30) // 10).expand(20, 30).to(torch.uint8)
    aug = TrainAugment(crop=32, img_size=None, scale=(1.0, 1.0), flip=1.0, cat_max_ratio=1.0, photometric=False)
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    x, y = augment_pair(image, mask, aug, mean, std, torch.Generator().manual_seed(0))
    assert x.shape == (1, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    assert torch.equal(y[:20, :30], mask.flip(-1).long()) and (y[20:] == 255).all() and (y[:, 30:] == 255).all()
    assert torch.allclose(x[0, :20, :30], (image[0].flip(-1).float() / 255 - 0.5) / 0.25)
    assert (x[:, 20:] == 0).all() and (x[:, :, 30:] == 0).all()  # padding: 0 in normalised units (DINOv3, mmseg)


def test_crop_redraw_keeps_crops_with_more_than_one_class() -> None:
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[26:38, 26:38] = 1  # a crop holding more than 64 of its 144 pixels has both classes under 0.75
    image = torch.zeros(1, 64, 64, dtype=torch.uint8)

    def mixed(ratio: float) -> int:
        g = torch.Generator().manual_seed(0)
        return sum(len(random_crop(image, mask, 16, ratio, g)[1].unique()) > 1 for _ in range(100))

    assert mixed(0.75) > mixed(1.0) + 20, (mixed(0.75), mixed(1.0))


def test_photometric_distortion_keeps_grey_order_and_shapes() -> None:
    grey = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(1, 16, 16)
    rgb = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    changed = 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        out = photometric_distortion(grey, g).view(-1)
        assert out.dtype == torch.uint8 and bool((out[1:] >= out[:-1]).all())  # brightness, contrast: monotone
        changed += int(not torch.equal(out.view(1, 16, 16), grey))
        assert photometric_distortion(rgb, g).shape == (3, 8, 8)
    assert changed >= 8  # p = 1 - 1/8 per draw that something applies


def test_dense_features_of_convnets_resnets_and_vits() -> None:
    torch.manual_seed(0)
    net = ConvNet(1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        f = dense_features(net)(x)
        assert f.shape == (2, 128, 4, 4) and torch.allclose(f.mean(dim=(2, 3)), net(x), atol=1e-6)
        assert dense_features(TorchvisionResNet("resnet18", 3, False).eval())(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
        vit = TimmViT("vit_tiny_patch16_224", 1, 32, small_stem=True).eval()  # 4 px patches, 1 class token
        grid = dense_features(vit)
        assert isinstance(grid, PatchGrid)
        tokens = vit.net.forward_features(x)
        g = grid(x)
        assert g.shape == (2, 192, 8, 8) and torch.equal(g[:, :, 2, 5], tokens[:, 1 + 2 * 8 + 5])
        assert grid(torch.randn(1, 1, 32, 48)).shape == (1, 192, 8, 12)  # any size (dynamic position embedding)
    with pytest.raises(NotApplicable, match="segmentation needs a backbone with a spatial feature map"):
        dense_features(Pixels(1, 28))


def test_dilation_is_torchvisions_replace_stride_with_dilation() -> None:
    import torchvision

    torch.manual_seed(0)
    ours = TorchvisionResNet("resnet50", 3, False)
    assert output_stride(stages(ours), 3) == 32
    assert dilate(ours, 3, 8) == ["layer3", "layer4"] and output_stride(stages(ours), 3) == 8
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    missing = ref.load_state_dict(ours.net.state_dict(), strict=False).missing_keys
    assert missing == ["fc.weight", "fc.bias"]
    geometry = [(n, m.stride, m.dilation, m.padding) for n, m in ref.named_modules() if isinstance(m, nn.Conv2d)]
    assert geometry == [(n, m.stride, m.dilation, m.padding) for n, m in ours.net.named_modules() if isinstance(m, nn.Conv2d)]
    ours.eval(), ref.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        body = nn.Sequential(*list(ref.children())[:-2])
        assert torch.equal(nn.Sequential(*stages(ours))(x), body(x))


def test_dilation_of_basic_blocks_and_what_is_left_alone() -> None:
    r18 = TorchvisionResNet("resnet18", 1, False)
    assert dilate(r18, 1, 8) == ["layer3", "layer4"] and output_stride(stages(r18), 1) == 8
    l4 = r18.net.layer4
    assert (l4[0].conv1.stride, l4[0].conv1.dilation, l4[1].conv1.dilation, l4[1].conv2.dilation) == ((1, 1), (2, 2), (4, 4), (1, 1))
    assert l4[0].downsample[0].stride == (1, 1)
    assert dilate(r18, 1, 8) == []  # already at 8
    net = ConvNet(1)
    assert dilate(net, 1, 8) == [] and output_stride(stages(net), 1) == 8  # strides 1, 2, 2, 2
    small = TorchvisionResNet("resnet18", 1, True)
    assert dilate(small, 1, 8) == [] and output_stride(stages(small), 1) == 8
    r16 = TorchvisionResNet("resnet18", 1, False)
    assert dilate(r16, 1, 16) == ["layer4"] and r16.net.layer4[1].conv1.dilation == (2, 2)
