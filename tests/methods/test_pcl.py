"""PCL: ProtoNCE against a hand case and a loop reference, negative-prototype sampling, the concentration phi,
the clustering (blobs, best of several runs, subsampling), before_epoch on the momentum features, the warm-up,
gradients, checkpoints and resume, and training on real digits."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import methods.pcl as pcl  # registers "pcl"
from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.kmeans import kmeans
from benchmark.train.pretrain import build_method, pretrain
from methods.mocov2 import moco_infonce
from methods.pcl import PCL, Config, cluster, concentration, proto_nce, sample_negatives
from tests.methods.steps import assert_loss_falls

CPU = torch.device("cpu")
TINY = Config(proj_hidden_dim=32, proj_dim=8, queue_size=64, num_clusters=(5, 10), n_negative_protos=4)


def _subset(digits: Splits, n: int) -> Splits:
    return dataclasses.replace(digits, train=digits.train.subset(torch.arange(n)))


def _model(data: Splits, cfg: Config = TINY) -> PCL:
    cfg = dataclasses.replace(cfg, num_samples=len(data.train))  # as the runner fills it
    model = build_method(METHODS.get("pcl"), cfg, PretrainConfig(backbone="convnet_tiny"), data, seed=0)
    assert isinstance(model, PCL)
    return model


def _views(model: PCL, data: Splits, idx: Tensor) -> list[Tensor]:
    return make_views(data.train.x[idx], model.views(16), data.mean, data.std, torch.Generator().manual_seed(0))


def _reference(q: Tensor, c: Tensor, phi: Tensor, pos: Tensor, neg: Tensor) -> float:
    """The official logits as loops: row i scores q_i against [c_pos_1 .. c_pos_B, c_neg_1 .. c_neg_R], each over
    its phi; the target is column i; unit q and c."""
    cols = pos.tolist() + neg.tolist()
    total = 0.0
    for i, qi in enumerate(q.double().tolist()):
        norm = math.sqrt(sum(a * a for a in qi))
        logits = [sum(a / norm * b for a, b in zip(qi, c[j].double().tolist())) / float(phi[j]) for j in cols]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
    return total / len(q)


def test_proto_nce_hand_case_including_a_shared_prototype() -> None:
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    phi = torch.tensor([0.5, 1.0, 0.25])
    q = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # queries are normalised: the scale of q does not matter
    # pos (0, 1), neg (2): row 0 = e1 -> [1/0.5, 0/1, -1/0.25] = [2, 0, -4], target 0; row 1 = e2 -> [0, 1, 0], target 1
    want = (math.log(math.exp(2) + 1 + math.exp(-4)) - 2 + math.log(2 + math.e) - 1) / 2
    assert math.isclose(float(proto_nce(q, c, phi, torch.tensor([0, 1]), torch.tensor([2]))), want, rel_tol=1e-6)
    # both queries in cluster 0 (official code): columns [c0, c0, c1]; row 0 -> [2, 2, 0] target 0; row 1 -> [0, 0, 1] target 1
    want = (math.log(2 * math.exp(2) + 1) - 2 + math.log(2 + math.e)) / 2
    assert math.isclose(float(proto_nce(q, c, phi, torch.tensor([0, 0]), torch.tensor([1]))), want, rel_tol=1e-6)
    # no negatives left (every cluster is some query's positive): the batch's prototypes alone
    want = (math.log(math.exp(2) + 1) - 2 + math.log(1 + math.e) - 1) / 2
    assert math.isclose(float(proto_nce(q, c, phi, torch.tensor([0, 1]), torch.tensor([], dtype=torch.long))), want, rel_tol=1e-6)


def test_proto_nce_matches_the_loops_is_batch_order_invariant_and_trains_only_the_queries() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 5, generator=g, requires_grad=True)
    c = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1).requires_grad_(True)
    phi = (0.1 + 0.2 * torch.rand(12, generator=g)).requires_grad_(True)
    pos, neg = torch.tensor([0, 3, 3, 7, 1, 0]), torch.tensor([11, 2, 5, 9])
    value = proto_nce(q, c, phi, pos, neg)
    assert math.isclose(float(value.detach()), _reference(q.detach(), c.detach(), phi.detach(), pos, neg), rel_tol=1e-5)
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(proto_nce(q[perm], c, phi, pos[perm], neg), value)
    torch.testing.assert_close(proto_nce(q, c, phi, pos, neg.flip(0)), value)
    assert not torch.allclose(proto_nce(q, c, phi, pos.flip(0), neg), value)  # pairs matter
    assert not torch.allclose(proto_nce(q, c, phi * 2, pos, neg), value)  # phi is each prototype's temperature
    value.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert c.grad is None and phi.grad is None  # prototypes and concentrations are targets


def test_negative_prototypes_exclude_every_positive_and_are_clamped_and_uniform() -> None:
    torch.manual_seed(0)
    pos = torch.tensor([1, 3, 3])
    neg = sample_negatives(pos, 6, 10)  # r > available: every non-positive cluster, once
    assert sorted(neg.tolist()) == [0, 2, 4, 5]
    assert len(sample_negatives(pos, 6, 0)) == 0 and len(sample_negatives(torch.arange(6), 6, 3)) == 0
    counts = torch.zeros(6)
    for _ in range(400):
        neg = sample_negatives(pos, 6, 2)
        assert len(set(neg.tolist())) == 2 and not set(neg.tolist()) & {1, 3}
        counts[neg] += 1
    assert counts[[1, 3]].sum() == 0 and (counts[[0, 2, 4, 5]] - 200).abs().max() < 45  # 2 of 4, 400 draws: 200 each


def test_concentration_hand_cluster() -> None:
    # 1-D points; clusters: {0, 2} around 1, {10, 11, 15} around 12, {20} alone, {30, 34} around 32, and an empty one
    x = torch.tensor([0.0, 2.0, 10.0, 11.0, 15.0, 20.0, 30.0, 34.0]).double()[:, None]
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    c = torch.tensor([1.0, 12.0, 20.0, 32.0, 100.0]).double()[:, None]
    a, b, d = 1 / math.log(12), 2 / math.log(13), 2 / math.log(12)  # mean distance / log(Z + 10)
    raw = [a, b, d, d, d]  # the single-point and the empty cluster take the largest phi
    s = sorted(raw)  # percentiles with linear interpolation at positions 0.1 x 4 and 0.9 x 4
    lo, hi = s[0] + 0.4 * (s[1] - s[0]), s[3] + 0.6 * (s[4] - s[3])
    assert np.allclose([lo, hi], np.percentile(raw, [10, 90]))
    clipped = [min(max(v, lo), hi) for v in raw]
    want = [0.2 * v / (sum(clipped) / 5) for v in clipped]
    got = concentration(x, c, labels, temperature=0.2, alpha=10.0)
    torch.testing.assert_close(got, torch.tensor(want).double())
    assert math.isclose(float(got.mean()), 0.2, rel_tol=1e-9)
    # alpha enters as log(Z + alpha); every cluster a single point: no spread, each phi is the temperature
    assert not torch.allclose(concentration(x, c, labels, 0.2, alpha=1.0), got)
    torch.testing.assert_close(concentration(x[:3], x[:3], torch.arange(3), 0.3), torch.full((3,), 0.3).double())


def _blobs(n_blobs: int, n_per: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_blobs).repeat_interleave(n_per)
    return torch.eye(n_blobs, 5)[y] * 10 + 0.3 * torch.randn(len(y), 5, generator=g), y


def _same_partition(a: Tensor, b: Tensor) -> bool:
    return bool((a[:, None] == a[None, :]).eq(b[:, None] == b[None, :]).all())


def test_clustering_recovers_blobs_keeps_the_best_run_and_subsamples() -> None:
    x, y = _blobs(5, 30)
    c, labels = cluster(x, 5, 20, 5, torch.Generator().manual_seed(0))
    assert _same_partition(labels, y)
    best = float(((x - c[labels]) ** 2).sum())
    g = torch.Generator().manual_seed(0)  # the same draws, one run at a time: the best of them was kept
    singles = [kmeans(x, 5, 20, g) for _ in range(5)]
    assert math.isclose(best, min(float(((x - ci[li]) ** 2).sum()) for ci, li in singles), rel_tol=1e-6)
    again = cluster(x, 5, 20, 5, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], c) and torch.equal(again[1], labels)  # deterministic given the generator
    # more than k x 1000 points: fit on 2000 of them, then every point is assigned
    x, y = _blobs(2, 1100)
    c, labels = cluster(x, 2, 5, 1, torch.Generator().manual_seed(0))
    assert labels.shape == (2200,) and _same_partition(labels, y)


def test_before_epoch_clusters_the_momentum_features(digits: Splits) -> None:
    data = _subset(digits, 400)
    model = _model(data)
    with torch.no_grad():
        for p in model.moco.backbone.parameters():
            p.add_(0.5)  # the query encoder now differs from the momentum (key) encoder
    bn_before = {k: v.clone() for k, v in model.moco.key_backbone.state_dict().items()}
    model.before_epoch(0, data, CPU, seed=5)
    assert model.training and model.moco.key_backbone.training  # train mode restored
    for k, v in model.moco.key_backbone.state_dict().items():
        assert torch.equal(v, bn_before[k]), k  # featurised in eval mode
    x = model.key_features(data, CPU)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(400))
    g = torch.Generator().manual_seed(5)
    for i, (k, lo) in enumerate(zip((5, 10), (0, 5))):
        c, labels = cluster(x, k, 20, 5, g)  # the same generator, granularity after granularity
        assert torch.equal(model.im2cluster[i], labels)
        torch.testing.assert_close(model.centroids[lo : lo + k], torch.nn.functional.normalize(c, dim=1))
        torch.testing.assert_close(model.phi[lo : lo + k], concentration(x, c, labels, 0.2))
        assert math.isclose(float(model.phi[lo : lo + k].mean()), 0.2, rel_tol=1e-5)
    from sklearn.metrics import normalized_mutual_info_score

    nmi = normalized_mutual_info_score(data.train.y.numpy(), model.im2cluster[1].numpy())
    chance = normalized_mutual_info_score(data.train.y.numpy(), model.im2cluster[1][torch.randperm(400)].numpy())
    assert nmi > 0.1 and nmi > 2 * chance, (nmi, chance)  # the clusters of an untrained net carry some digit information
    other = _model(data)
    other.load_state_dict(model.state_dict())
    other.before_epoch(0, data, CPU, seed=5)
    assert torch.equal(other.im2cluster, model.im2cluster) and torch.equal(other.centroids, model.centroids)


def test_no_prototype_term_before_the_warm_up(digits: Splits) -> None:
    data = _subset(digits, 200)
    model = _model(data, dataclasses.replace(TINY, warmup=0.3))
    model.before_epoch(0, data, CPU, seed=0)
    model.eval()  # BN on running statistics: the copies below compute the same function
    idx = torch.tensor([4, 150, 9, 77, 31, 0])
    views = _views(model, data, idx)
    for progress in (0.0, 0.299, 0.3, 1.0):
        m, ref = copy.deepcopy(model), copy.deepcopy(model)
        torch.manual_seed(1)
        value = m.loss(views, progress, indices=idx)
        ref.moco.update_key_encoder(TINY.momentum)
        q = ref.moco.head(ref.moco.backbone(views[0]))
        want = moco_infonce(q, ref.moco.keys(views[1]), model.moco.queue, 0.2)
        if progress >= 0.3:
            torch.manual_seed(1)  # the same negative prototypes
            terms = []
            for i, (k, lo) in enumerate(zip((5, 10), (0, 5))):
                pos = model.im2cluster[i, idx]
                terms.append(proto_nce(q, model.centroids[lo : lo + k], model.phi[lo : lo + k], pos, sample_negatives(pos, k, 4)))
            want = want + (terms[0] + terms[1]) / 2  # the mean over granularities
        torch.testing.assert_close(value, want)
    with pytest.raises(ValueError, match="indices"):
        model.loss(views, 0.0)


def test_gradients_buffers_views_and_encoder(digits: Splits) -> None:
    data = _subset(digits, 200)
    model = _model(data, dataclasses.replace(TINY, warmup=0.0))
    model.before_epoch(0, data, CPU, seed=0)
    assert {"centroids", "phi", "im2cluster", "moco.queue", "moco.queue_ptr"} <= set(dict(model.named_buffers()))
    assert model.centroids.shape == (15, 8) and model.phi.shape == (15,) and model.im2cluster.shape == (2, 200)
    idx = torch.arange(16)
    views = _views(model, data, idx)
    model.proto_loss(model.moco.head(model.moco.backbone(views[0])), idx).backward()  # the prototype term alone
    online = [*model.moco.backbone.parameters(), *model.moco.head.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
    model.zero_grad()
    model.loss(views, 1.0, indices=idx).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
    key = [*model.moco.key_backbone.parameters(), *model.moco.key_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in key)
    trained = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"backbone", "head"}  # the optimiser sees the query encoder only
    assert model.encoder() is model.moco.backbone
    specs = model.views(28)  # MoCo v2's aug_plus, as the official PCL v2 (`--aug-plus`)
    assert len(specs) == 2 and specs[0] == specs[1]
    v = specs[0]
    assert (v.size, v.scale, v.jitter_p, v.gray_p, v.blur_p, v.flip_p) == (28, (0.2, 1.0), 0.8, 0.2, 0.5, 0.5)


def test_checkpoint_round_trip_and_resume_equal_an_uninterrupted_run(digits: Splits, tmp_path: Path) -> None:
    data = _subset(digits, 64)
    cfg = dataclasses.replace(TINY, num_clusters=(4, 8), warmup=0.5, kmeans_redo=2)  # 2 epochs: the prototype term in the second
    model = _model(data, cfg)
    model.before_epoch(0, data, CPU, seed=7)
    fresh = _model(data, cfg)
    assert not torch.equal(fresh.im2cluster, model.im2cluster)
    fresh.load_state_dict(model.state_dict())
    for name in ("centroids", "phi", "im2cluster"):
        assert torch.equal(getattr(fresh, name), getattr(model, name)), name
    pcfg = PretrainConfig(backbone="convnet_tiny", epochs=2, batch_size=32, lr=0.03, deterministic=True, channels_last=False)
    straight = pretrain(_model(data, cfg), data, pcfg, 0, tmp_path, CPU, progress=False)
    want = {k: v.clone() for k, v in straight.encoder.state_dict().items()}
    for name in ("epoch0002.pt", "epoch0002.pt.sha256"):
        (tmp_path / name).unlink()
    resumed = pretrain(_model(data, cfg), data, pcfg, 0, tmp_path, CPU, progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for k, v in resumed.encoder.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_loss_falls_within_20_steps_on_real_data(digits: Splits) -> None:
    # On a fixed batch the queue would fill with the batch's own keys (see test_mocov2), so the MoCo negatives are
    # held at the keys of 128 other images; the prototypes are k-means clusters of the digits, the term is on.
    torch.manual_seed(0)
    model = _model(digits, dataclasses.replace(TINY, proj_hidden_dim=256, proj_dim=64, queue_size=128, num_clusters=(10, 30), n_negative_protos=16))
    model.before_epoch(0, digits, CPU, seed=0)
    idx = torch.arange(32)
    views = _views(model, digits, idx)
    bank = make_views(digits.train.x[32:160], model.views(16)[:1], digits.mean, digits.std, torch.Generator().manual_seed(1))[0]
    model.moco.enqueue(model.moco.keys(bank))
    negatives = model.moco.queue.clone()
    assert_loss_falls(model, views, progress=1.0, before_step=lambda: model.moco.queue.copy_(negatives))


def test_registered_defaults_and_validation() -> None:
    entry = METHODS.entry("pcl")
    assert entry.obj is PCL and entry.config is Config and getattr(PCL, "uses_indices", False)
    assert entry.meta["pretrain"] == dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0)
    cfg = Config()
    assert (cfg.proj_dim, cfg.queue_size, cfg.momentum, cfg.temperature, cfg.n_negative_protos) == (128, 16384, 0.999, 0.2, 16384)
    assert (cfg.warmup, cfg.kmeans_iters, cfg.kmeans_redo, cfg.alpha) == (0.1, 20, 5, 10.0)
    assert Config(num_classes=1000).ks == (25000, 50000, 100000) and Config(num_clusters=(3, 4), num_classes=10).ks == (3, 4)
    for bad in (dict(queue_size=0), dict(temperature=0.0), dict(momentum=1.5), dict(proj_dim=0), dict(num_clusters=()),
                dict(num_clusters=(5, 1)), dict(n_negative_protos=-1), dict(warmup=1.5), dict(kmeans_iters=0),
                dict(kmeans_redo=0), dict(alpha=0.0), dict(min_scale=0.0), dict(num_samples=0)):
        with pytest.raises(ConfigError, match="pcl"):
            Config(**bad)  # type: ignore[arg-type]
    for bad_cfg in (Config(num_clusters=(5,)), Config(num_samples=100), Config(num_clusters=(5, 200), num_samples=100)):
        with pytest.raises(ConfigError, match="pcl"):
            PCL(ConvNet(1, (4, 8)), bad_cfg)


assert pcl.__doc__ is not None and "2005.04966" in pcl.__doc__ and "salesforce/PCL" in pcl.__doc__
