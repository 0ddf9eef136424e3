"""VICReg: each loss term on hand-computed cases, a loop reference, symmetry, gradients, 2 processes, training."""

from __future__ import annotations

import math

import pytest
import torch

import methods.vicreg  # noqa: F401  (registers "vicreg")
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.vicreg import Config, VICReg, vicreg_loss, vicreg_terms
from tests.methods.steps import assert_loss_falls

SMALL = Config(expander_dims=(32, 32, 16))


def _reference(z1: torch.Tensor, z2: torch.Tensor, lam: float, mu: float, nu: float, eps: float = 1e-4) -> float:
    """Paper eqs. 1-6 as loops, with the official code's normalisation (MSE over n*d, variance term halved)."""
    a, b = z1.double().tolist(), z2.double().tolist()
    n, d = len(a), len(a[0])
    inv = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def v_and_c(z: list[list[float]]) -> tuple[float, float]:
        mean = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        cov = [[sum((z[i][j] - mean[j]) * (z[i][k] - mean[k]) for i in range(n)) / (n - 1) for k in range(d)] for j in range(d)]
        v = sum(max(0.0, 1 - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        c = sum(cov[j][k] ** 2 for j in range(d) for k in range(d) if j != k) / d
        return v, c

    (v1, c1), (v2, c2) = v_and_c(a), v_and_c(b)
    return lam * inv + mu * (v1 + v2) / 2 + nu * (c1 + c2)


def test_terms_on_a_hand_computed_case() -> None:
    # N = 2, d = 2. z1 - z2 = [[0, 1], [0, -1]]: inv = (0 + 1 + 0 + 1) / 4 = 0.5.
    # Every column is (0.5, -0.5): mean 0, unbiased Var = (0.25 + 0.25) / 1 = 0.5, so each view's
    # v = 1 - sqrt(0.5 + 1e-4) and var = (v + v) / 2 = 1 - sqrt(0.5001) = 0.29282...
    # C(z1) = [[0.5, 0.5], [0.5, 0.5]], C(z2) = [[0.5, -0.5], [-0.5, 0.5]]: off-diagonal squares sum to
    # 0.5, / d = 0.25 per view, cov = 0.5. Total with 25/25/1: 12.5 + 25 (1 - sqrt(0.5001)) + 0.5.
    z1 = 0.5 * torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    z2 = 0.5 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    inv, var, cov = vicreg_terms(z1, z2)
    assert math.isclose(float(inv), 0.5, rel_tol=1e-6)
    assert math.isclose(float(var), 1 - math.sqrt(0.5001), rel_tol=1e-5)
    assert math.isclose(float(cov), 0.5, rel_tol=1e-6)
    expected = 12.5 + 25 * (1 - math.sqrt(0.5001)) + 0.5
    assert math.isclose(float(vicreg_loss(z1, z2, 25, 25, 1)), expected, rel_tol=1e-6)


def test_identical_views_give_zero_invariance() -> None:
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    assert float(vicreg_terms(z, z.clone())[0]) == 0.0


def test_decorrelated_unit_variance_batch_gives_zero_variance_and_covariance() -> None:
    # Columns 1..7 of an 8x8 Hadamard matrix: mean 0, orthogonal, unbiased Var = 8 / 7 > 1.
    h = torch.tensor([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    z = h[:, 1:]
    _, var, cov = vicreg_terms(z, z.flip(0))
    assert float(var) == 0.0
    assert float(cov) < 1e-10


def test_constant_batch_gives_the_full_variance_penalty() -> None:
    # Var = 0: std = sqrt(1e-4) = 0.01, so each dimension pays 1 - 0.01; no covariance.
    z = torch.ones(6, 4) * 3.0
    _, var, cov = vicreg_terms(z, z.clone())
    assert math.isclose(float(var), 0.99, rel_tol=1e-6)
    assert float(cov) == 0.0
    assert math.isclose(float(vicreg_loss(z, z.clone(), 25, 25, 1)), 25 * 0.99, rel_tol=1e-6)


def test_matches_the_loop_reference_and_scales_with_each_coefficient() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = 0.7 * torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g) + 0.3
    for lam, mu, nu in ((25, 25, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (2.5, 7, 0.3)):
        assert math.isclose(float(vicreg_loss(z1, z2, lam, mu, nu)), _reference(z1, z2, lam, mu, nu), rel_tol=1e-5)
    inv, var, cov = (float(t) for t in vicreg_terms(z1, z2))
    assert inv > 0 and var > 0 and cov > 0  # each term is live in this case, so each coefficient matters
    base = float(vicreg_loss(z1, z2, 25, 25, 1))
    assert math.isclose(float(vicreg_loss(z1, z2, 35, 25, 1)) - base, 10 * inv, rel_tol=1e-4)
    assert math.isclose(float(vicreg_loss(z1, z2, 25, 35, 1)) - base, 10 * var, rel_tol=1e-4)
    assert math.isclose(float(vicreg_loss(z1, z2, 25, 25, 3)) - base, 2 * cov, rel_tol=1e-4)


def test_symmetric_in_the_views_and_invariant_to_batch_order() -> None:
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(12, 7, generator=g), 0.5 * torch.randn(12, 7, generator=g)
    loss = float(vicreg_loss(z1, z2, 25, 25, 1))
    assert math.isclose(float(vicreg_loss(z2, z1, 25, 25, 1)), loss, rel_tol=1e-6)
    perm = torch.randperm(12, generator=g)
    assert math.isclose(float(vicreg_loss(z1[perm], z2[perm], 25, 25, 1)), loss, rel_tol=1e-5)
    # pairing matters: permuting only one view changes the invariance term
    assert not math.isclose(float(vicreg_loss(z1[perm], z2, 25, 25, 1)), loss, rel_tol=1e-3)


def test_gradients_reach_both_branches_and_every_parameter(digits: Splits) -> None:
    # No stop-gradient in VICReg: both views' embeddings and all of backbone and expander get gradients.
    z1 = torch.randn(8, 4, requires_grad=True)
    z2 = torch.randn(8, 4, requires_grad=True)
    vicreg_loss(z1, z2, 25, 25, 1).backward()
    assert z1.grad is not None and z2.grad is not None
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    model = build_method(METHODS.get("vicreg"), SMALL, PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:16], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    model.loss(views, 0.5).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_model_shape_views_and_no_schedule(digits: Splits) -> None:
    model = build_method(METHODS.get("vicreg"), SMALL, PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    assert isinstance(model, VICReg) and model.encoder() is model.backbone
    linears = [m for m in model.expander if isinstance(m, torch.nn.Linear)]
    dim = model.backbone.dim
    assert [tuple(m.weight.shape) for m in linears] == [(32, dim), (32, 32), (16, 32)]
    assert linears[-1].bias is None  # official Projector: last Linear has no bias
    v1, v2 = model.views(224)
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert v1.size == v2.size == 224 and v1.scale == (0.08, 1.0)
    views = make_views(digits.train.x[:16], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    assert torch.equal(model.loss(views, 0.0), model.loss(views, 1.0))  # progress drives nothing


def test_defaults_follow_the_official_code_and_bad_values_raise() -> None:
    cfg = Config()
    assert (cfg.expander_dims, cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff) == ((8192, 8192, 8192), 25.0, 25.0, 1.0)
    assert METHODS.entry("vicreg").meta["pretrain"] == dict(optimizer="lars", lr=0.2, weight_decay=1e-6, warmup_epochs=10)
    for bad in (dict(expander_dims=()), dict(expander_dims=(8, 0)), dict(std_coeff=-1.0), dict(min_scale=0.0)):
        with pytest.raises(ConfigError):
            Config(**bad)  # type: ignore[arg-type]


def test_loss_falls_within_20_sgd_steps_on_digits(digits: Splits) -> None:
    torch.manual_seed(0)
    model = build_method(METHODS.get("vicreg"), SMALL, PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:32], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    assert_loss_falls(model, views)


def test_two_processes_equal_one_process_on_the_global_batch() -> None:
    from tests.ddp import pair_loss_in_processes

    g = torch.Generator().manual_seed(3)
    z1, z2 = 0.5 * torch.randn(8, 5, generator=g), 0.5 * torch.randn(8, 5, generator=g)
    losses, ref = pair_loss_in_processes(vicreg_loss, z1, z2, 25, 25, 1)  # also checks the DDP-averaged gradients
    # per-process invariance on 4 rows, variance/covariance on all 8: the mean over processes is the global loss
    assert math.isclose(sum(losses) / 2, ref, rel_tol=1e-5)
    # with 4 rows per process the variance/covariance differ from the global ones: gathering matters here
    local = float(vicreg_loss(z1[:4], z2[:4], 25, 25, 1) + vicreg_loss(z1[4:], z2[4:], 25, 25, 1)) / 2
    assert not math.isclose(local, ref, rel_tol=1e-3)
