"""MoCo v3: ctr against its formula (2T factor included), the momentum encoder, heads, views, ResNet- and ViT-style training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import methods.mocov3 as mocov3  # registers "mocov3"
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.mocov3 import Config, MoCoV3, ctr, momentum_at
from tests.methods.steps import sgd_losses

SMALL = Config(hidden_dim=64, proj_dim=16)
VIT = Config(hidden_dim=64, proj_dim=16, proj_layers=3, pred_bn_last=True, temperature=0.2)


def _reference(q: Tensor, k: Tensor, t: float) -> float:
    """Paper alg. 1 as loops: 2t * mean_i -log( exp(q_i.k_i / t) / sum_j exp(q_i.k_j / t) ), q, k unit rows."""
    qs = [[a / math.sqrt(sum(x * x for x in row)) for a in row] for row in q.double().tolist()]
    ks = [[a / math.sqrt(sum(x * x for x in row)) for a in row] for row in k.double().tolist()]
    total = 0.0
    for i, qi in enumerate(qs):
        s = [sum(a * b for a, b in zip(qi, kj)) / t for kj in ks]
        total += -math.log(math.exp(s[i]) / sum(math.exp(v) for v in s))
    return 2 * t * total / len(qs)


def _random(n: int = 6, d: int = 5, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q1, q2, k1, k2 = (torch.randn(n, d, generator=g) for _ in range(4))
    return q1, q2, k1, k2


def test_ctr_hand_case_includes_the_2t_factor() -> None:
    q = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # unit rows: (1, 0), (0.7071, 0.7071)
    k = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # unit rows: (1, 0), (0, 1)
    # T = 0.25. Row 0: logits (1/T, 0) = (4, 0), label 0: CE = log(1 + e^-4) = 0.018150.
    # Row 1: logits (0.7071/T, 0.7071/T) = (2.828, 2.828), label 1: CE = log 2 = 0.693147.
    # Mean CE = 0.355649; times 2T = 0.5 -> 0.177824.
    expected = 2 * 0.25 * (math.log(1 + math.exp(-4)) + math.log(2)) / 2
    assert math.isclose(expected, 0.177824, rel_tol=1e-5)
    assert math.isclose(float(ctr(q, k, 0.25)), expected, rel_tol=1e-6)
    # at T = 1 the factor is 2: row 0 logits (1, 0) -> log(1 + e^-1); row 1 -> log 2
    assert math.isclose(float(ctr(q, k, 1.0)), 2 * (math.log(1 + math.exp(-1)) + math.log(2)) / 2, rel_tol=1e-6)


def test_ctr_matches_the_loop_formula() -> None:
    q, _, k, _ = _random()
    for t in (0.2, 1.0):
        assert math.isclose(float(ctr(q, k, t)), _reference(q, k, t), rel_tol=1e-5)
    # the positive of query i is key i: shuffling the keys alone changes the loss
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    assert not math.isclose(float(ctr(q, k[perm], 0.2)), float(ctr(q, k, 0.2)), rel_tol=1e-3)


def test_symmetric_loss_is_symmetric_in_the_views_and_invariant_to_batch_order() -> None:
    q1, q2, k1, k2 = _random(n=7)

    def sym(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor) -> Tensor:
        return ctr(q1, k2, 0.2) + ctr(q2, k1, 0.2)

    value = sym(q1, q2, k1, k2)
    torch.testing.assert_close(sym(q2, q1, k2, k1), value)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sym(q1[perm], q2[perm], k1[perm], k2[perm]), value)
    assert not torch.allclose(sym(q1[perm], q2, k1, k2), value)  # one view permuted alone breaks the pairs


def test_ctr_sends_no_gradient_into_the_keys() -> None:
    q, _, k, _ = (t.requires_grad_(True) for t in _random())
    ctr(q, k, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


def test_ctr_sharded_over_two_ranks_equals_one_process_on_the_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated ranks (a real 2-process run costs ~10 s of spawning here): `gather` returns every rank's
    # keys in rank order, as all_gather does, so rank r's positives must sit at rows r * B + i.
    q, _, k, _ = _random(n=8)
    b = 4
    monkeypatch.setattr(mocov3, "gather", lambda local: nn.functional.normalize(k, dim=1))
    losses, grads = [], []
    for r in range(2):
        monkeypatch.setattr(mocov3, "rank", lambda r=r: r)
        local_q = q[r * b : (r + 1) * b].clone().requires_grad_(True)
        loss = ctr(local_q, k[r * b : (r + 1) * b], 0.2)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(local_q.grad)
    monkeypatch.undo()
    ref_q = q.clone().requires_grad_(True)
    ref = ctr(ref_q, k, 0.2)
    ref.backward()
    assert math.isclose(sum(losses) / 2, float(ref.detach()), rel_tol=1e-5)
    # DDP averages over the 2 processes: each process's query gradient / 2 is the reference's
    torch.testing.assert_close(torch.cat(grads) / 2, ref_q.grad)
    # rank 1 with the labels of rank 0 (no offset) would score its queries against the wrong keys
    logits = nn.functional.normalize(q[b:], dim=1) @ nn.functional.normalize(k, dim=1).T / 0.2
    assert not math.isclose(losses[1], float(nn.functional.cross_entropy(logits, torch.arange(b))) * 0.4, rel_tol=1e-3)


def test_momentum_schedule_goes_from_m0_to_one() -> None:
    assert math.isclose(momentum_at(0.99, 0.0), 0.99)
    assert math.isclose(momentum_at(0.99, 0.5), 0.995)
    assert momentum_at(0.99, 1.0) == 1.0
    assert math.isclose(momentum_at(0.996, 0.0), 0.996)


def test_heads_follow_the_official_builder() -> None:
    backbone = nn.Linear(4, 4)
    backbone.dim = 4  # type: ignore[assignment]
    model = MoCoV3(backbone, Config(hidden_dim=32, proj_dim=8))
    proj, pred = list(model.projector), list(model.predictor)
    assert [tuple(m.weight.shape) for m in proj if isinstance(m, nn.Linear)] == [(32, 4), (8, 32)]
    assert isinstance(proj[-1], nn.BatchNorm1d) and not proj[-1].affine  # SimCLR-style last BN, no gamma/beta
    assert [tuple(m.weight.shape) for m in pred if isinstance(m, nn.Linear)] == [(32, 8), (8, 32)]
    assert isinstance(pred[-1], nn.Linear) and pred[-1].bias is None  # ResNet predictor: no last BN
    assert all(m.bias is None for m in [*proj, *pred] if isinstance(m, nn.Linear))  # `_build_mlp`: bias=False
    vit = MoCoV3(backbone, Config(hidden_dim=32, proj_dim=8, proj_layers=3, pred_bn_last=True))
    assert [tuple(m.weight.shape) for m in vit.projector if isinstance(m, nn.Linear)] == [(32, 4), (32, 32), (8, 32)]
    assert isinstance(vit.predictor[-1], nn.BatchNorm1d) and not vit.predictor[-1].affine
    assert model.encoder() is backbone
    assert model.momentum_backbone is not backbone
    assert not any(p.requires_grad for p in [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()])


def test_views_are_byol_asymmetric() -> None:
    backbone = nn.Linear(4, 4)
    backbone.dim = 4  # type: ignore[assignment]
    v1, v2 = MoCoV3(backbone, SMALL).views(28)
    for v in (v1, v2):
        assert (v.size, v.scale) == (28, (0.08, 1.0))
        assert (v.brightness, v.contrast, v.saturation, v.hue, v.jitter_p, v.gray_p, v.flip_p) == (0.4, 0.4, 0.2, 0.1, 0.8, 0.2, 0.5)
    assert (v1.blur_p, v1.solarize_p) == (1.0, 0.0)
    assert (v2.blur_p, v2.solarize_p) == (0.1, 0.2)


def test_registered_defaults_and_validation() -> None:
    entry = METHODS.entry("mocov3")
    assert entry.obj is MoCoV3 and entry.config is Config
    assert entry.meta["pretrain"] == dict(optimizer="lars", lr=0.6, weight_decay=1e-6, momentum=0.9, warmup_epochs=10)
    cfg = Config()
    assert (cfg.hidden_dim, cfg.proj_dim, cfg.proj_layers, cfg.pred_bn_last, cfg.temperature, cfg.momentum) == (4096, 256, 2, False, 1.0, 0.99)
    for bad in (dict(temperature=0.0), dict(momentum=1.5), dict(proj_layers=0), dict(hidden_dim=0), dict(min_scale=0.0)):
        with pytest.raises(ConfigError):
            Config(**bad)  # type: ignore[arg-type]


def _model_and_views(digits: Splits, cfg: Config, backbone: str = "convnet_tiny", n: int = 32) -> tuple[MoCoV3, list[Tensor]]:
    model = build_method(METHODS.get("mocov3"), cfg, PretrainConfig(backbone=backbone), digits, seed=0)
    views = make_views(digits.train.x[:n], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    assert isinstance(model, MoCoV3)
    return model, views


def _momentum_params(model: MoCoV3) -> list[Tensor]:
    return [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]


def _base_params(model: MoCoV3) -> list[Tensor]:
    return [*model.backbone.parameters(), *model.projector.parameters()]


def test_model_loss_is_view_symmetric_and_order_invariant_and_only_the_base_encoder_learns(digits: Splits) -> None:
    model, (v1, v2) = _model_and_views(digits, SMALL)
    value = model.loss([v1, v2], 0.0)
    torch.testing.assert_close(model.loss([v2, v1], 0.0), value)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.loss([v1[perm], v2[perm]], 0.0), value, rtol=1e-4, atol=1e-5)
    value.backward()
    assert all(p.grad is not None for p in [*_base_params(model), *model.predictor.parameters()])
    assert all(p.grad is None for p in _momentum_params(model))


def test_momentum_update_follows_the_schedule(digits: Splits) -> None:
    model, views = _model_and_views(digits, SMALL, n=8)
    assert all(torch.equal(pb, pm) for pb, pm in zip(_base_params(model), _momentum_params(model)))  # same start
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.loss(views, 0.0).backward()
    opt.step()
    old = [p.clone() for p in _momentum_params(model)]
    model.loss(views, 0.5)  # m = 0.995
    for pb, pm, po in zip(_base_params(model), _momentum_params(model), old):
        torch.testing.assert_close(pm, 0.995 * po + 0.005 * pb)
    assert any(not torch.equal(pm, po) for pm, po in zip(_momentum_params(model), old))
    frozen = [p.clone() for p in _momentum_params(model)]
    model.loss(views, 1.0)  # m = 1: the momentum encoder stops moving
    assert all(torch.equal(pm, po) for pm, po in zip(_momentum_params(model), frozen))



def test_loss_falls_within_20_steps_on_real_data(digits: Splits) -> None:
    torch.manual_seed(0)
    model, views = _model_and_views(digits, Config(hidden_dim=128, proj_dim=64))
    losses = sgd_losses(model, views)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_vit_tiny_backbone_at_16px_trains_with_the_vit_heads(digits: Splits) -> None:
    torch.manual_seed(0)
    model, views = _model_and_views(digits, VIT, backbone="vit_tiny", n=8)
    assert sum(isinstance(m, nn.Linear) for m in model.projector) == 3
    before = [p.clone() for p in model.backbone.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    value = model.loss(views, 0.0)
    assert torch.isfinite(value)
    value.backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    assert all(p.grad is None for p in _momentum_params(model))
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.backbone.parameters(), before))
    moved = [p.clone() for p in _momentum_params(model)]
    model.loss(views, 0.0)  # the next step pulls the momentum ViT towards the updated base ViT
    assert any(not torch.equal(p, m) for p, m in zip(_momentum_params(model), moved))


assert mocov3.__doc__ is not None and "2104.02057" in mocov3.__doc__ and "facebookresearch/moco-v3" in mocov3.__doc__
