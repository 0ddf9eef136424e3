"""Few-shot transfer: N-way K-shot episodes with a prototypical classifier on frozen features.

The ssl-transfer protocol (docs/protocols.md#few-shot; Ericsson et al. 2021, https://arxiv.org/abs/2011.13377,
`few_shot.py` in https://github.com/linusericsson/ssl-transfer), with the classifier of Prototypical
Networks (Snell et al. 2017, https://arxiv.org/abs/1703.05175) and the 5/20/50 shots of CD-FSL (Guo et
al. 2020, https://arxiv.org/abs/1912.07200). On a transfer dataset (not the pretraining one) each
episode draws `n_way` classes, K support and `n_query` query images per class; the prototype of a class is
the mean of its support features and a query goes to the prototype at the smallest squared Euclidean
distance (softmax over -d). Reported per K: mean accuracy over `episodes` episodes ± 1.96·std/√episodes.
Nothing is trained or selected, so there is no val row. As ssl-transfer, episodes pool every split of
the transfer dataset (`pool="all"`). Differences: features come from images resized to the encoder's input
(ssl-transfer: 224 px resize+crop); std uses n-1 (ssl-transfer: np.std, n; a factor 0.9992 at 600 episodes);
classes with fewer than K+n_query images are left out for that K; accuracies are fractions, not percent.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from benchmark.config import DataConfig, check, nohash
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.evaluate.encoder import Encoder, extract_features
from benchmark.evaluate.protocol import NO_CONTEXT, EvalContext, spread, transfer_splits
from benchmark.registry import DATASETS, register_protocol
from benchmark.store.results import Row

__all__ = ["Config", "episode_accuracies", "episode_generator", "fewshot", "proto_scores", "run_episodes", "sample_episodes"]

log = logging.getLogger(__name__)

_CHUNK = 2**24  # elements per episode batch (support+query features, or sampling keys): bounds memory


@dataclass(frozen=True)
class Config:
    dataset: str = "digits"  # transfer dataset (any registered name); ssl-transfer: CD-FSL + 11 many-shot sets
    data_root: str | None = nohash(None)  # its folder (None: $SSLBENCH_DATA_<NAME> or the default path)
    pool: str = "all"  # "all" (train+val+test), as ssl-transfer pools every split; "test" keeps to the test split
    n_way: int = 5  # ssl-transfer --n-way
    shots: tuple[int, ...] = (5, 20, 50)  # K; CD-FSL and ssl-transfer report 5, 20 and 50 shots
    n_query: int = 15  # ssl-transfer --n-query
    episodes: int = 600  # ssl-transfer --iter-num
    l2_normalize: bool = False  # ssl-transfer uses raw pooled features; True L2-normalises them first

    def __post_init__(self) -> None:
        close = difflib.get_close_matches(self.dataset, DATASETS.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(DATASETS.names())
        check(self.dataset in DATASETS, f"fewshot.dataset: unknown dataset {self.dataset!r}{hint} known: {known}")
        check(self.pool in ("test", "all"), f"fewshot.pool must be 'test' or 'all', got {self.pool!r}")
        check(self.n_way >= 2, f"fewshot.n_way must be >= 2, got {self.n_way}")
        shots = list(self.shots)
        check(len(shots) > 0 and all(k > 0 for k in shots), f"fewshot.shots must be a non-empty list of ints > 0, got {shots}")
        check(len(set(shots)) == len(shots), f"fewshot.shots has duplicates: {shots}")
        check(self.n_query >= 1, f"fewshot.n_query must be >= 1, got {self.n_query}")
        check(self.episodes >= 1, f"fewshot.episodes must be >= 1, got {self.episodes}")


def proto_scores(support: Tensor, query: Tensor) -> Tensor:
    """Log-softmax over -‖q - c‖² of each query to each class prototype c (mean of its support).

    Args:
        support: (E, W, K, D) features, K per class of each of E episodes.
        query: (E, M, D) features.
    Returns:
        (E, M, W) log-probabilities; argmax = nearest prototype.
    """
    c = support.mean(2)  # (E, W, D)
    d = torch.cdist(query, c, compute_mode="donot_use_mm_for_euclid_dist").pow(2)  # exact, no |a|²-2ab+|b|² cancellation
    return F.log_softmax(-d, dim=-1)


def episode_generator(seed: int, k: int) -> torch.Generator:
    """The episode RNG for run `seed` and K shots: every encoder evaluated with `seed` sees the same episodes."""
    h = hashlib.sha256(f"fewshot-{seed}-{k}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") >> 1)


def sample_episodes(y: Tensor, classes: Tensor, n_way: int, n_per_class: int, episodes: int, g: torch.Generator) -> Tensor:
    """Indices into `y`, (episodes, n_way, n_per_class): `n_way` distinct `classes` per episode, then
    `n_per_class` distinct images of each, all uniformly at random (every class needs >= n_per_class images)."""
    members = [torch.nonzero(y == c).squeeze(1) for c in classes.tolist()]
    table = torch.full((len(members), max(len(m) for m in members)), -1, dtype=torch.int64)  # (C, Nmax), -1 pads
    for i, m in enumerate(members):
        table[i, : len(m)] = m
    way = torch.rand(episodes, len(members), generator=g).argsort(1)[:, :n_way]  # (E, W) rows of `table`
    out = []
    for w in way.split(max(1, _CHUNK // (n_way * table.shape[1]))):
        rows = table[w]  # (e, W, Nmax)
        keys = torch.rand(rows.shape, generator=g).masked_fill_(rows < 0, 2.0)  # padding is never among the smallest
        out.append(rows.gather(2, keys.topk(n_per_class, dim=2, largest=False).indices))
    return torch.cat(out)


def episode_accuracies(f: Tensor, idx: Tensor, k: int) -> Tensor:
    """(E,) query accuracy of each episode. `idx` (E, W, K+Q) indexes rows of `f` (N, D): per class, the
    first `k` are the support, the rest the queries; the class of idx[:, w] is w."""
    _, w, n = idx.shape
    x = f[idx.to(f.device)]  # (E, W, K+Q, D)
    scores = proto_scores(x[:, :, :k], x[:, :, k:].flatten(1, 2))  # (E, W·Q, W)
    target = torch.arange(w, device=f.device).repeat_interleave(n - k)
    return (scores.argmax(-1) == target).float().mean(1).cpu()


def pool_features(encoder: Encoder, splits: Splits, pool: str) -> tuple[Tensor, Tensor]:
    """Features (N, D) and labels (N,) of the episode pool, each split extracted once (cached)."""
    names = ("train", "val", "test") if pool == "all" else ("test",)
    sets = [getattr(splits, s) for s in names]
    f = [extract_features(encoder, images, name=f"{splits.fingerprint}-{s}") for s, images in zip(names, sets)]
    return torch.cat(f), torch.cat([images.y for images in sets])


def run_episodes(f: Tensor, y: Tensor, classes: Tensor, cfg: Config, k: int, g: torch.Generator, progress: bool) -> Tensor:
    """(episodes,) accuracies of `cfg.n_way`-way `k`-shot episodes over `classes`, in memory-bounded batches."""
    idx = sample_episodes(y, classes, cfg.n_way, k + cfg.n_query, cfg.episodes, g)  # drawn before any batching
    batches = idx.split(max(1, _CHUNK // (idx[0].numel() * f.shape[1])))
    bar = tqdm(batches, desc=f"fewshot {k}-shot", disable=not progress, leave=False)
    return torch.cat([episode_accuracies(f, b, k) for b in bar])


def _nothing_fits(cfg: Config, counts: Tensor) -> str:
    where = f"{cfg.dataset} ({cfg.pool} pool{'; pool=all has more images' if cfg.pool == 'test' else ''})"
    sizes = counts[counts > 0].sort(descending=True).values
    if len(sizes) < cfg.n_way:
        return f"fewshot.n_way={cfg.n_way}: {where} has only {len(sizes)} classes"
    c = int(sizes[cfg.n_way - 1])
    nth = f"the smallest of its {cfg.n_way} largest classes has {c} images"
    if c <= cfg.n_query:
        return f"fewshot.n_query={cfg.n_query}: in {where} {nth}, so n_way={cfg.n_way} needs n_query < {c}"
    return (f"fewshot.shots={list(cfg.shots)}: none fits {where}: {nth}, so {cfg.n_way}-way episodes with "
            f"{cfg.n_query} queries allow K <= {c - cfg.n_query} (lower n_query or n_way for more)")


@register_protocol("fewshot", config=Config, version="1")
def fewshot(encoder: Encoder, data: Splits, cfg: Config, seed: int, ctx: EvalContext = NO_CONTEXT) -> list[Row]:
    splits = transfer_splits(cfg.dataset, data, DataConfig(root=cfg.data_root))
    if splits.multilabel:
        raise ConfigError(f"fewshot.dataset={cfg.dataset!r} is multi-label; few-shot episodes need one label per image")
    if cfg.dataset == data.name and cfg.pool == "all":
        log.warning("fewshot: transfer dataset %s is also the pretraining one; pool=all includes pretraining images", cfg.dataset)
    f, y = pool_features(encoder, splits, cfg.pool)
    f = (F.normalize(f, dim=1) if cfg.l2_normalize else f).to(ctx.device)
    counts = torch.bincount(y, minlength=splits.num_classes)
    sel = f"prototypes, {cfg.episodes} episodes, {cfg.n_way}-way {cfg.n_query} queries"
    rows = []
    for k in cfg.shots:
        classes = torch.nonzero(counts >= k + cfg.n_query).squeeze(1)
        if len(classes) < cfg.n_way:
            log.warning("fewshot: skipping %d-shot: only %d classes of %s have %d+%d images (n_way=%d)",
                        k, len(classes), cfg.dataset, k, cfg.n_query, cfg.n_way)
            continue
        skipped = int((counts > 0).sum()) - len(classes)
        if skipped:
            log.warning("fewshot: %d-shot episodes leave out %d classes of %s with fewer than %d images",
                        k, skipped, cfg.dataset, k + cfg.n_query)
        s = spread(run_episodes(f, y, classes, cfg, k, episode_generator(seed, k), ctx.progress))
        extra = {"transfer": cfg.dataset, "pool": cfg.pool, **({"skipped_classes": skipped} if skipped else {})}
        rows.append(Row(f"top1_{k}shot", s.mean, selection=sel, n_train=k * cfg.n_way, ci95=s.ci95, std=s.std,
                        min=s.min, max=s.max, extra=extra))
    if not rows:
        raise ConfigError(_nothing_fits(cfg, counts))
    return rows
