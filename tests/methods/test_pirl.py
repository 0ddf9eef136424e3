"""PIRL: h and the NCE loss against their formulas, the memory bank (update rule, rows by index, no gradient,
checkpoints, resume), the jigsaw tiles on hand-made images, the plugin's wiring and defaults, training on real data."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import methods.pirl as pirl  # registers "pirl"
from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method, pretrain
from methods.pirl import (
    PIRL,
    Config,
    bank_update,
    cut_tiles,
    estimate_log_z,
    nce_h,
    nce_loss,
    pirl_loss,
    pirl_softmax_loss,
    tile_geometry,
)
from tests.methods.steps import assert_loss_falls

T = 0.07


def _cfg(**kw: Any) -> Config:
    """Small heads and bank for fast tests."""
    return Config(**{"proj_dim": 16, "tile_dim": 8, "num_negatives": 64, "num_samples": 500, **kw})


def _reference_nce(s: Tensor, temperature: float, z: float, n: int) -> float:
    """VISSL's NCEAverage + NCECriterion as loops: P = exp(s / T) / Z, P_n = 1 / |D|, float32 eps in the denominators."""
    eps, total = 1.1920929e-07, 0.0
    for row in s.double().tolist():
        k = len(row) - 1
        p = [math.exp(v / temperature) / z for v in row]
        total -= math.log(p[0] / (p[0] + k / n + eps))
        total -= sum(math.log((k / n) / (pj + k / n + eps)) for pj in p[1:])
    return total / len(s)


def test_h_is_the_papers_formula() -> None:
    # K = 2 negatives, |D| = 4: K / |D| = 0.5. s = 0: exp = 1 -> 1 / 1.5; s = T ln 3: exp = 3 -> 3 / 3.5
    s = torch.tensor([0.0, T * math.log(3.0)])
    torch.testing.assert_close(nce_h(s, T, 2, 4), torch.tensor([2 / 3, 6 / 7]))
    torch.testing.assert_close(nce_h(s, T, 2, 4, math.log(2.0)), torch.tensor([0.5 / 1.0, 1.5 / 2.0]))  # P = exp / Z, Z = 2
    g = torch.Generator().manual_seed(0)
    s = torch.rand(50, generator=g) * 2 - 1  # cosines
    for k, n, log_z in ((10, 1000, 0.0), (32000, 1281167, 0.0), (256, 1347, 3.7)):
        ref = [math.exp(v / T - log_z) / (math.exp(v / T - log_z) + k / n) for v in s.double().tolist()]
        torch.testing.assert_close(nce_h(s, T, k, n, log_z), torch.tensor(ref, dtype=torch.float32))
    assert torch.all(nce_h(torch.tensor([1.0, -1.0]), 0.001, 10, 100) == torch.tensor([1.0, 0.0]))  # no overflow at tiny T


def test_nce_loss_hand_case() -> None:
    # |D| = 4, K = 2: K P_n = 0.5; Z = 2. P = [1.5, 0.5, 0.25] ->
    # -log(1.5/2) - log(1 - 0.5/1) - log(1 - 0.25/0.75) = -log(0.75 * 0.5 * 2/3) = log 4
    s = T * torch.log(torch.tensor([[3.0, 1.0, 0.5]]))
    assert math.isclose(float(nce_loss(s, T, 4, math.log(2.0))), math.log(4), rel_tol=1e-5)
    assert math.isclose(float(nce_loss(s, T, 4, math.log(2.0))), _reference_nce(s, T, 2.0, 4), rel_tol=1e-5)
    # the same from h: -log h(positive) - sum log(1 - h(noise))
    h = nce_h(s, T, 2, 4, math.log(2.0))
    assert math.isclose(float(nce_loss(s, T, 4, math.log(2.0))), float(-h[0, 0].log() - (1 - h[0, 1:]).log().sum()), rel_tol=1e-5)


def test_nce_loss_matches_vissl_and_is_invariant_to_batch_and_noise_order() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(6, 9, generator=g) * 2 - 1  # (B, 1 + K)
    value = nce_loss(s, T, 100, math.log(30.0))
    assert math.isclose(float(value), _reference_nce(s, T, 30.0, 100), rel_tol=1e-5)
    torch.testing.assert_close(nce_loss(s[torch.randperm(6, generator=g)], T, 100, math.log(30.0)), value)
    shuffled = torch.cat([s[:, :1], s[:, 1:][:, torch.randperm(8, generator=g)]], dim=1)
    torch.testing.assert_close(nce_loss(shuffled, T, 100, math.log(30.0)), value)
    assert not torch.allclose(nce_loss(s.roll(1, dims=1), T, 100, math.log(30.0)), value)  # column 0 is the positive
    assert nce_loss(s + 0.1 * F.one_hot(torch.zeros(6, dtype=torch.long), 9), T, 100, math.log(30.0)) < value
    assert torch.isfinite(nce_loss(torch.ones(2, 5), 0.005, 100))  # exp(200) does not fit in float32


def test_pirl_loss_weights_the_two_terms() -> None:
    g = torch.Generator().manual_seed(1)
    s_t, s_i = torch.rand(4, 6, generator=g), torch.rand(4, 6, generator=g)
    a, b = nce_loss(s_t, T, 50, 1.0), nce_loss(s_i, T, 50, 1.0)
    torch.testing.assert_close(pirl_loss(s_t, s_i, 0.5, T, 50, 1.0), 0.5 * a + 0.5 * b)
    torch.testing.assert_close(pirl_loss(s_t, s_i, 0.3, T, 50, 1.0), 0.3 * a + 0.7 * b)
    torch.testing.assert_close(pirl_loss(s_t, s_i, 1.0, T, 50, 1.0), a)  # lambda = 1: the jigsaw term alone


def test_estimate_log_z_is_bank_size_times_the_mean_of_exp() -> None:
    s = T * torch.log(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))  # exp(s / T): 1, 3, 2, 2 -> mean 2
    assert math.isclose(float(estimate_log_z(s, T, 50)), math.log(100.0), rel_tol=1e-6)
    assert math.isclose(float(estimate_log_z(torch.ones(3, 4), 0.007, 10)), 1 / 0.007 + math.log(10), rel_tol=1e-6)


def test_bank_update_rule() -> None:
    m = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    f = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    r = 1 / math.sqrt(2)
    assert torch.equal(bank_update(m, f, 0.5), F.normalize(torch.tensor([[0.5, 0.5], [0.6, 0.8]]), dim=1))  # momentum, then renormalise
    torch.testing.assert_close(bank_update(m, f, 0.5), torch.tensor([[r, r], [0.6, 0.8]]))
    torch.testing.assert_close(bank_update(m, f, 0.75), torch.tensor([[0.75, 0.25], [0.6, 0.8]]) / torch.tensor([[math.hypot(0.75, 0.25)], [1.0]]))
    torch.testing.assert_close(bank_update(m, f, 0.0), f)  # m = 0: replacement


def test_tile_geometry() -> None:
    assert tile_geometry(255, 3, 21 / 85) == (85, 64)  # VISSL: 64 px patches, 21 px of jitter
    assert tile_geometry(28, 3, 0.25) == (9, 7)
    assert tile_geometry(16, 3, 0.25) == (5, 4)
    with pytest.raises(ConfigError, match="pirl"):
        tile_geometry(2, 3, 0.25)


def test_tiles_hand_case() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)  # x[r, c] = 4 r + c; 2x2 cells of 2 px, 1 px tiles
    order = torch.tensor([[3, 2, 1, 0]])  # position 0 shows cell 3 (bottom right), ...
    offsets = torch.tensor([[[1, 1], [0, 1], [1, 0], [0, 0]]])
    out = cut_tiles(x, order, offsets, grid=2, cell=2, tile=1)
    assert out.shape == (1, 4, 1, 1, 1)
    # cell 3 at (+1, +1) -> x[3, 3] = 15; cell 2 at (0, +1) -> x[2, 1] = 9; cell 1 at (+1, 0) -> x[1, 2] = 6; cell 0 -> 0
    assert out.flatten().tolist() == [15.0, 9.0, 6.0, 0.0]
    y = torch.randn(2, 3, 11, 11)  # several channels, 3 px cells (the last 2 rows and columns unused), 2 px tiles
    order, offsets = torch.stack([torch.randperm(9), torch.randperm(9)]), torch.randint(2, (2, 9, 2))
    out = cut_tiles(y, order, offsets, 3, 3, 2)
    for i in range(2):
        for j in range(9):
            r, q = int(order[i, j]) // 3 * 3 + int(offsets[i, j, 0]), int(order[i, j]) % 3 * 3 + int(offsets[i, j, 1])
            assert torch.equal(out[i, j], y[i, :, r : r + 2, q : q + 2])


def test_puzzles_show_each_cell_once_in_a_random_order_per_image() -> None:
    # every 9 px cell of a 28 px image is constant (its index; channel 1 is offset by 100): each tile names its cell
    cells = torch.arange(9.0).view(3, 3).repeat_interleave(9, 0).repeat_interleave(9, 1)
    x = torch.zeros(64, 2, 28, 28)
    x[:, :, :27, :27] = cells
    x[:, 1] += 100
    model = PIRL(ConvNet(2, (4, 8)), _cfg(tile_flip_p=0.0))
    torch.manual_seed(0)
    tiles, order = model.puzzles(x)
    assert tiles.shape == (64, 9, 2, 7, 7) and order.shape == (64, 9)
    assert torch.equal(order.sort(dim=1).values, torch.arange(9).expand(64, 9))  # a permutation of the 9 cells
    assert torch.equal(tiles[:, :, 0], order[..., None, None].float().expand(64, 9, 7, 7))  # position j shows cell order[j]
    assert torch.equal(tiles[:, :, 1], tiles[:, :, 0] + 100)
    assert len({tuple(o) for o in order.tolist()}) == 64  # one permutation per image
    assert (order[:, 0] == 0).float().mean() < 0.3  # not the identity layout
    torch.manual_seed(0)  # the draw comes from torch's global generator (checkpointed by the loop)
    assert torch.equal(model.puzzles(x)[0], tiles)


def test_tiles_jitter_and_flip_independently() -> None:
    x = torch.arange(28.0 * 28).view(1, 1, 28, 28).repeat(300, 1, 1, 1)
    model = PIRL(ConvNet(1, (4, 8)), _cfg(tile_flip_p=0.0))
    torch.manual_seed(0)
    tiles, order = model.puzzles(x)
    corner = tiles[:, :, 0, 0, 0].long()  # top-left pixel: 28 r + c
    dr, dc = corner // 28 - order // 3 * 9, corner % 28 - order % 3 * 9
    assert set(dr.flatten().tolist()) == {0, 1, 2} and set(dc.flatten().tolist()) == {0, 1, 2}  # 9 px cells, 7 px tiles
    flipping = PIRL(ConvNet(1, (4, 8)), _cfg(tile_flip_p=0.5))
    torch.manual_seed(0)
    flipped, order2 = flipping.puzzles(x)
    assert torch.equal(order2, order)  # the same draws of order and offsets, then one coin per tile
    mirrored = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(flipped.flatten(0, 1), tiles.flatten(0, 1))])
    same = torch.tensor([torch.equal(a, b) for a, b in zip(flipped.flatten(0, 1), tiles.flatten(0, 1))])
    assert torch.all(mirrored ^ same) and 0.4 < float(mirrored.float().mean()) < 0.6
    assert bool(((mirrored.view(300, 9).sum(1) > 0) & (mirrored.view(300, 9).sum(1) < 9)).any())  # per tile, not per image


def _model(digits: Splits, cfg: Config) -> tuple[PIRL, list[Tensor], Tensor]:
    model = cast(PIRL, build_method(METHODS.get("pirl"), cfg, PretrainConfig(backbone="convnet_tiny"), digits, seed=0))
    views = make_views(digits.train.x[:32], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    indices = torch.arange(100, 164, 2)  # (32,) rows of the bank, not 0..31, so a mix-up would show
    return model, views, indices


@pytest.mark.parametrize("num_negatives, k", [(64, 64), (32000, 500)])  # K clamped to the bank size
def test_loss_reads_the_batch_rows_and_noise_and_sets_z_once(digits: Splits, num_negatives: int, k: int) -> None:
    model, views, idx = _model(digits, _cfg(num_negatives=num_negatives))
    ref, bank0 = copy.deepcopy(model), model.memory.clone()
    assert torch.isnan(model.log_z)
    torch.manual_seed(1)
    value = model.loss(views, 0.0, indices=idx)
    torch.manual_seed(1)  # loss() draws the puzzles, then the noise of both terms
    tiles, _ = ref.puzzles(views[1])
    noise = torch.randint(500, (2, 32, k))
    g, f = ref.embed_tiles(tiles), ref.embed_image(views[0])
    s_t = torch.einsum("bkd,bd->bk", bank0[torch.cat([idx[:, None], noise[0]], dim=1)], g)  # rows of the old bank
    s_i = torch.einsum("bkd,bd->bk", bank0[torch.cat([idx[:, None], noise[1]], dim=1)], f)
    log_z = estimate_log_z(s_t, T, 500)  # from the jigsaw term (VISSL's first output)
    torch.testing.assert_close(model.log_z, log_z)
    torch.testing.assert_close(value, 0.5 * nce_loss(s_t, T, 500, log_z) + 0.5 * nce_loss(s_i, T, 500, log_z))
    model.loss(views, 0.5, indices=idx)
    torch.testing.assert_close(model.log_z, log_z)  # estimated once, then fixed


def test_bank_update_writes_the_batch_rows_with_the_image_embedding(digits: Splits) -> None:
    model, views, idx = _model(digits, _cfg())
    bank0 = model.memory.clone()
    ref = copy.deepcopy(model)
    torch.manual_seed(0)
    model.loss(views, 0.0, indices=idx)
    torch.manual_seed(0)
    ref.puzzles(views[1])
    f = ref.embed_image(views[0]).detach()  # f(v_I), not g(v_It) (VISSL `update_mem_with_emb_index: 1`)
    torch.testing.assert_close(model.memory[idx], F.normalize(0.5 * bank0[idx] + 0.5 * f, dim=1))
    rest = torch.ones(500, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(model.memory[rest], bank0[rest])


def test_bank_gets_no_gradient_and_every_parameter_does(digits: Splits) -> None:
    model, views, idx = _model(digits, _cfg())
    model.loss(views, 0.0, indices=idx).backward()  # type: ignore[no-untyped-call]  # after the in-place bank update
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"backbone", "f_head", "tile_fc", "g_head"}
    assert not model.memory.requires_grad and model.memory.grad is None and not model.log_z.requires_grad
    assert model.g_head.in_features == 9 * 8  # the 9 per-tile vectors, concatenated
    assert model.encoder() is model.backbone


def test_z_is_one_when_not_estimated(digits: Splits) -> None:
    model, views, idx = _model(digits, _cfg(z_estimate=False))
    assert float(model.log_z) == 0.0
    model.loss(views, 0.0, indices=idx)
    assert float(model.log_z) == 0.0  # the paper's h as printed


def test_checkpoint_round_trip_of_the_bank(digits: Splits) -> None:
    model, views, idx = _model(digits, _cfg())
    model.loss(views, 0.0, indices=idx)
    state = copy.deepcopy(model.state_dict())
    assert {"memory", "log_z"} <= set(state)
    torch.manual_seed(123)  # a different random bank
    other = PIRL(ConvNet(1, (8, 16, 32)), _cfg())
    assert not torch.equal(other.memory, model.memory) and torch.isnan(other.log_z)
    other.load_state_dict(state)
    assert torch.equal(other.memory, model.memory) and torch.equal(other.log_z, model.log_z)
    torch.manual_seed(5)
    a = model.loss(views, 0.1, indices=idx)
    torch.manual_seed(5)
    torch.testing.assert_close(other.loss(views, 0.1, indices=idx), a, rtol=0, atol=0)
    assert torch.equal(other.memory, model.memory)


def test_resumed_pretraining_equals_an_uninterrupted_run(digits: Splits, tmp_path: Path) -> None:
    data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(64)), val=digits.val.subset(torch.arange(16)))
    cfg = _cfg(num_samples=64)
    pre = PretrainConfig(backbone="convnet_tiny", epochs=2, batch_size=32, deterministic=True)

    class Interrupted(Exception):
        pass

    def run(out: Path, stop_at_epoch: int | None = None) -> PIRL:
        model = cast(PIRL, build_method(METHODS.get("pirl"), cfg, pre, data, seed=0))
        if stop_at_epoch is not None:  # hack: an instance attribute is the loop's optional before_epoch hook
            def stop(epoch: int, *_: object) -> None:
                if epoch == stop_at_epoch:
                    raise Interrupted
            model.before_epoch = stop  # type: ignore[assignment]
        pretrain(model, data, pre, 0, out, torch.device("cpu"), progress=False)
        return model

    straight = run(tmp_path / "a")
    with pytest.raises(Interrupted):
        run(tmp_path / "b", stop_at_epoch=1)  # killed after epoch 1's checkpoint
    resumed = run(tmp_path / "b")  # bank and Z come back from the checkpoint
    for key, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[key]), key
    assert torch.isfinite(straight.log_z)


def test_views_embeddings_and_bank_init() -> None:
    model = PIRL(ConvNet(3, (4, 8)), Config(num_samples=3000))
    image, patches = model.views(28)
    assert (image.size, image.scale, image.flip_p, patches.size, patches.scale, patches.flip_p) == (28, (0.08, 1.0), 0.5, 28, (0.6, 1.0), 0.0)
    for v in (image, patches):  # VISSL: ColorJitter(0.4, 0.4, 0.4, 0.2), RandomGrayscale(0.2)
        assert (v.jitter_p, v.brightness, v.contrast, v.saturation, v.hue, v.gray_p, v.blur_p, v.solarize_p) == (1.0, 0.4, 0.4, 0.4, 0.2, 0.2, 0.0, 0.0)
    with pytest.raises(ConfigError):
        model.views(2)
    f = model.embed_image(torch.randn(5, 3, 32, 32))
    torch.manual_seed(0)
    g = model.embed_tiles(model.puzzles(torch.randn(5, 3, 32, 32))[0])
    assert f.shape == g.shape == (5, 128) and torch.allclose(f.norm(dim=1), torch.ones(5)) and torch.allclose(g.norm(dim=1), torch.ones(5))
    assert model.memory.shape == (3000, 128) and torch.allclose(model.memory.norm(dim=1), torch.ones(3000))  # VISSL norm_init
    assert torch.isfinite(model.loss([torch.randn(4, 3, 32, 32)] * 2, 0.0, indices=torch.arange(4)))  # RGB, 32 px


def test_registered_defaults_and_validation() -> None:
    entry = METHODS.entry("pirl")
    assert entry.obj is PIRL and entry.config is Config and PIRL.uses_indices
    assert entry.meta["pretrain"] == dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0)
    c = Config()
    assert (c.proj_dim, c.tile_dim, c.num_negatives, c.temperature, c.bank_momentum, c.lam, c.z_estimate, c.grid) == (
        128, 128, 32000, 0.07, 0.5, 0.5, True, 3)
    assert (c.image_min_scale, c.patch_min_scale, c.tile_flip_p, c.num_samples) == (0.08, 0.6, 0.5, None)
    for bad in (dict(proj_dim=0), dict(tile_dim=0), dict(num_negatives=0), dict(temperature=0.0), dict(bank_momentum=1.0),
                dict(bank_momentum=-0.1), dict(lam=1.5), dict(grid=1), dict(jitter_fraction=1.0), dict(image_min_scale=0.0),
                dict(patch_min_scale=1.5), dict(tile_flip_p=-0.1), dict(num_samples=0)):
        with pytest.raises(ConfigError, match="pirl."):
            Config(**bad)
    with pytest.raises(ConfigError, match="pirl.num_samples"):
        PIRL(ConvNet(1, (4, 8)), Config())
    with pytest.raises(ValueError, match="indices"):
        PIRL(ConvNet(1, (4, 8)), _cfg()).loss([torch.randn(2, 1, 16, 16)] * 2, 0.0)


def test_loss_falls_within_20_steps_on_real_data(digits: Splits) -> None:
    # From the loop's starting state (random bank, Z from this first batch). On a FIXED batch the loss falls only
    # while the batch's own rows are rare among the noise: with K = 256 of 1347 rows each sample meets them ~6
    # times per term, and as the batch's embeddings and rows draw together (cosine -> 1, ~7 nats each) the loss
    # rises from step 5 on, as NPID's does. K = 16 (~0.4 meetings) leaves the NCE task itself: 5.4 -> 2.4.
    torch.manual_seed(0)
    model, views, _ = _model(digits, _cfg(proj_dim=32, tile_dim=16, num_negatives=16, num_samples=len(digits.train)))
    assert_loss_falls(model, views)  # indices 0..31: the batch is the first 32 training images


assert pirl.__doc__ is not None and "1912.01991" in pirl.__doc__ and "facebookresearch/vissl" in pirl.__doc__


def test_softmax_loss_hand_case_and_wiring(digits: Splits) -> None:
    # two bank rows, one sample at row 1: CE over [s/T] with target 1, per term, weighted by lam
    s_t, s_i = torch.tensor([[0.0, 0.1]]), torch.tensor([[0.2, 0.0]])
    ce_t = -math.log(math.exp(1.0) / (1 + math.exp(1.0)))  # logits [0, 1] at T = 0.1
    ce_i = -math.log(1 / (math.exp(2.0) + 1))  # logits [2, 0]
    got = pirl_softmax_loss(s_t, s_i, torch.tensor([1]), 0.25, 0.1)
    assert float(got) == pytest.approx(0.25 * ce_t + 0.75 * ce_i, rel=1e-6)
    model, views, idx = _model(digits, _cfg(loss_type="softmax"))
    bank0 = model.memory.clone()
    torch.manual_seed(3)
    loss = model.loss(views, 0.0, indices=idx)
    torch.manual_seed(3)
    ref = copy.deepcopy(model)
    ref.memory.copy_(bank0)
    tiles, _ = ref.puzzles(views[1])
    g, f = ref.embed_tiles(tiles), ref.embed_image(views[0])
    expected = pirl_softmax_loss(g @ bank0.T, f @ bank0.T, idx, ref.cfg.lam, ref.cfg.temperature)
    torch.testing.assert_close(loss, expected)
    assert torch.isnan(model.log_z)  # no Z in the softmax
    assert not torch.equal(model.memory[idx], bank0[idx]) and torch.equal(model.memory[:100], bank0[:100])
