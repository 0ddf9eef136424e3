"""DenseCL: the correspondence, the dense InfoNCE against its loop formula, the global + dense weighting, the
feature maps, the queues and key encoder, the views, the registered defaults, training on real data, and two
processes against one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import methods.densecl as densecl  # registers "densecl"
from benchmark.backbones import ConvNet, Pixels, TimmViT, TorchvisionResNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.densecl import Config, DenseCL, backbone_features, correspondence, dense_infonce, densecl_loss
from methods.mocov2 import moco_infonce
from tests.methods.steps import assert_loss_falls

SMALL = Config(proj_hidden_dim=16, proj_dim=4, queue_size=8)


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(a * a for a in v))
    return [a / norm for a in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _reference_dense(q_grid: Tensor, k_grid: Tensor, match: Tensor, queue: Tensor, t: float) -> float:
    """Paper eq. 2 as loops: mean over (n, s) of -log exp(q.k+/t) / (exp(q.k+/t) + sum_j exp(q.n_j/t)),
    with k+ = k_grid[n, :, match[n, s]] and every vector unit-norm."""
    negatives = [_unit(n) for n in queue.double().tolist()]
    total, rows = 0.0, 0
    n_img, _, s_loc = q_grid.shape
    for n in range(n_img):
        for s in range(s_loc):
            q = _unit(q_grid[n, :, s].double().tolist())
            k = _unit(k_grid[n, :, int(match[n, s])].double().tolist())
            pos = math.exp(_dot(q, k) / t)
            total += -math.log(pos / (pos + sum(math.exp(_dot(q, m) / t) for m in negatives)))
            rows += 1
    return total / rows


def _random_dense(n: int = 3, d: int = 5, s: int = 4, t: int = 6, k: int = 7, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    match = torch.randint(0, t, (n, s), generator=g)
    return torch.randn(n, d, s, generator=g), torch.randn(n, d, t, generator=g), match, torch.randn(k, d, generator=g)


def test_correspondence_is_the_argmax_of_cosine_similarity_within_each_image() -> None:
    # image 0: query locations e1, e2, (1, -1); key locations (1, 0.1), (5, 5), (0, -2).
    # e1 has the largest DOT product with (5, 5) (5 > 1) but the largest COSINE with (1, 0.1) (0.995 > 0.707).
    fq0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]).T  # (C=2, S=3)
    fk0 = torch.tensor([[1.0, 0.1], [5.0, 5.0], [0.0, -2.0]]).T  # (C=2, T=3)
    # e2: cos 0.0995, 0.707, -1 -> 1; (1, -1): cos 0.633, 0, 0.707 -> 2
    # image 1: the same queries against the keys in reverse order: the indices follow the keys
    fq, fk = torch.stack([fq0, fq0]), torch.stack([fk0, fk0.flip(1)])
    match = correspondence(fq, fk)
    assert match.dtype == torch.long and match.tolist() == [[0, 1, 2], [2, 1, 0]]
    # a different number of key locations (T=2) and a scaled query: still the cosine argmax
    assert correspondence(3 * fq0[None], fk0[None, :, :2]).tolist() == [[0, 1, 0]]
    # an image's keys only compete with that image's keys: a perfect match in image 1 does not pull image 0
    fk_other = torch.stack([fk0, fq0])  # image 1's keys equal its queries
    assert correspondence(fq, fk_other).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_dense_infonce_matches_the_loop_formula() -> None:
    q_grid, k_grid, match, queue = _random_dense()
    value = dense_infonce(q_grid, k_grid, match, queue, 0.2)
    assert math.isclose(float(value), _reference_dense(q_grid, k_grid, match, queue, 0.2), rel_tol=1e-5)
    assert not torch.allclose(dense_infonce(q_grid, k_grid, torch.zeros_like(match), queue, 0.2), value)  # the match is used
    assert not torch.allclose(dense_infonce(q_grid, k_grid, match, queue, 0.07), value)  # the temperature is used


def test_dense_infonce_hand_case_and_one_location_is_moco_infonce() -> None:
    t = 0.5
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # one image, two query locations e1 and 3 e2; key locations (1, 1), (2, 0); match [1, 0]
    # row 1: q = e1, k = e1 -> logits [1, 0, -1] / t; row 2: q = e2, k = (1, 1)/sqrt2 -> [1/sqrt2, 1, 0] / t
    q_grid = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).T[None]  # (1, 2, 2)
    k_grid = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).T[None]
    match = torch.tensor([[1, 0]])
    row1 = math.log(1 + math.exp(-2) + math.exp(-4))
    row2 = math.log(math.exp(math.sqrt(2)) + math.exp(2) + 1) - math.sqrt(2)
    assert math.isclose(float(dense_infonce(q_grid, k_grid, match, queue, t)), (row1 + row2) / 2, rel_tol=1e-6)
    # with S = T = 1 the dense loss is the global InfoNCE over the batch
    q, k, _, negatives = _random_dense(n=5, s=1, t=1)
    torch.testing.assert_close(dense_infonce(q, k, torch.zeros(5, 1, dtype=torch.long), negatives, 0.2),
                               moco_infonce(q[..., 0], k[..., 0], negatives, 0.2))


def test_dense_infonce_is_invariant_to_image_location_and_queue_order() -> None:
    q_grid, k_grid, match, queue = _random_dense()
    value = dense_infonce(q_grid, k_grid, match, queue, 0.2)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(dense_infonce(q_grid[perm], k_grid[perm], match[perm], queue, 0.2), value)
    loc = torch.tensor([3, 1, 0, 2])  # permute query locations with their matches
    torch.testing.assert_close(dense_infonce(q_grid[..., loc], k_grid, match[:, loc], queue, 0.2), value)
    kperm = torch.randperm(6, generator=torch.Generator().manual_seed(1))  # permute key locations, remap the match
    torch.testing.assert_close(dense_infonce(q_grid, k_grid[..., kperm], torch.argsort(kperm)[match], queue, 0.2), value)
    torch.testing.assert_close(dense_infonce(q_grid, k_grid, match, queue.flip(0), 0.2), value)
    assert not torch.allclose(dense_infonce(q_grid[perm], k_grid, match, queue, 0.2), value)  # breaking the pairs


def test_dense_infonce_sends_gradient_to_the_queries_only() -> None:
    q_grid, k_grid, match, queue = (t.requires_grad_(True) if t.is_floating_point() else t for t in _random_dense())
    dense_infonce(q_grid, k_grid, match, queue, 0.2).backward()
    assert q_grid.grad is not None and q_grid.grad.abs().sum() > 0
    assert k_grid.grad is None and queue.grad is None


def test_feature_map_mean_is_the_pooled_backbone_output() -> None:
    torch.manual_seed(0)
    backbones: list[tuple[nn.Module, int]] = [(ConvNet(1, (8, 16, 32)), 1), (ConvNet(3), 3), (TorchvisionResNet("resnet18", 1, True), 1)]
    for backbone, c in backbones:
        for size in (16, 28):
            x = torch.randn(2, c, size, size)
            for train in (True, False):
                backbone.train(train)
                pooled, fmap = backbone_features(backbone, x)
                assert fmap.shape[:2] == (2, backbone.dim) and fmap.dim() == 4
                torch.testing.assert_close(pooled, backbone(x), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(fmap.mean(dim=(2, 3)), pooled, rtol=1e-5, atol=1e-6)
    assert backbone_features(ConvNet(1), torch.randn(2, 1, 28, 28))[1].shape == (2, 128, 4, 4)  # CPU suite: 16 locations
    pytest.importorskip("timm")
    vit = TimmViT("vit_tiny_patch16_224", 1, 16, True).eval()  # 4 px patches: a 4 x 4 grid of patch tokens
    x = torch.randn(2, 1, 16, 16)
    pooled, fmap = backbone_features(vit, x)
    torch.testing.assert_close(pooled, vit(x))
    assert fmap.shape == (2, vit.dim, 4, 4)
    tokens = vit.net.forward_features(x)
    torch.testing.assert_close(fmap[:, :, 1, 2], tokens[:, vit.net.num_prefix_tokens + 1 * 4 + 2])  # row-major grid


def test_unsupported_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="densecl needs a feature map"):
        DenseCL(Pixels(1, 16), SMALL)


def _model(digits: Splits, cfg: Config) -> tuple[DenseCL, list[Tensor]]:
    model = build_method(METHODS.get("densecl"), cfg, PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:32], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    return model, views  # type: ignore[return-value]


def test_loss_is_the_lambda_weighted_sum_of_the_global_and_dense_terms(digits: Splits) -> None:
    assert float(densecl_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25)) == 0.75 * 2 + 0.25 * 4
    model, (v1, v2) = _model(digits, Config(proj_hidden_dim=16, proj_dim=4, queue_size=80, momentum=0.9))
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.1)  # query and key encoders differ
    ref = copy.deepcopy(model)
    ref.update_key_encoder(0.9)
    pooled, fmap = backbone_features(ref.backbone, v1)
    k, k_grid, _, fk = ref.keys(v2)
    g = moco_infonce(ref.head(pooled), k, ref.queue, 0.2)
    d = dense_infonce(ref.dense_head(fmap).flatten(2), k_grid, correspondence(fmap.flatten(2), fk), ref.dense_queue, 0.2)
    assert abs(float(g.detach()) - float(d.detach())) > 1e-3  # the weighting below is visible
    for lam in (0.0, 0.5, 1.0):
        m = copy.deepcopy(model)
        m.cfg = Config(proj_hidden_dim=16, proj_dim=4, queue_size=80, momentum=0.9, loss_lambda=lam)
        torch.testing.assert_close(m.loss([v1, v2], 0.0), (1 - lam) * g + lam * d)
    assert not torch.allclose(copy.deepcopy(model).loss([v2, v1], 0.0), copy.deepcopy(model).loss([v1, v2], 0.0))  # one-way


def test_gradients_reach_the_query_side_only(digits: Splits) -> None:
    model, views = _model(digits, SMALL)
    model.loss(views, 0.0).backward()  # after the in-place enqueues: autograd's saved tensors are intact
    online = [*model.backbone.parameters(), *model.head.parameters(), *model.dense_head.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
    key = [*model.key_backbone.parameters(), *model.key_head.parameters(), *model.key_dense_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in key)
    for buf in (model.queue, model.dense_queue):
        assert not buf.requires_grad and buf.grad is None
    assert model.encoder() is model.backbone
    # the dense term alone trains the dense head and the backbone, not the global head
    model.zero_grad(set_to_none=True)
    dense_only = copy.deepcopy(model)
    dense_only.cfg = Config(proj_hidden_dim=16, proj_dim=4, queue_size=8, loss_lambda=1.0)
    dense_only.loss(views, 0.0).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in dense_only.head.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*dense_only.backbone.parameters(), *dense_only.dense_head.parameters()])


def test_momentum_update_and_both_queues_take_the_keys(digits: Splits) -> None:
    model, (v1, v2) = _model(digits, Config(proj_hidden_dim=16, proj_dim=4, queue_size=40, momentum=0.9))
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.dense_head.parameters()]:
            p.add_(1.0)
    key_before = [p.clone() for p in [*model.key_backbone.parameters(), *model.key_dense_head.parameters()]]
    online = [*model.backbone.parameters(), *model.dense_head.parameters()]
    m = copy.deepcopy(model)
    m.loss([v1, v2], 1.0)
    for pk, pk0, pq in zip([*m.key_backbone.parameters(), *m.key_dense_head.parameters()], key_before, online):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)  # theta_k <- m theta_k + (1 - m) theta_q
    k, k_grid, k_dense, _ = m.keys(v2)  # from the updated key encoder
    torch.testing.assert_close(m.queue[:32], k)
    # the dense queue holds the normalised MEAN over locations of the dense key projections (official `avgpool2`)
    _, fmap = backbone_features(m.key_backbone, v2)
    torch.testing.assert_close(m.dense_queue[:32], nn.functional.normalize(m.key_dense_head(fmap).mean(dim=(2, 3)), dim=1))
    torch.testing.assert_close(k_dense, m.dense_queue[:32])
    assert k_grid.shape == (32, 4, 16) and torch.allclose(k_grid.norm(dim=1), torch.ones(32, 16))  # 16 px -> 4 x 4
    for buf, before in ((m.queue, model.queue), (m.dense_queue, model.dense_queue)):
        torch.testing.assert_close(buf[32:], before[32:])
    assert int(m.queue_ptr) == int(m.dense_queue_ptr) == 32
    m.loss([v1, v2], 1.0)  # 64 > 40: both queues wrap around
    assert int(m.queue_ptr) == int(m.dense_queue_ptr) == 24
    assert {"queue", "queue_ptr", "dense_queue", "dense_queue_ptr"} <= set(m.state_dict())


def test_heads_views_and_three_channels() -> None:
    model = DenseCL(ConvNet(3, (4, 8)), SMALL)
    assert [type(m) for m in model.head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [type(m) for m in model.dense_head] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert [tuple(m.weight.shape) for m in model.dense_head if isinstance(m, nn.Conv2d)] == [(16, 8, 1, 1), (4, 16, 1, 1)]
    for online, key in ((model.backbone, model.key_backbone), (model.head, model.key_head), (model.dense_head, model.key_dense_head)):
        assert online is not key
        for a, b in zip(online.state_dict().values(), key.state_dict().values()):
            torch.testing.assert_close(a, b)  # the key encoder starts as a copy
    g = torch.Generator().manual_seed(0)
    loss = model.loss([torch.randn(4, 3, 28, 28, generator=g), torch.randn(4, 3, 28, 28, generator=g)], 0.0)
    assert torch.isfinite(loss)
    specs = model.views(28)
    assert len(specs) == 2 and specs[0] == specs[1]
    v = specs[0]
    assert (v.size, v.scale) == (28, (0.2, 1.0))
    assert (v.brightness, v.contrast, v.saturation, v.hue, v.jitter_p) == (0.4, 0.4, 0.4, 0.1, 0.8)
    assert (v.gray_p, v.blur_p, v.solarize_p, v.flip_p) == (0.2, 0.5, 0.0, 0.5)


def test_registered_defaults_and_validation() -> None:
    entry = METHODS.entry("densecl")
    assert entry.obj is DenseCL and entry.config is Config
    assert entry.meta["pretrain"] == dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0)
    cfg = Config()
    assert (cfg.proj_hidden_dim, cfg.proj_dim, cfg.queue_size, cfg.momentum, cfg.temperature, cfg.loss_lambda) == (2048, 128, 65536, 0.999, 0.2, 0.5)
    bad_values = dict(proj_hidden_dim=0, proj_dim=0, queue_size=0, momentum=1.5, temperature=0.0, loss_lambda=1.5, min_scale=0.0)
    for field, bad in bad_values.items():
        with pytest.raises(ConfigError, match=f"densecl.{field}"):
            Config(**{field: bad})  # type: ignore[arg-type]


def test_loss_falls_within_20_steps_on_real_data(digits: Splits) -> None:
    # As for MoCo v2, on a fixed batch the queues fill with this batch's own keys and the loss rises
    # (1.73 -> 4.40 with the smoke sizes), so both queues are held at the keys of 128 other images.
    torch.manual_seed(0)
    model, views = _model(digits, Config(proj_hidden_dim=64, proj_dim=32, queue_size=128))
    bank = make_views(digits.train.x[32:160], model.views(16)[:1], digits.mean, digits.std, torch.Generator().manual_seed(1))[0]
    k, _, k_dense, _ = model.keys(bank)
    model.queue.copy_(k)
    model.dense_queue.copy_(k_dense)
    negatives, dense_negatives = model.queue.clone(), model.dense_queue.clone()

    def hold() -> None:
        model.queue.copy_(negatives)
        model.dense_queue.copy_(dense_negatives)

    assert_loss_falls(model, views, before_step=hold)


def _ddp_rank(rank: int, world: int, x1: Tensor, x2: Tensor) -> tuple[float, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    model = DenseCL(ConvNet(1, (4, 8)), Config(proj_hidden_dim=16, proj_dim=4, queue_size=12)).eval()
    b = len(x1) // world
    k_grid = model.keys(x2[rank * b : (rank + 1) * b])[1]  # shuffled across the two processes, then unshuffled
    loss = model.loss([x1[rank * b : (rank + 1) * b], x2[rank * b : (rank + 1) * b]], 0.0)
    return float(loss.detach()), k_grid, model.queue.clone(), model.dense_queue.clone()


def test_two_processes_equal_one_process_on_the_global_batch() -> None:
    from tests.ddp import run_distributed

    # eval mode: BN uses running statistics, so a key does not depend on which batch it was computed in
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 1, 8, 8, generator=g)
    ranks = run_distributed(_ddp_rank, 2, (x1, x2))
    torch.manual_seed(0)
    model = DenseCL(ConvNet(1, (4, 8)), Config(proj_hidden_dim=16, proj_dim=4, queue_size=12)).eval()
    k_grid = model.keys(x2)[1]
    loss = model.loss([x1, x2], 0.0)
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]), k_grid)  # Shuffle-BN's unshuffle restores the order
    # every term is a mean over the same number of rows per process, so the mean of the means is the global mean
    assert math.isclose(sum(r[0] for r in ranks) / 2, float(loss.detach()), rel_tol=1e-5)
    for r in ranks:  # every process enqueues the global batch's keys: the queues stay identical
        torch.testing.assert_close(r[2], model.queue)
        torch.testing.assert_close(r[3], model.dense_queue)


assert densecl.__doc__ is not None and "2011.09157" in densecl.__doc__ and "WXinlong/DenseCL" in densecl.__doc__
