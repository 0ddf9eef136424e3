"""kNN on frozen features: DINO's weighted vote (Caron et al. 2021, `eval_knn.py`), k=20, T=0.07.

Variants: `knn` (DINO, k=20, T=0.07) and `knn_instdisc` (InstDisc/NPID, VISSL and lightly: k=200, T=0.1).

Features are L2-normalised; each of the k nearest training samples votes for its class with weight
exp(cos / T). The bank is train + val (nothing is selected on val: k and T are fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.config import check
from benchmark.data.sets import Splits
from benchmark.evaluate.encoder import Encoder, split_features
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext, topk_accuracy
from benchmark.registry import register_protocol
from benchmark.store.results import Row

__all__ = ["Config", "InstDiscConfig", "knn", "knn_predict", "topk_accuracy"]


@dataclass(frozen=True)
class Config:
    k: int = 20  # DINO: "20 usually works the best"; InstDisc/lightly use 200
    temperature: float = 0.07  # DINO; InstDisc/lightly use 0.1

    def __post_init__(self) -> None:
        check(self.k > 0, f"knn.k must be > 0, got {self.k}")
        check(self.temperature > 0, f"knn.temperature must be > 0, got {self.temperature}")


def knn_predict(train_f: Tensor, train_y: Tensor, test_f: Tensor, k: int, t: float, num_classes: int, chunk: int = 1024) -> Tensor:
    """Class scores (M, num_classes) of `test_f` (M, D) by a weighted vote of the k nearest `train_f` (N, D)."""
    train_f = F.normalize(train_f, dim=1)
    k = min(k, len(train_f))
    out = []
    for q in F.normalize(test_f, dim=1).split(chunk):
        sim, idx = (q @ train_f.T).topk(k, dim=1)  # (m, k)
        w = (sim / t).exp()
        out.append(torch.zeros(len(q), num_classes, dtype=w.dtype).scatter_add_(1, train_y[idx], w))
    return torch.cat(out)


@register_protocol("knn", config=Config, version="1")
def knn(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    del seed, ctx  # deterministic, writes nothing
    f = split_features(encoder, data)
    bank_f, bank_y = torch.cat([f["train"][0], f["val"][0]]), torch.cat([f["train"][1], f["val"][1]])
    k = min(cfg.k, len(bank_y))  # the vote cannot use more neighbours than the bank holds: say which k was used
    scores = knn_predict(bank_f, bank_y, f["test"][0], k, cfg.temperature, data.num_classes)
    sel = f"fixed k={k} T={cfg.temperature}" + (f" (k={cfg.k} asked; the bank holds {k})" if k < cfg.k else "")
    rows = [Row("top1", topk_accuracy(scores, f["test"][1], 1), selection=sel, n_train=len(bank_y))]
    if data.num_classes > 5:
        rows.append(Row("top5", topk_accuracy(scores, f["test"][1], 5), selection=sel, n_train=len(bank_y)))
    return rows


@dataclass(frozen=True)
class InstDiscConfig(Config):
    """The InstDisc/NPID variant (VISSL NEAREST_NEIGHBOR, lightly's ResNet benchmarks): k=200, T=0.1."""

    k: int = 200
    temperature: float = 0.1


register_protocol("knn_instdisc", config=InstDiscConfig, version="1")(knn)
