from __future__ import annotations

import math

import pytest
import torch

from benchmark.data.detection import Detections, DetectionSet
from benchmark.evaluate.detection.deteval import COCO_KEYS, coco_metrics, voc_ap, voc_aps

Box = tuple[float, float, float, float]  # continuous 0-based x1, y1, x2, y2
BACKGROUND: Box = (40, 40, 50, 50)  # overlaps no ground-truth box in these tests


def _gt(boxes: list[list[Box]], labels: list[list[int]] | None = None, difficult: list[list[bool]] | None = None,
        classes: tuple[str, ...] = ("a",)) -> DetectionSet:
    labels = labels or [[0] * len(b) for b in boxes]
    difficult = difficult or [[False] * len(b) for b in boxes]
    return DetectionSet("toy", classes, [torch.zeros(1, 64, 64, dtype=torch.uint8) for _ in boxes],
                        [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes],
                        [torch.tensor(y, dtype=torch.int64) for y in labels],
                        [torch.tensor(d, dtype=torch.bool) for d in difficult],
                        [f"im{i}" for i in range(len(boxes))], "toy")


def _dets(per_image: list[list[tuple[Box, float, int]]]) -> Detections:
    """One list of (box, score, label) per image."""
    return Detections([torch.tensor([b for b, _, _ in d], dtype=torch.float32).reshape(-1, 4) for d in per_image],
                      [torch.tensor([s for _, s, _ in d], dtype=torch.float32) for d in per_image],
                      [torch.tensor([y for _, _, y in d], dtype=torch.int64) for d in per_image])


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return all(math.isclose(a[k], b[k], abs_tol=1e-12) or (math.isnan(a[k]) and math.isnan(b[k])) for k in COCO_KEYS)


# --------------------------------------------------------------------------- a case worked by hand

A, B, C = (0, 0, 10, 10), (20, 20, 30, 30), (5, 5, 15, 15)
HAND_GT = _gt([[A, B], [C]])
# TP on A (IoU 1), FP on background, TP on C (IoU 1); B is missed
HAND_DETS = _dets([[(A, 0.9, 0)], [(BACKGROUND, 0.8, 0), (C, 0.7, 0)]])


def test_hand_checked_case() -> None:
    # 3 objects, ranked detections TP, FP, TP -> (precision, recall) points (1, 1/3), (1/2, 1/3), (2/3, 2/3).
    # VOC07 11-point: t = 0, .1, .2, .3 see precision 1 (recall 1/3 >= t), t = .4, .5, .6 see 2/3 (only the
    #   last point has recall >= t), t = .7 .. 1 see 0 -> (4 * 1 + 3 * 2/3) / 11 = 6/11.
    # VOC2010 area: envelope 1 on recall (0, 1/3], 2/3 on (1/3, 2/3], nothing beyond -> 1/3 * 1 + 1/3 * 2/3 = 5/9.
    # COCO AP50, 101 recall thresholds 0, .01, .., 1: 0 .. .33 (34 thresholds) reach the first point (precision 1),
    #   .34 .. .66 (33) reach the last point (envelope 2/3), .67 .. 1 are never reached (0)
    #   -> (34 * 1 + 33 * 2/3) / 101 = 56/101.
    # The TPs have IoU 1, so every IoU threshold .5 .. .95 gives the same answer: AP75 = AP = AP50. All boxes are
    # 10 x 10 (area 100 < 32^2): APs = AP50, and there is no medium or large object: APm = APl = nan.
    ap07, per_class07 = voc_ap(HAND_GT, HAND_DETS, use_07_metric=True)
    ap10, per_class10 = voc_ap(HAND_GT, HAND_DETS, use_07_metric=False)
    assert ap07 == pytest.approx(6 / 11, abs=1e-12) and per_class07 == [pytest.approx(6 / 11, abs=1e-12)]
    assert ap10 == pytest.approx(5 / 9, abs=1e-12) and per_class10 == [pytest.approx(5 / 9, abs=1e-12)]
    m = coco_metrics(HAND_GT, HAND_DETS)
    for key in ("AP", "AP50", "AP75", "APs"):
        assert m[key] == pytest.approx(56 / 101, abs=1e-12), key  # COCOeval's precision is tp / (tp + fp + 2.2e-16)
    assert math.isnan(m["APm"]) and math.isnan(m["APl"])


def test_precision_envelope() -> None:
    # FP, TP, TP on 2 objects: (precision, recall) (0, 0), (1/2, 1/2), (2/3, 1). Every evaluator takes the best
    # precision at recall >= r, which is 2/3 everywhere: 11-point, area and COCO AP50 are all 2/3 (the raw curve
    # would give an area of 1/2 * 1/2 + 1/2 * 2/3 = 7/12).
    gt = _gt([[A, B]])
    dets = _dets([[(BACKGROUND, 0.9, 0), (A, 0.8, 0), (B, 0.7, 0)]])
    assert voc_ap(gt, dets)[0] == pytest.approx(2 / 3, abs=1e-12)
    assert voc_ap(gt, dets, use_07_metric=False)[0] == pytest.approx(2 / 3, abs=1e-12)
    assert coco_metrics(gt, dets)["AP50"] == pytest.approx(2 / 3, abs=1e-12)


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(("box", "voc_hit", "coco_hit"), [
    # ground truth (0, 0, 10, 10) is VOC (1, 1, 10, 10): 10 x 10 = 100 pixels with the +1 widths
    ((0, 0, 10, 19), True, True),  # VOC (1, 1, 10, 19): inter 100, union 10 * 19 = 190: IoU .526 > .5
    ((0, 0, 10, 20), False, True),  # VOC (1, 1, 10, 20): 100 / 200 = .5 exactly: VOC needs > .5, COCO >= .5
    ((0, 0, 10, 21), False, False),  # VOC (1, 1, 10, 21): 100 / 210 = .476
])  # fmt: skip
def test_iou_threshold(box: Box, voc_hit: bool, coco_hit: bool) -> None:
    # A hit is AP 1, a miss AP 0. Had the +1 widths been applied to unconverted boxes, (0, 0, 10, 20) would be
    # 11 * 11 / (11 * 21) = .524 and a VOC hit.
    gt, dets = _gt([[(0, 0, 10, 10)]]), _dets([[(box, 0.9, 0)]])
    assert voc_ap(gt, dets)[0] == float(voc_hit)
    assert voc_ap(gt, dets, use_07_metric=False)[0] == float(voc_hit)
    assert coco_metrics(gt, dets)["AP50"] == pytest.approx(float(coco_hit), abs=1e-12)


def test_duplicate_is_a_false_positive() -> None:
    # two objects; the second detection of A ranks above the detection of B. It must count exactly as a
    # detection on background would, and lower AP below 1.
    gt = _gt([[A, B]])
    dup = _dets([[(A, 0.9, 0), (A, 0.8, 0), (B, 0.7, 0)]])
    bg = _dets([[(A, 0.9, 0), (BACKGROUND, 0.8, 0), (B, 0.7, 0)]])
    for metric in (True, False):
        assert voc_ap(gt, dup, use_07_metric=metric) == voc_ap(gt, bg, use_07_metric=metric)
        assert voc_ap(gt, dup, use_07_metric=metric)[0] < 1 - 1e-3
    # (precision, recall): (1, 1/2), (1/2, 1/2), (2/3, 1); 11-point: t <= .5 (6 thresholds) 1, t >= .6 (5) 2/3
    assert voc_ap(gt, dup)[0] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)
    assert _same(coco_metrics(gt, dup), coco_metrics(gt, bg))
    assert coco_metrics(gt, dup)["AP50"] < 1 - 1e-3


# --------------------------------------------------------------------------- difficult objects

D = (20, 20, 30, 30)  # the difficult object in image 0


@pytest.mark.parametrize("score", [0.95, 0.75])  # ranked first (before any TP or FP) and in the middle
def test_detection_on_difficult_box_is_ignored(score: float) -> None:
    gt = _gt([[A, D], [C]], difficult=[[False, True], [False]])
    without = _dets([[(A, 0.9, 0)], [(BACKGROUND, 0.8, 0), (C, 0.7, 0)]])
    with_d = _dets([[(A, 0.9, 0), (D, score, 0)], [(BACKGROUND, 0.8, 0), (C, 0.7, 0)]])
    for metric in (True, False):
        assert voc_ap(gt, with_d, use_07_metric=metric) == voc_ap(gt, without, use_07_metric=metric)
    # VOC07 of TP, FP, TP on 2 objects: points (1, 1/2), (1/2, 1/2), (2/3, 1) -> (6 + 5 * 2/3) / 11; had the
    # detection on D been a TP over 3 objects, or an FP, this would differ
    assert voc_ap(gt, with_d)[0] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)
    assert _same(coco_metrics(gt, with_d), coco_metrics(gt, without))
    assert coco_metrics(gt, with_d)["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)


def test_missed_difficult_box_does_not_lower_recall() -> None:
    gt = _gt([[A, D], [C]], difficult=[[False, True], [False]])
    dets = _dets([[(A, 0.9, 0)], [(C, 0.8, 0)]])
    assert voc_ap(gt, dets) == (1.0, [1.0])
    assert voc_ap(gt, dets, use_07_metric=False) == (1.0, [1.0])
    assert coco_metrics(gt, dets)["AP"] == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------- known answers

THREE = ("a", "b", "c")
MULTI_GT = _gt(
    [[(0, 0, 10, 10), (12, 3, 30, 25)], [], [(5, 5, 40, 40), (30, 30, 60, 62), (1, 40, 9, 52)], [(2, 2, 63, 63)]],
    labels=[[0, 1], [], [2, 0, 1], [2]], classes=THREE,
)


def test_perfect_detections_score_one() -> None:
    dets = Detections.of_ground_truth(MULTI_GT)
    for metric in (True, False):
        assert voc_ap(MULTI_GT, dets, use_07_metric=metric) == (1.0, [1.0, 1.0, 1.0])
    m = coco_metrics(MULTI_GT, dets)
    # APl: the 61 x 61 box (3721 < 96^2) is medium; no large object
    for key in ("AP", "AP50", "AP75", "APs", "APm"):
        assert m[key] == pytest.approx(1.0, abs=1e-12), key
    assert math.isnan(m["APl"])


def test_wrong_labels_score_zero() -> None:
    perfect = Detections.of_ground_truth(MULTI_GT)
    dets = Detections(perfect.boxes, perfect.scores, [(y + 1) % 3 for y in perfect.labels])
    assert voc_ap(MULTI_GT, dets) == (0.0, [0.0, 0.0, 0.0])
    m = coco_metrics(MULTI_GT, dets)
    assert [m[k] for k in ("AP", "AP50", "AP75", "APs", "APm")] == [0.0] * 5


def test_class_without_ground_truth() -> None:
    # class "b" has no object: nan in VOC's per-class list and out of its mean; -1 in COCOeval, left out of COCO's
    # mean. The FP of class "b" changes neither.
    gt = _gt([[A], [C]], labels=[[0], [2]], classes=THREE)
    dets = _dets([[(A, 0.9, 0), (BACKGROUND, 0.99, 1)], [(C, 0.9, 2)]])
    ap, per_class = voc_ap(gt, dets)
    assert ap == 1.0 and per_class[0] == per_class[2] == 1.0 and math.isnan(per_class[1])
    assert coco_metrics(gt, dets)["AP"] == pytest.approx(1.0, abs=1e-12)


def test_no_ground_truth_at_all_is_nan() -> None:
    gt, dets = _gt([[], []]), _dets([[(A, 0.9, 0)], []])
    ap, per_class = voc_ap(gt, dets)
    assert math.isnan(ap) and math.isnan(per_class[0])
    assert all(math.isnan(v) for v in coco_metrics(gt, dets).values())


def test_no_detections_scores_zero() -> None:
    dets = _dets([[] for _ in range(len(MULTI_GT))])
    assert voc_ap(MULTI_GT, dets) == (0.0, [0.0, 0.0, 0.0])
    assert voc_ap(MULTI_GT, dets, use_07_metric=False) == (0.0, [0.0, 0.0, 0.0])
    m = coco_metrics(MULTI_GT, dets)
    assert [m[k] for k in ("AP", "AP50", "AP75", "APs", "APm")] == [0.0] * 5
    assert math.isnan(m["APl"])  # no large object to miss


def test_misaligned_detections_raise() -> None:
    with pytest.raises(ValueError, match="not aligned"):
        voc_ap(HAND_GT, _dets([[(A, 0.9, 0)]]))


# --------------------------------------------------------------------------- invariance


def _noisy_detections(gt: DetectionSet, seed: int) -> Detections:
    """Jittered copies of each object (some twice, some with the wrong class) plus background boxes; distinct scores."""
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for b, y in zip(gt.boxes, gt.labels):
        copies = torch.cat([b, b[: len(b) // 2]])
        jitter = torch.randint(-3, 4, copies.shape, generator=g).float()
        noise = torch.randint(0, 40, (2, 2), generator=g).float()
        boxes.append(torch.cat([copies + jitter, torch.cat([noise, noise + 12], 1)]))
        wrong = (torch.rand(len(copies), generator=g) < 0.2).long()
        labels.append(torch.cat([(torch.cat([y, y[: len(y) // 2]]) + wrong) % 3, torch.randint(0, 3, (2,), generator=g)]))
    n = sum(len(b) for b in boxes)
    scores = (torch.randperm(n, generator=g).float() + 1) / n
    return Detections(boxes, list(scores.split([len(b) for b in boxes])), labels)


def test_order_within_image_does_not_matter() -> None:
    dets = _noisy_detections(MULTI_GT, seed=0)
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(len(b), generator=g) for b in dets.boxes]
    shuffled = Detections([b[p] for b, p in zip(dets.boxes, perms)], [s[p] for s, p in zip(dets.scores, perms)],
                          [y[p] for y, p in zip(dets.labels, perms)])
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms)
    ap = voc_ap(MULTI_GT, dets)
    assert 0 < ap[0] < 1  # a case with both hits and misses
    assert voc_ap(MULTI_GT, shuffled) == ap
    assert voc_ap(MULTI_GT, shuffled, use_07_metric=False) == voc_ap(MULTI_GT, dets, use_07_metric=False)
    assert coco_metrics(MULTI_GT, shuffled) == pytest.approx(coco_metrics(MULTI_GT, dets), abs=0, nan_ok=True)


def test_several_thresholds_at_once_equal_one_at_a_time_and_fall_with_the_threshold() -> None:
    dets = _noisy_detections(MULTI_GT, seed=3)
    ious = [0.5 + 0.05 * i for i in range(10)]
    many = voc_aps(MULTI_GT, dets, ious)
    assert list(many) == ious
    for t in ious:
        assert many[t] == voc_ap(MULTI_GT, dets, iou=t)
    means = [many[t][0] for t in ious]
    assert means == sorted(means, reverse=True) and means[0] > means[-1]
