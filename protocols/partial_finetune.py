"""Partial fine-tuning: the last k blocks of the encoder plus a linear head trained, the rest frozen (docs/protocols.md#partial-fine-tuning).

MAE (He et al. 2021, https://arxiv.org/abs/2111.06377, fig. 9) fine-tunes the last k of ViT-L's 24 blocks, k = 0
being a linear probe, and finds k = 1 closes most of the gap to full fine-tuning. Per k of `blocks`, a trainable
copy of the encoder has its last k blocks (`benchmark.backbones.finetune_blocks`: ViT transformer blocks, with the
final norm trained along when k > 0; ResNet residual blocks, or stages with `unit: stage`; ConvNet stages) trained
in train mode, and everything before them frozen: no gradients and eval mode, so its BN statistics never move. k =
all blocks trains the whole backbone, stem included (MAE's "full" point) and is `finetune` exactly. Each k runs
`finetune`'s machinery (`protocols.semisup.finetune_rows`): every lr x head-lr multiplier on train, the best on val
top1 tested once, rows `top1_k{k}`, `top5_k{k}`, `mean_class_acc_k{k}`; the selection note names what was trained.
Recipe: `finetune`'s, VISSL's full fine-tune (SGD Nesterov, lr 0.1 x batch/256, 105 epochs, x0.1 at 30/60/90/100),
not MAE's AdamW + layer decay, so that a k row and the `finetune` row differ only in what is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from benchmark.backbones import finetune_blocks
from benchmark.config import check
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.evaluate.encoder import Encoder
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext
from benchmark.registry import register_protocol
from benchmark.store.results import Row
from protocols.finetune import Config as FinetuneConfig
from protocols.semisup import finetune_rows

__all__ = ["Config", "PartiallyFrozen", "partial_finetune", "trained_part"]


@dataclass(frozen=True)
class Config(FinetuneConfig):
    """`finetune`'s recipe (VISSL full fine-tune; fields documented on `Tuning` and `finetune.Config`) per k."""

    blocks: tuple[int, ...] = (0, 1, 2, 4)  # k: the last k blocks trained, one set of rows each (MAE fig. 9: 0 ... 24)
    # what k counts on a torchvision ResNet: "block" = residual blocks (as MAE counts transformer blocks; ResNet-50
    # has 16) or "stage" = layer1 ... layer4; ConvNets and ViTs have one kind of block
    unit: Literal["block", "stage"] = "block"

    def __post_init__(self) -> None:
        check(len(self.blocks) > 0 and all(isinstance(k, int) and k >= 0 for k in self.blocks),
              f"partial_finetune.blocks must be non-empty integers >= 0, got {self.blocks}")
        check(len(set(self.blocks)) == len(self.blocks), f"partial_finetune.blocks has duplicates: {self.blocks}")
        check(self.unit in ("block", "stage"), f"partial_finetune.unit must be block or stage, got {self.unit!r}")
        check(self.epochs > 0, f"partial_finetune.epochs must be > 0, got {self.epochs}")
        check(self.weight_decay >= 0, f"partial_finetune.weight_decay must be >= 0, got {self.weight_decay}")
        self.check_tuning("partial_finetune")


def trained_part(net: nn.Module, k: int, unit: Literal["block", "stage"]) -> tuple[list[nn.Module], str]:
    """The modules of `net` that learn when its last k blocks are fine-tuned, and a note saying what they are.

    k = 0: none. 0 < k < n: the last k blocks and what follows them (a ViT's final norm). k = n: all of `net`.

    Raises:
        ConfigError: k is more than the n blocks of `net`.
        NotApplicable: `net` has no blocks.
    """
    b = finetune_blocks(net, unit)
    n = len(b.blocks)
    if k > n:
        raise ConfigError(f"partial_finetune.blocks: k={k} is more than the {n} {b.kind}s of this {type(net).__name__}; "
                          f"use values in 0..{n}")
    if k == n:
        return [net], f"trained: the whole backbone (all {n} {b.kind}s and what precedes them)"
    if k == 0:
        return [], f"trained: the head only (all {n} {b.kind}s frozen)"
    after = [m for m in b.after if list(m.parameters())]
    tail = f" + {', '.join(type(m).__name__ for m in after)} after them" if after else ""
    return [*b.blocks[n - k :], *after], f"trained: last {k} of {n} {b.kind}s{tail}"


class PartiallyFrozen(nn.Module):
    """`net` with only the `trained` modules learning; the rest has no gradients and stays in eval mode."""

    def __init__(self, net: nn.Module, trained: list[nn.Module]) -> None:
        super().__init__()
        self.net = net
        self.trained = tuple(trained)  # a tuple: not registered a second time (they are `net`'s own)
        net.requires_grad_(False)
        for m in self.trained:
            m.requires_grad_(True)

    def train(self, mode: bool = True) -> PartiallyFrozen:
        super().train(mode)
        if mode:  # frozen BN layers normalise with their running statistics and never update them
            self.net.eval()
            for m in self.trained:
                m.train()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class _LastBlocks:
    """`encoder`, whose trainable copies learn only in their last k blocks: what `finetune_rows` fine-tunes per k."""

    def __init__(self, encoder: Encoder, k: int, unit: Literal["block", "stage"]) -> None:
        self.encoder, self.k, self.unit = encoder, k, unit
        self.dim, self.mean, self.std = encoder.dim, encoder.mean, encoder.std

    def features(self, x: Tensor) -> Tensor:
        return self.encoder.features(x)

    def trainable_copy(self) -> nn.Module:
        net = self.encoder.trainable_copy()
        return PartiallyFrozen(net, trained_part(net, self.k, self.unit)[0])


@register_protocol("partial_finetune", config=Config, version="1")
def partial_finetune(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    if data.multilabel:
        raise ValueError("partial_finetune needs one label per image; use a multi-label protocol for this dataset")
    probe = encoder.trainable_copy()
    notes = {k: trained_part(probe, k, cfg.unit)[1] for k in cfg.blocks}  # every k checked before any training
    del probe
    recipe = cfg.recipe(cfg.epochs, cfg.weight_decay)
    rows: list[Row] = []
    for k in cfg.blocks:
        rows += finetune_rows(_LastBlocks(encoder, k, cfg.unit), data.train, data, cfg, recipe, seed, ctx,
                              suffix=f"_k{k}", note=notes[k], name="partial_finetune")
    return rows
