from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import nn

import protocols.linear_sgd as lsgd
from benchmark.backbones import build_backbone
from benchmark.config import PretrainConfig, config_hash
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.evaluate.encoder import FrozenEncoder
from benchmark.evaluate.finetune import Classifier, train_heads
from benchmark.registry import PROTOCOLS
from protocols.linear_sgd import Config, MoCoConfig, fit, fit_heads, linear_sgd, make_head, recipe
from tests.protocols.test_knn import Flatten, blobs, frozen

FAST = Config(epochs=10, batch_size=32)  # blobs: 160 train images, 5 steps per epoch


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def by_split(rows: list[Any]) -> dict[tuple[str, str], Any]:
    return {(r.split, r.metric): r for r in rows}


def test_separable_blobs_give_top1_of_one() -> None:
    rows = linear_sgd(frozen(Flatten(16), 16), blobs(), FAST, seed=0)
    # test rows through classification_rows: top1 and mean_class_acc (top5 only past 5 classes; blobs have 4)
    assert [(r.split, r.metric, r.value) for r in rows] == [("test", "top1", 1.0), ("test", "mean_class_acc", 1.0)]
    assert all(r.selection == "fixed lr=0.1" and r.n_train == 200 for r in rows)  # one lr: fit on train + val directly


def test_head_init_is_mocos_and_bn_head_has_no_affine() -> None:
    fc = make_head(512, 100, bn=False, seed=0)
    assert isinstance(fc, nn.Linear)
    w = fc.weight.detach()
    assert fc.bias.abs().max() == 0 and abs(float(w.std()) - 0.01) < 3e-4 and abs(float(w.mean())) < 1e-4
    torch.testing.assert_close(make_head(512, 100, bn=False, seed=0).weight, fc.weight)
    bn = make_head(512, 100, bn=True, seed=0)
    assert isinstance(bn, nn.Sequential) and isinstance(bn[0], nn.BatchNorm1d) and not bn[0].affine
    torch.testing.assert_close(bn[1].weight, fc.weight)


class ForceTrainBackbone(Classifier):
    """What a bug would do: train the backbone (train mode, gradients on)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, train_backbone: bool) -> None:
        del train_backbone
        super().__init__(backbone, head, train_backbone=True)


def test_frozen_backbone_with_bn_is_bit_identical_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    # BN with no affine: its only state is the running statistics, which any train-mode forward moves.
    module = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(16, affine=False))
    enc = frozen(module, 16)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    model = fit(enc, blobs().train, 4, FAST, 0.1, seed=0)
    for k, v in model.backbone.state_dict().items():  # the trained copy, not just the encoder
        assert torch.equal(v, before[k]), k
    linear_sgd(enc, blobs(), FAST, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    monkeypatch.setattr(lsgd, "Classifier", ForceTrainBackbone)
    with pytest.raises(RuntimeError, match="frozen backbone changed.*running_mean"):
        fit(enc, blobs().train, 4, FAST, 0.1, seed=0)


def test_convnet_weights_and_bn_stats_are_unchanged(digits: Splits) -> None:
    torch.manual_seed(0)
    module = build_backbone(PretrainConfig(backbone="convnet_tiny"), 1, 16)
    module.train()
    enc = frozen(module, int(getattr(module, "dim")))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    small = dataclasses.replace(digits, train=digits.train.subset(torch.arange(128)))
    model = fit(enc, small.train, 10, Config(epochs=1, batch_size=64), 0.1, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_moco_variant_steps_by_ten_at_epochs_60_and_80() -> None:
    cfg = MoCoConfig()
    assert (cfg.lrs, cfg.epochs, cfg.batch_size, cfg.nesterov, cfg.weight_decay, cfg.momentum) == ((30.0,), 100, 256, False, 0.0, 0.9)
    assert PROTOCOLS.entry("linear_sgd_moco").config is MoCoConfig and PROTOCOLS.get("linear_sgd_moco") is linear_sgd
    r, per_epoch = recipe(cfg, 30.0), 7
    total = cfg.epochs * per_epoch
    mult = {epoch: r.lr_at(epoch * per_epoch, total) for epoch in (0, 59, 60, 79, 80, 99)}
    assert mult[0] == 1.0 and mult[59] == 1.0 and math.isclose(mult[60], 0.1) and math.isclose(mult[79], 0.1)
    assert math.isclose(mult[80], 0.01) and math.isclose(mult[99], 0.01)
    assert math.isclose(r.lr_at(60 * per_epoch - 1, total), 1.0)  # the last step of epoch 59
    simclr = recipe(Config(), 0.1)  # default: cosine from 1 to 0, no warm-up, Nesterov
    assert simclr.nesterov and simclr.lr_at(0, 900) == 1.0 and math.isclose(simclr.lr_at(450, 900), 0.5)


def test_selection_picks_the_lr_that_learns_and_survives_divergence() -> None:
    cfg = dataclasses.replace(FAST, lrs=(1e-6, 1e38, 0.1))  # too small to learn, overflows, fine
    rows = by_split(linear_sgd(frozen(Flatten(16), 16), blobs(), cfg, seed=0))
    val = rows["val", "top1"]
    assert val.selection == "val top1: lr=0.1 of 3 (1e-06:0.1000 1e+38:diverged 0.1:1.0000)"
    assert val.value == 1.0 and val.n_train == 160
    assert rows["test", "top1"].value == 1.0 and rows["test", "top1"].n_train == 200  # refit on train + val


def test_all_lrs_diverging_is_a_clear_error() -> None:
    with pytest.raises(FloatingPointError, match="every learning rate diverged"):
        linear_sgd(frozen(Flatten(16), 16), blobs(), dataclasses.replace(FAST, lrs=(1e38, 3e38)), seed=0)


def test_deterministic_given_the_seed() -> None:
    enc, data = frozen(Flatten(16), 16), blobs()
    cfg = dataclasses.replace(FAST, epochs=2, bn_head=True)
    a, b, c = (fit(enc, data.train, 4, cfg, 0.1, seed=s).head.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])
    assert not torch.equal(a["0.running_mean"], c["0.running_mean"])  # the seed drives crops and order too


@pytest.mark.parametrize(("field", "value"), [
    ("lrs", ()), ("lrs", (0.1, -1.0)), ("lrs", (math.nan,)), ("lrs", (0.1, 0.1)), ("epochs", 0), ("batch_size", 0),
    ("momentum", 1.0), ("weight_decay", -1e-4), ("schedule", "linear"), ("milestones", (0.8, 0.6)),
    ("milestones", (0.5, 1.0)), ("crop_scale", 0.0), ("crop_scale", 1.5),
])
def test_config_validation_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"linear_sgd.{field}"):
        Config(**{field: value})


def test_random_convnet_on_digits_is_well_above_chance(digits: Splits) -> None:
    torch.manual_seed(0)
    module = build_backbone(PretrainConfig(backbone="convnet_tiny"), 1, 16)
    enc = FrozenEncoder(module, int(getattr(module, "dim")), digits.mean, digits.std, key="random")
    # random-init features are tiny (std ~0.006), so the head needs the BN trick to learn in 5 epochs
    cfg = Config(lrs=(1.0,), epochs=5, batch_size=64, bn_head=True, refit=False)
    rows = by_split(linear_sgd(enc, digits, cfg, seed=0))
    assert rows["val", "top1"].value > 0.35 and rows["val", "top1"].selection == f"fixed lr=1 (1:{rows['val', 'top1'].value:.4f})"
    assert rows["test", "top1"].n_train == len(digits.train)  # no refit: trained on train only
    assert 0.4 < rows["test", "top1"].value <= rows["test", "top5"].value  # chance: 0.1


# --- one pass: every lr a head on the same frozen features (DINOv2 eval/linear.py)


def test_one_pass_heads_end_bit_identical_to_separate_runs(digits: Splits) -> None:
    torch.manual_seed(0)
    module = build_backbone(PretrainConfig(backbone="convnet_tiny"), 1, 16)
    enc = FrozenEncoder(module, int(getattr(module, "dim")), digits.mean, digits.std, key="random")
    small = dataclasses.replace(digits, train=digits.train.subset(torch.arange(320)))
    # BN head (its running statistics too), crops, Nesterov, weight decay, a step schedule: all must match per head
    cfg = Config(lrs=(0.3, 3.0, 30.0), epochs=2, batch_size=64, bn_head=True, crop_scale=0.5, weight_decay=1e-4,
                 schedule="step", milestones=(0.5,), refit=False)
    backbone, heads = fit_heads(enc, small.train, 10, cfg, seed=3)
    for lr, head in zip(cfg.lrs, heads):
        assert head is not None
        alone = fit(enc, small.train, 10, cfg, lr, seed=3).head.state_dict()
        assert all(torch.equal(v, alone[k]) for k, v in head.state_dict().items()), lr
    one, per_lr = (linear_sgd(enc, small, dataclasses.replace(cfg, one_pass=p), seed=3) for p in (True, False))
    assert one == per_lr  # val scores, picked lr, the sweep string and the test rows, exactly
    assert one[0].selection.startswith("val top1: lr=") and len({r.value for r in one}) > 1
    assert len(set(one[0].selection.split("(")[1].split())) == 3  # three different val scores: the test can fail


class CountingHead(nn.Module):
    """A head that counts its training-mode calls."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head, self.calls = head, 0

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        return self.head(f)  # type: ignore[no-any-return]


def test_a_diverging_head_stops_while_the_others_train_on() -> None:
    data, cfg = blobs(), dataclasses.replace(FAST, epochs=3)  # 5 steps per epoch
    heads = [CountingHead(make_head(16, 4, False, 0)) for _ in range(3)]
    losses = train_heads(Flatten(16), heads, (0.1, 1e38, 1.0), data.train, recipe(cfg, 0.1), (0.0,), (1.0,),
                         torch.device("cpu"), seed=0)
    assert [len(v) for v in losses] == [3, 1, 3] and not math.isfinite(losses[1][0])
    assert all(math.isfinite(x) for x in losses[0] + losses[2])
    assert [h.calls for h in heads] == [15, 5, 15]  # the diverged head is left out after its epoch
    alone = fit(frozen(Flatten(16), 16), data.train, 4, cfg, 0.1, seed=0).head
    assert torch.equal(heads[0].state_dict()["head.weight"], alone.state_dict()["weight"])  # unaffected by its diverging neighbour


def test_one_pass_drops_a_diverged_lr_and_picks_as_separate_runs() -> None:
    cfg = dataclasses.replace(FAST, lrs=(1e-6, 1e38, 0.1))
    one, per_lr = (by_split(linear_sgd(frozen(Flatten(16), 16), blobs(), dataclasses.replace(cfg, one_pass=p), seed=0))
                   for p in (True, False))
    assert one["val", "top1"].selection == "val top1: lr=0.1 of 3 (1e-06:0.1000 1e+38:diverged 0.1:1.0000)"
    assert one == per_lr
    _, heads = fit_heads(frozen(Flatten(16), 16), blobs().train, 4, cfg, seed=0)
    assert [h is None for h in heads] == [False, True, False]
    with pytest.raises(FloatingPointError, match="every learning rate diverged"):
        linear_sgd(frozen(Flatten(16), 16), blobs(), dataclasses.replace(FAST, lrs=(1e38, 3e38)), seed=0)


def test_one_pass_keeps_the_backbone_bit_identical_and_checks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    module = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(16, affine=False))  # only state: running statistics
    enc = frozen(module, 16)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cfg = dataclasses.replace(FAST, lrs=(0.1, 1.0), refit=False)
    backbone, _ = fit_heads(enc, blobs().train, 4, cfg, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # the trained-on copy
    linear_sgd(enc, blobs(), cfg, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())

    def leaky(net: nn.Module, *args: Any, **kwargs: Any) -> list[list[float]]:
        net.eval = net.train  # type: ignore[method-assign]  # what a bug would do: the frozen copy left in train mode
        return train_heads(net, *args, **kwargs)

    monkeypatch.setattr(lsgd, "train_heads", leaky)
    with pytest.raises(RuntimeError, match="frozen backbone changed.*running_mean"):
        linear_sgd(enc, blobs(), cfg, seed=0)


def test_one_pass_is_not_part_of_the_config_hash() -> None:
    assert config_hash({"linear_sgd": Config(one_pass=False)}) == config_hash({"linear_sgd": Config()})
    assert config_hash({"linear_sgd": Config(lrs=(0.1, 1.0))}) != config_hash({"linear_sgd": Config()})
