"""DeepCluster: PCA whitening, k-means and its empty-cluster split, the reweighted loss, pseudo-labels by index,
the per-epoch head reset, checkpoints and resume, and training on real digits."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import methods.deepcluster  # noqa: F401  (registers "deepcluster")
from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.kmeans import SPLIT_EPS, kmeans, split_empty_clusters
from benchmark.train.pretrain import build_method, pretrain
from methods.deepcluster import Config, DeepCluster, deepcluster_loss, pca_whiten
from tests.methods.steps import assert_loss_falls

CPU = torch.device("cpu")
TINY = Config(n_clusters=10, pca_dim=16)  # convnet_tiny: 32-d features


def _model(digits: Splits, cfg: Config = TINY) -> DeepCluster:
    if cfg.num_samples is None:
        cfg = dataclasses.replace(cfg, num_samples=len(digits.train))  # as the runner fills it
    model = build_method(METHODS.get("deepcluster"), cfg, PretrainConfig(backbone="convnet_tiny"), digits, seed=0)
    assert isinstance(model, DeepCluster)
    return model


def _subset(digits: Splits, n: int) -> Splits:
    return dataclasses.replace(digits, train=digits.train.subset(torch.arange(n)))


def _blobs(n_blobs: int = 4, n_per: int = 30, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Well separated Gaussian blobs in 5-D (centres 10 sqrt(2) apart, std 0.3) and each point's blob."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(n_blobs, 5) * 10
    y = torch.arange(n_blobs).repeat_interleave(n_per)
    return centres[y] + 0.3 * torch.randn(len(y), 5, generator=g), y


def _same_partition(a: Tensor, b: Tensor) -> bool:
    """a and b group the points identically (equal up to renaming the clusters)."""
    return bool((a[:, None] == a[None, :]).eq(b[:, None] == b[None, :]).all())


def test_kmeans_recovers_separated_blobs_and_is_deterministic_given_the_seed() -> None:
    x, y = _blobs(2)
    first = set()
    for seed in range(5):  # random initial points: 2 blobs are recovered from any start
        labels = kmeans(x, 2, 20, torch.Generator().manual_seed(seed))[1]
        assert _same_partition(labels, y), seed
        first.add(int(labels[0]))
    assert first == {0, 1}  # the cluster names depend on the seed (random initial points), the partition does not
    x, y = _blobs(4)
    c, labels = kmeans(x, 4, 20, torch.Generator(), init=x[::30])  # one start in each blob
    assert torch.equal(labels, y)
    for i in range(4):
        torch.testing.assert_close(c[i], x[y == i].mean(0))
    for seed in range(2):
        # random starts (faiss's init) may settle in a local optimum with 4 blobs, but always a Lloyd fixed
        # point: every centroid is its cluster's mean, every point is with its nearest centroid; and bit-identical
        # for the same seed
        c, labels = kmeans(x, 4, 20, torch.Generator().manual_seed(seed))
        for i in labels.unique().tolist():
            torch.testing.assert_close(c[i], x[labels == i].mean(0))
        assert torch.equal(torch.cdist(x, c).argmin(dim=1), labels)
        c2, labels2 = kmeans(x, 4, 20, torch.Generator().manual_seed(seed))
        assert torch.equal(labels, labels2) and torch.equal(c, c2)


def test_split_empty_clusters_hand_case() -> None:
    c = torch.tensor([[1.0, 2.0, 4.0], [3.0, 4.0, 5.0], [9.0, 9.0, 9.0]])
    counts = torch.tensor([6.0, 1.0, 0.0])
    assert split_empty_clusters(c, counts, torch.Generator().manual_seed(0)) == 1
    e = SPLIT_EPS
    # only cluster 0 has n_j - 1 > 0: the empty one becomes its copy, pushed apart as x(1 +- eps) on alternate dims
    torch.testing.assert_close(c[2], torch.tensor([1 * (1 + e), 2 * (1 - e), 4 * (1 + e)]))
    torch.testing.assert_close(c[0], torch.tensor([1 * (1 - e), 2 * (1 + e), 4 * (1 - e)]))
    torch.testing.assert_close(c[1], torch.tensor([3.0, 4.0, 5.0]))
    assert counts.tolist() == [3.0, 1.0, 3.0]  # the split cluster's count is shared
    # the cluster to split is drawn with probability proportional to n_j - 1 (faiss): never a singleton
    picks = []
    for s in range(400):
        c = torch.eye(4)
        split_empty_clusters(c, torch.tensor([3.0, 1.0, 0.0, 5.0]), torch.Generator().manual_seed(s))
        picks.append(int(c[2].argmax()))
    assert 1 not in picks and 0.25 < picks.count(0) / len(picks) < 0.42  # expected 2 / (2 + 4) = 1/3


def test_empty_clusters_are_split_until_none_is_left() -> None:
    # two tight blobs and k = 5 > 2 natural groups; initial centroids far from every point start empty
    x, _ = _blobs(2, n_per=10)
    init = torch.cat([x[:1], x[10:11], torch.full((3, 5), 100.0)])
    c, labels = kmeans(x, 5, 20, torch.Generator().manual_seed(0), init=init)
    sizes = torch.bincount(labels, minlength=5)
    assert (sizes > 0).all(), sizes
    assert (c - 100).abs().max(dim=1).values.min() > 50  # no centroid stayed far away
    # each blob was cut into pieces; no cluster mixes the two blobs
    assert set(labels[:10].tolist()).isdisjoint(labels[10:].tolist())


def test_more_clusters_than_distinct_points_gives_one_cluster_per_point() -> None:
    # with only 3 distinct points (each repeated), nearest-centroid labels cannot fill k = 5 clusters;
    # the splits must still separate the 3 points, and the loss ignores the 2 clusters left empty
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).repeat_interleave(8, dim=0)
    for seed in range(4):
        _, labels = kmeans(x, 5, 20, torch.Generator().manual_seed(seed))
        assert _same_partition(labels, torch.arange(3).repeat_interleave(8)), (seed, labels)
        counts = torch.bincount(labels, minlength=5)
        loss = deepcluster_loss(torch.randn(24, 5), labels, counts)
        assert torch.isfinite(loss)


def test_pca_whiten_matches_the_svd_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3  # correlated, off-centre
    y = pca_whiten(x, 4)
    assert y.shape == (200, 4)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(200))
    # reference: x_c = U S V^T; the whitened coordinates are sqrt(N) U[:, :dim] (unit variance), then rows L2
    u, _, _ = torch.linalg.svd((x - x.mean(0)).double(), full_matrices=False)
    ref = torch.nn.functional.normalize(u[:, :4] * math.sqrt(200), dim=1).float()
    sign = torch.sign((y * ref).sum(0))  # each principal axis is defined up to sign
    torch.testing.assert_close(y * sign, ref, atol=1e-4, rtol=1e-4)
    # dead (constant) feature columns stay finite
    assert torch.isfinite(pca_whiten(torch.cat([x, torch.zeros(200, 3)], dim=1), 9)).all()


def test_loss_hand_case_and_uniform_over_clusters() -> None:
    ln = math.log
    logits = torch.tensor([[0.0, 0.0], [ln(3), 0.0], [0.0, 0.0]])
    targets = torch.tensor([0, 0, 1])
    counts = torch.tensor([2, 1])
    # CE: ln 2, ln(4/3), ln 2; weights 1/2, 1/2, 1
    want = (0.5 * ln(2) + 0.5 * ln(4 / 3) + 1 * ln(2)) / 2
    assert math.isclose(float(deepcluster_loss(logits, targets, counts)), want, rel_tol=1e-6)
    assert math.isclose(float(deepcluster_loss(logits, targets, counts, 0.0)), (2 * ln(2) + ln(4 / 3)) / 3, rel_tol=1e-6)
    # on the whole training set, pow 1 gives the mean over clusters of each cluster's mean loss (uniform sampling)
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    counts = torch.bincount(targets, minlength=4)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    per_cluster = torch.stack([ce[targets == k].mean() for k in range(4)])
    torch.testing.assert_close(deepcluster_loss(logits, targets, counts), per_cluster.mean())
    # invariant to the order of the batch
    perm = torch.randperm(50, generator=g)
    torch.testing.assert_close(deepcluster_loss(logits[perm], targets[perm], counts), deepcluster_loss(logits, targets, counts))


def test_pseudo_labels_are_looked_up_by_dataset_index(digits: Splits) -> None:
    model = _model(digits)
    model.pseudo_labels.copy_(torch.randint(0, 10, (len(digits.train),), generator=torch.Generator().manual_seed(0)))
    model.counts.copy_(torch.bincount(model.pseudo_labels, minlength=10))
    idx = torch.tensor([5, 1200, 42, 7, 900, 3])
    views = make_views(digits.train.x[idx], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    model.eval()  # BatchNorm on running statistics: the two forward passes below see the same function
    logits = model.head(model.backbone(views[0]))
    want = deepcluster_loss(logits, model.pseudo_labels[idx], model.counts)
    torch.testing.assert_close(model.loss(views, 0.0, indices=idx), want)
    wrong = deepcluster_loss(logits, model.pseudo_labels[idx.flip(0)], model.counts)
    assert not torch.allclose(wrong, want)


def test_before_epoch_clusters_and_resets_the_head(digits: Splits) -> None:
    digits = _subset(digits, 400)
    model = _model(digits)
    bn_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with torch.no_grad():
        model.head.weight.fill_(1.0)  # as if trained
        model.head.bias.fill_(1.0)
    model.before_epoch(0, digits, CPU, seed=123)
    assert model.training  # train mode is restored
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, bn_before[k]), k  # featurised in eval mode: BN statistics untouched
    w = model.head.weight.detach().clone()
    assert torch.equal(model.head.bias, torch.zeros(10)) and abs(float(w.std()) - 0.01) < 0.002
    labels = model.pseudo_labels.clone()
    assert labels.shape == (len(digits.train),) and int(labels.min()) >= 0 and int(labels.max()) < 10
    assert torch.equal(model.counts, torch.bincount(labels, minlength=10)) and (model.counts > 0).all()
    # the clusters carry information about the digits (a random labelling has NMI ~ 0.01)
    from sklearn.metrics import normalized_mutual_info_score

    assert normalized_mutual_info_score(digits.train.y.numpy(), labels.numpy()) > 0.3
    # deterministic given the seed; another seed gives another head
    again = _model(digits)
    again.before_epoch(0, digits, CPU, seed=123)
    assert torch.equal(again.pseudo_labels, labels) and torch.equal(again.head.weight, w)
    again.before_epoch(1, digits, CPU, seed=124)
    assert not torch.equal(again.head.weight, w)


def test_buffers_gradients_views_and_config(digits: Splits) -> None:
    model = _model(digits)
    buffers = dict(model.named_buffers())
    assert "pseudo_labels" in buffers and "counts" in buffers
    assert model.pseudo_labels.dtype == torch.int64 and not model.pseudo_labels.requires_grad
    views = make_views(digits.train.x[:16], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    model.loss(views, 0.0, indices=torch.arange(16)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # backbone and head are both trained
    (view,) = model.views(28)
    assert (view.size, view.scale, view.jitter_p, view.gray_p, view.blur_p, view.flip_p) == (28, (0.08, 1.0), 0.0, 0.0, 0.0, 0.5)
    assert model.encoder() is model.backbone
    groups = model.param_groups(1e-5)  # the head trains without momentum, as the official per-epoch optimiser
    (head_group,) = [g for g in groups if g.get("momentum") == 0.0]
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.head.parameters()}  # type: ignore[attr-defined]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # type: ignore[arg-type, misc]
    assert Config(num_classes=7).k == 70 and Config(n_clusters=3, num_classes=7).k == 3
    for bad in (dict(n_clusters=1), dict(pca_dim=0), dict(kmeans_iters=0), dict(reweight_pow=-1.0),
                dict(head_init_std=0.0), dict(min_scale=0.0), dict(num_samples=0)):
        with pytest.raises(ConfigError, match="deepcluster"):
            Config(**bad)  # type: ignore[arg-type]
    for bad_cfg in (Config(n_clusters=10, pca_dim=33, num_samples=100), Config(n_clusters=10, pca_dim=16),
                    Config(n_clusters=200, pca_dim=16, num_samples=100), Config(pca_dim=16, num_samples=100)):
        with pytest.raises(ConfigError, match="deepcluster"):
            DeepCluster(ConvNet(1, (8, 16, 32)), bad_cfg)


def test_mlp_between_backbone_and_head_is_clustered_before_its_relu(digits: Splits) -> None:
    digits = _subset(digits, 300)
    model = _model(digits, Config(n_clusters=10, pca_dim=16, mlp_dim=24))
    assert model.head.in_features == 24 and model.encoder() is model.backbone
    seen: list[Tensor] = []
    model.mlp.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    model.before_epoch(0, digits, CPU, seed=1)
    (feats,) = seen  # one batch of 300: what was clustered is the second linear layer's output, negatives included
    assert feats.shape == (300, 24) and (feats < 0).any()
    views = make_views(digits.train.x[:16], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    model.loss(views, 0.0, indices=torch.arange(16)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mlp.parameters())
    groups = model.param_groups(1e-5)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # type: ignore[arg-type, misc]
    with pytest.raises(ConfigError, match="pca_dim"):
        _model(digits, Config(n_clusters=10, pca_dim=32, mlp_dim=24))
    with pytest.raises(ConfigError, match="mlp_dim"):
        Config(mlp_dim=-1)
    # without the MLP the state-dict names are those of earlier checkpoints
    assert not any(k.startswith("mlp") for k in _model(digits).state_dict())


class _WithIndices(nn.Module):
    """The model with fixed dataset indices passed to loss(), for the shared SGD-steps check."""

    def __init__(self, model: DeepCluster, indices: Tensor) -> None:
        super().__init__()
        self.model, self.indices = model, indices

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        return self.model.loss(views, progress, indices=self.indices)


def test_loss_falls_within_20_sgd_steps_on_real_data_with_fixed_pseudo_labels(digits: Splits) -> None:
    torch.manual_seed(0)
    model = _model(digits)
    model.before_epoch(0, digits, CPU, seed=0)  # real pseudo-labels from k-means on the digits
    idx = torch.arange(100, 132)
    views = make_views(digits.train.x[idx], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    assert_loss_falls(_WithIndices(model, idx), views)


def test_checkpoint_round_trip_and_resume_equal_an_uninterrupted_run(digits: Splits, tmp_path: Path) -> None:
    data = _subset(digits, 128)
    cfg = dataclasses.replace(TINY, num_samples=128)
    model = _model(data, cfg)
    model.before_epoch(0, data, CPU, seed=7)
    fresh = _model(data, cfg)
    assert not torch.equal(fresh.pseudo_labels, model.pseudo_labels)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.pseudo_labels, model.pseudo_labels) and torch.equal(fresh.counts, model.counts)
    # the loop: 2 epochs straight == the same run killed after epoch 1 (its last checkpoint deleted), then resumed
    pcfg = PretrainConfig(backbone="convnet_tiny", epochs=2, batch_size=64, lr=0.05, deterministic=True, channels_last=False)
    straight = pretrain(_model(data, cfg), data, pcfg, 0, tmp_path, CPU, progress=False)
    want = {k: v.clone() for k, v in straight.encoder.state_dict().items()}
    for name in ("epoch0002.pt", "epoch0002.pt.sha256"):
        (tmp_path / name).unlink()
    resumed = pretrain(_model(data, cfg), data, pcfg, 0, tmp_path, CPU, progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    for k, v in resumed.encoder.state_dict().items():
        assert torch.equal(v, want[k]), k
