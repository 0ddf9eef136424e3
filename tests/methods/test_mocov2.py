"""MoCo v2: InfoNCE against its formula, the queue (FIFO with wrap-around), the momentum encoder, the views,
the registered defaults, training on real data, and two processes against one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import methods.mocov2 as mocov2  # registers "mocov2"
from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.mocov2 import Config, MoCoV2, moco_infonce
from tests.methods.steps import assert_loss_falls

SMALL = Config(proj_hidden_dim=16, proj_dim=4, queue_size=8)


def _reference(q: Tensor, k: Tensor, queue: Tensor, t: float) -> float:
    """v1 eq. 1 as loops: mean_i -log exp(q_i.k_i/t) / (exp(q_i.k_i/t) + sum_j exp(q_i.n_j/t)), unit vectors."""

    def unit(v: Tensor) -> list[float]:
        xs = v.double().tolist()
        norm = math.sqrt(sum(a * a for a in xs))
        return [a / norm for a in xs]

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    negatives = [unit(n) for n in queue]
    total = 0.0
    for qi, ki in zip(q, k):
        a, pos = unit(qi), dot(unit(qi), unit(ki))
        denom = math.exp(pos / t) + sum(math.exp(dot(a, n) / t) for n in negatives)
        total += -math.log(math.exp(pos / t) / denom)
    return total / len(q)


def _random(n: int = 6, d: int = 5, k: int = 7, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


def test_infonce_hand_case() -> None:
    t = 0.5
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # row 1: q = k = e1 -> logits [1, 0, -1] / t = [2, 0, -2]; loss = log(1 + e^-2 + e^-4)
    # row 2: q = 3 e2, k = (1, 1) -> cos 1/sqrt(2); logits [sqrt(2), 2, 0]; loss = log(e^sqrt2 + e^2 + 1) - sqrt2
    q = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    k = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # keys are normalised, so the scale of k does not matter
    row1 = math.log(1 + math.exp(-2) + math.exp(-4))  # log(1.15365) = 0.14293
    row2 = math.log(math.exp(math.sqrt(2)) + math.exp(2) + 1) - math.sqrt(2)  # log(12.50231) - 1.41421 = 1.11170
    assert math.isclose(float(moco_infonce(q, k, queue, t)), (row1 + row2) / 2, rel_tol=1e-6)
    assert math.isclose((row1 + row2) / 2, 0.627316, rel_tol=1e-5)
    # all logits equal: the positive is one of 1 + K equally likely columns
    ones = torch.ones(3, 2)
    assert math.isclose(float(moco_infonce(ones, ones, torch.ones(5, 2), 0.2)), math.log(6), rel_tol=1e-6)


def test_infonce_matches_the_loop_formula_and_is_invariant_to_batch_and_queue_order() -> None:
    q, k, queue = _random()
    value = moco_infonce(q, k, queue, 0.2)
    assert math.isclose(float(value), _reference(q, k, queue, 0.2), rel_tol=1e-5)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moco_infonce(q[perm], k[perm], queue, 0.2), value)
    torch.testing.assert_close(moco_infonce(q, k, queue.flip(0), 0.2), value)
    assert not torch.allclose(moco_infonce(q[perm], k, queue, 0.2), value)  # permuting one side breaks the pairs
    assert not torch.allclose(moco_infonce(q, k, queue, 0.07), value)  # the temperature is used


def test_infonce_sends_gradient_to_the_queries_only() -> None:
    q, k, queue = (t.requires_grad_(True) for t in _random())
    moco_infonce(q, k, queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_queue_is_fifo_and_wraps_around() -> None:
    model = MoCoV2(ConvNet(1, (4, 8)), Config(proj_hidden_dim=16, proj_dim=2, queue_size=5))
    start = model.queue.clone()
    a = torch.arange(6.0).view(3, 2)
    model.enqueue(a)  # rows 0..2, pointer 3
    torch.testing.assert_close(model.queue, torch.cat([a, start[3:]]))
    assert int(model.queue_ptr) == 3
    b = torch.arange(6.0, 12.0).view(3, 2)
    model.enqueue(b)  # rows 3, 4 then 0: the oldest row (a[0]) goes first
    torch.testing.assert_close(model.queue, torch.stack([b[2], a[1], a[2], b[0], b[1]]))
    assert int(model.queue_ptr) == 1
    # a batch larger than the queue: the same as writing its rows one at a time, in order
    c = torch.arange(12.0, 26.0).view(7, 2)
    expected, ptr = model.queue.clone(), 1
    for row in c:
        expected[ptr], ptr = row, (ptr + 1) % 5
    model.enqueue(c)
    torch.testing.assert_close(model.queue, expected)
    assert int(model.queue_ptr) == ptr == 3
    assert {"queue", "queue_ptr"} <= set(model.state_dict())  # checkpoints carry the queue


def _model(digits: Splits, cfg: Config) -> tuple[MoCoV2, list[Tensor]]:
    model = build_method(METHODS.get("mocov2"), cfg, PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:32], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    return model, views  # type: ignore[return-value]


def test_key_encoder_and_queue_get_no_gradient(digits: Splits) -> None:
    for symmetric in (False, True):
        model, views = _model(digits, Config(proj_hidden_dim=16, proj_dim=4, queue_size=8, symmetric=symmetric))
        model.loss(views, 0.0).backward()  # after the in-place enqueue: autograd's saved tensors are intact
        online = [*model.backbone.parameters(), *model.head.parameters()]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
        key = [*model.key_backbone.parameters(), *model.key_head.parameters()]
        assert all(p.grad is None and not p.requires_grad for p in key)
        assert not model.queue.requires_grad and model.queue.grad is None
        assert model.encoder() is model.backbone


def test_momentum_update_is_constant_over_training_and_the_keys_enter_the_queue(digits: Splits) -> None:
    model, (v1, v2) = _model(digits, Config(proj_hidden_dim=16, proj_dim=4, queue_size=40, momentum=0.9))
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)  # make the query encoder differ from the key encoder
    key_before = [p.clone() for p in model.key_backbone.parameters()]
    results = []
    for progress in (0.0, 1.0):  # no schedule: m = 0.9 at both ends (official code)
        m = copy.deepcopy(model)
        m.loss([v1, v2], progress)
        results.append(m)
        for pk, pk0, pq in zip(m.key_backbone.parameters(), key_before, model.backbone.parameters()):
            torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)  # theta_k <- m theta_k + (1 - m) theta_q
    m = results[0]
    torch.testing.assert_close(m.queue[:32], m.keys(v2))  # the keys of view 2, from the updated key encoder
    torch.testing.assert_close(m.queue[32:], model.queue[32:])  # the rest is untouched
    assert int(m.queue_ptr) == 32 and torch.allclose(m.queue.norm(dim=1), torch.ones(40))


def test_one_way_and_symmetric_losses(digits: Splits) -> None:
    model, (v1, v2) = _model(digits, Config(proj_hidden_dim=16, proj_dim=4, queue_size=80, momentum=0.9))
    queue0 = model.queue.clone()
    ref = copy.deepcopy(model)
    one_way = model.loss([v1, v2], 0.0)
    ref.update_key_encoder(0.9)
    expected = moco_infonce(ref.head(ref.backbone(v1)), ref.keys(v2), queue0, 0.2)  # query from view 1, key from view 2
    torch.testing.assert_close(one_way, expected)
    sym = MoCoV2(ref.backbone, Config(proj_hidden_dim=16, proj_dim=4, queue_size=80, symmetric=True))
    sym.load_state_dict(model.state_dict())
    sym.queue.copy_(queue0)
    sym.queue_ptr.zero_()
    value = copy.deepcopy(sym).loss([v1, v2], 0.0)
    torch.testing.assert_close(copy.deepcopy(sym).loss([v2, v1], 0.0), value)  # symmetric in the views
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(copy.deepcopy(sym).loss([v1[perm], v2[perm]], 0.0), value, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(copy.deepcopy(model).loss([v2, v1], 0.0), copy.deepcopy(model).loss([v1, v2], 0.0))
    sym.loss([v1, v2], 0.0)
    assert int(sym.queue_ptr) == 64  # both directions' keys are enqueued
    torch.testing.assert_close(sym.queue[:64], torch.cat([sym.keys(v1), sym.keys(v2)]))


def test_head_and_key_encoder_follow_the_official_builder() -> None:
    model = MoCoV2(ConvNet(1, (4, 8)), SMALL)
    head = list(model.head)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]  # official `--mlp`: no BN in the head
    assert [tuple(m.weight.shape) for m in head if isinstance(m, nn.Linear)] == [(16, 8), (4, 16)]
    for online, key in ((model.backbone, model.key_backbone), (model.head, model.key_head)):
        assert online is not key
        for a, b in zip(online.state_dict().values(), key.state_dict().values()):
            torch.testing.assert_close(a, b)  # the key encoder starts as a copy
    assert model.queue.shape == (8, 4) and torch.allclose(model.queue.norm(dim=1), torch.ones(8))


def test_views_are_the_moco_v2_augmentation() -> None:
    specs = MoCoV2(ConvNet(1, (4, 8)), SMALL).views(28)
    assert len(specs) == 2 and specs[0] == specs[1]
    v = specs[0]
    assert (v.size, v.scale) == (28, (0.2, 1.0))
    assert (v.brightness, v.contrast, v.saturation, v.hue, v.jitter_p) == (0.4, 0.4, 0.4, 0.1, 0.8)
    assert (v.gray_p, v.blur_p, v.solarize_p, v.flip_p) == (0.2, 0.5, 0.0, 0.5)


def test_registered_defaults_and_validation() -> None:
    entry = METHODS.entry("mocov2")
    assert entry.obj is MoCoV2 and entry.config is Config
    assert entry.meta["pretrain"] == dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0)
    cfg = Config()
    assert (cfg.proj_hidden_dim, cfg.proj_dim, cfg.queue_size, cfg.momentum, cfg.temperature, cfg.symmetric) == (2048, 128, 65536, 0.999, 0.2, False)
    for bad in (dict(queue_size=0), dict(temperature=0.0), dict(momentum=1.5), dict(proj_dim=0), dict(min_scale=0.0)):
        with pytest.raises(ConfigError):
            Config(**bad)  # type: ignore[arg-type]


def test_loss_falls_within_20_steps_on_real_data(digits: Splits) -> None:
    # On a fixed batch the queue would fill with this batch's own keys, near-copies of the positives, and the
    # loss would rise (6.70 -> 7.05 with the defaults). So the negatives are held at the keys of 128 other images.
    torch.manual_seed(0)
    model, views = _model(digits, Config(proj_hidden_dim=512, queue_size=128))
    bank = make_views(digits.train.x[32:160], model.views(16)[:1], digits.mean, digits.std, torch.Generator().manual_seed(1))[0]
    model.enqueue(model.keys(bank))
    negatives = model.queue.clone()
    assert_loss_falls(model, views, before_step=lambda: model.queue.copy_(negatives))


def _ddp_rank(rank: int, world: int, x1: Tensor, x2: Tensor) -> tuple[float, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    model = MoCoV2(ConvNet(1, (4, 8)), Config(proj_hidden_dim=16, proj_dim=4, queue_size=12)).eval()
    b = len(x1) // world
    k = model.keys(x2[rank * b : (rank + 1) * b])  # shuffled across the two processes, then unshuffled
    loss = model.loss([x1[rank * b : (rank + 1) * b], x2[rank * b : (rank + 1) * b]], 0.0)
    return float(loss.detach()), k, model.queue.clone(), model.queue_ptr.clone()


def test_two_processes_equal_one_process_on_the_global_batch() -> None:
    from tests.ddp import run_distributed

    # eval mode: BN uses running statistics, so a key does not depend on which batch it was computed in
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 1, 8, 8, generator=g)
    ranks = run_distributed(_ddp_rank, 2, (x1, x2))
    torch.manual_seed(0)
    model = MoCoV2(ConvNet(1, (4, 8)), Config(proj_hidden_dim=16, proj_dim=4, queue_size=12)).eval()
    k = model.keys(x2)
    loss = model.loss([x1, x2], 0.0)
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]), k)  # Shuffle-BN's unshuffle restores the order
    assert math.isclose(sum(r[0] for r in ranks) / 2, float(loss.detach()), rel_tol=1e-5)
    for r in ranks:  # every process enqueues the global batch's keys: the queues stay identical
        torch.testing.assert_close(r[2], model.queue)
        assert int(r[3]) == 8


assert mocov2.__doc__ is not None and "2003.04297" in mocov2.__doc__ and "facebookresearch/moco" in mocov2.__doc__
