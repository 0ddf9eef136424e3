"""The shared pretraining loop: any registered method, any backbone, resumable bit for bit.

A method is an `nn.Module` built as `cls(backbone, cfg)` that provides `views(image_size)`,
`loss(views, progress, labels=None)` and `encoder()`. Labels are passed only to methods that set
`uses_labels = True` (the supervised baseline); methods with `trainable = False` are not trained.
Methods that need more than the views declare it: `uses_indices = True` passes each sample's index
into the training set as `loss(..., indices=)` (memory banks: NPID, PIRL); `before_epoch(epoch, splits,
device, seed)` runs at the start of every epoch (clustering over the whole set: DeepCluster, PCL); all
their state must live in buffers so that checkpoints restore it.
Optional hooks for what the official recipes do beyond one lr and one weight decay:
`param_groups(weight_decay)` (per-group `lr_mult`, `fixed_lr`, `lars`; see `optim.build_optimizer`)
and `weight_decay_at(progress, base)` (a weight-decay schedule); `pretrain.clip_grad` clips gradients.

Randomness is derived from (seed, epoch, step), so a run resumed from a checkpoint draws the same
batches and the same augmentations as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from benchmark.augment import ViewSpec, make_views
from benchmark.backbones import build_backbone
from benchmark.checkpoints import CheckpointDir
from benchmark.config import PretrainConfig
from benchmark.data import Splits
from benchmark.distributed import all_reduce_mean, average_gradients, rank, world_size
from benchmark.errors import ConfigError
from benchmark.monitors import is_collapsed, rankme, std_of_l2_normalized
from benchmark.optim import base_lr, build_optimizer, clip_per_parameter, lr_at, set_hyperparameters

log = logging.getLogger(__name__)


class Method(Protocol):
    def views(self, image_size: int) -> list[ViewSpec]: ...

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor: ...

    def encoder(self) -> nn.Module: ...


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple, stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


@dataclass
class PretrainOutcome:
    status: str  # ok | collapsed | diverged
    encoder: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    diverged_at: int | None = None
    last_finite_loss: float | None = None
    steps: int = 0


def build_method(method_cls: Callable[..., Any], method_cfg: Any, cfg: PretrainConfig, splits: Splits, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    backbone = build_backbone(cfg, splits.channels, splits.image_size)
    model: nn.Module = method_cls(backbone, method_cfg)
    return model


def device_resident(x: Tensor, device: torch.device, budget: float = 0.25) -> Tensor:
    """`x` (uint8 images) moved to a CUDA `device` once when it takes at most `budget` of the free memory there, so
    that batches are indexed on the GPU without host copies; else (or on the CPU) `x` itself."""
    if device.type != "cuda":
        return x
    free, _ = torch.cuda.mem_get_info(device)
    if x.numel() * x.element_size() > budget * free:
        log.info("dataset (%.1f GiB) does not fit the GPU budget; batches are copied from pinned memory", x.numel() / 2**30)
        return x
    return x.to(device)


def compile_parts(model: nn.Module, mode: str) -> Callable[[], None]:
    """`torch.compile` every child module of `model` that has parameters (backbone, heads, EMA copies) in place, with
    static shapes (multi-crop sizes compile once each); state-dict names are unchanged. Returns the undo, which puts
    the eager forwards back so that the encoder handed to the protocols is a plain module. Mode "none": nothing."""
    if mode == "none":
        return lambda: None
    parts = [m for m in model.children() if any(True for _ in m.parameters())]
    for m in parts:
        m.compile(mode=None if mode == "default" else mode, dynamic=False)

    def undo() -> None:
        for m in parts:
            m._compiled_call_impl = None  # what nn.Module.compile sets; None restores the eager __call__
    return undo


def collapse_stats(encoder: nn.Module, splits: Splits, device: torch.device, n: int = 512) -> dict[str, float]:
    """std·sqrt(d) and RankMe of the encoder's features on a fixed slice of the validation split."""
    was_training = encoder.training
    encoder.eval()
    mean = torch.tensor(splits.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(splits.std, device=device).view(1, -1, 1, 1)
    with torch.no_grad():
        x = (splits.val.x[:n].to(device).float() / 255 - mean) / std
        z = encoder(x).float()
    encoder.train(was_training)
    return {"std_l2": std_of_l2_normalized(z), "rankme": rankme(z)}


def pretrain(
    model: nn.Module,
    splits: Splits,
    cfg: PretrainConfig,
    seed: int,
    ckpt_dir: Path,
    device: torch.device,
    progress: bool = True,
    desc: str = "pretrain",
) -> PretrainOutcome:
    """Train `model` on `splits.train` (labels withheld unless the method uses them).

    Resumes from the newest valid checkpoint in `ckpt_dir`. Raises nothing for divergence: a
    non-finite loss ends the run with status `diverged`. With `cfg.compile` the model's parts run compiled during
    training only.
    """
    uncompile = compile_parts(model, cfg.compile)
    try:
        return _pretrain(model, splits, cfg, seed, ckpt_dir, device, progress, desc)
    finally:
        uncompile()


def _pretrain(model: nn.Module, splits: Splits, cfg: PretrainConfig, seed: int, ckpt_dir: Path, device: torch.device,
              progress: bool, desc: str) -> PretrainOutcome:
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=False)
    method = cast(Method, model)
    # Several processes (torchrun, or SLURM tasks): each takes its slice of the same global batch, gradients are
    # averaged, and only rank 0 writes; losses that need the global batch gather it (benchmark.distributed).
    world, me = world_size(), rank()
    if cfg.batch_size % world:
        raise ConfigError(f"pretrain.batch_size ({cfg.batch_size}) is the global batch: it must be divisible by the {world} processes")
    local = cfg.batch_size // world
    if world > 1 and device.type == "cuda" and getattr(model, "sync_bn", False):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]  # BN statistics over the global batch, as the method's code
        method = cast(Method, model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    specs = method.views(splits.image_size)
    uses_labels = bool(getattr(model, "uses_labels", False))
    n = len(splits.train)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    opt = build_optimizer(model, cfg)
    wd_at = getattr(model, "weight_decay_at", None)  # optional method hook: (progress, base) -> weight decay
    ckpts = CheckpointDir(ckpt_dir, cfg.keep_checkpoints)
    history: list[dict[str, float]] = []
    start_epoch, step = 0, 0
    state = ckpts.load_latest()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step, history = state["epoch"], state["step"], list(state["history"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        log.info("resumed from epoch %d of %s", start_epoch, ckpt_dir)
    amp = device.type == "cuda" and cfg.amp
    sync_every = cfg.sync_every or (50 if device.type == "cuda" else 1)
    data_x = device_resident(splits.train.x, device)
    last_finite: float | None = history[-1]["loss"] if history else None
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress or me != 0, dynamic_ncols=True, leave=False, mininterval=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    uses_indices = bool(getattr(model, "uses_indices", False))
    before_epoch = getattr(model, "before_epoch", None)
    for epoch in range(start_epoch, cfg.epochs):
        if before_epoch is not None:
            before_epoch(epoch, splits, device, derive_seed(seed, "before_epoch", epoch))
            model.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))
        running, t0 = 0.0, time.perf_counter()
        pending: list[Tensor] = []  # per-step losses not yet read on the host
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            if data_x.device.type == device.type:  # on the device already (or both on the CPU)
                x = data_x[idx.to(data_x.device)]
            else:  # did not fit the GPU: pinned host memory, asynchronous copy
                x = data_x[idx].pin_memory().to(device, non_blocking=True)
            g = torch.Generator(device).manual_seed(derive_seed(seed, "views", step))
            views = make_views(x, specs, splits.mean, splits.std, g)  # the global batch's views, then this process's rows
            if world > 1:
                mine = slice(me * local, (me + 1) * local)
                views, idx = [v[mine] for v in views], idx[mine]
            if cfg.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            labels = splits.train.y[idx].to(device) if uses_labels else None
            wd = wd_at(step / max(1, total), cfg.weight_decay) if wd_at is not None else None
            set_hyperparameters(opt, lr_at(step, total, warmup, base_lr(cfg), cfg.min_lr), base_lr(cfg), wd)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if uses_indices:
                    loss = method.loss(views, step / max(1, total), labels, indices=idx.to(device))  # type: ignore[call-arg]
                else:
                    loss = method.loss(views, step / max(1, total), labels)
            pending.append(all_reduce_mean(loss.detach().float().clone()))  # the same on every process; stays on the device
            if sync_every == 1 and not math.isfinite(float(pending[-1])):  # CPU: stop before the step applies NaNs
                bar.close()
                log.error("diverged at step %d (last finite loss %s)", step, last_finite)
                return PretrainOutcome("diverged", method.encoder(), history, step, last_finite, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            average_gradients(params)
            if cfg.clip_grad > 0:
                clip_per_parameter(model, cfg.clip_grad)
            opt.step()
            step += 1
            bar.update(1)
            if len(pending) >= sync_every or i == steps_per_epoch - 1:
                # one host sync for `sync_every` steps: the GPU keeps its queue full in between
                values = torch.stack(pending).tolist()
                first = step - len(values)
                pending.clear()
                for k, value in enumerate(values):
                    if not math.isfinite(value):
                        bar.close()
                        log.error("diverged at step %d (last finite loss %s)", first + k, last_finite)
                        return PretrainOutcome("diverged", method.encoder(), history, first + k, last_finite, first + k)
                    last_finite = value
                    running += value
                bar.set_postfix(epoch=epoch + 1, loss=f"{values[-1]:.3f}", refresh=False)
        stats = collapse_stats(method.encoder(), splits, device)
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "epoch_s": time.perf_counter() - t0, **stats})
        log.info("%s epoch %d: %s", desc, epoch + 1, history[-1])
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "step": step,
                     "history": history, "rng_cpu": torch.get_rng_state()}
            if device.type == "cuda":
                state["rng_cuda"] = torch.cuda.get_rng_state()
            if me == 0:
                ckpts.save(state, epoch + 1)
    bar.close()
    final = history[-1] if history else collapse_stats(method.encoder(), splits, device)
    dim = int(getattr(method.encoder(), "dim", 1))
    status = "collapsed" if is_collapsed(final["std_l2"], final["rankme"], dim) and cfg.epochs > 0 else "ok"
    return PretrainOutcome(status, method.encoder(), history, None, last_finite, step)
