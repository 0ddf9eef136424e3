"""Typed configuration: dataclass defaults, then YAML overrides, then `--set a.b=c` overrides.

Every section of a resolved configuration is a frozen dataclass. Overrides are plain nested dicts;
unknown keys and wrong types raise `ConfigError` naming the valid fields. `config_hash` hashes the
semantic part of a configuration (fields marked `hash=False`, such as worker counts and paths, are
left out) so that every result row can say exactly which configuration made it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from benchmark.errors import ConfigError


def nohash(default: Any, **kw: Any) -> Any:
    """A dataclass field that does not change results (worker counts, paths): kept out of hashes."""
    return field(default=default, metadata={"hash": False}, **kw)


def hashed_if_set(default: Any, **kw: Any) -> Any:
    """A dataclass field added after runs existed: hashed only when it differs from `default`, so that adding it left
    every earlier run directory and config hash valid."""
    return field(default=default, metadata={"hash": "if_set"}, **kw)


def check(ok: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `ok`; used in `__post_init__` validators."""
    if not ok:
        raise ConfigError(message)


def positive(path: str, value: float) -> None:
    check(
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
        f"{path} must be a finite number > 0, got {value!r}",
    )


@dataclass(frozen=True)
class DataConfig:
    """Which part of a dataset is used and how it is split."""

    root: str | None = nohash(None)  # dataset folder; None: $SSLBENCH_DATA_<NAME> or the default path
    train_size: int | None = None  # class-balanced subset of the train split (None: all)
    test_size: int | None = None  # class-balanced subset of the test split (None: all)
    val_fraction: float = 0.1  # held out of train for model selection; protocols test once
    split_seed: int = 0  # the validation split and subsets are fixed by this, not by the run seed
    image_size: int | None = None  # resize to this (None: native size; file-based datasets: their default, e.g. 224)
    # file-based datasets (imagefolder, imagenet, webdataset, ...): the evaluation transform of each decoded image:
    # "resize_crop" (shorter side to image_size/0.875, centre crop: 256 -> 224), "resize" (to image_size square),
    # "vissl" (VOC07's: shorter side to image_size/0.875, then squashed to image_size, on PIL), "native", or "auto"
    # (the dataset's own: resize_crop for the ImageNet-style ones, vissl for voc2007)
    transform: Literal["auto", "resize_crop", "resize", "vissl", "native"] = hashed_if_set("auto")
    # where a file-based dataset's images live: "memory" (decoded once, the fast path), "stream" (decoded per batch in
    # `workers` DataLoader processes), "auto" (memory when the decoded split takes <= 2 GiB and 1/8 of this machine's
    # memory). The images, hence every number, are the same either way; the choice is recorded in each row.
    storage: Literal["auto", "memory", "stream"] = nohash("auto")
    workers: int = nohash(2)  # decoding processes of a streamed dataset (0: in the main process)

    def __post_init__(self) -> None:
        for name in ("train_size", "test_size", "image_size"):
            v = getattr(self, name)
            check(v is None or v > 0, f"data.{name} must be > 0 or null, got {v!r}")
        check(0 < self.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        check(self.workers >= 0, f"data.workers must be >= 0, got {self.workers!r}")


@dataclass(frozen=True)
class PretrainConfig:
    """The shared pretraining loop. Methods declare their own defaults for these in the registry."""

    backbone: str = "convnet"  # see `--list`
    small_stem: bool | None = None  # ResNet 3x3 stem without max-pool; None: on for images <= 64 px
    epochs: int = 10
    batch_size: int = 256
    optimizer: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.05  # for batch 256, scaled linearly with batch_size (Goyal et al. 2017)
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD/LARS momentum (AdamW: beta1)
    warmup_epochs: float = 0.0  # linear warm-up, then cosine decay to `min_lr`
    min_lr: float = hashed_if_set(0.0)  # the cosine's end (absolute, not scaled with the batch; DINO: 1e-6)
    clip_grad: float = 0.0  # per-parameter gradient-norm clip (DINO's `clip_gradients`); 0: off
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # memory format of model and views (faster convs on CPU and GPU)
    deterministic: bool = nohash(False)  # torch.use_deterministic_algorithms
    checkpoint_every: int = nohash(1)  # epochs between checkpoints (a checkpoint is always written at the end)
    keep_checkpoints: int = nohash(2)  # >= 2 so that a corrupt latest checkpoint is survivable
    # where pretraining views are cropped: "batch" (from the in-memory or eval-transformed images, on the device, by
    # the batched augmentations) or "worker" (a streamed set only: each view's random-resized crop taken from the
    # full decoded image in the data workers, ImageNet-style, then flip / jitter / blur on the device)
    crops: Literal["batch", "worker"] = hashed_if_set("batch")
    sync_every: int = nohash(0)  # steps between reads of the loss on the host (NaN check, progress); 0: 1 on CPU, 50 on GPU
    # torch.compile each of the model's parts (`nn.Module.compile` on its child modules): "none", or a torch.compile
    # mode ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"). The same recipe with
    # float-level differences, hence not hashed; the first steps pay for compilation (tens of seconds).
    compile: Literal["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = nohash("none")
    # online kNN (DINO's weighted vote on the encoder's features: a bank of train images, scored on val) in the
    # history every `eval_every` epochs and at the last; 0: off. Observes only: training is bit-identical either way.
    eval_every: int = nohash(5)
    knn_bank: int = nohash(5000)  # train images in the bank: a fixed seeded random subset (all of train when smaller)
    knn_k: int = nohash(20)  # DINO's k and T
    knn_temperature: float = nohash(0.07)
    # milestones "EPOCH:MIN_TOP1[,...]" (e.g. "10:0.3,50:0.5"): online kNN is evaluated at each EPOCH and a top-1
    # below MIN (in [0, 1]) ends the run with status `stopped` (no metrics); "": never stop. Quote it in YAML files
    # (stop_below: "10:0.3"; unquoted, YAML reads a base-60 number); --set pretrain.stop_below=10:0.3 needs no quotes
    stop_below: str = hashed_if_set("")
    # each epoch's history scalars (loss, std_l2, rankme, knn_top1, lr) to <run dir>/tensorboard/ (pip install tensorboard)
    tensorboard: bool = nohash(False)

    def __post_init__(self) -> None:
        positive("pretrain.lr", self.lr)
        check(self.epochs >= 0, f"pretrain.epochs must be >= 0, got {self.epochs}")
        check(self.batch_size > 0, f"pretrain.batch_size must be > 0, got {self.batch_size}")
        check(self.weight_decay >= 0, f"pretrain.weight_decay must be >= 0, got {self.weight_decay}")
        check(self.clip_grad >= 0, f"pretrain.clip_grad must be >= 0, got {self.clip_grad}")
        check(self.warmup_epochs >= 0, f"pretrain.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        check(0 <= self.min_lr < self.lr, f"pretrain.min_lr must be in [0, lr={self.lr}), got {self.min_lr}")
        check(self.checkpoint_every > 0, "pretrain.checkpoint_every must be > 0")
        check(self.keep_checkpoints >= 2, "pretrain.keep_checkpoints must be >= 2")
        check(self.sync_every >= 0, f"pretrain.sync_every must be >= 0, got {self.sync_every}")
        check(self.eval_every >= 0, f"pretrain.eval_every must be >= 0 (0: off), got {self.eval_every}")
        check(self.knn_bank > 0, f"pretrain.knn_bank must be > 0, got {self.knn_bank}")
        check(self.knn_k > 0, f"pretrain.knn_k must be > 0, got {self.knn_k}")
        positive("pretrain.knn_temperature", self.knn_temperature)
        parse_milestones(self.stop_below)

    @property
    def milestones(self) -> dict[int, float]:
        """`stop_below` as {epoch: minimum online kNN top-1}."""
        return parse_milestones(self.stop_below)


def parse_milestones(text: str) -> dict[int, float]:
    """"EPOCH:MIN[,...]" -> {EPOCH: MIN}: EPOCH an integer >= 1, MIN a number in [0, 1], each epoch once; "" -> {}."""
    out: dict[int, float] = {}
    for item in (p.strip() for p in text.split(",")) if text.strip() else ():
        epoch, sep, low = (s.strip() for s in item.partition(":"))
        try:
            e, m = int(epoch), float(low)
        except ValueError:
            e, m, sep = 0, math.nan, ""
        check(bool(sep), f"pretrain.stop_below: {item!r} in {text!r} is not EPOCH:MIN_TOP1 (e.g. '10:0.3,50:0.5')")
        check(e >= 1, f"pretrain.stop_below: epoch {e} in {item!r} must be >= 1 (epochs count from 1)")
        check(0 <= m <= 1, f"pretrain.stop_below: minimum top-1 {low} in {item!r} must be in [0, 1] (a fraction, not %)")
        check(e not in out, f"pretrain.stop_below: epoch {e} has two milestones in {text!r}")
        out[e] = m
    return out


@dataclass(frozen=True)
class EvalConfig:
    """Frozen-feature extraction shared by all protocols."""

    batch_size: int = nohash(512)  # eval mode: features do not depend on it
    cache: bool = nohash(True)  # reuse extracted features across protocols of one encoder (the on-disk feature store)
    # what frozen features are rounded to and stored as: "auto" is float16 for file-based datasets (ImageNet ResNet-50
    # train features: 5.2 GB instead of 10.5) and float32 for the in-memory tensor datasets
    feature_dtype: Literal["auto", "float16", "float32"] = hashed_if_set("auto")
    shard_rows: int = nohash(65_536)  # feature-store rows per shard: the unit a killed extraction resumes from

    def __post_init__(self) -> None:
        check(self.batch_size > 0, f"eval.batch_size must be > 0, got {self.batch_size}")
        check(self.shard_rows > 0, f"eval.shard_rows must be > 0, got {self.shard_rows}")

    def dtype_for(self, file_based: bool) -> str:
        if self.feature_dtype != "auto":
            return self.feature_dtype
        return "float16" if file_based else "float32"


CORE_SECTIONS: dict[str, type] = {"data": DataConfig, "pretrain": PretrainConfig, "eval": EvalConfig}


# --------------------------------------------------------------------------- overrides

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 6, 80, 80
MAX_VALUES = 100_000  # scalars a whole override set may expand to (YAML aliases can make 433 bytes into billions)


def short(value: Any) -> str:
    """A repr of bounded length and cost, whatever `value` is (a message never expands a YAML alias bomb)."""
    return _REPR.repr(value)


def _check_size(data: Any, where: str) -> None:
    """Refuse a parsed YAML value that expands to more than `MAX_VALUES` values (walked with early exit)."""
    count, stack = 0, [data]
    while stack:
        v = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{where} expands to more than {MAX_VALUES:,} values (YAML aliases?); write the values out")
        if isinstance(v, Mapping):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Return `value` checked against the annotation `tp` (numeric strings become numbers)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(path, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {short(value)} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(str, args))}; got {short(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {short(value)}")
        item = args[0] if args else Any
        out = [_coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {short(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path} must be a number, got {short(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {short(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{path} must be finite, got {short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {short(value)}")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp!r}")  # pragma: no cover


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], path: str) -> Any:
    """Return a copy of the dataclass `cfg` with `overrides` applied and validated.

    Args:
        cfg: a dataclass instance.
        overrides: field name -> new value (values as parsed from YAML).
        path: the section name, used in error messages (`knn`, `pretrain`).
    """
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{path} must be a mapping of field: value, got {short(overrides)}")
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key {path}.{key}; valid fields of {path}: {', '.join(sorted(fields))}"
            )
        changes[key] = _coerce(f"{path}.{key}", hints[key], value)
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """`["data.image_size=32", "pretrain.lr=0.1"]` -> `{"data": {"image_size": 32}, "pretrain": {"lr": 0.1}}`."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name or "." in name:
            raise ConfigError(f"--set expects section.key=value (e.g. knn.k=20), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (int, float)) and not isinstance(value, bool) and ":" in raw:
            value = raw.strip()  # YAML 1.1 reads 10:0.3 as the base-60 number 600.3; nobody means that (stop_below=10:0.3)
        _check_size(value, f"--set {key.strip()}")
        out.setdefault(section, {})[name] = value
    return out


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML file of overrides: `{section: {key: value}}`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text; --config takes a YAML file of {{section: {{key: value}}}}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {p}{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    _check_size(data, f"config file {p}")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{p} must map section names to mappings, e.g. 'knn: {{k: 20}}'")
    return data


def merge(*layers: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge override layers section by section; later layers win."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            if not isinstance(values, Mapping):
                raise ConfigError(f"section {short(section)} must be a mapping of key: value, got {short(values)}")
            out.setdefault(section, {}).update(values)
    return out


# --------------------------------------------------------------------------- hashing


def to_dict(cfg: Any, semantic_only: bool = False) -> dict[str, Any]:
    """A dataclass as a JSON-ready dict; `semantic_only` drops fields marked `hash=False`."""
    out = {}
    for f in dataclasses.fields(cfg):
        if semantic_only and not f.metadata.get("hash", True):
            continue
        v = getattr(cfg, f.name)
        if semantic_only and f.metadata.get("hash") == "if_set" and v == f.default:
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def config_hash(sections: Mapping[str, Any]) -> str:
    """Stable 12-hex-digit hash of semantic config values (independent of key order)."""
    payload = {
        k: to_dict(v, semantic_only=True) if dataclasses.is_dataclass(v) else v
        for k, v in sections.items()
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
