"""Jigsaw puzzles: Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving Jigsaw
Puzzles", https://arxiv.org/abs/1603.09246; official code https://github.com/MehdiNoroozi/JigsawPuzzleSolver
(Caffe: `train_val_cfn_jps.prototxt`, `data_transformer.cpp`). Scaled up in Goyal et al. 2019, "Scaling and
Benchmarking Self-Supervised Visual Representation Learning", https://arxiv.org/abs/1905.01235 (VISSL:
`configs/config/pretrain/jigsaw/`).

The image is cut into a 3x3 grid of cells; one tile is taken from each cell at a random offset (the gap keeps
tiles from sharing edges, a shortcut) and has its own mean removed. The tiles are shuffled by one permutation
out of a fixed set, chosen greedily for maximal average Hamming distance; the SAME backbone encodes every
tile (the context-free network), a per-tile layer (fc6) maps each to a vector, the 9 vectors are
concatenated in shuffled order, and an MLP (fc7, fc8) predicts the index of the permutation: cross entropy.
Protocols evaluate the backbone on whole images.

Where the official code differs from the paper, the code is followed:
- tiles are 64 px in 85 px cells of a 255 px crop (`jitter_size: 21`), a gap of 25% of the cell; the paper
  text says 64 px in 75 px cells of 225 px;
- each tile loses its per-channel mean only (`mean_values_[c]` computed over the patch); the paper text says
  mean and standard deviation (`tile_norm: mean_std`);
- the shipped training uses 100 permutations (`permutations_100_max.bin`); the paper's ablation also tries
  1000, and VISSL uses 2000 / 10000.
Not reproduced: dropout 0.5 after fc6 and fc7 (a BatchNorm is used instead, as in VISSL's jigsaw head), and the
official step schedule (the shared loop's cosine is used).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.registry import register_method
from benchmark.train.heads import mlp


@dataclass(frozen=True)
class Config:
    n_permutations: int = 100  # classes of the puzzle (official `permutations_100_max.bin`)
    grid: int = 3  # cells per side (paper and official code: 3x3 = 9 tiles)
    gap_fraction: float = 0.25  # room for the tile's random offset, as a fraction of the cell (official 21/85)
    tile_norm: Literal["none", "mean", "mean_std"] = "mean"  # per tile and channel (official: mean; paper: mean_std)
    tile_dim: int = 1024  # fc6, the per-tile layer shared by all tiles (official `fc6_s*`: 1024)
    hidden_dim: int = 4096  # fc7 on the concatenated tiles (official: 4096)
    perm_seed: int = 0  # draws the first permutation of the greedy selection (paper algorithm 1: at random)
    # Official: a centred 255 px crop, no flip; VISSL: resize 256 + random 255 crop + flip. Here: a square crop of
    # 75-100% of the area, resized, plus flip, a mild augmentation for small datasets.
    min_scale: float = 0.75
    gray_p: float = 0.66  # RGB only: grayscale against chromatic-aberration shortcuts (VISSL; the Caffe code: none)

    def __post_init__(self) -> None:
        check(self.grid in (2, 3), f"jigsaw.grid must be 2 or 3 (all (grid^2)! permutations are searched), got {self.grid}")
        n_max = math.factorial(self.grid**2)
        check(2 <= self.n_permutations <= n_max, f"jigsaw.n_permutations must be in [2, {n_max}], got {self.n_permutations}")
        check(0 <= self.gap_fraction < 1, f"jigsaw.gap_fraction must be in [0, 1), got {self.gap_fraction}")
        check(self.tile_norm in ("none", "mean", "mean_std"), f"jigsaw.tile_norm must be none, mean or mean_std, got {self.tile_norm!r}")
        check(self.tile_dim > 0 and self.hidden_dim > 0, "jigsaw.tile_dim and jigsaw.hidden_dim must be > 0")
        check(0 < self.min_scale <= 1, f"jigsaw.min_scale must be in (0, 1], got {self.min_scale}")
        check(0 <= self.gray_p <= 1, f"jigsaw.gray_p must be in [0, 1], got {self.gray_p}")


@functools.lru_cache(maxsize=8)
def _all_permutations(n_tiles: int) -> np.ndarray:
    """(n_tiles, n_tiles!) uint8: column c is the c-th permutation in lexicographic order (position-major, so
    that the greedy below runs as n_tiles vectorised byte comparisons)."""
    return np.ascontiguousarray(np.array(list(itertools.permutations(range(n_tiles))), dtype=np.uint8).T)


@functools.lru_cache(maxsize=8)
def hamming_permutations(n: int, n_tiles: int = 9, seed: int = 0) -> Tensor:
    """The fixed permutation set: greedy selection for maximal average Hamming distance (paper, algorithm 1).

    The first permutation is drawn uniformly from all n_tiles! with `seed`; each next one is the permutation,
    among those not yet chosen, with the largest SUM of Hamming distances (positions that differ) to the
    chosen set; ties go to the first in lexicographic order, so the set is a pure function of the arguments.
    The identity gets no special treatment: it is in the set only if the greedy picks it, and then it is an
    ordinary class (the puzzle shown unshuffled). For the defaults (100 of 9!, seed 0) it is picked second,
    as the permutation farthest from the first, and the set's smallest pairwise distance is 2. Cached: callers
    must not modify the returned tensor in place.

    Returns:
        (n, n_tiles) long, row k listing, for each position, the cell whose tile is shown there.
    """
    every = _all_permutations(n_tiles)  # (n_tiles, n_tiles!)
    total = np.zeros(every.shape[1], dtype=np.int64)  # sum of distances to the chosen set; -inf-like once chosen
    j = int(torch.randint(every.shape[1], (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = []
    for _ in range(n):
        chosen.append(j)
        dist = np.zeros(every.shape[1], dtype=np.uint8)
        for p in range(n_tiles):
            dist += every[p] != every[p, j]
        total += dist
        total[j] = np.iinfo(np.int64).min // 2  # never chosen twice
        j = int(total.argmax())  # argmax returns the first of equal maxima: the lexicographically first
    return torch.from_numpy(every[:, chosen].T.astype(np.int64))


def tile_geometry(image_size: int, grid: int, gap_fraction: float) -> tuple[int, int]:
    """(cell, tile) side lengths in pixels: cells of image_size // grid px (the remainder at the bottom and
    right is unused), tiles of cell - round(gap_fraction * cell) px (28 px, 3x3, 0.25: cells 9, tiles 7)."""
    cell = image_size // grid
    tile = cell - math.floor(gap_fraction * cell + 0.5)
    check(tile >= 1, f"jigsaw: {image_size} px images give empty {grid}x{grid} tiles; lower jigsaw.grid or gap_fraction")
    return cell, tile


def jigsaw_tiles(x: Tensor, order: Tensor, offsets: Tensor, grid: int, cell: int, tile: int) -> Tensor:
    """Cut every image into tiles and lay them out in shuffled order.

    Args:
        x: (N, C, S, S) images, S >= grid * cell.
        order: (N, T) long, T = grid^2: position j of image n shows the tile of cell order[n, j]; cells are
            numbered row-major (cell c spans rows (c // grid) * cell + [0, cell), columns (c % grid) * cell + ...).
        offsets: (N, T, 2) long in [0, cell - tile]: (row, column) of the tile inside its cell, per position.

    Returns:
        (N, T, C, tile, tile): out[n, j] = x[n, :, r:r + tile, q:q + tile] with
        r = (order[n, j] // grid) * cell + offsets[n, j, 0] and q = (order[n, j] % grid) * cell + offsets[n, j, 1].
    """
    r0 = (order // grid) * cell + offsets[..., 0]  # (N, T)
    q0 = (order % grid) * cell + offsets[..., 1]
    span = torch.arange(tile, device=x.device)
    rows = (r0[..., None] + span)[..., :, None]  # (N, T, tile, 1)
    cols = (q0[..., None] + span)[..., None, :]  # (N, T, 1, tile)
    n = torch.arange(len(x), device=x.device).view(-1, 1, 1, 1)
    return x.permute(0, 2, 3, 1)[n, rows, cols].permute(0, 1, 4, 2, 3)  # (N, T, tile, tile, C) -> (N, T, C, tile, tile)


def normalize_tiles(tiles: Tensor, mode: str, eps: float = 1e-5) -> Tensor:
    """Per tile and channel: remove the mean (`mean`, official code), also divide by the standard deviation
    (`mean_std`, the paper's text: against low-level statistics shortcuts), or leave as is (`none`, VISSL).
    tiles: (..., C, H, W)."""
    if mode == "none":
        return tiles
    centred = tiles - tiles.mean(dim=(-2, -1), keepdim=True)
    if mode == "mean":
        return centred
    return centred / torch.sqrt(tiles.var(dim=(-2, -1), unbiased=False, keepdim=True) + eps)


def jigsaw_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross entropy over the permutation set, averaged over the batch.

    Args:
        logits: (N, P) scores of the P permutations.
        target: (N,) long, the index of the permutation each puzzle was shuffled with.
    """
    return F.cross_entropy(logits.float(), target)


# VISSL's ResNet-50 recipe (jigsaw_8gpu_resnet.yaml): SGD lr 0.1 per 256, weight decay 1e-4, 5 warm-up epochs
# of 105. The official CaffeNet (no BatchNorm) used lr 0.01, weight decay 5e-4, batch 256.
@register_method("jigsaw", config=Config, pretrain=dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, warmup_epochs=5))
class Jigsaw(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        n_tiles = cfg.grid**2
        # A buffer, so checkpoints carry the exact set the head's classes refer to.
        self.register_buffer("permutations", hamming_permutations(cfg.n_permutations, n_tiles, cfg.perm_seed).clone())
        dim: int = backbone.dim  # type: ignore[assignment]
        self.tile_fc = nn.Sequential(nn.Linear(dim, cfg.tile_dim, bias=False), nn.BatchNorm1d(cfg.tile_dim), nn.ReLU(inplace=True))
        self.head = mlp(n_tiles * cfg.tile_dim, cfg.hidden_dim, cfg.n_permutations)  # fc7 (Linear-BN-ReLU), fc8

    def views(self, image_size: int) -> list[ViewSpec]:
        tile_geometry(image_size, self.cfg.grid, self.cfg.gap_fraction)  # fail early on images too small to cut
        return [ViewSpec(size=image_size, scale=(self.cfg.min_scale, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=self.cfg.gray_p)]

    def puzzles(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Shuffled, normalised tiles (N, T, C, tile, tile) and permutation indices (N,), drawn from torch's
        global generator (the loop checkpoints its state, so resumed runs draw the same puzzles)."""
        cfg, n = self.cfg, len(x)
        cell, tile = tile_geometry(x.shape[-1], cfg.grid, cfg.gap_fraction)
        perms: Tensor = self.permutations  # type: ignore[assignment]
        target = torch.randint(len(perms), (n,), device=x.device)
        offsets = torch.randint(cell - tile + 1, (n, perms.shape[1], 2), device=x.device)  # official: rand() % (jitter + 1)
        tiles = jigsaw_tiles(x, perms[target], offsets, cfg.grid, cell, tile)
        return normalize_tiles(tiles, cfg.tile_norm), target

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: one (N, C, S, S) crop; all N x T tiles go through the backbone in one batch."""
        tiles, target = self.puzzles(views[0])
        n, t = tiles.shape[:2]
        h = self.tile_fc(self.backbone(tiles.flatten(0, 1)))  # (N T, tile_dim)
        return jigsaw_loss(self.head(h.reshape(n, t * h.shape[1])), target)  # concatenated in shuffled order

    def encoder(self) -> nn.Module:
        return self.backbone
