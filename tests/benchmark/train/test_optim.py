"""Per-group optimiser settings the official recipes use: SimSiam's fixed predictor lr, Barlow Twins'
bias lr, DINO's weight-decay schedule and per-parameter gradient clipping."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from benchmark.config import PretrainConfig
from benchmark.data.sets import Splits
from benchmark.train.optim import build_optimizer, clip_per_parameter, lr_at, set_hyperparameters
from tests.methods.test_all_methods import _build


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


def test_simsiam_predictor_lr_stays_at_its_peak(digits: Splits) -> None:
    model = _build("simsiam", digits)
    cfg = PretrainConfig(optimizer="sgd", lr=0.05, batch_size=256)
    opt = build_optimizer(model, cfg)
    pred = {id(p) for p in model.predictor.parameters()}
    set_hyperparameters(opt, lr_at(90, 100, 0, 0.05), 0.05, None)
    for g in opt.param_groups:
        if not g["params"]:
            continue
        in_pred = {id(p) in pred for p in g["params"]}
        assert len(in_pred) == 1  # a group is all predictor or none of it
        assert g["lr"] == (0.05 if in_pred.pop() else pytest.approx(lr_at(90, 100, 0, 0.05)))
    assert sum(len(g["params"]) for g in opt.param_groups) == len([p for p in model.parameters() if p.requires_grad])


def test_barlow_twins_biases_and_bn_use_the_bias_lr_without_lars(digits: Splits) -> None:
    model = _build("barlow_twins", digits)
    opt = build_optimizer(model, PretrainConfig(optimizer="lars", lr=0.2, weight_decay=1.5e-6))
    set_hyperparameters(opt, 0.2, 0.2, None)
    weights, biases = opt.param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim <= 1 for p in biases["params"])
    assert (weights["lr"], weights["lars"], weights["weight_decay"]) == (0.2, True, 1.5e-6)
    assert biases["lr"] == pytest.approx(0.0048) and biases["lars"] is False and biases["weight_decay"] == 0.0
    model.cfg = dataclasses.replace(model.cfg, bias_lr_mult=1.0)  # a plain-SGD suite: biases at the weights' lr
    opt = build_optimizer(model, PretrainConfig(optimizer="sgd", lr=0.1))
    set_hyperparameters(opt, 0.1, 0.1, None)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.1])


def test_dino_weight_decay_rises_on_a_cosine_for_decayed_groups_only(digits: Splits) -> None:
    model = _build("dino", digits)
    assert model.weight_decay_at(0.0, 0.04) == pytest.approx(0.04)
    assert model.weight_decay_at(0.5, 0.04) == pytest.approx(0.22)
    assert model.weight_decay_at(1.0, 0.04) == pytest.approx(0.4)
    opt = build_optimizer(model, PretrainConfig(optimizer="adamw", lr=5e-4, weight_decay=0.04))
    set_hyperparameters(opt, 1e-4, 5e-4, model.weight_decay_at(1.0, 0.04))
    assert sorted(g["weight_decay"] for g in opt.param_groups) == pytest.approx([0.0, 0.4])


def test_clip_per_parameter_bounds_each_gradient_norm_separately() -> None:
    m = nn.Linear(3, 2)
    m.weight.grad = torch.full((2, 3), 10.0)  # norm ~24.5: clipped to 3
    m.bias.grad = torch.tensor([0.3, 0.4])  # norm 0.5: untouched
    clip_per_parameter(m, 3.0)
    assert float(m.weight.grad.norm()) == pytest.approx(3.0, rel=1e-5)
    assert torch.equal(m.bias.grad, torch.tensor([0.3, 0.4]))
    assert torch.allclose(m.weight.grad / m.weight.grad[0, 0], torch.ones(2, 3))  # direction kept


def test_cosine_ends_at_the_floor_after_warm_up() -> None:
    # DINO's cosine_scheduler: final + 0.5 (base - final)(1 + cos(pi t)) after a linear warm-up
    assert [lr_at(s, 110, 10, 1.0, 0.1) for s in (0, 9, 10, 60, 110, 200)] == pytest.approx(
        [0.1, 1.0, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1])
    assert lr_at(60, 110, 10, 1.0) == pytest.approx(0.5)  # floor 0 by default
