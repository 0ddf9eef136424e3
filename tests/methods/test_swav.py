"""SwAV: Sinkhorn codes, the swapped-prediction loss, the queue, prototype freezing, and training on real digits."""

from __future__ import annotations

import math

import pytest
import torch

import methods.swav  # noqa: F401  (registers "swav")
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.swav import Config, SwAV, sinkhorn, swav_loss
from tests.methods.steps import assert_loss_falls

TINY = Config(hidden_dim=64, proj_dim=16, n_prototypes=10, n_small_crops=2, freeze_prototypes=0.0)


def _model(digits: Splits, cfg: Config = TINY) -> SwAV:
    model = build_method(METHODS.get("swav"), cfg, PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    assert isinstance(model, SwAV)
    return model


def _views(model: SwAV, digits: Splits, n: int = 32) -> list[torch.Tensor]:
    return make_views(digits.train.x[:n], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))


def _sinkhorn_reference(scores: list[list[float]], eps: float, iters: int) -> list[list[float]]:
    """Paper eq. 3-5 / official `distributed_sinkhorn` as loops on a (B, K) list: Q = exp(s / eps)^T (K, B)."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[j][i] / eps) for j in range(b)] for i in range(k)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]  # each prototype (row) -> 1/K
        col = [sum(q[i][j] for i in range(k)) for j in range(b)]
        q = [[q[i][j] / col[j] / b for j in range(b)] for i in range(k)]  # each sample (column) -> 1/B
    return [[q[i][j] * b for i in range(k)] for j in range(b)]


def test_sinkhorn_rows_sum_to_one_and_prototypes_share_the_batch() -> None:
    s = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)) * 0.3
    q = sinkhorn(s, eps=0.05, iters=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(8))  # last step normalises samples: exact
    assert (q >= 0).all()
    # converged: every prototype receives B/K of the assignments, i.e. marginal 1/K
    q = sinkhorn(s, eps=0.05, iters=500)
    torch.testing.assert_close(q.sum(dim=0) / 8, torch.full((5,), 1 / 5), rtol=1e-3, atol=1e-4)
    # 3 iterations already pull the prototype marginals far closer to 1/K than the plain softmax
    soft = torch.softmax(s / 0.05, dim=1).sum(dim=0) / 8
    three = sinkhorn(s, eps=0.05, iters=3).sum(dim=0) / 8
    assert (three - 0.2).abs().max() < 0.5 * (soft - 0.2).abs().max()


def test_sinkhorn_hand_case_and_loop_reference() -> None:
    # scores [[a, 0], [0, a]] are symmetric, so every normalisation keeps the ratios:
    # q = [[p, 1-p], [1-p, p]] with p = e^{a/eps} / (e^{a/eps} + 1); a = eps ln 3 gives p = 3/4
    eps = 0.05
    a = eps * math.log(3)
    q = sinkhorn(torch.tensor([[a, 0.0], [0.0, a]]), eps=eps, iters=3)
    torch.testing.assert_close(q, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    # equal scores give uniform codes 1/K
    torch.testing.assert_close(sinkhorn(torch.zeros(3, 4)), torch.full((3, 4), 0.25))
    s = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).double()
    ref = torch.tensor(_sinkhorn_reference(s.tolist(), 0.5, 3), dtype=torch.float32)
    torch.testing.assert_close(sinkhorn(s, eps=0.5, iters=3), ref)


def test_swav_loss_hand_case() -> None:
    # tau = 1. crop 0: scores (0, 0) -> softmax (1/2, 1/2); crop 1: (ln 3, 0) -> (3/4, 1/4)
    # codes q0 = (1, 0), q1 = (1/2, 1/2)
    # a = 0, predicted by crop 1: -ln(3/4);  a = 1, predicted by crop 0: -(1/2 ln 1/2 + 1/2 ln 1/2) = ln 2
    # L = (ln(4/3) + ln 2) / 2 = ln(8/3) / 2
    s0, s1 = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])
    q0, q1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    assert math.isclose(float(swav_loss([s0, s1], [q0, q1], 1.0)), math.log(8 / 3) / 2, rel_tol=1e-6)
    # a third (small) crop (0, ln 3) -> (1/4, 3/4) predicts both codes; each code averages over V - 1 = 2 crops:
    # a = 0: (ln(4/3) + ln 4) / 2;  a = 1: (ln 2 + (ln 4 + ln(4/3)) / 2) / 2
    s2 = torch.tensor([[0.0, math.log(3)]])
    l0 = (math.log(4 / 3) + math.log(4)) / 2
    l1 = (math.log(2) + (math.log(4) + math.log(4 / 3)) / 2) / 2
    assert math.isclose(float(swav_loss([s0, s1, s2], [q0, q1], 1.0)), (l0 + l1) / 2, rel_tol=1e-6)
    # temperature divides the scores: tau = 0.5 on half the scores is the same case
    assert math.isclose(float(swav_loss([s0 / 2, s1 / 2], [q0, q1], 0.5)), math.log(8 / 3) / 2, rel_tol=1e-6)


def test_swav_loss_is_symmetric_in_the_global_crops_and_codes_get_no_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(4, 6, generator=g, requires_grad=True) for _ in range(3)]
    q = [torch.softmax(torch.randn(4, 6, generator=g), dim=1).requires_grad_(True) for _ in range(2)]
    loss = swav_loss(s, q, 0.1)
    swapped = swav_loss([s[1], s[0], s[2]], [q[1], q[0]], 0.1)
    assert math.isclose(float(loss.detach()), float(swapped.detach()), rel_tol=1e-6)
    loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in q)


def test_views_are_two_global_and_v_small_crops() -> None:
    model = _bare_model(Config(hidden_dim=8, proj_dim=4, n_prototypes=3))
    for size, small in ((224, 96), (28, 12), (16, 8)):
        specs = model.views(size)
        assert [v.size for v in specs] == [size] * 2 + [small] * 6
        assert [v.scale for v in specs] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    with pytest.raises(ConfigError, match="swav.temperature"):
        Config(temperature=0.0)


def test_loss_is_invariant_to_batch_order_and_codes_need_no_gradient(digits: Splits) -> None:
    model = _model(digits)
    views = _views(model, digits, n=16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    a = model.loss(views, 0.5)
    b = model.loss([v[perm] for v in views], 0.5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    z = model.embed(views[:1])
    s = z @ model.prototypes.weight.T
    assert s.requires_grad and not model.codes(s, z, 0, 0.5).requires_grad


def test_prototypes_are_normalised_and_frozen_early_then_trained(digits: Splits) -> None:
    model = _model(digits, Config(hidden_dim=64, proj_dim=16, n_prototypes=10, n_small_crops=2, freeze_prototypes=0.1))
    with torch.no_grad():
        model.prototypes.weight.mul_(3)
    views = _views(model, digits, n=8)
    model.loss(views, 0.05).backward()
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(10))
    assert model.prototypes.weight.grad is None  # frozen for progress < 0.1
    assert model.projector[0].weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.loss(views, 0.1).backward()
    grad = model.prototypes.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_queue_fills_newest_first_and_is_used_once_full() -> None:
    cfg = Config(hidden_dim=8, proj_dim=3, n_prototypes=4, queue_length=6, queue_start=0.5)
    model = _bare_model(cfg)
    assert "queue" in model.state_dict() and model.queue.shape == (2, 6, 3)
    g = torch.Generator().manual_seed(0)
    w = model.prototypes.weight
    zs = [torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1) for _ in range(3)]
    model.codes(zs[0] @ w.T, zs[0], 1, 0.4)  # before queue_start: untouched
    assert not model.queue.any()
    for z in zs[:2]:  # not full yet: codes come from the batch alone
        torch.testing.assert_close(model.codes(z @ w.T, z, 1, 0.5), sinkhorn(z @ w.T))
    torch.testing.assert_close(model.queue[1], torch.cat([zs[1], zs[0][:2]]))  # newest first, oldest dropped
    assert not model.queue[0].any()  # each global crop has its own queue
    before = model.queue[1].clone()
    q = model.codes(zs[2] @ w.T, zs[2], 1, 0.9)  # full: queue scores are prepended before Sinkhorn
    torch.testing.assert_close(q, sinkhorn(torch.cat([before @ w.T, zs[2] @ w.T]))[-4:])
    torch.testing.assert_close(model.queue[1], torch.cat([zs[2], zs[1][:2]]))


def _bare_model(cfg: Config) -> SwAV:
    backbone = torch.nn.Flatten()
    backbone.dim = 4  # type: ignore[assignment]
    torch.manual_seed(0)
    model = SwAV(backbone, cfg)
    model.normalize_prototypes()
    return model


def test_loss_falls_over_20_sgd_steps_on_real_digits(digits: Splits) -> None:
    model = _model(digits)
    views = _views(model, digits)
    assert_loss_falls(model, views, progress=0.5)


def _sinkhorn_rank(rank: int, world: int, s: torch.Tensor) -> torch.Tensor:
    b = len(s) // world
    return sinkhorn(s[rank * b : (rank + 1) * b], eps=0.05, iters=3)


def test_sinkhorn_in_two_processes_equals_one_process_on_the_global_batch() -> None:
    from tests.ddp import run_distributed

    s = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)) * 0.3
    torch.testing.assert_close(torch.cat(run_distributed(_sinkhorn_rank, 2, (s,))), sinkhorn(s, eps=0.05, iters=3))
