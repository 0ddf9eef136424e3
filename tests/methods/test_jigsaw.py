"""Jigsaw: the permutation set, tiling and shuffling on hand-made images, the loss, gradients, the plugin's wiring."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

import methods.jigsaw  # noqa: F401  (registers "jigsaw")
from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.jigsaw import (
    Config,
    Jigsaw,
    _all_permutations,
    hamming_permutations,
    jigsaw_loss,
    jigsaw_tiles,
    normalize_tiles,
    tile_geometry,
)
from tests.methods.steps import assert_loss_falls


def _cfg(**kw: Any) -> Config:
    """Small heads (fc6 16, fc7 32) for fast tests."""
    return Config(**{"tile_dim": 16, "hidden_dim": 32, **kw})


def _hamming(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return sum(x != y for x, y in zip(a, b))


def _pairwise(p: torch.Tensor) -> torch.Tensor:
    """(n, n) Hamming distances between the rows of p, diagonal excluded (n * (n - 1) values)."""
    d = (p[:, None, :] != p[None, :, :]).sum(-1)
    return d[~torch.eye(len(p), dtype=torch.bool)]


def test_default_permutation_set() -> None:
    p = hamming_permutations(100, 9, 0)
    assert p.shape == (100, 9) and p.dtype == torch.long
    assert all(sorted(row) == list(range(9)) for row in p.tolist())  # every row is a permutation of the 9 cells
    assert len({tuple(row) for row in p.tolist()}) == 100  # distinct
    d = _pairwise(p)
    # what the greedy gives: a larger average than a uniformly random set's 8 (one fixed point expected per pair)
    assert int(d.min()) == 2 and math.isclose(float(d.float().mean()), 8.08, abs_tol=1e-6)
    # identity handling (docstring): not forced in, but the greedy picks it second for seed 0
    assert p[1].tolist() == list(range(9)) and p[0].tolist() == [5, 6, 7, 0, 2, 8, 3, 1, 4]
    # computed once and deterministic: the same arguments give the same set, another seed another set
    hamming_permutations.cache_clear()
    assert torch.equal(hamming_permutations(100, 9, 0), p)
    assert not torch.equal(hamming_permutations(100, 9, 1), p)


def test_every_pick_maximises_the_summed_distance_and_breaks_ties_lexicographically() -> None:
    p = hamming_permutations(100, 9, 0)
    every = torch.from_numpy(_all_permutations(9).astype("int64"))  # (9, 9!): column c = c-th in lexicographic order
    index = {tuple(col): i for i, col in enumerate(every.T.tolist())}
    for k in (1, 2, 3, 50, 99):
        # summed distance to the first k picks, counted another way: 9 k - #(position, cell) pairs shared with them
        count = torch.zeros(9, 9, dtype=torch.int64)  # count[position, cell]
        for q in p[:k]:
            count[torch.arange(9), q] += 1
        total = 9 * k - count.gather(1, every).sum(0)  # (9!,)
        total[[index[tuple(q.tolist())] for q in p[:k]]] = -1  # already chosen
        best = int(total.max())
        assert index[tuple(p[k].tolist())] == int((total == best).nonzero()[0])  # a maximum, the first of the ties


def test_greedy_matches_an_explicit_loop_on_four_tiles() -> None:
    every = list(itertools.permutations(range(4)))  # lexicographic, as the implementation enumerates
    first = int(torch.randint(len(every), (1,), generator=torch.Generator().manual_seed(3)))
    picked = [first]
    while len(picked) < len(every):
        scores = [(-1 if i in picked else sum(_hamming(c, every[j]) for j in picked)) for i, c in enumerate(every)]
        picked.append(scores.index(max(scores)))
    ref = [list(every[i]) for i in picked]
    for n in (2, 7, 24):
        assert hamming_permutations(n, 4, 3).tolist() == ref[:n]


def test_tile_geometry() -> None:
    assert tile_geometry(255, 3, 21 / 85) == (85, 64)  # the official 255 px crop: 64 px tiles, 21 px of jitter
    assert tile_geometry(28, 3, 0.25) == (9, 7)  # Fashion-MNIST
    assert tile_geometry(16, 3, 0.25) == (5, 4)  # the tests' digits
    assert tile_geometry(32, 2, 0.0) == (16, 16)
    with pytest.raises(ConfigError, match="tiles"):
        tile_geometry(2, 3, 0.25)


def test_tiles_land_where_the_permutation_says_hand_case() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)  # x[r, c] = 4 r + c; 2x2 cells of 2 px, 1 px tiles
    order = torch.tensor([[3, 2, 1, 0]])  # position 0 shows cell 3 (bottom right), ...
    offsets = torch.tensor([[[1, 1], [0, 1], [1, 0], [0, 0]]])
    out = jigsaw_tiles(x, order, offsets, grid=2, cell=2, tile=1)
    assert out.shape == (1, 4, 1, 1, 1)
    # cell 3 at (+1, +1) -> x[3, 3] = 15; cell 2 at (0, +1) -> x[2, 1] = 9; cell 1 at (+1, 0) -> x[1, 2] = 6; cell 0 -> 0
    assert out.flatten().tolist() == [15.0, 9.0, 6.0, 0.0]


def test_tiles_match_explicit_slices_on_several_channels() -> None:
    g = torch.Generator().manual_seed(0)
    n, s, grid, cell, tile = 3, 11, 3, 3, 2  # 11 px: the last row and column are left out
    x = torch.randn(n, 3, s, s, generator=g)
    order = torch.stack([torch.randperm(9, generator=g) for _ in range(n)])
    offsets = torch.randint(cell - tile + 1, (n, 9, 2), generator=g)
    out = jigsaw_tiles(x, order, offsets, grid, cell, tile)
    assert out.shape == (n, 9, 3, tile, tile)
    for i in range(n):
        for j in range(9):
            c = int(order[i, j])
            r = (c // grid) * cell + int(offsets[i, j, 0])
            q = (c % grid) * cell + int(offsets[i, j, 1])
            assert torch.equal(out[i, j], x[i, :, r : r + tile, q : q + tile])


def test_puzzles_show_the_cells_of_the_drawn_permutation() -> None:
    # every 9 px cell of a 28 px image is constant (its index, per channel offset): each tile reveals its cell
    cells = torch.arange(9.0).view(3, 3).repeat_interleave(9, 0).repeat_interleave(9, 1)  # (27, 27)
    x = torch.zeros(5, 2, 28, 28)
    x[:, :, :27, :27] = cells
    x[:, 1] += 100
    model = Jigsaw(ConvNet(2, (4, 8)), _cfg(tile_norm="none"))
    torch.manual_seed(0)
    tiles, target = model.puzzles(x)
    assert tiles.shape == (5, 9, 2, 7, 7) and target.shape == (5,)
    perms = model.permutations
    assert isinstance(perms, torch.Tensor)
    for i in range(5):
        for j in range(9):
            assert torch.all(tiles[i, j, 0] == perms[target[i], j]) and torch.all(tiles[i, j, 1] == perms[target[i], j] + 100)
    # the draw comes from torch's global generator (checkpointed by the loop): the same seed, the same puzzles
    torch.manual_seed(0)
    tiles2, target2 = model.puzzles(x)
    assert torch.equal(tiles, tiles2) and torch.equal(target, target2)


def test_jitter_covers_every_offset_in_the_cell() -> None:
    x = torch.arange(28.0 * 28).view(1, 1, 28, 28).repeat(400, 1, 1, 1)
    model = Jigsaw(ConvNet(1, (4, 8)), _cfg(tile_norm="none"))
    torch.manual_seed(0)
    tiles, target = model.puzzles(x)  # 9 px cells, 7 px tiles: offsets 0, 1, 2 in each direction
    perms = model.permutations
    assert isinstance(perms, torch.Tensor)
    corner = tiles[:, :, 0, 0, 0].long()  # top-left pixel of each tile: 28 r + c
    cell = perms[target]
    dr = corner // 28 - (cell // 3) * 9
    dc = corner % 28 - (cell % 3) * 9
    assert set(dr.unique().tolist()) == {0, 1, 2} and set(dc.unique().tolist()) == {0, 1, 2}


def test_normalize_tiles() -> None:
    t = torch.randn(4, 9, 3, 5, 5) * 3 + 2
    assert torch.equal(normalize_tiles(t, "none"), t)
    m = normalize_tiles(t, "mean")
    torch.testing.assert_close(m.mean(dim=(-2, -1)), torch.zeros(4, 9, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(m - t, (m - t)[..., :1, :1].expand_as(t))  # a constant shift per tile and channel
    s = normalize_tiles(t, "mean_std")
    torch.testing.assert_close(s.std(dim=(-2, -1), unbiased=False), torch.ones(4, 9, 3), atol=1e-4, rtol=0)
    assert torch.equal(normalize_tiles(torch.ones(1, 1, 1, 3, 3), "mean_std"), torch.zeros(1, 1, 1, 3, 3))  # flat: 0


def test_loss_hand_case_and_batch_order() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    # row 0: uniform over 4 -> ln 4; row 1: p(target 0) = 3 / (3 + 1 + 1 + 1) -> ln 2
    assert math.isclose(float(jigsaw_loss(logits, torch.tensor([2, 0]))), (math.log(4) + math.log(2)) / 2, rel_tol=1e-6)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(8, 10, generator=g), torch.randint(10, (8,), generator=g)
    perm = torch.randperm(8, generator=g)
    assert math.isclose(float(jigsaw_loss(z[perm], y[perm])), float(jigsaw_loss(z, y)), rel_tol=1e-6)


def test_one_shared_encoder_gets_the_gradient_of_all_tiles() -> None:
    torch.manual_seed(0)
    model = Jigsaw(ConvNet(1, (4, 8)), _cfg())
    seen: list[tuple[int, ...]] = []
    model.backbone.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    model.loss([torch.randn(6, 1, 16, 16)], 0.0).backward()
    assert seen == [(54, 1, 4, 4)]  # one pass of the same backbone over the 6 x 9 tiles of 4 px
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"backbone", "tile_fc", "head"}
    # the head reads the tiles in shuffled order: its fc7 input is the 9 per-tile vectors, concatenated
    assert model.head[0].in_features == 9 * 16 and model.head[-1].out_features == 100


def test_views_buffer_and_config() -> None:
    model = Jigsaw(ConvNet(3, (4, 8)), _cfg())
    (v,) = model.views(28)
    assert (v.size, v.scale, v.ratio, v.flip_p, v.jitter_p, v.gray_p) == (28, (0.75, 1.0), (1.0, 1.0), 0.5, 0.0, 0.66)
    assert model.encoder() is model.backbone
    assert "permutations" in model.state_dict()  # checkpoints carry the set the classes refer to
    assert torch.isfinite(model.loss([torch.randn(4, 3, 32, 32)], 0.5))  # RGB, 32 px: 10 px cells
    with pytest.raises(ConfigError):
        model.views(2)
    c = Config()
    assert (c.n_permutations, c.grid, c.gap_fraction, c.tile_norm, c.tile_dim, c.hidden_dim) == (100, 3, 0.25, "mean", 1024, 4096)
    assert Jigsaw(ConvNet(1, (4, 8)), _cfg(grid=2, n_permutations=24)).permutations.shape == (24, 4)
    for bad in (dict(grid=4), dict(grid=2, n_permutations=25), dict(n_permutations=1), dict(gap_fraction=1.0),
                dict(gap_fraction=-0.1), dict(tile_norm="std"), dict(tile_dim=0), dict(min_scale=0.0), dict(gray_p=2.0)):
        with pytest.raises(ConfigError):
            Config(**bad)


def _model_and_views(digits: Splits, **kw: Any) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = build_method(METHODS.get("jigsaw"), _cfg(**kw), PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:32], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    return model, views


def test_loss_falls_within_20_sgd_steps_on_real_data(digits: Splits) -> None:
    # A fixed batch means fixed puzzles too: the permutations and offsets are redrawn from the same seed each step.
    model, views = _model_and_views(digits)
    assert_loss_falls(model, views, before_step=lambda: torch.manual_seed(1))


def test_solves_new_puzzles_within_20_sgd_steps(digits: Splits) -> None:
    # Fresh permutations and offsets at every step: the loss can only fall by learning to solve puzzles
    # (on 24 permutations; 100 need more than 20 steps).
    model, views = _model_and_views(digits, n_permutations=24)
    assert_loss_falls(model, views)
