"""DirectPred: the predictor formula, the F moving average, gradients, schedules, and a falling loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import methods.directpred as dp
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from tests.methods.steps import assert_loss_falls


def _model(data: Splits, **kw: object) -> dp.DirectPred:
    cfg = dp.Config(hidden_dim=32, proj_dim=8, **kw)  # type: ignore[arg-type]
    model = build_method(METHODS.get("directpred"), cfg, PretrainConfig(backbone="convnet_tiny"), data, seed=0)
    assert isinstance(model, dp.DirectPred)
    return model


def _views(model: dp.DirectPred, data: Splits, seed: int = 0) -> list[torch.Tensor]:
    return make_views(data.train.x[:32], model.views(16), data.mean, data.std, torch.Generator().manual_seed(seed))


def test_predictor_weight_hand_case() -> None:
    # F = diag(4, 1): s = (4, 1), max 4, p = (sqrt(4/4) + eps, sqrt(1/4) + eps) = (1.1, 0.6) for eps = 0.1
    w = dp.predictor_weight(torch.diag(torch.tensor([4.0, 1.0])), eps=0.1)
    torch.testing.assert_close(w, torch.diag(torch.tensor([1.1, 0.6])))
    # a negative eigenvalue is clamped to 0 before the square root: p = (1 + eps, 0 + eps)
    w = dp.predictor_weight(torch.diag(torch.tensor([4.0, -1.0])), eps=0.1)
    torch.testing.assert_close(w, torch.diag(torch.tensor([1.1, 0.1])))
    # rotating F rotates Wp: F = R diag(4, 1) R^T gives R diag(1.1, 0.6) R^T
    c, s = math.cos(0.3), math.sin(0.3)
    r = torch.tensor([[c, -s], [s, c]])
    w = dp.predictor_weight(r @ torch.diag(torch.tensor([4.0, 1.0])) @ r.T, eps=0.1)
    torch.testing.assert_close(w, r @ torch.diag(torch.tensor([1.1, 0.6])) @ r.T)


def test_predictor_weight_is_symmetric_psd_and_shares_the_eigenvectors_of_F() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 20, generator=g)
    F_hat = a @ a.T / 20
    eps = 0.05
    w = dp.predictor_weight(F_hat, eps)
    torch.testing.assert_close(w, w.T)
    assert torch.linalg.eigvalsh(w).min() >= eps - 1e-5
    s, U = torch.linalg.eigh(F_hat.double())
    for j in range(6):  # Wp u_j = p_j u_j with p_j = sqrt(s_j / max s) + eps, one eigenvector at a time
        p_j = math.sqrt(max(float(s[j]), 0.0) / float(s.max())) + eps
        torch.testing.assert_close(w.double() @ U[:, j], p_j * U[:, j], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w @ F_hat, F_hat @ w, atol=1e-5, rtol=1e-5)  # they commute


def test_correlation_matches_the_sum_of_outer_products_and_ignores_batch_order() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(10, 4, generator=g)
    ref = sum(torch.outer(z[i], z[i]) for i in range(10)) / 10
    torch.testing.assert_close(dp.correlation(z), ref)
    perm = torch.randperm(10, generator=g)
    torch.testing.assert_close(dp.correlation(z[perm]), dp.correlation(z))


def test_the_moving_average_of_F_is_exact() -> None:
    est1, est2 = torch.eye(2) * 2, torch.tensor([[0.0, 1.0], [1.0, 4.0]])
    f1 = dp.ema_correlation(torch.zeros(2, 2), est1, rho=0.3, first=True)
    torch.testing.assert_close(f1, est1)  # the first estimate is taken as it is
    f2 = dp.ema_correlation(f1, est2, rho=0.3, first=False)
    # 0.3 * [[2, 0], [0, 2]] + 0.7 * [[0, 1], [1, 4]] = [[0.6, 0.7], [0.7, 3.4]]
    torch.testing.assert_close(f2, torch.tensor([[0.6, 0.7], [0.7, 3.4]]))


def test_loss_updates_F_and_Wp_buffers_as_specified(digits: Splits) -> None:
    model = _model(digits, rho=0.3, eps=0.1)
    assert {"F_hat", "Wp", "step"} <= set(model.state_dict())
    seen = []
    for seed in range(2):
        views = _views(model, digits, seed)
        with torch.no_grad():  # the projections loss() will see (the EMA update leaves the online net alone)
            z = torch.cat([model.projector(model.backbone(v)) for v in views])
        seen.append(z.T @ z / len(z))
        model.loss(views, 0.0)
    expected = 0.3 * seen[0] + 0.7 * seen[1]
    torch.testing.assert_close(model.F_hat, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.Wp, dp.predictor_weight(expected, 0.1), atol=1e-4, rtol=1e-4)
    assert int(model.step) == 2


def test_freq_keeps_Wp_between_updates(digits: Splits) -> None:
    model = _model(digits, freq=2)
    model.loss(_views(model, digits, 0), 0.0)
    w0, f0 = model.Wp.clone(), model.F_hat.clone()
    model.loss(_views(model, digits, 1), 0.0)  # step 1: F moves, Wp stays
    assert torch.equal(model.Wp, w0) and not torch.equal(model.F_hat, f0)
    model.loss(_views(model, digits, 2), 0.0)  # step 2: Wp is reset from F
    torch.testing.assert_close(model.Wp, dp.predictor_weight(model.F_hat, model.cfg.eps))


def test_only_the_online_network_gets_gradients(digits: Splits) -> None:
    model = _model(digits)
    assert not any("Wp" in n or "F_hat" in n for n, _ in model.named_parameters())  # not trainable
    model.loss(_views(model, digits), 0.0).backward()
    assert not model.Wp.requires_grad and model.Wp.grad is None
    assert all(p.grad is None for p in model.target_backbone.parameters())
    assert all(p.grad is None for p in model.target_projector.parameters())
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())


def test_loss_is_symmetric_in_the_views_and_invariant_to_batch_order(digits: Splits) -> None:
    model = _model(digits)
    v1, v2 = _views(model, digits)
    perm = torch.randperm(len(v1), generator=torch.Generator().manual_seed(3))
    base = float(copy.deepcopy(model).loss([v1, v2], 0.0).detach())
    assert math.isclose(float(copy.deepcopy(model).loss([v2, v1], 0.0).detach()), base, rel_tol=1e-5)
    assert math.isclose(float(copy.deepcopy(model).loss([v1[perm], v2[perm]], 0.0).detach()), base, rel_tol=1e-5)


def test_target_momentum_schedule_and_ema(digits: Splits) -> None:
    constant = _model(digits)
    assert constant.momentum_at(0.0) == constant.momentum_at(1.0) == 0.996
    ramp = _model(digits, cosine_momentum=True)
    assert math.isclose(ramp.momentum_at(0.0), 0.996) and math.isclose(ramp.momentum_at(1.0), 1.0)
    w_online = next(constant.projector.parameters())
    w_target = next(constant.target_projector.parameters())
    with torch.no_grad():
        w_online.add_(1.0)
    old = w_target.clone()
    constant.update_target(0.9)
    torch.testing.assert_close(w_target, 0.9 * old + 0.1 * w_online)


def test_state_dict_round_trip_resumes_exactly(digits: Splits) -> None:
    model = _model(digits)
    model.loss(_views(model, digits, 0), 0.0)
    resumed = _model(digits)
    resumed.load_state_dict(model.state_dict())
    views = _views(model, digits, 1)
    assert torch.equal(model.loss(views, 0.5), resumed.loss(views, 0.5))
    assert torch.equal(model.F_hat, resumed.F_hat) and torch.equal(model.Wp, resumed.Wp)


def test_config_is_validated() -> None:
    for bad in (dict(rho=1.0), dict(rho=-0.1), dict(freq=0), dict(eps=-1.0), dict(momentum=1.5)):
        with pytest.raises(ConfigError):
            dp.Config(**bad)  # type: ignore[arg-type]


def test_loss_falls_within_20_sgd_steps(digits: Splits) -> None:
    torch.manual_seed(0)
    model = _model(digits)
    views = _views(model, digits)
    assert_loss_falls(model, views)


def _correlation_on_rank(rank: int, world: int, z: torch.Tensor) -> torch.Tensor:
    b = len(z) // world
    return dp.correlation(z[rank * b : (rank + 1) * b])


def test_correlation_in_two_processes_equals_one_process_on_the_global_batch() -> None:
    from tests.ddp import run_distributed

    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for f in run_distributed(_correlation_on_rank, 2, (z,)):
        torch.testing.assert_close(f, z.T @ z / 8)
