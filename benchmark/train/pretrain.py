"""The shared pretraining loop: any registered method, any backbone, resumable bit for bit.

What the loop calls on a method, and when, is the `Method` contract in `benchmark.train.method`; the optional
members are read once through its `Hooks` adapter. `pretrain.clip_grad` clips gradients per parameter.

Randomness is derived from (seed, epoch, step), so a run resumed from a checkpoint draws the same
batches and the same augmentations as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from benchmark.backbones import build_backbone
from benchmark.config import PretrainConfig
from benchmark.data.augment import ViewSpec, augment, make_views
from benchmark.data.sets import Images, ImageSet, Splits
from benchmark.data.stream import CropSpec, StreamSet
from benchmark.device import is_oom
from benchmark.errors import ConfigError, SSLBenchError
from benchmark.store.checkpoints import CheckpointDir
from benchmark.train.distributed import all_reduce_mean, average_gradients, rank, world_size
from benchmark.train.method import Hooks, Method, check_method
from benchmark.train.monitors import is_collapsed, knn_predict, rankme, std_of_l2_normalized
from benchmark.train.optim import base_lr, build_optimizer, clip_per_parameter, lr_at, set_hyperparameters

log = logging.getLogger(__name__)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple, stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


@dataclass
class PretrainOutcome:
    status: str  # ok | collapsed | diverged | stopped
    encoder: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    diverged_at: int | None = None
    last_finite_loss: float | None = None
    steps: int = 0
    reason: str = ""  # diverged: what was not finite or not sane; stopped: the stop_below milestone missed


def build_method(method_cls: Callable[..., Any], method_cfg: Any, cfg: PretrainConfig, splits: Splits, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    backbone = build_backbone(cfg, splits.channels, splits.image_size)
    model: nn.Module = method_cls(backbone, method_cfg)
    check_method(model)
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
        x = (splits.val.take(torch.arange(min(n, len(splits.val)))).to(device).float() / 255 - mean) / std
        z = encoder(x).float()
    encoder.train(was_training)
    return {"std_l2": std_of_l2_normalized(z), "rankme": rankme(z)}


def knn_bank(n_train: int, size: int, seed: int) -> Tensor:
    """The online kNN's bank: `size` sorted indices into the training set, a random subset fixed by `seed` (from its
    own generator: the run's random numbers are untouched); all of them when the set is no larger."""
    if n_train <= size:
        return torch.arange(n_train)
    g = torch.Generator().manual_seed(derive_seed(seed, "knn_bank"))
    return torch.randperm(n_train, generator=g)[:size].sort().values


def knn_due(cfg: PretrainConfig, epochs_done: int) -> bool:
    """Whether the online kNN runs after `epochs_done` epochs: every `eval_every` epochs and at the last one (unless
    eval_every is 0), and at every stop_below milestone."""
    every = cfg.eval_every > 0 and (epochs_done % cfg.eval_every == 0 or epochs_done == cfg.epochs)
    return every or epochs_done in cfg.milestones


def missed_milestone(cfg: PretrainConfig, entry: dict[str, float]) -> str:
    """Why the run stops after the history `entry` ("" when it goes on): its epoch is a stop_below milestone and the
    online kNN top-1 is below the milestone's minimum."""
    low = cfg.milestones.get(int(entry["epoch"]))
    if low is None or "knn_top1" not in entry or entry["knn_top1"] >= low:
        return ""
    return f"knn top1 {entry['knn_top1']:.4f} < {low:g} at epoch {int(entry['epoch'])} (pretrain.stop_below)"


def _features(encoder: nn.Module, images: Images, idx: Tensor, splits: Splits, device: torch.device,
              batch: int = 512) -> Tensor:
    """Features (len(idx), D) of images[idx] on `device`, normalised as `collapse_stats` and the protocols' frozen
    encoder do (uint8 / 255, then the split's mean and std; bf16 autocast on CUDA, as that encoder)."""
    mean = torch.tensor(splits.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(splits.std, device=device).view(1, -1, 1, 1)
    out = []
    for xb in images.loader(list(torch.split(idx, batch)), pin=device.type == "cuda"):
        x = (xb.to(device, non_blocking=True).float() / 255 - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(encoder(x).float())
    return torch.cat(out)


def online_knn(encoder: nn.Module, splits: Splits, bank: Tensor, cfg: PretrainConfig, device: torch.device) -> dict[str, float]:
    """`knn_top1` (and `knn_top5` with more than 5 classes) of all of `splits.val` by DINO's vote (pretrain.knn_k,
    knn_temperature) over the training images `bank`, with the encoder as it is now; `knn_s`: the seconds it took.

    It only observes: eval mode under no_grad (no BN statistics move), each module's mode put back after, and the RNG
    states forked (a streamed set's DataLoader draws a seed), so training is bit-identical with it on or off. Every
    process evaluates and the values are averaged over them, so that all take the same stop_below decision."""
    t0 = time.perf_counter()
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            bank_f = _features(encoder, splits.train, bank, splits, device)
            val_f = _features(encoder, splits.val, torch.arange(len(splits.val)), splits, device)
            scores = knn_predict(bank_f, splits.train.y[bank].to(device), val_f, cfg.knn_k, cfg.knn_temperature,
                                 splits.num_classes)  # (len(val), num_classes)
    finally:
        for m, mode in modes:
            m.training = mode
    y = splits.val.y.to(device).view(-1, 1)
    hits = [(scores.topk(1, dim=1).indices == y).any(dim=1)]  # topk(1), as the protocol's top-1 (ties alike)
    if splits.num_classes > 5:
        hits.append((scores.topk(5, dim=1).indices == y).any(dim=1))
    acc = all_reduce_mean(torch.stack([h.float().mean() for h in hits])).tolist()
    return {"knn_top1": acc[0], **({"knn_top5": acc[1]} if len(acc) > 1 else {}), "knn_s": time.perf_counter() - t0}


def knn_applies(splits: Splits) -> bool:
    """The online kNN needs single-label classes, a training set and a validation split."""
    return splits.train.y.ndim == 1 and len(splits.train) > 0 and len(splits.val) > 0


def pretrain(
    model: nn.Module,
    splits: Splits,
    cfg: PretrainConfig,
    seed: int,
    ckpt_dir: Path,
    device: torch.device,
    progress: bool = True,
    desc: str = "pretrain",
    tensorboard_dir: Path | None = None,
) -> PretrainOutcome:
    """Train `model` on `splits.train` (labels withheld unless the method uses them).

    Resumes from the newest valid checkpoint in `ckpt_dir`. Raises nothing for divergence: a
    non-finite loss ends the run with status `diverged`; a missed `cfg.stop_below` milestone ends it with status
    `stopped`. With `cfg.compile` the model's parts run compiled during training only. With `cfg.tensorboard` each
    epoch's scalars go to `tensorboard_dir` (None: `ckpt_dir`'s parent / "tensorboard").
    """
    uncompile = compile_parts(model, cfg.compile)
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        board = tensorboard_dir if tensorboard_dir is not None else ckpt_dir.parent / "tensorboard"
        return _pretrain(model, splits, cfg, seed, ckpt_dir, device, progress, desc, board)
    finally:
        uncompile()
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])  # the caller's, not this run's


@dataclass
class _Run:
    """One training run's state, shared by the steps below."""

    model: nn.Module
    method: Method
    hooks: Hooks
    cfg: PretrainConfig
    splits: Splits
    seed: int
    device: torch.device
    specs: list[ViewSpec]
    opt: torch.optim.Optimizer
    ckpts: CheckpointDir
    data_x: Tensor | None  # the in-memory training images (on the device when they fit); None: streamed
    bar: Any
    steps_per_epoch: int
    total: int
    warmup: int
    world: int
    me: int
    sync_every: int
    amp: bool
    params: list[nn.Parameter]
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    step: int = 0
    last_finite: float | None = None
    desc: str = "pretrain"
    bank: Tensor | None = None  # the online kNN's training images (None: the data has no single-label val split)
    board: Any = None  # the TensorBoard writer (pretrain.tensorboard, rank 0)
    shown: dict[str, str] = field(default_factory=dict)  # kept in the progress bar's postfix (the last online kNN)

    def diverged(self, at: int, why: float | str) -> PretrainOutcome:
        """The run's end at step `at`: the loss `why` was inf, NaN or beyond the method's bound, or `why` says what
        else stopped being finite."""
        self.bar.close()
        reason = why if isinstance(why, str) else f"loss {why:.4g}" + ("" if not math.isfinite(why) else
                                                                         f" beyond the method's bound {self.hooks.loss_bound:g}")
        log.error("diverged at step %d: %s (last sane loss %s)", at, reason, self.last_finite)
        return PretrainOutcome("diverged", self.method.encoder(), self.history, at, self.last_finite, at, reason)

    def stopped(self, why: str) -> PretrainOutcome:
        """The run's end after a missed stop_below milestone (`why`); its checkpoint is saved."""
        self.bar.close()
        log.warning("%s stopped early: %s", self.desc, why)
        return PretrainOutcome("stopped", self.method.encoder(), self.history, None, self.last_finite, self.step, why)


class PretrainOOM(SSLBenchError):
    """Pretraining ran out of memory. The batch is the method's recipe (it sets the lr and the loss's negatives), so it
    is never shrunk behind the user's back: the message names the batch and the knobs."""


def _reraise_oom(error: RuntimeError, run: _Run, views: list[Tensor]) -> NoReturn:
    if not is_oom(error):
        raise error
    shapes = ", ".join(sorted({f"{v.shape[-1]} px" for v in views}))
    raise PretrainOOM(f"out of memory in pretraining at pretrain.batch_size={run.cfg.batch_size} ({len(views)} views, {shapes}) "
                      f"on {run.device} with {run.cfg.backbone}: lower pretrain.batch_size (lr scales with it), "
                      "data.image_size or the method's crops; the effective batch is never changed silently") from None


def _sane(loss: float, run: _Run) -> bool:
    """The divergence rule: a loss counts only when it is finite and within the method's declared bound."""
    return math.isfinite(loss) and abs(loss) <= run.hooks.loss_bound


WEIGHT_BOUND = 1e10  # no trained network has a weight this large; a run's weights that reach it have blown up


def _insane_weights(module: nn.Module) -> str:
    """Why the weights of `module` are no longer those of a network ("" when they are): a parameter or buffer holds
    inf or NaN, or a parameter's magnitude passed `WEIGHT_BOUND` (scale-invariant losses keep such runs finite)."""
    bad = [k for k, v in module.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        return f"{len(bad)} weight tensor(s) hold inf or NaN ({', '.join(bad[:3])})"
    big = max((float(p.detach().abs().max()) for p in module.parameters() if p.numel()), default=0.0)
    return f"a weight reached {big:.3g} (bound {WEIGHT_BOUND:g})" if big > WEIGHT_BOUND else ""


def _pretrain(model: nn.Module, splits: Splits, cfg: PretrainConfig, seed: int, ckpt_dir: Path, device: torch.device,
              progress: bool, desc: str, board_dir: Path) -> PretrainOutcome:
    board = _board(cfg, board_dir, rank())  # before any work: a missing package is one line, not a lost epoch
    try:
        run = _prepare(model, splits, cfg, seed, ckpt_dir, device, progress, desc)
        run.board = board
        return _epochs(run)
    finally:
        if board is not None:
            board.close()


def _epochs(run: _Run) -> PretrainOutcome:
    """The epochs from `run.start_epoch` on, each followed by its monitors, online kNN when due, and checkpoint."""
    cfg, splits, device, seed, desc = run.cfg, run.splits, run.device, run.seed, run.desc
    why = missed_milestone(cfg, run.history[-1]) if run.history else ""
    if why:  # resumed from the checkpoint a stopped run saved (killed before its pretrain.json was written)
        return run.stopped(why)
    for epoch in range(run.start_epoch, cfg.epochs):
        if run.hooks.before_epoch is not None:
            run.hooks.before_epoch(epoch, splits, device, derive_seed(seed, "before_epoch", epoch))
            run.model.train()
        t0 = time.perf_counter()
        running = _train_epoch(run, epoch)
        if isinstance(running, PretrainOutcome):
            return running
        why = _insane_weights(run.model)  # a finite loss over blown-up weights (a bounded loss of saturated features)
        if why:
            return run.diverged(run.step, why)
        stats = collapse_stats(run.method.encoder(), splits, device)
        run.history.append({"epoch": epoch + 1, "loss": running / run.steps_per_epoch, "epoch_s": time.perf_counter() - t0, **stats})
        if run.bank is not None and knn_due(cfg, epoch + 1):
            run.history[-1].update(online_knn(run.method.encoder(), splits, run.bank, cfg, device))
            run.shown["knn"] = f"{run.history[-1]['knn_top1']:.3f}"
            run.bar.set_postfix(epoch=epoch + 1, loss=f"{run.history[-1]['loss']:.3f}", **run.shown)
        log.info("%s epoch %d: %s", desc, epoch + 1, run.history[-1])
        why = missed_milestone(cfg, run.history[-1])
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or why:
            _save(run, epoch + 1)
        _log_board(run)
        if why:
            return run.stopped(why)
    run.bar.close()
    final = run.history[-1] if run.history else collapse_stats(run.method.encoder(), splits, device)
    dim = int(getattr(run.method.encoder(), "dim", 1))
    status = "collapsed" if is_collapsed(final["std_l2"], final["rankme"], dim) and cfg.epochs > 0 else "ok"
    return PretrainOutcome(status, run.method.encoder(), run.history, None, run.last_finite, run.step)


def _prepare(model: nn.Module, splits: Splits, cfg: PretrainConfig, seed: int, ckpt_dir: Path, device: torch.device,
             progress: bool, desc: str) -> _Run:
    """Place the model, build the optimiser, and resume from the newest valid checkpoint in `ckpt_dir`."""
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=False)
    hooks = Hooks.of(model)
    # Several processes (torchrun, or SLURM tasks): each takes its slice of the same global batch, gradients are
    # averaged, and only rank 0 writes; losses that need the global batch gather it (benchmark.train.distributed).
    world, me = world_size(), rank()
    if cfg.batch_size % world:
        raise ConfigError(f"pretrain.batch_size ({cfg.batch_size}) is the global batch: it must be divisible by the {world} processes")
    if world > 1 and device.type == "cuda" and hooks.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]  # BN statistics over the global batch, as the method's code
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    method = cast(Method, model)
    specs = method.views(splits.image_size)
    steps_per_epoch = max(1, len(splits.train) // cfg.batch_size)
    run = _Run(model, method, hooks, cfg, splits, seed, device, specs, build_optimizer(model, cfg), CheckpointDir(ckpt_dir, cfg.keep_checkpoints),
               data_x=None, bar=None, steps_per_epoch=steps_per_epoch, total=steps_per_epoch * cfg.epochs,
               warmup=round(cfg.warmup_epochs * steps_per_epoch), world=world, me=me,
               sync_every=cfg.sync_every or (50 if device.type == "cuda" else 1), amp=device.type == "cuda" and cfg.amp,
               params=[p for p in model.parameters() if p.requires_grad], desc=desc)
    if knn_applies(splits):
        run.bank = knn_bank(len(splits.train), cfg.knn_bank, seed)
    elif cfg.milestones:
        raise ConfigError(f"pretrain.stop_below={cfg.stop_below!r} needs the online kNN, which needs single-label classes "
                          f"and a validation split; {splits.name} has none: unset pretrain.stop_below")
    late = sorted(e for e in cfg.milestones if e > cfg.epochs)
    if late:
        log.warning("pretrain.stop_below: milestone epoch(s) %s beyond pretrain.epochs=%d are never reached", late, cfg.epochs)
    state = run.ckpts.load_latest()
    if state is not None:
        model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["optimizer"])
        run.start_epoch, run.step, run.history = state["epoch"], state["step"], list(state["history"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        log.info("resumed from epoch %d of %s", run.start_epoch, ckpt_dir)
    run.data_x = device_resident(splits.train.x, device) if isinstance(splits.train, ImageSet) else None
    run.last_finite = run.history[-1]["loss"] if run.history else None
    run.bar = tqdm(total=run.total, initial=run.step, desc=desc, disable=not progress or me != 0, dynamic_ncols=True, leave=False,
                   mininterval=0.5)
    model.train()
    return run


def _batch(run: _Run, perm: Tensor, i: int, streamed: Tensor | list[Tensor] | None = None) -> tuple[list[Tensor], Tensor | None, Tensor]:
    """Step `i` of the epoch whose order is `perm`: this process's views, labels (if the method uses them), indices.
    `streamed`: the step's images decoded by the streamed set's workers, or with pretrain.crops=worker one crop
    batch per view (None: indexed from memory)."""
    cfg, device = run.cfg, run.device
    idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
    g = torch.Generator(device).manual_seed(derive_seed(run.seed, "views", run.step))
    if isinstance(streamed, list):  # cropped in the workers: the rest of each view's pipeline here, without a crop
        m, s = torch.tensor(run.splits.mean, device=device), torch.tensor(run.splits.std, device=device)
        views = [augment(c.to(device, non_blocking=True), dataclasses.replace(spec, scale=(1.0, 1.0), ratio=(1.0, 1.0)), m, s, g)
                 for c, spec in zip(streamed, run.specs)]
        return _finish_batch(run, views, idx)
    if streamed is not None:
        x = streamed.to(device, non_blocking=True)
    elif run.data_x is None:
        raise TypeError("a streamed training set needs its decoded batch")
    elif run.data_x.device.type == device.type:  # on the device already (or both on the CPU)
        x = run.data_x[idx.to(run.data_x.device)]
    else:  # did not fit the GPU: pinned host memory, asynchronous copy
        x = run.data_x[idx].pin_memory().to(device, non_blocking=True)
    views = make_views(x, run.specs, run.splits.mean, run.splits.std, g)  # the global batch's views, then this process's rows
    return _finish_batch(run, views, idx)


def _finish_batch(run: _Run, views: list[Tensor], idx: Tensor) -> tuple[list[Tensor], Tensor | None, Tensor]:
    cfg, device = run.cfg, run.device
    if run.world > 1:
        local = cfg.batch_size // run.world
        mine = slice(run.me * local, (run.me + 1) * local)
        views, idx = [v[mine] for v in views], idx[mine]
    if cfg.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    labels = run.splits.train.y[idx].to(device) if run.hooks.uses_labels else None
    return views, labels, idx


def _train_epoch(run: _Run, epoch: int) -> float | PretrainOutcome:
    """One epoch of steps. Returns the sum of its losses, or the outcome when the loss stopped being finite."""
    cfg = run.cfg
    perm = torch.randperm(len(run.splits.train), generator=torch.Generator().manual_seed(derive_seed(run.seed, "epoch", epoch)))
    running = 0.0
    pending: list[Tensor] = []  # per-step losses not yet read on the host
    data, bs = run.splits.train, cfg.batch_size
    steps, pin = [perm[i * bs : (i + 1) * bs] for i in range(run.steps_per_epoch)], run.device.type == "cuda"
    stream: Iterator[Tensor | list[Tensor]] | None = None  # decoded ahead, in order, by the set's workers
    if isinstance(data, StreamSet) and cfg.crops == "worker":
        crops = [CropSpec(v.size, v.scale, v.ratio) for v in run.specs]
        stream = data.crops(steps, crops, seed=derive_seed(run.seed, "crops", epoch), pin=pin)
    elif isinstance(data, StreamSet):
        stream = data.loader(steps, pin=pin)
    for i in range(run.steps_per_epoch):
        views, labels, idx = _batch(run, perm, i, next(stream) if stream is not None else None)
        progress = run.step / max(1, run.total)
        wd = run.hooks.weight_decay_at(progress, cfg.weight_decay) if run.hooks.weight_decay_at is not None else None
        set_hyperparameters(run.opt, lr_at(run.step, run.total, run.warmup, base_lr(cfg), cfg.min_lr), base_lr(cfg), wd)
        try:
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
                loss = run.hooks.loss(run.method, views, progress, labels, idx.to(run.device))
        except RuntimeError as e:  # torch.OutOfMemoryError included
            _reraise_oom(e, run, views)
        pending.append(all_reduce_mean(loss.detach().float().clone()))  # the same on every process; stays on the device
        if run.sync_every == 1 and not _sane(float(pending[-1]), run):  # CPU: stop before the step applies NaNs
            return run.diverged(run.step, float(pending[-1]))
        run.opt.zero_grad(set_to_none=True)
        try:
            loss.backward()  # type: ignore[no-untyped-call]
        except RuntimeError as e:
            _reraise_oom(e, run, views)
        average_gradients(run.params)
        if cfg.clip_grad > 0:
            clip_per_parameter(run.model, cfg.clip_grad)
        run.opt.step()
        run.step += 1
        run.bar.update(1)
        if len(pending) >= run.sync_every or i == run.steps_per_epoch - 1:
            # one host sync for `sync_every` steps: the GPU keeps its queue full in between
            values = torch.stack(pending).tolist()
            first = run.step - len(values)
            pending.clear()
            for k, value in enumerate(values):
                if not _sane(value, run):
                    return run.diverged(first + k, value)
                run.last_finite = value
                running += value
            run.bar.set_postfix(epoch=epoch + 1, loss=f"{values[-1]:.3f}", refresh=False, **run.shown)
    return running


def _board(cfg: PretrainConfig, folder: Path, me: int) -> Any:
    """A TensorBoard writer into `folder` with pretrain.tensorboard on rank 0, else None."""
    if not cfg.tensorboard or me != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("pretrain.tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(folder))


BOARD_SCALARS = ("loss", "std_l2", "rankme", "knn_top1", "knn_top5")  # of a history entry, where present


def _log_board(run: _Run) -> None:
    """The last history entry's scalars, and the lr of the epoch's last step, at step = epoch (`pretrain/<key>`)."""
    if run.board is None:
        return
    entry, cfg = run.history[-1], run.cfg
    epoch = int(entry["epoch"])
    for key in BOARD_SCALARS:
        if key in entry:
            run.board.add_scalar(f"pretrain/{key}", entry[key], epoch)
    run.board.add_scalar("pretrain/lr", lr_at(max(0, run.step - 1), run.total, run.warmup, base_lr(cfg), cfg.min_lr), epoch)
    run.board.flush()


def _save(run: _Run, epochs_done: int) -> None:
    """A checkpoint after `epochs_done` epochs (rank 0 writes): weights, optimiser, position, history, RNG."""
    state = {"model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epochs_done, "step": run.step,
             "history": run.history, "rng_cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()
    if run.me == 0:
        run.ckpts.save(state, epochs_done)
