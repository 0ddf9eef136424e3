"""Full fine-tuning: the whole encoder plus a linear head trained on all train labels (the ceiling of `semisup`).

The machinery of protocols/semisup.py (docs/protocols.md#semi-supervised) on 100% of `data.train`: a trainable copy of the
encoder and a linear head are fine-tuned with random resized crop + flip; every lr x head-lr multiplier is
scored on the val split and the best one is tested once (no refit on train + val). Default = VISSL
`fulltune/imagenet1k/eval_resnet_8gpu_transfer_in1k_fulltune.yaml`: SGD Nesterov m=0.9, lr 0.1 x batch/256,
wd 0, 105 epochs, x0.1 at epochs 30, 60, 90 and 100, batch 256 (8 x 32), head at PyTorch's default init.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.config import check
from benchmark.data.sets import Splits
from benchmark.evaluate.encoder import Encoder
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext
from benchmark.registry import register_protocol
from benchmark.store.results import Row
from protocols.semisup import Tuning, finetune_rows

__all__ = ["Config", "finetune"]


@dataclass(frozen=True)
class Config(Tuning):
    """VISSL's full fine-tune; the fields shared with `semisup` are documented on `Tuning`."""

    lrs: tuple[float, ...] = (0.1,)  # base lr per batch 256, picked on val (VISSL fulltune: 0.1)
    milestones: tuple[float, ...] = (30 / 105, 60 / 105, 90 / 105, 100 / 105)  # VISSL: x0.1 at epochs 30, 60, 90, 100
    epochs: int = 105  # VISSL fulltune in1k
    weight_decay: float = 0.0  # VISSL fulltune in1k

    def __post_init__(self) -> None:
        check(self.epochs > 0, f"finetune.epochs must be > 0, got {self.epochs}")
        check(self.weight_decay >= 0, f"finetune.weight_decay must be >= 0, got {self.weight_decay}")
        self.check_tuning("finetune")


@register_protocol("finetune", config=Config, version="1", label_efficiency=1.0)
def finetune(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    if data.multilabel:
        raise ValueError("finetune needs one label per image; use a multi-label protocol for this dataset")
    return finetune_rows(encoder, data.train, data, cfg, cfg.recipe(cfg.epochs, cfg.weight_decay), seed, ctx, name="finetune")
