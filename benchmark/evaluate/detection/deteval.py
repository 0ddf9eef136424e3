"""Detection evaluators: COCO AP through pycocotools, and the Pascal VOC AP of py-faster-rcnn / Detectron2.

Both score a `Detections` against the `DetectionSet` it was run on (aligned per image) and return fractions in [0, 1].

- `coco_metrics`: AP (mean over IoU 0.50:0.05:0.95), AP50, AP75 and AP by object size (small / medium / large:
  area below 32^2, up to 96^2, above), each a mean over categories of the precision averaged at 101 recall
  thresholds, at most 100 detections per image and category. Computed by pycocotools' `COCOeval` (iouType "bbox",
  `pycocotools/cocoeval.py`) on an in-memory COCO ground truth. Difficult objects: written as `iscrowd` = 1, so
  a detection matched to one is ignored and a missed one is not counted (COCOeval's `gtIgnore` / `dtIgnore`).
- `voc_ap`: per class, detections in score order are matched greedily to the ground-truth box they overlap most
  (IoU strictly above the threshold); AP is the VOC2007 11-point interpolated precision or the VOC2010+ area
  under the precision envelope. Our own implementation of `voc_eval` / `voc_ap` in py-faster-rcnn's
  `lib/datasets/voc_eval.py`, as copied into Detectron2's `detectron2/evaluation/pascal_voc_evaluation.py`.
  Difficult objects: a detection whose best match is a difficult box is dropped, and difficult boxes are not
  in the recall denominator.

Why both: MoCo's VOC tables report the VOC07 11-point AP50 of Detectron2's Pascal VOC evaluator (and its mean over
IoU 0.5:0.95), which is not the COCO number on the same detections; COCO AP / AP50 / AP75 is the standard for
everything else.

Boxes are continuous 0-based xyxy (`benchmark.detection`). VOC's evaluator works on 1-based inclusive pixel
indices with +1 widths; boxes are converted as Detectron2 does (xmin = x1 + 1, ymin = y1 + 1, xmax = x2,
ymax = y2). For boxes converted that way the +1 IoU equals the continuous IoU, which is what COCO uses, so the two
evaluators see the same overlaps; they differ at the threshold (VOC: IoU > t, COCO: IoU >= t).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmark.data.detection import Detections, DetectionSet

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six entries of COCOeval.stats, in order


def _check_aligned(gt: DetectionSet, dets: Detections) -> None:
    n = {len(gt), len(dets.boxes), len(dets.scores), len(dets.labels)}
    if len(n) != 1:
        raise ValueError(f"detections are not aligned with the {len(gt)} images of {gt.name!r}: "
                         f"{len(dets.boxes)} box, {len(dets.scores)} score and {len(dets.labels)} label lists")


# --------------------------------------------------------------------------- COCO (pycocotools)


def _coco_ground_truth(gt: DetectionSet) -> dict[str, Any]:
    """`gt` as a COCO instances document: image ids 1..N, category ids 1..K, difficult -> iscrowd.

    Not `benchmark.detection.coco_json`: that reads every image for its size, which COCOeval does not use (and a
    `LazyImages` set would decode every file). Annotation ids start at 1 because COCOeval stores a match as the
    matched id, with 0 meaning unmatched.
    """
    anns: list[dict[str, Any]] = []
    for i, (boxes, labels, hard) in enumerate(zip(gt.boxes, gt.labels, gt.difficult), 1):
        for (x1, y1, x2, y2), k, d in zip(boxes.tolist(), labels.tolist(), hard.tolist()):
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": k + 1, "bbox": [x1, y1, w, h],
                         "area": w * h, "iscrowd": int(d)})
    return {"images": [{"id": i} for i in range(1, len(gt) + 1)], "annotations": anns,
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(gt.classes)]}


def _coco_results(dets: Detections) -> list[dict[str, Any]]:
    """Detections in COCO's result format ([x, y, w, h] boxes, 1-based image and category ids)."""
    out: list[dict[str, Any]] = []
    for i, (boxes, scores, labels) in enumerate(zip(dets.boxes, dets.scores, dets.labels), 1):
        for (x1, y1, x2, y2), s, k in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            out.append({"image_id": i, "category_id": k + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    return out


def coco_metrics(gt: DetectionSet, dets: Detections) -> dict[str, float]:
    """COCO box AP of `dets` on `gt` through pycocotools.

    Args:
        gt: the ground truth; difficult objects become `iscrowd` regions (ignored: neither hit nor miss).
        dets: one (m_i, 4) box / (m_i,) score / (m_i,) label tensor per image of `gt`.

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl"} in [0, 1]. A category without (non-difficult) ground truth in
        a size range is left out of that mean (COCOeval marks it -1); a metric with no category left is nan.
        No detections at all give 0 wherever there is ground truth to miss.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _check_aligned(gt, dets)
    results = _coco_results(dets)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        coco_gt = COCO()
        coco_gt.dataset = _coco_ground_truth(gt)
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes fails on an empty list (it reads results[0]); an empty result set evaluates fine
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # summarize() averages over the entries > -1 and gives -1 when there is none
    return {key: float(v) if v >= 0 else math.nan for key, v in zip(COCO_KEYS, ev.stats[: len(COCO_KEYS)])}


# --------------------------------------------------------------------------- Pascal VOC (voc_eval)


def _to_voc(boxes: Tensor) -> np.ndarray:
    """(n, 4) continuous 0-based xyxy -> float64 VOC 1-based inclusive (xmin, ymin, xmax, ymax), as Detectron2."""
    b: np.ndarray = boxes.reshape(-1, 4).to(torch.float64).numpy().copy()
    b[:, :2] += 1.0
    return b


def _voc_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, n) IoU of VOC boxes a (m, 4) and b (n, 4), with voc_eval's +1 pixel widths and heights."""
    iw = np.maximum(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1.0, 0.0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0] + 1.0) * (a[:, 3] - a[:, 1] + 1.0)
    area_b = (b[:, 2] - b[:, 0] + 1.0) * (b[:, 3] - b[:, 1] + 1.0)
    iou: np.ndarray = inter / (area_a[:, None] + area_b[None, :] - inter)
    return iou


def _best_overlaps(gt: DetectionSet, dets: Detections, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class k over all images: per detection its score, best IoU and the index of that ground-truth box in the
    concatenated class-k ground truth (-inf / -1 in an image without one); and that ground truth's difficult flags.

    The best box is taken over all of the image's class-k boxes, matched or not, as voc_eval does: a detection
    whose best box is already taken is a false positive even if another box would have fitted.
    """
    scores, best_iou, best_gt, hard = [], [], [], []
    n_gt = 0
    for i in range(len(gt)):
        g, d = gt.labels[i] == k, dets.labels[i] == k
        gt_boxes, det_boxes = _to_voc(gt.boxes[i][g]), _to_voc(dets.boxes[i][d])
        scores.append(dets.scores[i][d].to(torch.float64).numpy())
        hard.append(gt.difficult[i][g].numpy().astype(bool))
        if len(gt_boxes):
            overlaps = _voc_iou(det_boxes, gt_boxes)  # (m, n)
            best_iou.append(overlaps.max(1))
            best_gt.append(overlaps.argmax(1) + n_gt)
        else:
            best_iou.append(np.full(len(det_boxes), -np.inf))
            best_gt.append(np.full(len(det_boxes), -1))
        n_gt += len(gt_boxes)
    return np.concatenate(scores), np.concatenate(best_iou), np.concatenate(best_gt), np.concatenate(hard)


def _hits(scores: np.ndarray, best_iou: np.ndarray, best_gt: np.ndarray, hard: np.ndarray, iou: float) -> np.ndarray:
    """1 (true positive) or 0 (false positive) per counted detection, in descending score order (stable).

    A detection matched to a difficult box is left out: in voc_eval it adds neither a TP nor an FP, so it would
    only repeat the previous precision/recall point, which changes neither AP.
    """
    taken = np.zeros(len(hard), dtype=bool)
    hits = []
    for d in np.argsort(-scores, kind="stable"):
        j = best_gt[d]
        if not best_iou[d] > iou:
            hits.append(0.0)
        elif hard[j]:
            continue
        elif taken[j]:
            hits.append(0.0)  # a duplicate of an object already found
        else:
            taken[j] = True
            hits.append(1.0)
    return np.array(hits)


def _average_precision(hits: np.ndarray, n_pos: int, use_07_metric: bool) -> float:
    """AP of a ranked list of hits against n_pos objects: VOC07 11-point or VOC2010+ area; nan when n_pos is 0."""
    if n_pos == 0:
        return math.nan
    tp = np.cumsum(hits)
    rec = tp / n_pos
    prec = tp / np.arange(1, len(hits) + 1)
    if use_07_metric:
        # np.arange(0, 1.1, 0.1), not linspace: the same float thresholds as voc_eval (0.30000000000000004, ...)
        t = np.arange(0.0, 1.1, 0.1)
        return float(np.where(rec[None, :] >= t[:, None], prec[None, :], 0.0).max(1, initial=0.0).mean())
    r = np.concatenate(([0.0], rec, [1.0]))
    p = np.concatenate(([0.0], prec, [0.0]))
    p = np.maximum.accumulate(p[::-1])[::-1]  # envelope: the best precision at this recall or beyond
    return float(np.sum(np.diff(r) * p[1:]))


def voc_ap(gt: DetectionSet, dets: Detections, iou: float = 0.5, use_07_metric: bool = True) -> tuple[float, list[float]]:
    """Pascal VOC AP of `dets` on `gt` (py-faster-rcnn / Detectron2 `voc_eval`).

    Args:
        gt: the ground truth; difficult objects are neither hits nor misses.
        dets: one (m_i, 4) box / (m_i,) score / (m_i,) label tensor per image of `gt`.
        iou: a detection is a hit when its IoU with a ground-truth box is strictly above this.
        use_07_metric: VOC2007's 11-point interpolated AP (MoCo's tables), else VOC2010+'s area under the
            precision envelope.

    Returns:
        (mean over the classes with at least one non-difficult object, per-class AP with nan for the others).
        The mean is nan when no class has an object.
    """
    return voc_aps(gt, dets, [iou], use_07_metric)[iou]


def voc_aps(gt: DetectionSet, dets: Detections, ious: Sequence[float], use_07_metric: bool = True) -> dict[float, tuple[float, list[float]]]:
    """`voc_ap` at several IoU thresholds, {iou: (mean, per class)}, matching each class's boxes once for all."""
    _check_aligned(gt, dets)
    per_class: dict[float, list[float]] = {t: [] for t in ious}
    for k in range(len(gt.classes)):
        scores, best_iou, best_gt, hard = _best_overlaps(gt, dets, k)
        for t in ious:
            per_class[t].append(_average_precision(_hits(scores, best_iou, best_gt, hard, t), int((~hard).sum()), use_07_metric))
    out = {}
    for t, aps in per_class.items():
        valid = [a for a in aps if not math.isnan(a)]
        out[t] = ((sum(valid) / len(valid) if valid else math.nan), aps)
    return out
