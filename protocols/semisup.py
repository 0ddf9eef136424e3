"""Semi-supervised fine-tuning: the whole encoder plus a linear head trained on 1% and 10% of the labels.

docs/protocols.md#semi-supervised. Per fraction, a class-balanced subset of `data.train` (at least one image per class) is
drawn once with `subset_seed` (not the run seed) and saved to out/splits, so every method sees the same
images; or it is read from `subset_files`: our JSON ({"ids": [...]} indexing data.train), or a text file of image file
names, one per line, as SimCLR distributes its ImageNet subsets (`imagenet_subsets/1percent.txt`, 12,811 names;
file-based datasets only). Listed images that fell into the validation split (carved from train) are trained on and
taken out of it, so the labelled set is exactly the list and selection never sees it. A trainable copy of the encoder + linear head is fine-tuned on the subset
(random resized crop + flip) per lr x head-lr multiplier; the best on val top1 is tested once.
Default = VISSL `semi_supervised/imagenet1k/eval_resnet_8gpu_transfer_in1k_semi_sup_fulltune.yaml`: SGD
Nesterov m=0.9, lr 0.05 x batch/256, wd 0, 70 epochs, x0.1 at epoch 30, batch 256 (8 x 32).
Variants: `semisup_simclr` = SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709) appendix B.5
(paper, not verified in code): Nesterov SGD 0.05 x batch/256, batch 4096, wd 0, 60 / 30 epochs; cosine
without warm-up and a zero head from google-research/simclr (`model_util.py`, `--zero_init_logits_layer`).
SimCLRv2's LARS recipe, fine-tuning from the projection head and distillation are not implemented.
`semisup_mmselfsup` = mmselfsup `imagenet_{1,10}percent/resnet50_head10_4xb64-steplr1e-2-20e_*.py`:
SGD m=0.9, lr 0.01, head lr x10, wd 5e-4 / 1e-4, 20 epochs, x0.2 at epochs 12 and 16, batch 256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.sets import Images, Splits
from benchmark.errors import ConfigError
from benchmark.evaluate.encoder import Encoder
from benchmark.evaluate.finetune import Classifier, Recipe, predict, train_classifier
from benchmark.evaluate.protocol import (
    NO_CONTEXT,
    EvalContext,
    class_balanced_fraction,
    classification_rows,
    save_subset_file,
    topk_accuracy,
)
from benchmark.registry import register_protocol
from benchmark.store.results import Row

__all__ = ["Config", "MMSelfSupConfig", "SimCLRConfig", "Tuning", "finetune_rows", "label_subset", "linear_head",
           "pct_tag", "read_subset_file", "semisup"]

HeadInit = Literal["default", "normal", "zero"]


@dataclass(frozen=True)
class Tuning:
    """The optimiser fields `semisup` and `finetune` share; defaults are VISSL's semi-supervised recipe."""

    batch_size: int = 256  # VISSL 8 x 32; capped at the training-set size (the lr follows the batch actually used)
    lrs: tuple[float, ...] = (0.05,)  # base lr per batch 256, one run each, picked on val (VISSL 0.05)
    head_lr_mults: tuple[float, ...] = (1.0,)  # head lr = lr x mult, crossed with lrs (mmselfsup: 1, 10, 100)
    momentum: float = 0.9  # every anchor
    nesterov: bool = True  # VISSL, SimCLR; mmselfsup uses plain momentum
    schedule: Literal["cosine", "step"] = "step"  # VISSL multistep; SimCLR cosine
    milestones: tuple[float, ...] = (30 / 70,)  # step schedule: fractions of training (VISSL: epoch 30 of 70)
    gamma: float = 0.1  # step schedule: lr factor at each milestone (VISSL 0.1, mmselfsup 0.2)
    crop_scale: float = 0.08  # RandomResizedCrop minimum area + flip (every anchor); 1.0 = no augmentation
    head_init: HeadInit = "default"  # VISSL: PyTorch's default; mmselfsup N(0, 0.01); SimCLR zeros

    def check_tuning(self, name: str) -> None:
        """Validate the shared fields; `name` (the protocol) prefixes the messages."""
        for field, v in (("lrs", self.lrs), ("head_lr_mults", self.head_lr_mults)):
            check(len(v) > 0 and all(math.isfinite(x) and x > 0 for x in v), f"{name}.{field} must be non-empty, finite and > 0, got {v}")
            check(len(set(v)) == len(v), f"{name}.{field} has duplicates: {v}")
        check(self.batch_size > 0, f"{name}.batch_size must be > 0, got {self.batch_size}")
        check(0 <= self.momentum < 1, f"{name}.momentum must be in [0, 1), got {self.momentum}")
        check(self.schedule in ("cosine", "step"), f"{name}.schedule must be cosine or step, got {self.schedule!r}")
        check(all(0 < m < 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
              f"{name}.milestones must be increasing fractions in (0, 1), got {self.milestones}")
        check(0 < self.gamma <= 1, f"{name}.gamma must be in (0, 1], got {self.gamma}")
        check(0 < self.crop_scale <= 1, f"{name}.crop_scale must be in (0, 1], got {self.crop_scale}")
        check(self.head_init in ("default", "normal", "zero"), f"{name}.head_init must be default, normal or zero, got {self.head_init!r}")

    def recipe(self, epochs: int, weight_decay: float) -> Recipe:
        """The schedule of one fine-tuning run; `finetune_rows` sets the lr, head multiplier and batch cap."""
        return Recipe(epochs=epochs, batch_size=self.batch_size, lr=self.lrs[0], momentum=self.momentum, nesterov=self.nesterov,
                           weight_decay=weight_decay, schedule=self.schedule, milestones=self.milestones,
                           crop_scale=self.crop_scale, gamma=self.gamma)


@dataclass(frozen=True)
class Config(Tuning):
    fractions: tuple[float, ...] = (0.01, 0.1)  # SimCLR's 1% and 10% ImageNet subsets (here: of data.train)
    subset_seed: int = 0  # fixes the draw across methods and run seeds (SimCLR publishes one list)
    subset_files: tuple[str, ...] = ()  # one file per fraction, used instead of drawing: {"ids": [...]} .json, or file names (.txt)
    epochs: tuple[int, ...] = (70,)  # one per fraction, or one for all (VISSL semi_sup_fulltune: 70)
    weight_decay: tuple[float, ...] = (0.0,)  # one per fraction or one for all (VISSL, SimCLR 0; mmselfsup 5e-4 / 1e-4)

    def __post_init__(self) -> None:
        n = len(self.fractions)
        check(n > 0 and all(0 < f <= 1 for f in self.fractions), f"semisup.fractions must be in (0, 1], got {self.fractions}")
        check(len({pct_tag(f) for f in self.fractions}) == n, f"semisup.fractions has duplicates: {self.fractions}")
        check(len(self.subset_files) in (0, n), f"semisup.subset_files needs one file per fraction ({n}), got {len(self.subset_files)}")
        check(len(self.epochs) in (1, n) and all(e > 0 for e in self.epochs),
              f"semisup.epochs must be one or one-per-fraction positive integers, got {self.epochs}")
        check(len(self.weight_decay) in (1, n) and all(w >= 0 for w in self.weight_decay),
              f"semisup.weight_decay must be one or one-per-fraction values >= 0, got {self.weight_decay}")
        self.check_tuning("semisup")

    def recipe_for(self, i: int) -> Recipe:
        """The recipe of fraction `i` (per-fraction epochs and weight decay; one value applies to all)."""
        return self.recipe(self.epochs[i if len(self.epochs) > 1 else 0], self.weight_decay[i if len(self.weight_decay) > 1 else 0])


@dataclass(frozen=True)
class SimCLRConfig(Config):
    """SimCLR v1 appendix B.5 with SGD (LARS is SimCLRv2's and not in benchmark/evaluate/finetune.py)."""

    epochs: tuple[int, ...] = (60, 30)  # 1%: 60, 10%: 30
    batch_size: int = 4096
    schedule: Literal["cosine", "step"] = "cosine"  # simclr model_util.learning_rate_schedule, no warm-up
    head_init: HeadInit = "zero"  # --zero_init_logits_layer=True


@dataclass(frozen=True)
class MMSelfSupConfig(Config):
    """mmselfsup's semi-supervised benchmark (head x10, lr 0.01); its grid is lrs {0.1, 0.01, 0.001} x head {1, 10, 100}."""

    epochs: tuple[int, ...] = (20,)
    lrs: tuple[float, ...] = (0.01,)
    head_lr_mults: tuple[float, ...] = (10.0,)
    nesterov: bool = False
    weight_decay: tuple[float, ...] = (5e-4, 1e-4)  # 1%: 5e-4, 10%: 1e-4
    milestones: tuple[float, ...] = (12 / 20, 16 / 20)
    gamma: float = 0.2
    head_init: HeadInit = "normal"  # mmcls LinearClsHead: Normal(std=0.01)


def pct_tag(fraction: float) -> str:
    """0.01 -> "1", 0.1 -> "10", 0.005 -> "0p5": the fraction in metric names (`top1_1pct`) and split tags."""
    return f"{fraction * 100:g}".replace(".", "p")


def read_subset_file(path: str | Path, data: Splits) -> Tensor:
    """Sorted indices into `data.train` read from a JSON file {"ids": [...]} (the format save_subset_file writes).

    Raises:
        ConfigError: unreadable file, no integer `ids`, indices out of range or repeated, or a file drawn
            for another dataset fingerprint.
    """
    p = Path(path).expanduser()
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"semisup.subset_files: cannot read {p} ({type(e).__name__}: {e})") from None
    ids = info.get("ids") if isinstance(info, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"semisup.subset_files: {p} must hold {{\"ids\": [int, ...]}}, indices into the train split")
    if info.get("fingerprint", data.fingerprint) != data.fingerprint:
        raise ConfigError(f"semisup.subset_files: {p} was drawn for dataset fingerprint {info['fingerprint']}, not {data.fingerprint}")
    t = torch.tensor(ids, dtype=torch.int64)
    if int(t.min()) < 0 or int(t.max()) >= len(data.train):
        raise ConfigError(f"semisup.subset_files: {p} has ids outside [0, {len(data.train)}) (the train split of {data.name})")
    if len(t.unique()) != len(t):
        raise ConfigError(f"semisup.subset_files: {p} repeats ids")
    return t.sort().values


def read_file_list(path: str | Path, data: Splits) -> tuple[Tensor, Tensor]:
    """Indices into `data.train` and into `data.val` of the images a text file names (one basename per line).

    Raises:
        ConfigError: unreadable file, a dataset without file names, a listed name the dataset lacks, a repeated name.
    """
    p = Path(path).expanduser()
    try:
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"semisup.subset_files: cannot read {p} ({type(e).__name__}: {e})") from None
    if not data.train_names:
        raise ConfigError(f"semisup.subset_files: {p} lists file names, but {data.name!r} does not keep them (tensor data or shards); "
                          "use a file-based dataset (imagenet, imagefolder) or a JSON {\"ids\": [...]} file")
    if len(set(names)) != len(names):
        raise ConfigError(f"semisup.subset_files: {p} repeats file names")
    in_train = {n: i for i, n in enumerate(data.train_names)}
    in_val = {n: i for i, n in enumerate(data.val_names)}
    missing = [n for n in names if n not in in_train and n not in in_val]
    if missing:
        raise ConfigError(f"semisup.subset_files: {len(missing)} of the {len(names)} files {p} lists are not in {data.name!r} "
                          f"({', '.join(missing[:3])}); is it the list for this dataset?")
    t = torch.tensor(sorted(in_train[n] for n in names if n in in_train), dtype=torch.int64)
    v = torch.tensor(sorted(in_val[n] for n in names if n in in_val), dtype=torch.int64)
    return t, v


def listed_subset(data: Splits, path: str) -> tuple[Images, Splits, str]:
    """The labelled images a file list names, `data` with those taken out of its validation split, and a note."""
    t, v = read_file_list(path, data)
    labelled = data.train.subset(t).concat(data.val.subset(v)) if len(v) else data.train.subset(t)  # type: ignore[arg-type]
    keep = torch.ones(len(data.val), dtype=torch.bool)
    keep[v] = False
    rest = dataclasses.replace(data, val=data.val.subset(keep.nonzero().squeeze(1)))
    h = hashlib.sha256(repr((t.tolist(), v.tolist())).encode()).hexdigest()[:8]
    moved = f", {len(v)} of them taken from the validation split" if len(v) else ""
    return labelled, rest, f"file {Path(path).name} ({len(t) + len(v)} images{moved}) #{h}"


def label_subset(data: Splits, fraction: float, subset_seed: int, file: str | None, ctx: EvalContext) -> tuple[Tensor, str]:
    """Indices into `data.train` of the labelled subset, and a short note of where they came from (with a hash).

    Drawn subsets are saved once under out/splits; a saved file holding another draw raises RuntimeError.
    """
    if file:
        ids, src = read_subset_file(file, data), f"file {Path(file).name}"
    else:
        ids = class_balanced_fraction(data.train.y, fraction, subset_seed)
        save_subset_file(ctx, data, f"semisup-{pct_tag(fraction)}pct-s{subset_seed}", ids)
        src = f"balanced seed {subset_seed}"
    return ids, f"{src} #{hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:8]}"


def linear_head(dim: int, num_classes: int, init: HeadInit, seed: int) -> nn.Linear:
    """Linear (dim -> num_classes), initialised as `init` says from `seed` alone (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fc = nn.Linear(dim, num_classes)
        if init == "normal":
            nn.init.normal_(fc.weight, 0.0, 0.01)
        elif init == "zero":
            nn.init.zeros_(fc.weight)
        if init != "default":
            nn.init.zeros_(fc.bias)
    return fc


def finetune_rows(encoder: Encoder, train: Images, data: Splits, cfg: Tuning, recipe: Recipe, seed: int, ctx: EvalContext,
                  suffix: str = "", note: str = "", name: str = "semisup") -> list[Row]:
    """Fine-tune a copy of `encoder` + linear head on `train` per (lr, head mult) of `cfg`, pick by val top1, test the pick once.

    Returns rows `top1{suffix}` (val and test), `top5{suffix}` (test, more than 5 classes) and `mean_class_acc{suffix}` (test). A candidate whose
    loss diverges scores -inf; if all diverge, FloatingPointError is raised.
    """
    recipe = dataclasses.replace(recipe, batch_size=min(recipe.batch_size, len(train)))
    val: dict[tuple[float, float], float] = {}
    best: tuple[tuple[float, float], Classifier] | None = None
    for key in [(lr, m) for lr in cfg.lrs for m in cfg.head_lr_mults]:
        torch.manual_seed(seed)  # stochastic layers (dropout, drop-path) of the backbone, if any
        model = Classifier(encoder.trainable_copy(), linear_head(encoder.dim, data.num_classes, cfg.head_init, seed), train_backbone=True)
        try:
            train_classifier(model, train, dataclasses.replace(recipe, lr=key[0], head_lr_mult=key[1]), encoder.mean, encoder.std,
                             ctx.device, seed, progress=ctx.progress, desc=f"{name}{suffix} lr={key[0]:g} head x{key[1]:g}")
        except FloatingPointError:
            val[key] = -math.inf  # a diverged lr is a failed candidate, not a failed protocol
            continue
        val[key] = topk_accuracy(predict(model, data.val, encoder.mean, encoder.std, ctx.device), data.val.y, 1)
        if best is None or val[key] > val[best[0]]:  # ties keep the earlier candidate
            best = (key, model)
        del model
    if best is None:
        raise FloatingPointError(f"{name}{suffix}: every learning rate diverged (lrs={cfg.lrs}, head_lr_mults={cfg.head_lr_mults})")
    (lr, mult), model = best
    pick = f"lr={lr:g}" + (f" head x{mult:g}" if len(cfg.head_lr_mults) > 1 or mult != 1 else "")
    sel = (f"fixed {pick}" if len(val) == 1 else f"val top1: {pick} of {len(val)}") + (f"; {note}" if note else "")
    sweep = " ".join(f"{a:g}x{b:g}:{v:.4f}" if math.isfinite(v) else f"{a:g}x{b:g}:diverged" for (a, b), v in val.items())
    scores = predict(model, data.test, encoder.mean, encoder.std, ctx.device)
    return [Row(f"top1{suffix}", val[(lr, mult)], split="val", selection=f"{sel} ({sweep})" if len(val) > 1 else sel, n_train=len(train)),
            *classification_rows(scores, data.test.y, suffix, selection=sel, n_train=len(train))]


@register_protocol("semisup", config=Config, version="1", label_efficiency="suffix")
def semisup(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    if data.multilabel:
        raise ValueError("semisup needs one label per image; use a multi-label protocol for this dataset")
    rows: list[Row] = []
    for i, fraction in enumerate(cfg.fractions):
        file = cfg.subset_files[i] if cfg.subset_files else None
        if file and not file.endswith(".json"):  # a list of file names (SimCLR's format)
            labelled, selection, src = listed_subset(data, file)
            rows += finetune_rows(encoder, labelled, selection, cfg, cfg.recipe_for(i), seed, ctx,
                                  suffix=f"_{pct_tag(fraction)}pct", note=f"subset {src}")
            continue
        ids, src = label_subset(data, fraction, cfg.subset_seed, file, ctx)
        rows += finetune_rows(encoder, data.train.subset(ids), data, cfg, cfg.recipe_for(i), seed, ctx,
                              suffix=f"_{pct_tag(fraction)}pct", note=f"subset {src}")
    return rows


register_protocol("semisup_simclr", config=SimCLRConfig, version="1", label_efficiency="suffix")(semisup)
register_protocol("semisup_mmselfsup", config=MMSelfSupConfig, version="1", label_efficiency="suffix")(semisup)
