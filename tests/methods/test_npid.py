"""NPID: the NCE loss against its formula, Z estimated once, the memory bank (rows read by index, update rule, no
gradient, checkpoints, resume), the softmax variant, views and defaults, training on real data, two processes."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Literal, cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import methods.npid as npid  # registers "npid"
from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method, pretrain
from methods.npid import NPID, Config, bank_update, estimate_log_z, nce_loss
from tests.methods.steps import assert_loss_falls

SMALL = Config(proj_dim=8, nce_k=16, num_samples=50)


def _reference_nce(logits: Tensor, z: float, n: int) -> float:
    """The official NCECriterion as loops: P = exp(logit) / Z, P_n = 1/N, eps = 1e-7 in each denominator."""
    eps, total = 1e-7, 0.0
    for row in logits.double().tolist():
        k = len(row) - 1
        p = [math.exp(s) / z for s in row]
        total -= math.log(p[0] / (p[0] + k / n + eps))
        total -= sum(math.log((k / n) / (pj + k / n + eps)) for pj in p[1:])
    return total / len(logits)


def test_nce_loss_hand_case() -> None:
    # N = 4, K = 2: K P_n = 0.5; Z = 2.
    # row 1: P = [1.5, 0.5, 0.25] -> -log(1.5/2) - log(0.5/1) - log(0.5/0.75) = -log(0.75 * 0.5 * 2/3) = log 4
    # row 2 (log Z = 0): P = [1, 1, 1] -> -log(1/1.5) - 2 log(0.5/1.5) = log 1.5 + 2 log 3 = log 13.5
    logits = torch.tensor([[math.log(3.0), 0.0, math.log(0.5)], [math.log(2.0)] * 3])
    value = nce_loss(logits, math.log(2.0), 4)
    assert math.isclose(float(value), (math.log(4) + math.log(13.5)) / 2, rel_tol=1e-6)
    assert math.isclose(float(value), 1.994492, rel_tol=1e-6)
    assert math.isclose(float(value), _reference_nce(logits, 2.0, 4), rel_tol=1e-6)


def test_nce_loss_matches_the_official_criterion_and_is_invariant_to_batch_and_noise_order() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g) * 4  # (B, 1 + K)
    value = nce_loss(logits, math.log(30.0), 100)
    assert math.isclose(float(value), _reference_nce(logits, 30.0, 100), rel_tol=1e-5)
    torch.testing.assert_close(nce_loss(logits[torch.randperm(6, generator=g)], math.log(30.0), 100), value)
    shuffled = torch.cat([logits[:, :1], logits[:, 1:][:, torch.randperm(8, generator=g)]], dim=1)
    torch.testing.assert_close(nce_loss(shuffled, math.log(30.0), 100), value)
    assert not torch.allclose(nce_loss(logits.roll(1, dims=1), math.log(30.0), 100), value)  # column 0 is the positive
    # a higher positive score and lower noise scores both lower the loss
    assert nce_loss(logits + F.one_hot(torch.zeros(6, dtype=torch.long), 9), math.log(30.0), 100) < value
    assert nce_loss(logits - F.pad(torch.ones(6, 8), (1, 0)), math.log(30.0), 100) < value
    # log space: no overflow where exp(logit) does not fit in float32 (tau = 0.005)
    assert torch.isfinite(nce_loss(torch.full((2, 5), 200.0), 190.0, 100))


def test_estimate_log_z_is_n_times_the_mean_of_exp() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]])  # exp: 1, 3, 2, 2 -> mean 2
    assert math.isclose(float(estimate_log_z(logits, 50)), math.log(100.0), rel_tol=1e-6)
    assert math.isclose(float(estimate_log_z(torch.full((3, 4), 1 / 0.007), 10)), 1 / 0.007 + math.log(10), rel_tol=1e-6)


def test_bank_update_rule() -> None:
    v = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    f = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(bank_update(v, f, 0.5), torch.tensor([[s, s], [0.6, 0.8]]))  # normalise(v/2 + f/2)
    torch.testing.assert_close(bank_update(v, f, 0.0), f)  # m = 0: the paper's replacement
    torch.testing.assert_close(bank_update(v, f, 0.75), F.normalize(torch.tensor([[0.75, 0.25], [0.6, 0.8]]), dim=1))


def _model(digits: Splits, cfg: Config) -> tuple[NPID, list[Tensor], Tensor]:
    model = cast(NPID, build_method(METHODS.get("npid"), cfg, PretrainConfig(backbone="convnet_tiny"), digits, seed=0))
    views = make_views(digits.train.x[:32], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    indices = torch.arange(100, 164, 2)  # (32,) rows of the bank, not 0..31, so a mix-up would show
    return model, views, indices


def test_first_batch_sets_z_and_the_loss_reads_the_batch_rows(digits: Splits) -> None:
    model, views, idx = _model(digits, Config(proj_dim=16, nce_k=64, num_samples=500))
    bank0 = model.memory.clone()
    ref = copy.deepcopy(model)
    assert torch.isnan(model.log_z)
    torch.manual_seed(1)
    value = model.loss(views, 0.0, indices=idx)
    torch.manual_seed(1)  # the noise draw is the first use of the generator in loss()
    noise = torch.randint(500, (32, 64))
    f = ref.embed(views[0])
    logits = torch.einsum("bkd,bd->bk", bank0[torch.cat([idx[:, None], noise], dim=1)], f) / 0.07  # rows v_j of the old bank
    log_z = estimate_log_z(logits, 500)
    torch.testing.assert_close(model.log_z, log_z)
    torch.testing.assert_close(value, nce_loss(logits, log_z, 500))
    wrong = torch.einsum("bkd,bd->bk", bank0[torch.cat([idx[:, None] + 1, noise], dim=1)], f) / 0.07
    assert not torch.allclose(value, nce_loss(wrong, log_z, 500))
    model.loss(views, 0.5, indices=idx)
    torch.testing.assert_close(model.log_z, log_z)  # estimated once, then fixed (official NCEAverage)


def test_bank_update_writes_the_batch_rows_only(digits: Splits) -> None:
    model, views, idx = _model(digits, Config(proj_dim=16, nce_k=64, num_samples=500))
    bank0 = model.memory.clone()
    f = copy.deepcopy(model).embed(views[0]).detach()
    model.loss(views, 0.0, indices=idx)
    torch.testing.assert_close(model.memory[idx], F.normalize(0.5 * bank0[idx] + 0.5 * f, dim=1))
    rest = torch.ones(500, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(model.memory[rest], bank0[rest])


def test_bank_gets_no_gradient_and_the_encoder_does(digits: Splits) -> None:
    for loss_type in ("nce", "softmax"):
        model, views, idx = _model(digits, Config(proj_dim=16, nce_k=64, num_samples=500, loss_type=loss_type))
        model.loss(views, 0.0, indices=idx).backward()  # type: ignore[no-untyped-call]  # after the in-place bank update: saved tensors intact
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        assert {n for n, _ in model.named_parameters()} == {n for n, _ in model.backbone.named_parameters(prefix="backbone")} | {
            "head.weight", "head.bias"}
        assert not model.memory.requires_grad and model.memory.grad is None and not model.log_z.requires_grad
        assert model.encoder() is model.backbone


def test_softmax_is_cross_entropy_over_the_whole_bank(digits: Splits) -> None:
    model, views, idx = _model(digits, Config(proj_dim=16, num_samples=200, loss_type="softmax", temperature=0.1))
    bank0 = model.memory.clone()
    f = copy.deepcopy(model).embed(views[0])
    value = model.loss(views, 0.0, indices=idx)
    logits = (f @ bank0.T / 0.1).double().tolist()  # -log softmax of the own row, as loops
    expected = sum(math.log(sum(math.exp(s) for s in row)) - row[i] for row, i in zip(logits, idx.tolist())) / 32
    assert math.isclose(float(value.detach()), expected, rel_tol=1e-5)
    assert torch.isnan(model.log_z)  # no Z for the softmax
    torch.testing.assert_close(model.memory[idx], bank_update(bank0[idx], f.detach(), 0.5))


def test_checkpoint_round_trip_of_the_bank(digits: Splits) -> None:
    model, views, idx = _model(digits, Config(proj_dim=16, nce_k=64, num_samples=500))
    model.loss(views, 0.0, indices=idx)
    state = copy.deepcopy(model.state_dict())
    assert {"memory", "log_z"} <= set(state)
    torch.manual_seed(123)  # a different random bank
    other = NPID(ConvNet(1, (8, 16, 32)), Config(proj_dim=16, nce_k=64, num_samples=500))
    assert not torch.equal(other.memory, model.memory) and torch.isnan(other.log_z)
    other.load_state_dict(state)
    assert torch.equal(other.memory, model.memory) and torch.equal(other.log_z, model.log_z)
    torch.manual_seed(5)
    a = model.loss(views, 0.1, indices=idx)
    torch.manual_seed(5)
    torch.testing.assert_close(other.loss(views, 0.1, indices=idx), a, rtol=0, atol=0)
    assert torch.equal(other.memory, model.memory)


def test_resumed_pretraining_equals_an_uninterrupted_run(digits: Splits, tmp_path: Path) -> None:
    data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(200)), val=digits.val.subset(torch.arange(64)))
    cfg = Config(proj_dim=16, nce_k=64, num_samples=200)
    pre = PretrainConfig(backbone="convnet_tiny", epochs=2, batch_size=64, deterministic=True)

    class Interrupted(Exception):
        pass

    def run(out: Path, stop_at_epoch: int | None = None) -> NPID:
        model = cast(NPID, build_method(METHODS.get("npid"), cfg, pre, data, seed=0))
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
    resumed = run(tmp_path / "b")  # loads epoch 1's checkpoint, bank and Z included, and trains epoch 2
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert torch.isfinite(straight.log_z)
    # every row the loop visited is a unit vector now (a permutation per epoch: at least steps x batch rows)
    visited = torch.isclose(straight.memory.norm(dim=1), torch.ones(200))
    assert int(visited.sum()) >= 3 * 64


def test_indices_and_bank_size_are_required(digits: Splits) -> None:
    model, views, idx = _model(digits, SMALL)
    with pytest.raises(ValueError, match="indices"):
        model.loss(views, 0.0)
    with pytest.raises(ConfigError, match="npid.num_samples"):
        NPID(ConvNet(1, (4, 8)), Config())


def test_views_embeddings_and_bank_init() -> None:
    model = NPID(ConvNet(1, (4, 8)), Config(num_samples=3000))
    (v,) = model.views(28)
    assert (v.size, v.scale, v.flip_p, v.gray_p, v.blur_p, v.solarize_p) == (28, (0.2, 1.0), 0.5, 0.2, 0.0, 0.0)
    assert (v.jitter_p, v.brightness, v.contrast, v.saturation, v.hue) == (1.0, 0.4, 0.4, 0.4, 0.4)  # ColorJitter(0.4 x 4)
    assert model.views(16)[0].size == 16
    f = model.embed(torch.randn(5, 1, 16, 16))
    assert f.shape == (5, 128) and torch.allclose(f.norm(dim=1), torch.ones(5))
    assert model.memory.shape == (3000, 128) and model.memory.dtype == torch.float32
    a = math.sqrt(3 / 128)
    assert float(model.memory.abs().max()) <= a and abs(float((model.memory**2).sum(1).mean()) - 1) < 0.02  # E|v|^2 = 1


def test_registered_defaults_and_validation() -> None:
    entry = METHODS.entry("npid")
    assert entry.obj is NPID and entry.config is Config and NPID.uses_indices
    assert entry.meta["pretrain"] == dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0)
    c = Config()
    assert (c.proj_dim, c.nce_k, c.temperature, c.bank_momentum, c.loss_type, c.min_scale, c.num_samples) == (
        128, 4096, 0.07, 0.5, "nce", 0.2, None)
    for bad in (dict(proj_dim=0), dict(nce_k=0), dict(temperature=0.0), dict(bank_momentum=1.0), dict(bank_momentum=-0.1),
                dict(loss_type="ce"), dict(min_scale=0.0), dict(num_samples=0)):
        with pytest.raises(ConfigError, match="npid."):
            Config(**bad)


class _WithIndices(nn.Module):
    """The model with fixed batch indices, for `assert_loss_falls`, which calls loss(views, progress, labels)."""

    def __init__(self, model: NPID, indices: Tensor) -> None:
        super().__init__()
        self.model, self.indices = model, indices

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        return self.model.loss(views, progress, labels, indices=self.indices)


@pytest.mark.parametrize("loss_type", ["nce", "softmax"])
def test_loss_falls_within_20_steps_on_real_data(digits: Splits, loss_type: Literal["nce", "softmax"]) -> None:
    # The bank holds one embedding per training image, as after the first epoch. From the random initial bank
    # the NCE loss on one fixed batch goes 9.8 -> 3.5 (step 4) -> 37 at tau = 0.07, lr 0.05: the batch's
    # embeddings draw together (mean pairwise cosine 0.51 -> 0.98), and with K = 256 of ~1200 rows each sample
    # meets the batch's own rows as noise about K/N x 32 = 7 times, each costing about 5 nats at cosine 1.
    torch.manual_seed(0)
    model, views, _ = _model(digits, Config(proj_dim=32, nce_k=256, num_samples=len(digits.train), loss_type=loss_type))
    crops = make_views(digits.train.x, model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(1))[0]
    with torch.no_grad():
        model.memory.copy_(model.embed(crops))
    assert_loss_falls(_WithIndices(model, torch.arange(32)), views)  # the batch is the first 32 training images


def _ddp_rank(rank: int, world: int, x: Tensor, idx: Tensor) -> list[tuple[float, Tensor, Tensor]]:
    out = []
    for loss_type in ("nce", "softmax"):
        torch.manual_seed(0)
        model = NPID(ConvNet(1, (4, 8)), Config(proj_dim=4, nce_k=8, num_samples=20, loss_type=loss_type)).eval()
        b = len(x) // world
        torch.manual_seed(rank)  # different noise in each process
        loss = model.loss([x[rank * b : (rank + 1) * b]], 0.0, indices=idx[rank * b : (rank + 1) * b])
        out.append((float(loss.detach()), model.memory.clone(), model.log_z.clone()))
    return out


def test_two_processes_keep_one_bank() -> None:
    from tests.ddp import run_distributed

    g = torch.Generator().manual_seed(0)
    x, idx = torch.randn(8, 1, 8, 8, generator=g), torch.tensor([3, 17, 0, 9, 12, 5, 1, 19])
    ranks = run_distributed(_ddp_rank, 2, (x, idx))
    loss_types: tuple[Literal["nce", "softmax"], ...] = ("nce", "softmax")
    for i, loss_type in enumerate(loss_types):
        torch.manual_seed(0)
        model = NPID(ConvNet(1, (4, 8)), Config(proj_dim=4, nce_k=8, num_samples=20, loss_type=loss_type)).eval()
        loss = model.loss([x], 0.0, indices=idx)
        for r in ranks:  # every process writes the global batch's rows: the banks stay identical
            torch.testing.assert_close(r[i][1], model.memory)
        torch.testing.assert_close(ranks[0][i][2], ranks[1][i][2], equal_nan=True)  # one Z for all processes
        if loss_type == "nce":
            assert torch.isfinite(ranks[0][i][2])
        else:  # no noise draw: the mean over processes is the one-process loss
            assert math.isclose((ranks[0][i][0] + ranks[1][i][0]) / 2, float(loss.detach()), rel_tol=1e-5)


assert npid.__doc__ is not None and "1805.01978" in npid.__doc__ and "zhirongw/lemniscate.pytorch" in npid.__doc__
