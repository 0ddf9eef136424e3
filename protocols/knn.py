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
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext, classification_rows, topk_accuracy
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


BANK_CHUNK = 65_536  # bank rows compared at once: similarities stay (queries x BANK_CHUNK), whatever the bank's size


def knn_predict(train_f: Tensor | list[Tensor], train_y: Tensor, test_f: Tensor, k: int, t: float, num_classes: int,
                chunk: int = 1024) -> Tensor:
    """Class scores (M, num_classes) of `test_f` (M, D) by a weighted vote of the k nearest of the bank `train_f`
    (N, D), or of the bank given as parts (e.g. [train, val], never concatenated), labels `train_y` (N,).

    Out of core: the bank is normalised and compared BANK_CHUNK rows at a time, keeping a running top-k, so memory
    holds the bank once plus (chunk x BANK_CHUNK) similarities (ImageNet's 1.28M-image bank included). A bank of
    one chunk takes the direct path."""
    given = [train_f] if isinstance(train_f, Tensor) else list(train_f)
    n = sum(len(p_) for p_ in given)
    parts = [torch.cat(given)] if n <= BANK_CHUNK else [c for part in given for c in part.split(BANK_CHUNK)]
    k = min(k, n)
    out = []
    for q in F.normalize(test_f, dim=1).split(chunk):
        if len(parts) == 1:
            sim, idx = (q @ F.normalize(parts[0], dim=1).T).topk(k, dim=1)  # (m, k)
        else:
            sim = torch.empty(len(q), 0, dtype=q.dtype)
            idx = torch.empty(len(q), 0, dtype=torch.int64)
            start = 0
            for part in parts:
                s_, i_ = (q @ F.normalize(part, dim=1).T).topk(min(k, len(part)), dim=1)
                sim, pos = torch.cat([sim, s_], 1).topk(min(k, sim.shape[1] + s_.shape[1]), dim=1)
                idx = torch.cat([idx, i_ + start], 1).gather(1, pos)
                start += len(part)
        w = (sim / t).exp()
        out.append(torch.zeros(len(q), num_classes, dtype=w.dtype).scatter_add_(1, train_y[idx], w))
    return torch.cat(out)


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
