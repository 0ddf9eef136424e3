"""SimSiam: the loss against its formula, its stop-gradient, the heads, the views, and training on real data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import methods.simsiam as simsiam  # importing registers "simsiam"
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.simsiam import Config, SimSiam, simsiam_loss
from tests.methods.steps import sgd_losses

SMALL = Config(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8)


def _identity(dim: int) -> nn.Module:
    """A stand-in backbone of width `dim`."""
    backbone = nn.Identity()
    backbone.dim = dim  # type: ignore[assignment]
    return backbone


def _reference(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> float:
    """Paper eq. 1 and 4 as loops: L = 1/2 mean_i D(p1_i, z2_i) + 1/2 mean_i D(p2_i, z1_i), D = -cos."""

    def d(p: Tensor, z: Tensor) -> float:
        total = 0.0
        for i in range(len(p)):
            pi, zi = p[i].double().tolist(), z[i].double().tolist()
            dot = sum(a * b for a, b in zip(pi, zi))
            total += -dot / (math.sqrt(sum(a * a for a in pi)) * math.sqrt(sum(b * b for b in zi)))
        return total / len(p)

    return d(p1, z2) / 2 + d(p2, z1) / 2


def _random(n: int = 6, d: int = 5, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) for _ in range(4)]


def test_loss_hand_case() -> None:
    p1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[3.0, 0.0], [1.0, 0.0]])  # cos(p1_i, z2_i) = 1, 0 -> D(p1, z2) = -(1 + 0)/2 = -0.5
    p2 = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # cos(p2_i, z1_i) = 1/sqrt(2), -1 -> D(p2, z1) = -(0.7071 - 1)/2 = 0.1464
    expected = (-0.5 + (1 - 1 / math.sqrt(2)) / 2) / 2  # L = (-0.5 + 0.1464) / 2 = -0.1768
    assert math.isclose(float(simsiam_loss(p1, p2, z1, z2)), expected, rel_tol=1e-6)
    assert math.isclose(expected, -0.176777, rel_tol=1e-5)


def test_loss_matches_the_loop_formula() -> None:
    p1, p2, z1, z2 = _random()
    assert math.isclose(float(simsiam_loss(p1, p2, z1, z2)), _reference(p1, p2, z1, z2), rel_tol=1e-5)
    # D(p, z) pairs p1 with z2 and p2 with z1, not p1 with z1
    assert not math.isclose(float(simsiam_loss(p1, p2, z1, z2)), _reference(p1, p2, z2, z1), rel_tol=1e-3)


def test_loss_is_in_minus_one_to_one_and_reaches_both_ends() -> None:
    for seed in range(5):
        value = float(simsiam_loss(*_random(seed=seed)))
        assert -1 <= value <= 1
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert math.isclose(float(simsiam_loss(2 * z, 3 * z, z, z)), -1.0, rel_tol=1e-6)  # p along the target: minimum
    assert math.isclose(float(simsiam_loss(-z, -z, z, z)), 1.0, rel_tol=1e-6)  # opposite: maximum


def test_loss_is_symmetric_in_the_views_and_invariant_to_batch_order() -> None:
    p1, p2, z1, z2 = _random(n=7)
    value = simsiam_loss(p1, p2, z1, z2)
    torch.testing.assert_close(simsiam_loss(p2, p1, z2, z1), value)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(simsiam_loss(p1[perm], p2[perm], z1[perm], z2[perm]), value)
    # but a permutation applied to one view only breaks the pairs
    assert not torch.allclose(simsiam_loss(p1[perm], p2, z1[perm], z2), value)


def test_targets_receive_no_gradient_through_the_loss() -> None:
    p1, p2, z1, z2 = (t.requires_grad_(True) for t in _random())
    simsiam_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None
    # the collapse ablation lets gradients into the targets
    p1, p2, z1, z2 = (t.requires_grad_(True) for t in _random())
    simsiam_loss(p1, p2, z1, z2, stop_gradient=False).backward()
    assert z1.grad is not None and z2.grad is not None


def test_in_the_model_z_gets_gradient_only_through_its_own_prediction() -> None:
    torch.manual_seed(0)
    model = SimSiam(_identity(16), SMALL)  # only the predictor matters here
    z1, z2 = (torch.randn(8, 16).requires_grad_(True) for _ in range(2))
    loss = simsiam_loss(model.predictor(z1), model.predictor(z2), z1, z2)
    (g1,) = torch.autograd.grad(loss, z1)
    # the same gradient from the prediction branch alone: D(h(z1), stopgrad(z2)) / 2
    only_p = -nn.functional.cosine_similarity(model.predictor(z1), z2.detach(), dim=-1).mean() / 2
    (ref,) = torch.autograd.grad(only_p, z1)
    torch.testing.assert_close(g1, ref)
    ablation = simsiam_loss(model.predictor(z1), model.predictor(z2), z1, z2, stop_gradient=False)
    (g_ablation,) = torch.autograd.grad(ablation, z1)
    assert not torch.allclose(g_ablation, ref)


def test_heads_follow_the_official_builder() -> None:
    backbone = _identity(4)
    model = SimSiam(backbone, SMALL)
    proj, pred = list(model.projector), list(model.predictor)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(32, 4), (32, 32), (16, 32)]
    assert all(m.bias is None for m in linears)  # every projector Linear is followed by a BN
    bns = [m for m in proj if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 3 and bns[-1].num_features == 16 and not bns[-1].affine and bns[0].affine
    assert isinstance(proj[-1], nn.BatchNorm1d) and not any(isinstance(m, nn.ReLU) for m in proj[-2:])
    assert [tuple(m.weight.shape) for m in pred if isinstance(m, nn.Linear)] == [(8, 16), (16, 8)]
    assert isinstance(pred[-1], nn.Linear) and pred[-1].bias is not None  # no BN on the predictor's output
    assert sum(isinstance(m, nn.BatchNorm1d) for m in pred) == 1
    assert model.encoder() is backbone
    assert not any(n.startswith(("target", "momentum")) for n, _ in model.named_modules())  # no momentum encoder


def test_views_are_the_moco_v2_augmentation() -> None:
    specs = SimSiam(_identity(4), SMALL).views(28)
    assert len(specs) == 2 and specs[0] == specs[1]
    v = specs[0]
    assert (v.size, v.scale) == (28, (0.2, 1.0))
    assert (v.brightness, v.contrast, v.saturation, v.hue, v.jitter_p) == (0.4, 0.4, 0.4, 0.1, 0.8)
    assert (v.gray_p, v.blur_p, v.solarize_p, v.flip_p) == (0.2, 0.5, 0.0, 0.5)


def test_registered_defaults_and_validation() -> None:
    entry = METHODS.entry("simsiam")
    assert entry.obj is SimSiam and entry.config is Config
    assert entry.meta["pretrain"] == dict(optimizer="sgd", lr=0.05, weight_decay=1e-4, momentum=0.9, warmup_epochs=0)
    cfg = Config()
    assert (cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, cfg.pred_hidden_dim, cfg.stop_gradient) == (2048, 2048, 3, 512, True)
    for bad in (dict(pred_hidden_dim=0), dict(proj_layers=0), dict(min_scale=0.0), dict(proj_dim=-1)):
        with pytest.raises(ConfigError):
            Config(**bad)  # type: ignore[arg-type]
    assert simsiam.__doc__ is not None and "arxiv.org/abs/2011.10566" in simsiam.__doc__


def _model_and_views(digits: Splits, cfg: Config) -> tuple[nn.Module, list[Tensor]]:
    model = build_method(METHODS.get("simsiam"), cfg, PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:32], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    return model, views


def test_model_loss_is_view_symmetric_order_invariant_and_ignores_progress(digits: Splits) -> None:
    model, (v1, v2) = _model_and_views(digits, SMALL)
    value = model.loss([v1, v2], 0.0)
    assert -1 <= float(value.detach()) <= 1
    torch.testing.assert_close(model.loss([v2, v1], 0.0), value)
    torch.testing.assert_close(model.loss([v1, v2], 1.0), value)  # no schedule: progress is unused
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.loss([v1[perm], v2[perm]], 0.0), value, rtol=1e-4, atol=1e-5)
    value.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # every part is online



def test_loss_falls_within_20_steps_on_real_data(digits: Splits) -> None:
    # heads narrower than the paper's 2048 to keep this fast on two CPU cores; the architecture is the same.
    # Starts near 0 (unrelated directions) and falls towards -1: about 0.0 -> -0.4 here.
    model, views = _model_and_views(digits, SMALL)
    losses = sgd_losses(model, views)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
