"""Detectron2 backend of the detection protocol: convert a torchvision ResNet, train a named recipe, predict.

The recipes are the ones the SSL literature reports (docs/protocols.md#detection), written as overrides on Detectron2's
`get_cfg()` defaults: MoCo's (He et al. 2020, https://arxiv.org/abs/1911.05722; github.com/facebookresearch/moco
`detection/configs/Base-RCNN-C4-BN.yaml` + `pascal_voc_R_50_C4_24k_moco.yaml` / `coco_R_50_C4_2x_moco.yaml`,
`detection/train_net.py`, `detection/convert-pretrain-to-detectron2.py`) and Detectron2's own
`Base-RCNN-C4.yaml` / `Base-RCNN-FPN.yaml`. Training is Detectron2's machinery (`SimpleTrainer`, its optimizer,
LR schedule, data loader, augmentations and precise-BN hook); only the images come from memory (a
`DetectionSet`) instead of files.

One process: the recipes' synchronised BN ("SyncBN", MoCo's "naiveSyncBN") is plain "BN" here; on one process
both compute exactly BN (Detectron2's NaiveSyncBatchNorm falls back to BatchNorm2d when the world size is 1), so
only the per-process batch differs from an 8-GPU run (16 images on one process instead of 2 per GPU).

Detectron2 has no PyPI release (https://github.com/facebookresearch/detectron2, INSTALL.md), so it is imported
inside the functions that need it: `import benchmark.evaluate.detection.d2backend` works without it.
"""

from __future__ import annotations

import contextlib
import difflib
import pickle
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmark.data.colour import convert_channels
from benchmark.data.detection import Detections, DetectionSet
from benchmark.errors import ConfigError
from benchmark.store.io import atomic_write_bytes

__all__ = ["VARIANTS", "Schedule", "detectron2_cfg", "head_of", "load_backbone", "to_detectron2", "train_and_predict",
           "write_detectron2_checkpoint"]

TORCHVISION_MEAN = (0.485, 0.456, 0.406)  # the RGB normalisation torchvision ResNets are trained with
TORCHVISION_STD = (0.229, 0.224, 0.225)
HEADS = ("c4", "fpn")


# --------------------------------------------------------------------------- checkpoint conversion

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_STEM = re.compile(rf"conv1\.weight|bn1\.{_BN}")
_BLOCK = re.compile(rf"layer([1-4])\.(\d+)\.(conv[1-3]\.weight|bn[1-3]\.{_BN}|downsample\.0\.weight|downsample\.1\.{_BN})")


def _d2_name(key: str, head: str) -> str | None:
    """The Detectron2 full-model name of one torchvision key; None for keys with no counterpart (fc, num_batches_tracked).

    The block-level renaming is MoCo's (`benchmark.importers.detectron2_name`: layerN -> res{N+1}, bnK -> convK.norm,
    downsample -> shortcut); here it gets the module path of the head: C4 keeps stem and res2-res4 in `backbone.`
    and res5 in the RoI head (Res5ROIHeads), FPN puts the whole ResNet under `backbone.bottom_up.`.
    """
    from benchmark.store.importers import detectron2_name

    if head not in HEADS:
        raise ConfigError(f"unknown detection head {head!r}: use one of {', '.join(HEADS)}")
    if key.startswith("fc.") or (key.endswith(".num_batches_tracked") and (_STEM.fullmatch(key) or _BLOCK.fullmatch(key))):
        return None
    if not (_STEM.fullmatch(key) or _BLOCK.fullmatch(key)):
        raise ConfigError(f"cannot convert key {key!r} to Detectron2: not a torchvision ResNet key "
                          "(pass the encoder's torchvision-layout state dict, e.g. benchmark.backbones.torchvision_resnet_state)")
    short = detectron2_name(key)
    if head == "fpn":
        return f"backbone.bottom_up.{short}"
    return f"roi_heads.{short}" if short.startswith("res5.") else f"backbone.{short}"


def to_detectron2(sd: dict[str, Tensor], head: str) -> dict[str, Tensor]:
    """A torchvision ResNet state dict under Detectron2's full-model key names (the tensors themselves, not copies).

    bn1/bn2/bn3 -> convN.norm, downsample.0/1 -> shortcut / shortcut.norm; fc.* and num_batches_tracked are
    dropped; any other unknown key is an error. "c4": stem and res2-res4 under `backbone.`, res5 under
    `roi_heads.res5.` (needs bottleneck blocks: ResNet-50 and deeper). "fpn": all under `backbone.bottom_up.`.

    Args:
        sd: keys as `torchvision.models.resnetXX().state_dict()` (fc optional).
        head: "c4" or "fpn".

    Returns:
        {Detectron2 key: tensor}; loadable with `load_backbone` or, written by `write_detectron2_checkpoint`, by
        Detectron2's `DetectionCheckpointer`.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        name = _d2_name(key, head)
        if name is None:
            continue
        if name in out:  # cannot happen with the patterns above; guards against future edits
            raise ConfigError(f"two keys convert to {name!r}; the conversion table is broken")
        out[name] = value
    _check_resnet(sd, head)
    return out


def _check_resnet(sd: dict[str, Tensor], head: str) -> None:
    if "conv1.weight" not in sd:
        raise ConfigError("not a torchvision ResNet state dict (no conv1.weight): pass the encoder's torchvision-layout weights")
    k = tuple(sd["conv1.weight"].shape[-2:])
    if k != (7, 7):
        raise ConfigError(f"this ResNet has a small stem ({k[0]}x{k[1]} conv1, no max-pool) and cannot become Detectron2's "
                          "7x7 stem: use detection.backend=torchvision")
    if head == "c4" and "layer1.0.conv3.weight" not in sd:
        raise ConfigError("head 'c4' needs bottleneck blocks (ResNet-50 or deeper): Detectron2's Res5ROIHeads builds only "
                          "bottlenecks; use an FPN variant for ResNet-18/34")


def _resnet_layout(sd: dict[str, Tensor]) -> dict[str, Any]:
    """MODEL.RESNETS overrides that make Detectron2 build the same ResNet as `sd` (depth, widths, groups)."""
    blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in sd
    depths: dict[tuple[tuple[int, ...], bool], int] = {
        ((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
        ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152,
    }
    depth = depths.get((blocks, bottleneck))
    if depth is None:
        raise ConfigError(f"Detectron2 builds ResNet-18/34/50/101/152; this one has {blocks} "
                          f"{'bottleneck' if bottleneck else 'basic'} blocks per stage: use detection.backend=torchvision")
    out: dict[str, Any] = {"MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.STEM_OUT_CHANNELS": int(sd["conv1.weight"].shape[0])}
    if bottleneck:
        width, per_group = sd["layer1.0.conv2.weight"].shape[:2]  # (bottleneck channels, channels per group, 3, 3)
        out["MODEL.RESNETS.NUM_GROUPS"] = int(width // per_group)
        out["MODEL.RESNETS.WIDTH_PER_GROUP"] = int(per_group)
        out["MODEL.RESNETS.RES2_OUT_CHANNELS"] = int(sd["layer1.0.conv3.weight"].shape[0])
    else:
        out["MODEL.RESNETS.RES2_OUT_CHANNELS"] = int(sd["layer1.0.conv2.weight"].shape[0])  # Detectron2 requires 64
    return out


def write_detectron2_checkpoint(sd_d2: dict[str, Tensor], path: str | Path) -> None:
    """Write converted weights in Detectron2's pickle format (as MoCo's converter), atomically.

    `DetectionCheckpointer(model).load(path)` reads it; `matching_heuristics: False` makes it load by exact name.
    """
    if not str(path).endswith(".pkl"):
        raise ConfigError(f"Detectron2 reads this checkpoint format only from a .pkl file; got {path}")
    model = {k: v.detach().cpu().numpy() for k, v in sd_d2.items()}
    data = {"model": model, "__author__": "sslbench", "matching_heuristics": False}
    atomic_write_bytes(path, pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))


def _is_backbone_key(key: str, head: str) -> bool:
    """Model keys that a converted ResNet must fill (everything else is a head, trained from scratch)."""
    if key.endswith(".num_batches_tracked"):
        return False
    if head == "fpn":
        return key.startswith("backbone.bottom_up.")
    # MoCo's extra norm after res5 is new (Res5ROIHeadsExtraNorm), not part of the ResNet
    return key.startswith("backbone.") or (key.startswith("roi_heads.res5.") and not key.startswith("roi_heads.res5.norm."))


def load_backbone(model: nn.Module, sd_d2: dict[str, Tensor], head: str) -> int:
    """Copy converted weights into a built Detectron2 model; every backbone key must be filled, nothing else.

    Returns:
        The number of tensors loaded. Raises ConfigError naming the keys on any missing, extra or mis-shaped key.
    """
    state = model.state_dict()
    expected = {k for k in state if _is_backbone_key(k, head)}
    missing, extra = sorted(expected - sd_d2.keys()), sorted(sd_d2.keys() - expected)
    shapes = [f"{k} {tuple(sd_d2[k].shape)} vs {tuple(state[k].shape)}" for k in sorted(expected & sd_d2.keys())
              if sd_d2[k].shape != state[k].shape]
    if missing or extra or shapes:
        raise ConfigError(f"converted weights do not fit the Detectron2 model: missing {missing[:5]}, unexpected "
                          f"{extra[:5]}, shape {shapes[:5]} ({len(missing)}/{len(extra)}/{len(shapes)}); check the variant's head")
    result = model.load_state_dict(sd_d2, strict=False)
    if result.unexpected_keys or expected & set(result.missing_keys):  # checked above; Detectron2 disagreeing is a bug
        raise RuntimeError(f"Detectron2 loaded the converted weights differently than checked: {result}")
    return len(sd_d2)


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A training schedule and input sizes that replace a variant's (for small data or quick runs)."""

    iterations: int
    batch_size: int  # images per iteration (all on this process)
    lr: float
    steps: tuple[int, ...]  # iterations where lr is multiplied by 0.1
    warmup_iters: int  # linear warm-up from lr/1000 (Detectron2's WARMUP_FACTOR)
    min_size_train: tuple[int, ...]  # shorter side, one drawn per image
    min_size_test: int
    max_size: int  # longer-side cap, train and test
    weight_decay: float = 1e-4  # Detectron2's default (not applied to norm layers: WEIGHT_DECAY_NORM 0)
    anchor_sizes: tuple[int, ...] | None = None  # None = the variant's; C4: all on one map, FPN: one per level
    rois_per_image: int | None = None  # ROI_HEADS.BATCH_SIZE_PER_IMAGE (None = the variant's, 512)
    proposals_train: int | None = None  # RPN.POST_NMS_TOPK_TRAIN (None = the variant's)
    proposals_test: int | None = None  # RPN.POST_NMS_TOPK_TEST (None = the variant's)

    def __post_init__(self) -> None:
        ok = (self.iterations > 0 and self.batch_size > 0 and self.lr > 0 and self.warmup_iters >= 0
              and list(self.steps) == sorted(set(self.steps)) and all(0 < s < self.iterations for s in self.steps)
              and len(self.min_size_train) > 0 and min(self.min_size_train) > 0 and self.min_size_test > 0
              and self.max_size >= max(*self.min_size_train, self.min_size_test) and self.weight_decay >= 0
              and (self.anchor_sizes is None or (len(self.anchor_sizes) > 0 and min(self.anchor_sizes) > 0)))
        if not ok:
            raise ConfigError(f"bad detection schedule {self}: need positive iterations/batch/lr, increasing steps inside "
                              "(0, iterations), positive sizes and max_size >= every min size")


_MOCO_RGB = {  # moco pascal_voc_R_50_C4_24k_moco.yaml: torchvision-trained weights take RGB in torchvision's scale
    "MODEL.PIXEL_MEAN": [255 * m for m in TORCHVISION_MEAN],  # [123.675, 116.28, 103.53]
    "MODEL.PIXEL_STD": [255 * s for s in TORCHVISION_STD],  # [58.395, 57.12, 57.375]
    "INPUT.FORMAT": "RGB",
    "MODEL.RESNETS.STRIDE_IN_1X1": False,  # torchvision puts the stride in the 3x3 conv
}


def _moco_c4() -> dict[str, Any]:
    """Base-RCNN-C4.yaml + MoCo's Base-RCNN-C4-BN.yaml + the `_moco` input settings."""
    return {
        "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
        "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
        "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
        "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",  # BN after res5 (MoCo train_net.py)
        "MODEL.BACKBONE.FREEZE_AT": 0,
        "MODEL.RESNETS.NORM": "BN",  # MoCo: SyncBN in backbone and res5 head; BN on one process
        "MODEL.RESNETS.DEPTH": 50,
        "TEST.PRECISE_BN.ENABLED": True,
        "SOLVER.IMS_PER_BATCH": 16,
        "SOLVER.BASE_LR": 0.02,
        **_MOCO_RGB,
    }


def _voc0712_r50c4_moco() -> dict[str, Any]:
    """MoCo's VOC07+12 recipe (pascal_voc_R_50_C4_24k_moco.yaml): Faster R-CNN R50-C4, 24k iterations."""
    return {
        **_moco_c4(),
        "MODEL.MASK_ON": False,
        "INPUT.MIN_SIZE_TRAIN": tuple(range(480, 801, 32)),
        "INPUT.MIN_SIZE_TEST": 800,
        "SOLVER.STEPS": (18000, 22000),
        "SOLVER.MAX_ITER": 24000,
        "SOLVER.WARMUP_ITERS": 100,
    }


def _voc07_r50c4() -> dict[str, Any]:
    """The same model on VOC07 trainval only (VISSL voc07/rn50_transfer_voc07_detectron2_e2e.yaml): 12.5k, step 9.5k."""
    return {**_voc0712_r50c4_moco(), "SOLVER.STEPS": (9500,), "SOLVER.MAX_ITER": 12500}


def _coco_r50c4_2x() -> dict[str, Any]:
    """MoCo's COCO recipe (coco_R_50_C4_2x_moco.yaml): Mask R-CNN R50-C4, 2x = 180k iterations, warm-up 1000 (default).

    The mask head is off: our detection data have boxes only (the note goes into every row, see `_NOTES`).
    """
    return {
        **_moco_c4(),
        "MODEL.MASK_ON": False,  # recipe: True
        "INPUT.MIN_SIZE_TRAIN": tuple(range(640, 801, 32)),
        "INPUT.MIN_SIZE_TEST": 800,
        "SOLVER.STEPS": (120000, 160000),
        "SOLVER.MAX_ITER": 180000,
    }


def _coco_r50fpn_1x() -> dict[str, Any]:
    """Mask R-CNN R50-FPN 1x (Base-RCNN-FPN.yaml + mask_rcnn_R_50_FPN_1x.yaml) with the SSL-transfer changes of
    VISSL's COCOInstance/R50_FPN_MaskRCNN_COCOInstance/sBN_precBN.yaml: BN trained in the backbone (SyncBN there,
    BN on one process), nothing frozen, precise BN, RGB torchvision input; lr 0.02 and warm-up 1000 as Detectron2's
    1x. FPN and box head without norm, as both of those. Mask head off: boxes-only data."""
    return {
        "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
        "MODEL.MASK_ON": False,  # recipe: True
        "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
        "MODEL.BACKBONE.FREEZE_AT": 0,
        "MODEL.RESNETS.DEPTH": 50,
        "MODEL.RESNETS.NORM": "BN",
        "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
        "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"],
        "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
        "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000,  # per FPN level
        "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000,
        "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
        "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
        "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
        "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
        "TEST.PRECISE_BN.ENABLED": True,
        "INPUT.MIN_SIZE_TRAIN": tuple(range(640, 801, 32)),
        "INPUT.MIN_SIZE_TEST": 800,
        "SOLVER.IMS_PER_BATCH": 16,
        "SOLVER.BASE_LR": 0.02,
        "SOLVER.STEPS": (60000, 80000),
        "SOLVER.MAX_ITER": 90000,
        **_MOCO_RGB,
    }


VARIANTS: dict[str, Callable[[], dict[str, Any]]] = {
    "voc0712_r50c4@moco": _voc0712_r50c4_moco,
    "voc07_r50c4": _voc07_r50c4,
    "coco_r50c4_2x": _coco_r50c4_2x,
    "coco_r50fpn_1x": _coco_r50fpn_1x,
}
_NOTES = {  # goes into the stats (and so the rows) of every run of the variant
    "coco_r50c4_2x": "Mask R-CNN recipe run without its mask head (boxes-only data)",
    "coco_r50fpn_1x": "Mask R-CNN recipe run without its mask head (boxes-only data)",
}


def _variant(name: str) -> dict[str, Any]:
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, list(VARIANTS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown Detectron2 variant {name!r}{hint} known: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name]()


def head_of(variant: str) -> str:
    """"fpn" or "c4": where the ResNet's last stage lives in the variant's model."""
    return "fpn" if _variant(variant).get("MODEL.BACKBONE.NAME") == "build_resnet_fpn_backbone" else "c4"


def _register_extra_norm() -> None:
    """Register MoCo's Res5ROIHeadsExtraNorm (detection/train_net.py) in Detectron2's ROI_HEADS_REGISTRY, once."""
    from detectron2.layers import get_norm
    from detectron2.modeling import ROI_HEADS_REGISTRY
    from detectron2.modeling.roi_heads import Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        if not getattr(ROI_HEADS_REGISTRY.get("Res5ROIHeadsExtraNorm"), "sslbench", False):
            raise ConfigError("another Res5ROIHeadsExtraNorm is registered in Detectron2; import only one detection backend")
        return

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):  # type: ignore[misc]
        """Res5ROIHeads with one more norm layer after res5, as MoCo's paper describes."""

        sslbench = True

        @classmethod
        def _build_res5_block(cls, cfg: Any) -> tuple[nn.Module, int]:
            seq, out_channels = super()._build_res5_block(cfg)
            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return seq, out_channels

    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


def _schedule_overrides(s: Schedule, head: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "SOLVER.MAX_ITER": s.iterations, "SOLVER.IMS_PER_BATCH": s.batch_size, "SOLVER.BASE_LR": float(s.lr),
        "SOLVER.STEPS": tuple(s.steps), "SOLVER.WARMUP_ITERS": s.warmup_iters, "SOLVER.WEIGHT_DECAY": float(s.weight_decay),
        "INPUT.MIN_SIZE_TRAIN": tuple(s.min_size_train), "INPUT.MIN_SIZE_TEST": s.min_size_test,
        "INPUT.MAX_SIZE_TRAIN": s.max_size, "INPUT.MAX_SIZE_TEST": s.max_size,
    }
    for key, v in (("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", s.rois_per_image), ("MODEL.RPN.POST_NMS_TOPK_TRAIN", s.proposals_train),
                   ("MODEL.RPN.POST_NMS_TOPK_TEST", s.proposals_test)):
        if v is not None:
            out[key] = int(v)
    if s.anchor_sizes is not None:
        if head == "fpn" and len(s.anchor_sizes) != 5:
            raise ConfigError(f"an FPN variant needs 5 anchor sizes (one per level p2-p6), got {s.anchor_sizes}")
        sizes = [[int(a)] for a in s.anchor_sizes] if head == "fpn" else [[int(a) for a in s.anchor_sizes]]
        out["MODEL.ANCHOR_GENERATOR.SIZES"] = sizes
    return out


def detectron2_cfg(variant: str, sd: dict[str, Tensor], *, num_classes: int, mean: Sequence[float], std: Sequence[float],
                   schedule: Schedule | None = None, seed: int = 0, workdir: str | Path = "", device: str = "cpu",
                   train_sets: tuple[str, ...] = (), n_train: int | None = None) -> Any:
    """The frozen Detectron2 config of `variant` for the ResNet `sd` (torchvision layout), on top of `get_cfg()`.

    Args:
        mean, std: per-channel input normalisation in [0, 1] units; their length is the input channel count.
        schedule: replaces the variant's iterations, lr, steps, sizes (None: the full recipe).
        train_sets: registered DatasetCatalog names to train on.
        n_train: training images; precise BN runs min(one pass over them, 200, MAX_ITER) batches.
    """
    from detectron2.config import get_cfg

    _register_extra_norm()
    head = head_of(variant)
    _check_resnet(sd, head)
    channels = int(sd["conv1.weight"].shape[1])
    if channels not in (1, 3) or len(mean) != channels or len(std) != channels:
        raise ConfigError(f"Detectron2 takes 1- or 3-channel input with one mean/std per channel; the ResNet takes "
                          f"{channels} channels, mean {tuple(mean)}, std {tuple(std)}")
    over = {
        **_variant(variant),
        **_resnet_layout(sd),
        "MODEL.PIXEL_MEAN": [255.0 * float(m) for m in mean],  # Detectron2 normalises 0-255 pixels
        "MODEL.PIXEL_STD": [255.0 * float(s) for s in std],
        "INPUT.FORMAT": "RGB" if channels == 3 else "L",  # the stem's channel count is len(PIXEL_MEAN)
        "MODEL.WEIGHTS": "",  # loaded by `load_backbone`, checked key by key
        "MODEL.DEVICE": device,
        "TEST.DETECTIONS_PER_IMAGE": 100,
        "TEST.EVAL_PERIOD": 0,  # no evaluation during training; precise BN still runs after the last iteration
        "DATALOADER.NUM_WORKERS": 0,
        "DATASETS.TRAIN": tuple(train_sets),
        "DATASETS.TEST": (),
        "OUTPUT_DIR": str(workdir),
        "SEED": int(seed),
        **(_schedule_overrides(schedule, head) if schedule is not None else {}),
    }
    if n_train is not None:
        batches = -(-n_train // over.get("SOLVER.IMS_PER_BATCH", 16))
        # at most one pass over the data, Detectron2's 200 batches, and no more batches than training iterations
        # (a short schedule should not spend longer on BN statistics than on training)
        over["TEST.PRECISE_BN.NUM_ITER"] = max(1, min(200, batches, over.get("SOLVER.MAX_ITER", 200)))
    cfg = get_cfg()
    cfg.merge_from_list([x for kv in over.items() for x in kv])
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = int(num_classes)
    cfg.freeze()
    return cfg


# --------------------------------------------------------------------------- data


def _as_channels(image: Tensor, channels: int) -> Tensor:
    """uint8 (C, H, W) with `channels` channels (`data.convert_channels`, as the torchvision backend)."""
    try:
        return convert_channels(image, channels)
    except ValueError as e:
        raise ConfigError(f"{e}: the ResNet takes {channels}-channel images") from None


def _dataset_dicts(ds: DetectionSet, include_difficult: bool) -> list[dict[str, Any]]:
    """Detectron2 dataset dicts; the image itself is read by `_Mapper` from `ds.images[image_index]`."""
    from detectron2.structures import BoxMode

    dicts = []
    for i in range(len(ds)):
        keep = torch.ones_like(ds.difficult[i]) if include_difficult else ~ds.difficult[i]
        annos = [{"bbox": [float(v) for v in b], "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(y)}
                 for b, y in zip(ds.boxes[i][keep], ds.labels[i][keep])]
        dicts.append({"image_id": ds.ids[i], "image_index": i, "annotations": annos})
    return dicts


class _Mapper:
    """Detectron2's DatasetMapper for in-memory images: the default augmentations of the cfg (train: resize the
    shorter side to one of MIN_SIZE_TRAIN capped at MAX_SIZE_TRAIN, horizontal flip; test: MIN_SIZE_TEST)."""

    def __init__(self, cfg: Any, is_train: bool, images: Sequence[Tensor], channels: int) -> None:
        from detectron2.data import detection_utils, transforms

        self.utils, self.T = detection_utils, transforms
        self.augs = transforms.AugmentationList(detection_utils.build_augmentation(cfg, is_train))
        self.images, self.channels = images, channels

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        image = _as_channels(self.images[d["image_index"]], self.channels)
        h, w = image.shape[1:]
        aug = self.T.AugInput(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))  # (H, W, C) uint8
        tf = self.augs(aug)
        shape = aug.image.shape[:2]
        out = {"image_id": d["image_id"], "height": h, "width": w,
               "image": torch.from_numpy(np.array(aug.image.transpose(2, 0, 1)))}  # a writable copy
        if "annotations" in d:
            annos = [self.utils.transform_instance_annotations(dict(a), tf, shape) for a in d["annotations"]]
            out["instances"] = self.utils.filter_empty_instances(self.utils.annotations_to_instances(annos, shape))
        return out


@contextlib.contextmanager
def _registered(ds: DetectionSet, include_difficult: bool) -> Iterator[str]:
    """`ds` in Detectron2's DatasetCatalog under a fresh name, removed again afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = f"sslbench-{ds.name}-{uuid.uuid4().hex[:8]}"
    dicts = _dataset_dicts(ds, include_difficult)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(ds.classes))
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# --------------------------------------------------------------------------- train and predict


def _train(cfg: Any, model: nn.Module, images: Sequence[Tensor], channels: int, out: Path) -> list[float]:
    """Detectron2's training loop (DefaultTrainer's hooks, minus checkpoints and evaluation). Returns s/iteration."""
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import SimpleTrainer, hooks
    from detectron2.solver import build_lr_scheduler, build_optimizer
    from detectron2.utils.events import JSONWriter

    def loader() -> Any:
        return build_detection_train_loader(cfg, mapper=_Mapper(cfg, True, images, channels))

    optimizer = build_optimizer(cfg, model)
    trainer = SimpleTrainer(model, loader(), optimizer)
    skip = 6 if cfg.SOLVER.MAX_ITER > 5 else 0  # IterationTimer records iterations from this one (1-based) on
    steps = [hooks.IterationTimer(warmup_iter=skip), hooks.LRScheduler(optimizer, build_lr_scheduler(cfg, optimizer))]
    if cfg.TEST.PRECISE_BN.ENABLED:  # after the last iteration (EVAL_PERIOD 0), on fresh batches of the train loader
        steps.append(hooks.PreciseBN(cfg.TEST.EVAL_PERIOD, model, loader(), cfg.TEST.PRECISE_BN.NUM_ITER))
    steps.append(hooks.PeriodicWriter([JSONWriter(str(out / "metrics.json"))], period=20))
    trainer.register_hooks(steps)
    trainer.train(0, cfg.SOLVER.MAX_ITER)
    return [float(v) for v, _ in trainer.storage.history("time").values()]


@torch.no_grad()
def _predict(cfg: Any, model: nn.Module, test: DetectionSet, channels: int) -> Detections:
    """Detections in each image's own coordinates (Detectron2's postprocess rescales them), one image at a time."""
    from detectron2.evaluation import inference_context

    mapper = _Mapper(cfg, False, test.images, channels)
    boxes, scores, labels = [], [], []
    with inference_context(model):
        for i in range(len(test)):
            inst = model([mapper({"image_id": test.ids[i], "image_index": i})])[0]["instances"].to("cpu")
            boxes.append(inst.pred_boxes.tensor.float())
            scores.append(inst.scores.float())
            labels.append(inst.pred_classes.long())
    return Detections(boxes, scores, labels)


def train_and_predict(sd: dict[str, Tensor], *, variant: str, train: DetectionSet, test: DetectionSet,
                      mean: tuple[float, ...], std: tuple[float, ...], schedule: Schedule | None, seed: int,
                      workdir: Path | None, device: str = "cpu", include_difficult: bool = True,
                      ) -> tuple[Detections, dict[str, float | str]]:
    """Fine-tune Detectron2's `variant` on `train` from the ResNet `sd`, then detect on `test`.

    Args:
        sd: the encoder's weights, torchvision ResNet layout (1 or 3 input channels); images with another channel
            count are converted (grey repeated, RGB -> luma).
        mean, std: the encoder's input normalisation, [0, 1] units, one per input channel.
        schedule: None = the variant's full recipe.
        workdir: Detectron2's OUTPUT_DIR (metrics.json, appended to as Detectron2 does); None = a temporary folder.
        include_difficult: train on VOC "difficult" boxes too. True is Detectron2's (and so MoCo's) behaviour:
            `detectron2/data/datasets/pascal_voc.py` keeps them ("they don't hurt accuracy").

    Returns:
        (detections aligned with `test`, stats): s_per_iter (mean wall seconds per iteration after the first 5;
        over all iterations for runs of 5 or fewer), iterations, detectron2 (version), note (recipe deviations).
    """
    try:
        import detectron2
        from detectron2.modeling import build_model
        from detectron2.utils.env import seed_all_rng
    except ImportError:
        raise ConfigError("detection.backend=detectron2 needs Detectron2: build it from source "
                          "(https://github.com/facebookresearch/detectron2, INSTALL.md) or use detection.backend=torchvision") from None
    head = head_of(variant)
    d2 = to_detectron2(sd, head)
    channels = int(sd["conv1.weight"].shape[1])
    with _registered(train, include_difficult) as name, tempfile.TemporaryDirectory() as tmp:
        out = Path(workdir) if workdir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        cfg = detectron2_cfg(variant, sd, num_classes=len(train.classes), mean=mean, std=std, schedule=schedule,
                             seed=seed, workdir=out, device=device, train_sets=(name,), n_train=len(train))
        seed_all_rng(seed)  # heads' init, augmentation draws; the sampler takes cfg.SEED
        model = build_model(cfg)
        load_backbone(model, d2, head)
        times = _train(cfg, model, train.images, channels, out)
        dets = _predict(cfg, model, test, channels)
    stats: dict[str, float | str] = {
        "s_per_iter": sum(times) / len(times) if times else float("nan"),
        "iterations": float(cfg.SOLVER.MAX_ITER),
        "detectron2": str(detectron2.__version__),
        "note": _NOTES.get(variant, ""),
    }
    return dets, stats
