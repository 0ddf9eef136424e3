"""kNN on frozen features: DINO's weighted vote (Caron et al. 2021, `eval_knn.py`), k=20, T=0.07.

Variants: `knn` (DINO, k=20, T=0.07) and `knn_instdisc` (InstDisc/NPID, VISSL and lightly: k=200, T=0.1).

Features are L2-normalised; each of the k nearest training samples votes for its class with weight
exp(cos / T). The bank is train + val (nothing is selected on val: k and T are fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmark.config import check
from benchmark.data.sets import Splits
from benchmark.evaluate.encoder import Encoder, split_features
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext, classification_rows, topk_accuracy
from benchmark.registry import register_protocol
from benchmark.store.results import Row
from benchmark.train.monitors import BANK_CHUNK, knn_predict

__all__ = ["BANK_CHUNK", "Config", "InstDiscConfig", "knn", "knn_predict", "topk_accuracy"]


@dataclass(frozen=True)
class Config:
    k: int = 20  # DINO: "20 usually works the best"; InstDisc/lightly use 200
    temperature: float = 0.07  # DINO; InstDisc/lightly use 0.1

    def __post_init__(self) -> None:
        check(self.k > 0, f"knn.k must be > 0, got {self.k}")
        check(self.temperature > 0, f"knn.temperature must be > 0, got {self.temperature}")


@register_protocol("knn", config=Config, version="1")
def knn(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    del seed, ctx  # deterministic, writes nothing
    f = split_features(encoder, data)
    bank_f, bank_y = [f["train"][0], f["val"][0]], torch.cat([f["train"][1], f["val"][1]])  # features not copied
    k = min(cfg.k, len(bank_y))  # the vote cannot use more neighbours than the bank holds: say which k was used
    scores = knn_predict(bank_f, bank_y, f["test"][0], k, cfg.temperature, data.num_classes)
    sel = f"fixed k={k} T={cfg.temperature}" + (f" (k={cfg.k} asked; the bank holds {k})" if k < cfg.k else "")
    return classification_rows(scores, f["test"][1], selection=sel, n_train=len(bank_y))


@dataclass(frozen=True)
class InstDiscConfig(Config):
    """The InstDisc/NPID variant (VISSL NEAREST_NEIGHBOR, lightly's ResNet benchmarks): k=200, T=0.1."""

    k: int = 200
    temperature: float = 0.1


register_protocol("knn_instdisc", config=InstDiscConfig, version="1")(knn)
