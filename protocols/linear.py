"""Linear probe: multinomial logistic regression on frozen features, L2 strength chosen on val.

The ssl-transfer / DINOv2 protocol (docs/protocols.md#logistic-regression): C = 1/wd over wd in logspace(-6, 5, 45),
each fit on train and scored on the held-out val split, the best C refit on train + val, and the
test split touched once. The objective is scikit-learn's (mean cross entropy + ||W||² / (2 C n),
bias not penalised), solved full-batch with L-BFGS in torch so that it runs on the encoder's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.config import check, hashed_if_set
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.evaluate.encoder import Encoder, split_features
from benchmark.evaluate.layers import GOYAL_DIMS, check_layers, layer_encoders
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext, classification_rows, topk_accuracy
from benchmark.registry import register_protocol
from benchmark.store.results import Row


@dataclass(frozen=True)
class Config:
    wd_min_exp: float = -6.0  # grid of wd = 1/C: logspace(wd_min_exp, wd_max_exp, grid_points)
    wd_max_exp: float = 5.0
    grid_points: int = 45  # 45 points as ssl-transfer and DINOv2
    max_iter: int = 1000  # L-BFGS iterations per fit (DINOv2: 1000)
    tol: float = 1e-4  # L-BFGS gradient tolerance (scikit-learn's default tol); 1e-6 took 2.7x longer for the same choice
    standardize: bool = True  # z-score features with train statistics before fitting
    # probed layers, one set of rows each (metric suffix _<layer>): out = the encoder's output; conv1, res2..res5
    # (ResNets), block1..block4 (ConvNet), last<k> (ViTs: class tokens of the last k blocks); benchmark/evaluate/layers.py
    layers: tuple[str, ...] = hashed_if_set(("out",))
    layer_dims: int = hashed_if_set(GOYAL_DIMS)  # values a stage map is average-pooled to (Goyal et al. 2019: ~9k)

    def __post_init__(self) -> None:
        check(self.grid_points >= 1, "linear.grid_points must be >= 1")
        check(self.wd_min_exp <= self.wd_max_exp, "linear.wd_min_exp must be <= linear.wd_max_exp")
        check(self.max_iter > 0, "linear.max_iter must be > 0")
        check(self.tol > 0, "linear.tol must be > 0")
        check_layers("linear", self.layers, self.layer_dims)


LARGE = 2**27  # rows x classes above which logits are computed in row chunks and the features are never copied


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, C: float, max_iter: int = 1000, tol: float = 1e-6,
                 init: tuple[Tensor, Tensor] | None = None, shift: Tensor | None = None, scale: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Minimise mean CE(x'W + b, y) + ||W||² / (2 C n) with L-BFGS, x' = (x - shift) / scale (identity when None);
    returns (W (D, K), b (K,)) in the standardised space.

    Above LARGE rows x classes (ImageNet: 1.28M x 1000) the objective is summed over row chunks, each chunk's graph
    freed after its backward, and the standardisation is folded into W (x' W = x (W / scale) - (shift / scale) W):
    memory holds the features once plus one chunk's logits. The same objective; smaller problems take the direct
    path, so their numbers do not change."""
    n, d = x.shape
    W = (init[0].clone() if init else torch.zeros(d, num_classes, dtype=x.dtype, device=x.device)).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(num_classes, dtype=x.dtype, device=x.device)).requires_grad_(True)
    lam = 1.0 / (C * n)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    large = n * num_classes > LARGE
    rows = max(1, LARGE // (4 * num_classes))
    if not large and shift is not None and scale is not None:
        x = (x - shift) / scale  # small: one standardised copy, as the direct path always did

    def logits(xs: Tensor) -> Tensor:
        if not large or shift is None or scale is None:
            return xs @ W + b
        return xs @ (W / scale.view(-1, 1)) + (b - (shift / scale) @ W)

    def closure() -> Tensor:
        opt.zero_grad()
        if not large:
            loss = F.cross_entropy(logits(x), y) + 0.5 * lam * (W * W).sum()
            loss.backward()
            return loss
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        for i in range(0, n, rows):
            part = F.cross_entropy(logits(x[i : i + rows]), y[i : i + rows], reduction="sum") / n
            part.backward()
            total += part.detach()
        reg = 0.5 * lam * (W * W).sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    return W.detach(), b.detach()


def scores_of(x: Tensor, W: Tensor, b: Tensor, shift: Tensor | None, scale: Tensor | None, chunk: int = 65_536) -> Tensor:
    """(x - shift) / scale @ W + b on the CPU, in row chunks (no standardised copy of x)."""
    out = []
    for xs in x.split(chunk):
        xs = (xs - shift) / scale if shift is not None and scale is not None else xs
        out.append((xs @ W + b).cpu())
    return torch.cat(out) if out else torch.zeros(0, W.shape[1])


def c_grid(cfg: Config) -> list[float]:
    """C values, strongest regularisation first (so each fit warm-starts from the previous)."""
    wds = torch.logspace(cfg.wd_min_exp, cfg.wd_max_exp, cfg.grid_points, dtype=torch.float64).tolist()
    return [1.0 / wd for wd in reversed(wds)]


@register_protocol("linear", config=Config, version="1")
def linear(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    del ctx
    torch.manual_seed(seed)
    return [row for suffix, enc in layer_encoders(encoder, cfg.layers, data.image_size, cfg.layer_dims)
            for row in _probe(enc, data, cfg, suffix)]


def _probe(encoder: Encoder, data: Splits, cfg: Config, suffix: str) -> list[Row]:
    """The rows of one layer: val top1 of the picked C, then the test rows."""
    device = getattr(encoder, "device", torch.device("cpu"))
    f = split_features(encoder, data)
    (xtr, ytr), (xva, yva), (xte, yte) = ((x.to(device), y.to(device)) for x, y in (f["train"], f["val"], f["test"]))
    mu = sd = None
    if cfg.standardize:  # applied inside the fits and the scoring: the features are not copied
        mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    k = data.num_classes
    best_c, best_acc, params = None, -1.0, None
    for C in c_grid(cfg):
        params = fit_logistic(xtr, ytr, k, C, cfg.max_iter, cfg.tol, init=params, shift=mu, scale=sd)
        acc = topk_accuracy(scores_of(xva, *params, mu, sd), yva.cpu(), 1)
        if acc > best_acc:  # ties keep the stronger regularisation
            best_c, best_acc = C, acc
    if best_c is None:
        raise ConfigError(f"linear: no C of the grid {list(c_grid(cfg))[:5]} gave a finite validation accuracy")
    trainval = torch.cat([xtr, xva])
    W, b = fit_logistic(trainval, torch.cat([ytr, yva]), k, best_c, cfg.max_iter, cfg.tol, shift=mu, scale=sd)
    del trainval
    scores = scores_of(xte, W, b, mu, sd)
    sel = f"val top1: C={best_c:.4g} of {cfg.grid_points}"
    n = len(ytr) + len(yva)
    return [Row(f"top1{suffix}", best_acc, split="val", selection=sel, n_train=len(ytr)),
            *classification_rows(scores, yte.cpu(), suffix, selection=sel, n_train=n)]
