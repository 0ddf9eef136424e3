"""Barlow Twins: the loss against hand-computed cases and the paper's formula as loops; the plugin's wiring."""

from __future__ import annotations

import math

import pytest
import torch

import methods.barlow_twins  # noqa: F401  (registers "barlow_twins")
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.barlow_twins import BarlowTwins, Config, barlow_twins_loss
from tests.methods.steps import assert_loss_falls


def _reference(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5) -> tuple[float, float]:
    """Paper eq. 1 and 2 as loops: (sum_i (1 - C_ii)^2, sum_{i != j} C_ij^2), C_ij = sum_b zn1_bi zn2_bj / N."""
    n, d = z1.shape

    def standardise(z: torch.Tensor) -> list[list[float]]:
        cols = []
        for i in range(d):
            col = [float(z[b, i]) for b in range(n)]
            mu = sum(col) / n
            var = sum((v - mu) ** 2 for v in col) / n
            cols.append([(v - mu) / math.sqrt(var + eps) for v in col])
        return cols

    a, b = standardise(z1.double()), standardise(z2.double())
    on = off = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            if i == j:
                on += (1 - c) ** 2
            else:
                off += c**2
    return on, off


def _pair(n: int = 8, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g)
    return z1, z1 + 0.7 * torch.randn(n, d, generator=g)  # correlated views, as after training


def test_identical_decorrelated_embeddings_give_zero() -> None:
    # each column has mean 0 and (biased) variance 1, and the two columns are orthogonal: C = I
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert float(barlow_twins_loss(z, z.clone(), 0.0051)) < 1e-8
    # the same embeddings, shifted and rescaled per dimension, are standardised back to C = I
    assert float(barlow_twins_loss(3 * z + 5, z.clone(), 0.0051)) < 1e-8
    # one view negated: C = -I, every diagonal term is (1 - (-1))^2 = 4
    assert math.isclose(float(barlow_twins_loss(z, -z, 0.0051)), 8.0, rel_tol=1e-4)


def test_hand_case() -> None:
    # N = 2: every non-constant column standardises to +-1 (mean halfway, biased std = half the gap).
    z1 = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # zn1 = [[-1, 1], [1, -1]]
    z2 = torch.tensor([[0.0, 0.0], [1.0, 5.0]])  # zn2 = [[-1, -1], [1, 1]]
    # C = zn1^T zn2 / 2 = [[1, 1], [-1, -1]]: on-diagonal (1-1)^2 + (1+1)^2 = 4, off-diagonal 1 + 1 = 2
    assert math.isclose(float(barlow_twins_loss(z1, z2, 0.5)), 4 + 0.5 * 2, rel_tol=1e-4)


def test_matches_the_loop_formula() -> None:
    z1, z2 = _pair()
    on, off = _reference(z1, z2)
    assert math.isclose(float(barlow_twins_loss(z1, z2, 0.0051)), on + 0.0051 * off, rel_tol=1e-5)


def test_lambda_scales_only_the_off_diagonal_part() -> None:
    z1, z2 = _pair()
    on, off = _reference(z1, z2)
    assert math.isclose(float(barlow_twins_loss(z1, z2, 0.0)), on, rel_tol=1e-5)
    for lambd in (0.0051, 0.3, 2.0):
        assert math.isclose(float(barlow_twins_loss(z1, z2, lambd)), on + lambd * off, rel_tol=1e-5)


def test_symmetric_in_the_two_views_and_invariant_to_batch_order() -> None:
    z1, z2 = _pair()
    ref = float(barlow_twins_loss(z1, z2, 0.0051))
    assert math.isclose(float(barlow_twins_loss(z2, z1, 0.0051)), ref, rel_tol=1e-6)  # C -> C^T
    perm = torch.randperm(len(z1), generator=torch.Generator().manual_seed(1))
    assert math.isclose(float(barlow_twins_loss(z1[perm], z2[perm], 0.0051)), ref, rel_tol=1e-5)
    # pairing matters: shuffling one view only must change the loss
    assert not math.isclose(float(barlow_twins_loss(z1[perm], z2, 0.0051)), ref, rel_tol=1e-3)


def test_invariant_to_per_dimension_affine_rescaling() -> None:
    z1, z2 = _pair()
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(5, generator=g) * 3 + 0.5, torch.randn(5, generator=g) * 10  # positive scales, any shifts
    ref = float(barlow_twins_loss(z1, z2, 0.0051))
    assert math.isclose(float(barlow_twins_loss(z1 * a + b, z2, 0.0051)), ref, rel_tol=1e-4)
    assert math.isclose(float(barlow_twins_loss(z1, z2 * a - b, 0.0051)), ref, rel_tol=1e-4)


def test_gradients_reach_both_views_and_every_parameter() -> None:
    z1, z2 = (z.requires_grad_(True) for z in _pair())
    barlow_twins_loss(z1, z2, 0.0051).backward()
    assert z1.grad is not None and z2.grad is not None  # no stop-gradient: both branches are online
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    from benchmark.backbones import ConvNet

    torch.manual_seed(0)
    model = BarlowTwins(ConvNet(1, (4, 8)), Config(proj_dims=(16, 16, 12)))
    views = [torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)]
    model.loss(views, 0.0).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_projector_views_schedule_and_config() -> None:
    from benchmark.backbones import ConvNet

    model = BarlowTwins(ConvNet(1, (4, 8)), Config(proj_dims=(16, 16, 12)))
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, 8), (16, 16), (12, 16)]
    assert all(m.bias is None for m in linears)  # bias-free, as the official projector
    v1, v2 = model.views(28)
    assert (v1.size, v1.blur_p, v1.solarize_p) == (28, 1.0, 0.0)
    assert (v2.size, v2.blur_p, v2.solarize_p) == (28, 0.1, 0.2)
    assert model.encoder() is model.backbone
    # no schedule: progress 0 and 1 give the same loss
    views = [torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)]
    torch.testing.assert_close(model.loss(views, 0.0), model.loss(views, 1.0))
    assert Config().proj_dims == (8192, 8192, 8192) and Config().lambd == 0.0051
    for bad in (dict(lambd=-1.0), dict(proj_dims=()), dict(proj_dims=(16, 0)), dict(min_scale=0.0)):
        with pytest.raises(ConfigError):
            Config(**bad)  # type: ignore[arg-type]


def test_loss_falls_within_20_sgd_steps_on_real_data(digits: Splits) -> None:
    torch.manual_seed(0)
    cfg = Config(proj_dims=(64, 64, 64))
    model = build_method(METHODS.get("barlow_twins"), cfg, PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:32], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    assert_loss_falls(model, views)


def test_two_processes_equal_one_process_on_the_global_batch() -> None:
    from tests.ddp import pair_loss_in_processes

    z1, z2 = _pair(n=8, d=5)
    losses, ref = pair_loss_in_processes(barlow_twins_loss, z1, z2, 0.3)  # also checks the DDP-averaged gradients
    # every process computes the loss of the global batch (not of its half)
    for loss in losses:
        assert math.isclose(loss, ref, rel_tol=1e-5)
