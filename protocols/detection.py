"""Detection transfer: fine-tune a Faster R-CNN on the encoder's backbone, report COCO AP and VOC07 AP.

The recipe is MoCo's VOC protocol (He et al. 2020, https://arxiv.org/abs/1911.05722; github.com/facebookresearch/
moco `detection/configs/pascal_voc_R_50_C4_24k_moco.yaml` on `Base-RCNN-C4-BN.yaml`; docs/protocols.md#detection): Faster
R-CNN with a C4 head (the backbone up to its second-to-last stage, the last stage as the RoI head), BN trained in
backbone and head, nothing frozen, SGD momentum 0.9, lr 0.02, batch 16, 24k iterations, x0.1 at 18k and 22k,
100 linear warm-up iterations, weight decay 1e-4, train min size 480..800 step 32, test 800, flip.

Two backends behind the same rows:
- `torchvision`: `torchvision.models.detection.FasterRCNN` on the backbone's stages (`benchmark.backbones.stages`),
  C4 (RoIAlign 14x14 -> last stage -> average pool, as Detectron2's Res5ROIHeads) or FPN (a pyramid over every
  stage after the first, two-MLP box head). Runs on any machine and any stage-wise backbone (convnet, ResNets).
- `detectron2`: the reference. The ResNet is converted to Detectron2's names and trained with Detectron2 itself on
  a named recipe (`variant`; `benchmark.evaluate.detection.d2backend`). Detectron2 has no PyPI release: install it from its source
  repository (https://github.com/facebookresearch/detectron2, INSTALL.md). `auto` takes it when it is importable
  and the backbone is a 7x7-stem ResNet, else torchvision; the backend used is in every row (`extra`).

Both backends' detections are scored by the same evaluators (`benchmark.evaluate.detection.deteval`): COCO AP / AP50 / AP75 (and
by size) through pycocotools, and the VOC07 11-point AP at IoU 0.5 (`voc07_AP50`, the number in MoCo's VOC
tables) plus its mean over IoU 0.5:0.95 (`voc07_AP`) and at 0.75 (`voc07_AP75`), as Detectron2's Pascal VOC
evaluator reports them.

Data: `fmnist_det` (embedded: Fashion-MNIST items on 128 px canvases, `benchmark.data.detection`), `voc07`,
`voc0712` (MoCo's train set) or `coco`, from local folders. Images are converted to the encoder's channel count
(grey -> repeated, RGB -> luma) and normalised with the encoder's mean/std. Nothing is selected on the test set:
the recipe is fixed, so there is no val row. Differences from MoCo: one process (BN, not synchronised BN), no
precise-BN pass in the torchvision backend, torchvision's RPN/RoI sampling defaults.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from benchmark.backbones import stage_widths, stages, torchvision_resnet_state
from benchmark.config import check, nohash
from benchmark.data.colour import convert_channels
from benchmark.data.detection import DETECTION_DATASETS, Detections, DetectionSet, EmbeddedSpec, load_detection
from benchmark.data.sets import Splits
from benchmark.evaluate.encoder import Encoder
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext
from benchmark.registry import register_protocol
from benchmark.store.results import Row

__all__ = ["Config", "build_faster_rcnn", "detection", "hflip", "predict", "score", "train_detector"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torchvision", "detectron2")
HEADS = ("c4", "fpn")


@dataclass(frozen=True)
class Config:
    dataset: str = "fmnist_det"  # fmnist_det (embedded) | voc07 | voc0712 (MoCo: VOC07+12 trainval -> VOC07 test) | coco
    data_root: str | None = nohash(None)  # its folder (fmnist_det: Fashion-MNIST's; None = the usual lookup)
    backend: str = "auto"  # auto | torchvision | detectron2 (see the module docstring)
    variant: str = "voc0712_r50c4@moco"  # Detectron2 recipe; the schedule fields below override it
    head: str = "c4"  # torchvision backend: c4 (MoCo's R50-C4) | fpn
    iterations: int = 24000  # MoCo VOC: 24k
    batch_size: int = 16  # images per iteration (MoCo: 16 over 8 GPUs)
    lr: float = 0.02  # MoCo VOC
    steps: tuple[float, ...] = (0.75, 22 / 24)  # lr x0.1 at these fractions of `iterations` (MoCo: 18k, 22k of 24k)
    warmup_iters: int = 100  # linear warm-up from lr/1000 (Detectron2's WARMUP_FACTOR)
    weight_decay: float = 1e-4  # Detectron2 default
    momentum: float = 0.9
    min_size_train: tuple[int, ...] = tuple(range(480, 801, 32))  # shorter side, one drawn per batch
    min_size_test: int = 800
    max_size: int = 1333  # longer-side cap
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # C4: all on one map; FPN: one per level, finest first
    flip: bool = True  # random horizontal flip in training
    rois_per_image: int = 512  # sampled RoIs per training image (Detectron2 ROI_HEADS.BATCH_SIZE_PER_IMAGE)
    proposals_train: int = 2000  # RPN proposals kept after NMS per image in training (Detectron2 C4: 2000)
    proposals_test: int = 1000  # ... and at test time (Detectron2: 1000)
    # the embedded set (fmnist_det); these define the data, so they are part of the config hash
    embedded_train: int = 2000  # canvases to train on
    embedded_test: int = 500  # canvases to test on
    eval_batch_size: int = nohash(16)

    def __post_init__(self) -> None:
        check(self.dataset in DETECTION_DATASETS, f"detection.dataset must be one of {', '.join(DETECTION_DATASETS)}, got {self.dataset!r}")
        check(self.backend in BACKENDS, f"detection.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        check(self.head in HEADS, f"detection.head must be c4 or fpn, got {self.head!r}")
        check(self.iterations > 0, f"detection.iterations must be > 0, got {self.iterations}")
        check(self.batch_size > 0, f"detection.batch_size must be > 0, got {self.batch_size}")
        check(self.lr > 0 and math.isfinite(self.lr), f"detection.lr must be a positive number, got {self.lr}")
        check(all(0 < s < 1 for s in self.steps) and list(self.steps) == sorted(set(self.steps)),
              f"detection.steps are increasing fractions of the iterations in (0, 1), got {self.steps}")
        check(self.warmup_iters >= 0, f"detection.warmup_iters must be >= 0, got {self.warmup_iters}")
        check(len(self.min_size_train) > 0 and min(self.min_size_train) > 0, "detection.min_size_train needs positive sizes")
        check(self.min_size_test > 0 and self.max_size >= max(self.min_size_train + (self.min_size_test,)),
              "detection.max_size must be >= every min size")
        check(min(self.rois_per_image, self.proposals_train, self.proposals_test) > 0,
              "detection.rois_per_image, proposals_train and proposals_test must be > 0")
        check(self.embedded_train > 0 and self.embedded_test > 0, "detection.embedded_train and embedded_test must be > 0")
        check(len(self.anchor_sizes) > 0 and min(self.anchor_sizes) > 0, "detection.anchor_sizes needs positive sizes")

    def lr_at(self, it: int) -> float:
        """Detectron2's WarmupMultiStepLR: linear warm-up from lr/1000, x0.1 at each step passed."""
        decay = 0.1 ** sum(it >= round(s * self.iterations) for s in self.steps)
        warm = 1.0 if it >= self.warmup_iters else 1e-3 + (1 - 1e-3) * it / self.warmup_iters
        return self.lr * decay * warm


# --------------------------------------------------------------------------- model


class _Pyramid(nn.Module):
    """Backbone stages + FPN over every stage after the first (torchvision's BackboneWithFPN, any stages)."""

    def __init__(self, parts: list[nn.Module], channels: list[int]) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.parts = nn.ModuleList(parts)
        self.fpn = FeaturePyramidNetwork(channels[1:], 256, extra_blocks=LastLevelMaxPool())
        self.out_channels = 256

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats: OrderedDict[str, Tensor] = OrderedDict()
        for i, part in enumerate(self.parts):
            x = part(x)
            if i > 0:
                feats[str(i - 1)] = x
        out: OrderedDict[str, Tensor] = self.fpn(feats)
        return out


def build_faster_rcnn(backbone: nn.Module, in_channels: int, num_classes: int, cfg: Config,
                      mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """torchvision Faster R-CNN on `backbone`'s stages (shared modules: pass a trainable copy)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    parts = stages(backbone)
    ch = stage_widths(parts, in_channels)
    ratios = (0.5, 1.0, 2.0)
    body: nn.Module
    if cfg.head == "c4":  # Detectron2's Res5ROIHeads: RoIAlign 14x14 on the stride-16 map, res5, average pool
        body = nn.Sequential(*parts[:-1])
        body.out_channels = ch[-2]  # type: ignore[assignment]
        anchors = AnchorGenerator((tuple(cfg.anchor_sizes),), (ratios,))
        pool = MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0)
        box_head: nn.Module = nn.Sequential(parts[-1], nn.AdaptiveAvgPool2d(1), nn.Flatten())
        predictor = FastRCNNPredictor(ch[-1], num_classes + 1)
    else:
        body = _Pyramid(parts, ch)
        levels = len(parts)  # len(parts) - 1 stage outputs + the max-pooled extra level
        check(len(cfg.anchor_sizes) >= levels, f"detection.anchor_sizes: the FPN on this backbone has {levels} levels, "
              f"give at least {levels} sizes (finest first), got {cfg.anchor_sizes}")
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes[:levels]), (ratios,) * levels)
        pool = MultiScaleRoIAlign([str(i) for i in range(levels - 1)], output_size=7, sampling_ratio=2)
        box_head = TwoMLPHead(256 * 7 * 7, 1024)
        predictor = FastRCNNPredictor(1024, num_classes + 1)
    return FasterRCNN(body, num_classes=None, min_size=cfg.min_size_train, max_size=cfg.max_size, image_mean=list(mean),
                      image_std=list(std), rpn_anchor_generator=anchors, box_roi_pool=pool, box_head=box_head,
                      box_predictor=predictor, box_batch_size_per_image=cfg.rois_per_image,
                      rpn_post_nms_top_n_train=cfg.proposals_train, rpn_post_nms_top_n_test=cfg.proposals_test,
                      rpn_pre_nms_top_n_train=max(2000, cfg.proposals_train), rpn_pre_nms_top_n_test=max(1000, cfg.proposals_test))


# --------------------------------------------------------------------------- training and inference


def _as_input(image: Tensor, channels: int) -> Tensor:
    """uint8 (C, H, W) -> float [0, 1] with the encoder's channel count (`data.convert_channels`)."""
    return convert_channels(image, channels).float().div_(255)


def hflip(x: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror an image (C, H, W) and its continuous xyxy boxes: x1' = W - x2, x2' = W - x1."""
    w = x.shape[-1]
    out = boxes.clone()
    out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return x.flip(-1), out


def train_detector(model: nn.Module, train: DetectionSet, cfg: Config, channels: int, seed: int,
                   device: torch.device, progress: bool = False, include_difficult: bool = False) -> dict[str, float]:
    """The fixed schedule of `cfg` on `train`. Returns timing and the last loss.

    `include_difficult`: train on difficult boxes too (Detectron2's VOC loader does, "they don't hurt accuracy";
    COCO crowd boxes, also marked difficult, are always left out, as Detectron2's mapper does).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # GeneralizedRCNNTransform draws the training min size from the global generator
    use = [torch.ones_like(d) if include_difficult else ~d for d in train.difficult]
    keep = [i for i in range(len(train)) if int(use[i].sum()) > 0]  # Detectron2 drops images without boxes
    if not keep:
        raise ValueError(f"{train.name} has no image with a (non-difficult) box to train on")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.to(device).train()
    order: list[int] = []
    times: list[float] = []
    loss_value = float("nan")
    bar = tqdm(range(cfg.iterations), desc="detection", disable=not progress, leave=False)
    for it in bar:
        t0 = time.perf_counter()
        images, targets = [], []
        for _ in range(cfg.batch_size):
            if not order:
                order = [keep[int(i)] for i in torch.randperm(len(keep), generator=g)]
            i = order.pop()
            x = _as_input(train.images[i], channels)
            ok = use[i]
            boxes, labels = train.boxes[i][ok].clone(), train.labels[i][ok] + 1  # torchvision: 0 = background
            if cfg.flip and bool(torch.rand(1, generator=g) < 0.5):
                x, boxes = hflip(x, boxes)
            images.append(x.to(device))
            targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(it)
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detection loss is not finite at iteration {it} ({ {k: float(v) for k, v in losses.items()} }); "
                                     f"lower detection.lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if it % 20 == 0 or it == cfg.iterations - 1:
            loss_value = float(loss.detach())
            bar.set_postfix(loss=f"{loss_value:.3f}")
    steady = times[5:] or times
    return {"s_per_iter": sum(steady) / len(steady), "train_s": sum(times), "last_loss": loss_value}


@torch.inference_mode()
def predict(model: nn.Module, test: DetectionSet, cfg: Config, channels: int, device: torch.device) -> Detections:
    """Detections in each image's own coordinates (torchvision rescales them back), labels as class indices."""
    model.to(device).eval()
    model.transform.min_size = (cfg.min_size_test,)  # type: ignore[union-attr]
    boxes, scores, labels = [], [], []
    for s in range(0, len(test), cfg.eval_batch_size):
        batch = [_as_input(test.images[i], channels).to(device) for i in range(s, min(len(test), s + cfg.eval_batch_size))]
        for out in model(batch):
            boxes.append(out["boxes"].float().cpu())
            scores.append(out["scores"].float().cpu())
            labels.append(out["labels"].cpu() - 1)
    return Detections(boxes, scores, labels)


def score(test: DetectionSet, dets: Detections) -> dict[str, float]:
    """COCO AP/AP50/AP75/APs/APm/APl and VOC07 11-point AP at 0.5, 0.75 and averaged over 0.5:0.95."""
    from benchmark.evaluate.detection.deteval import coco_metrics, voc_aps

    out = dict(coco_metrics(test, dets))
    per_iou = {t: ap for t, (ap, _) in voc_aps(test, dets, [0.5 + 0.05 * i for i in range(10)], use_07_metric=True).items()}
    out["voc07_AP50"] = per_iou[0.5]
    out["voc07_AP75"] = per_iou[0.5 + 0.05 * 5]
    out["voc07_AP"] = sum(per_iou.values()) / len(per_iou)
    return out


# --------------------------------------------------------------------------- the protocol


def _backend(cfg: Config, backbone: nn.Module) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return "torchvision"
    state = torchvision_resnet_state(backbone)
    if state is None or state["conv1.weight"].shape[-1] != 7:
        log.info("detection: Detectron2 is installed but this backbone is not a 7x7-stem ResNet; using torchvision")
        return "torchvision"
    return "detectron2"


@register_protocol("detection", config=Config, version="1")
def detection(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    backbone = encoder.trainable_copy()
    stages(backbone)  # NotApplicable (cell skipped, with the reason) for backbones without spatial stages
    channels = data.channels
    train, test = load_detection(cfg.dataset, cfg.data_root, EmbeddedSpec(cfg.embedded_train, cfg.embedded_test))
    backend = _backend(cfg, backbone)
    voc_difficult = cfg.dataset.startswith("voc")  # VOC difficult boxes are trained on, COCO crowd boxes are not
    if backend == "detectron2":
        from benchmark.evaluate.detection import d2backend

        state = torchvision_resnet_state(backbone)
        if state is None:
            raise ValueError("detection.backend=detectron2 needs a torchvision ResNet backbone (resnet18/50); "
                             "use detection.backend=torchvision for this one")
        schedule = d2backend.Schedule(
            iterations=cfg.iterations, batch_size=cfg.batch_size, lr=cfg.lr,
            steps=tuple(sorted({r for s in cfg.steps if 0 < (r := round(s * cfg.iterations)) < cfg.iterations})),
            warmup_iters=cfg.warmup_iters,
            weight_decay=cfg.weight_decay, min_size_train=cfg.min_size_train, min_size_test=cfg.min_size_test,
            max_size=cfg.max_size, anchor_sizes=cfg.anchor_sizes, rois_per_image=cfg.rois_per_image,
            proposals_train=cfg.proposals_train, proposals_test=cfg.proposals_test)
        workdir = (ctx.out / "detectron2" / f"{encoder_key(encoder)}-seed{seed}") if ctx.out is not None else None
        dets, stats = d2backend.train_and_predict(state, variant=cfg.variant, train=train, test=test, mean=encoder.mean,
                                                  std=encoder.std, schedule=schedule, seed=seed, workdir=workdir,
                                                  device=ctx.device.type, include_difficult=voc_difficult)
        recipe = f"detectron2 {cfg.variant}"
    else:
        model = build_faster_rcnn(backbone, channels, len(train.classes), cfg, encoder.mean, encoder.std)
        stats = dict[str, float | str](train_detector(model, train, cfg, channels, seed, ctx.device, ctx.progress, voc_difficult))
        t0 = time.perf_counter()
        dets = predict(model, test, cfg, channels, ctx.device)
        stats["test_s"] = time.perf_counter() - t0
        recipe = f"torchvision faster_rcnn {cfg.head}"
    metrics = score(test, dets)
    sel = (f"fixed recipe: {recipe}, {cfg.iterations} it x {cfg.batch_size} images, lr {cfg.lr:g}; "
           f"{float(stats['s_per_iter']):.3f} s/it, {len(test)} test images")
    log.info("detection: %s (%s)", ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()), sel)
    extra = {"backend": backend}  # goes into the leaderboard's flags: the backend decides the numbers
    # nan = no ground truth in that range (e.g. APl on 128 px canvases): no row rather than a nan row
    return [Row(k, v, selection=sel, n_train=len(train), extra=extra) for k, v in metrics.items() if not math.isnan(v)]


def encoder_key(encoder: Encoder) -> str:
    return str(getattr(encoder, "key", "encoder"))
