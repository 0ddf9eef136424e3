"""The contract between a method plugin and the pretraining loop: one `typing.Protocol` naming every member the loop
may use, and `Hooks`, the one adapter through which the loop reads the optional ones.

A method is an `nn.Module` registered with `@register_method(name, config=Config)` and built as `cls(backbone, cfg)`.
The loop (`benchmark.train.pretrain`) calls, in order: `views` once; then per epoch `before_epoch` (if defined) and
per step `weight_decay_at` (if defined) and `loss`; `encoder` for each epoch's collapse statistics and at the end.
`param_groups` is read once when the optimiser is built. All state a method keeps between steps (EMA copies, queues,
memory banks, cluster assignments) must live in parameters or buffers, so that checkpoints restore it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from benchmark.data.augment import ViewSpec
from benchmark.data.sets import Splits


class Method(Protocol):
    """Every member the pretraining loop may use. The first three are required; the rest are optional: a method
    that leaves one out gets the default stated in its docstring (see `Hooks`)."""

    # ----------------------------------------------------------------- required

    def views(self, image_size: int) -> list[ViewSpec]:
        """Called once before training with the dataset's image side. Returns one `ViewSpec` per view a step needs
        (crop scale, flips, colour, blur, size); the loop draws them per sample on the device and passes the
        normalised batches to `loss` in this order. An empty list only for methods that are not trained."""
        ...

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None, **extra: Tensor) -> Tensor:
        """Called once per step, in train mode, under autocast on CUDA. `views`: the tensors of `views()`, each
        (N, C, h, w); `progress` = step / total steps in [0, 1) (drives momentum, temperature and other schedules);
        `labels`: (N,) only when `uses_labels`, else None; `indices=` (N,) training-set positions only when
        `uses_indices`. Returns the scalar loss; the loop calls `backward()` on it. EMA and queue updates happen here,
        under `torch.no_grad()`."""
        ...

    def encoder(self) -> nn.Module:
        """What the protocols evaluate: a module with an integer `dim` mapping (N, C, H, W) to (N, dim) features
        (usually the backbone; DINO's teacher, CMC's two halves). Called after every epoch (collapse statistics) and
        once at the end; its `state_dict` is what `encoder.safetensors` holds."""
        ...

    # ----------------------------------------------------------------- optional

    uses_labels: bool
    """Default False. True: `loss` receives the batch's labels (the supervised baseline only)."""

    uses_indices: bool
    """Default False. True: `loss` receives `indices=`, each sample's index into the training set (memory banks)."""

    trainable: bool
    """Default True. False: the loop does not train it (the random and pixel baselines); `encoder()` is saved as
    built."""

    sync_bn: bool
    """Default False. True: under multi-GPU DDP, BatchNorm layers become SyncBatchNorm (statistics over the global
    batch, as the method's official code)."""

    loss_bound: float
    """Default `LOSS_BOUND` (1e6). A loss whose magnitude exceeds it is not a sane loss for this method: the run ends
    `diverged`, like a NaN. Declare a tighter bound where the loss has one (a negative cosine lies in [-2, 2])."""

    def before_epoch(self, epoch: int, splits: Splits, device: torch.device, seed: int) -> None:
        """Default: nothing. Called at the start of every epoch (0-based `epoch`) with the whole dataset and a seed
        derived from (run seed, epoch): clustering (DeepCluster, PCL), statistics of the data. The loop puts the model
        back in train mode afterwards."""
        ...

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Default: `benchmark.train.optim.param_groups` (no decay on biases and norms). Called once, when the
        optimiser is built. Each group has `params` and `weight_decay`, and may set `lr_mult` (scale of the scheduled
        lr), `fixed_lr` (the lr stays at its peak) and `lars` (False: no LARS adaptation)."""
        ...

    def weight_decay_at(self, progress: float, base: float) -> float:
        """Default: the configured weight decay throughout. Called every step with `progress` in [0, 1) and the
        configured value; returns the weight decay for this step (DINO's cosine 0.04 -> 0.4)."""
        ...


REQUIRED = ("views", "loss", "encoder")
# no method's loss comes near it at sane settings (Barlow Twins' 8192-wide matrix starts at about 1e4); a learning rate
# 1e6 too large drives supervised cross-entropy to 3e16 while staying finite
LOSS_BOUND = 1e6


@dataclass(frozen=True)
class Hooks:
    """The optional members of one method, read once, with their defaults where the method leaves them out."""

    uses_labels: bool = False
    uses_indices: bool = False
    trainable: bool = True
    sync_bn: bool = False
    loss_bound: float = LOSS_BOUND
    before_epoch: Callable[[int, Splits, torch.device, int], None] | None = None
    param_groups: Callable[[float], list[dict[str, Any]]] | None = None
    weight_decay_at: Callable[[float, float], float] | None = None

    @classmethod
    def of(cls, model: Any) -> Hooks:
        """The optional members `model` (a method instance or class) defines, the defaults for the others. Raises
        TypeError when a flag is not a bool or a hook is not callable."""
        name = _name(model)
        found: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = getattr(model, f.name, None)
            if value is None:
                continue
            if f.name == "loss_bound":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise TypeError(f"method {name}: loss_bound must be a positive number, got {value!r}")
                found[f.name] = float(value)
                continue
            is_flag = f.default is not None
            if is_flag and not isinstance(value, bool):
                raise TypeError(f"method {name}: {f.name} must be True or False, got {value!r}")
            if not is_flag and not callable(value):
                raise TypeError(f"method {name}: {f.name} must be a method, got {type(value).__name__}")
            found[f.name] = value
        return cls(**found)

    def loss(self, method: Method, views: list[Tensor], progress: float, labels: Tensor | None, indices: Tensor) -> Tensor:
        """One call of `method.loss` with what this method asked for (labels, indices)."""
        if self.uses_indices:
            return method.loss(views, progress, labels, indices=indices)
        return method.loss(views, progress, labels)


def check_method(model: Any) -> Hooks:
    """`model`'s hooks, after checking that it has the required members; a missing one raises TypeError naming it."""
    missing = [m for m in REQUIRED if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(f"method {_name(model)} lacks {', '.join(f'{m}()' for m in missing)}: see benchmark.train.method.Method")
    return Hooks.of(model)


def _name(model: Any) -> str:
    return type(model).__name__ if isinstance(model, nn.Module) else str(getattr(model, "__name__", repr(model)))
