"""DeepCluster: Caron et al. 2018, "Deep Clustering for Unsupervised Learning of Visual Features",
https://arxiv.org/abs/1807.05520; official code https://github.com/facebookresearch/deepcluster.

At the start of every epoch the backbone's features of the whole training set (eval mode, no augmentation)
are PCA-whitened, L2-normalised and clustered by k-means; the cluster indices become pseudo-labels, a
freshly initialised linear head is put on the backbone, and backbone + head are trained with cross
entropy on the pseudo-labels for one epoch. Defaults follow the official code (main.py, clustering.py);
where the harness differs, the difference is noted inline:
- faiss k-means is replaced by the same algorithm in torch (random init from data points, 20 Lloyd
  iterations, faiss's split of a large cluster for every empty one);
- the official sampler draws images uniformly over pseudo-classes (`UnifLabelSampler`); the shared loop
  draws uniformly over images, so each sample's loss is weighted by 1 / (size of its cluster) instead,
  which has the same expectation (`reweight_pow`);
- the Sobel filter in front of the network is left out: the harness's encoder is the backbone on
  normalised images of the dataset's channels (Sobel would give it 2 input channels), and on 1-channel
  data Sobel's purpose, removing colour, is moot;
- the official VGG/AlexNet keep two fc layers between the convolutions and the head and cluster the
  second one's output before its ReLU; `mlp_dim > 0` puts such a pair (without the dropout) between backbone
  and head, `mlp_dim = 0` (default) puts head and clustering directly on the backbone's pooled features, as
  the ResNet ports of DeepCluster do (e.g. MMSelfSup's `deepcluster_resnet50`). Either way the protocols
  evaluate the backbone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check, hashed_if_set
from benchmark.data.augment import ViewSpec
from benchmark.data.sets import Splits
from benchmark.registry import register_method
from benchmark.train.distributed import all_reduce_sum, rank, world_size
from benchmark.train.kmeans import kmeans, training_features
from benchmark.train.optim import param_groups

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Config:
    n_clusters: int | None = None  # k; None: 10 x num_classes (official `--k 10000` for ImageNet's 1000 classes)
    pca_dim: int = 256  # PCA-whitening output size before k-means (official preprocess_features(pca=256)); <= backbone dim
    kmeans_iters: int = 20  # Lloyd iterations (official run_kmeans: clus.niter = 20)
    reweight_pow: float = 1.0  # loss weight n_c^-pow per sample; 1 = uniform over clusters (official UnifLabelSampler); 0 = plain CE
    head_init_std: float = 0.01  # new head each epoch: weight ~ N(0, std^2), bias 0 (official main.py)
    # Not in the official code (head lr = lr). The head, new every epoch, must fit the new pseudo-classes within
    # the epoch, and its progress scales with |f|^2: official fc7 features are 4096-d, a small ConvNet's 32-128-d.
    head_lr_mult: float = 1.0
    min_scale: float = 0.08  # RandomResizedCrop area lower bound (official: torchvision's default 0.08)
    # Official VGG/AlexNet: fc6-fc7 (4096 wide) between the convolutions and the head; 0: none (ResNet ports)
    mlp_dim: int = hashed_if_set(0)
    num_classes: int | None = None  # filled by the runner; only used for the default n_clusters
    num_samples: int | None = None  # filled by the runner with len(splits.train): length of the pseudo-label buffer

    def __post_init__(self) -> None:
        check(self.n_clusters is None or self.n_clusters >= 2, f"deepcluster.n_clusters must be >= 2, got {self.n_clusters}")
        check(self.pca_dim >= 1, f"deepcluster.pca_dim must be >= 1, got {self.pca_dim}")
        check(self.kmeans_iters >= 1, f"deepcluster.kmeans_iters must be >= 1, got {self.kmeans_iters}")
        check(self.reweight_pow >= 0, f"deepcluster.reweight_pow must be >= 0, got {self.reweight_pow}")
        check(self.head_init_std > 0, f"deepcluster.head_init_std must be > 0, got {self.head_init_std}")
        check(self.head_lr_mult > 0, f"deepcluster.head_lr_mult must be > 0, got {self.head_lr_mult}")
        check(0 < self.min_scale <= 1, f"deepcluster.min_scale must be in (0, 1], got {self.min_scale}")
        check(self.mlp_dim >= 0, f"deepcluster.mlp_dim must be >= 0, got {self.mlp_dim}")
        check(self.num_samples is None or self.num_samples >= 1, f"deepcluster.num_samples must be >= 1, got {self.num_samples}")

    @property
    def k(self) -> int:
        """The number of clusters, from `n_clusters` or 10 x `num_classes`."""
        check(self.n_clusters is not None or self.num_classes is not None,
              "deepcluster.n_clusters is None and deepcluster.num_classes is unset: set one of them")
        return self.n_clusters if self.n_clusters is not None else 10 * int(self.num_classes)  # type: ignore[arg-type]


def pca_whiten(x: Tensor, dim: int) -> Tensor:
    """Centre, project on the top `dim` principal axes, scale each to unit variance, then L2-normalise rows
    (official `preprocess_features`: faiss PCAMatrix(eigen_power=-0.5), then row L2 normalisation).

    Args:
        x: (N, D) features, D >= dim.
        dim: output size.

    Returns:
        (N, dim) float32 unit rows.
    """
    x64 = x.double()
    x64 = x64 - x64.mean(dim=0)
    lam, vec = torch.linalg.eigh(x64.T @ x64 / len(x64))  # ascending eigenvalues
    lam, vec = lam.flip(0)[:dim], vec.flip(1)[:, :dim]
    # faiss divides by sqrt(lambda) as is; the floor only keeps dead (zero-variance) units finite
    y = (x64 @ vec) / lam.clamp_min(1e-10 * float(lam[0].clamp_min(1e-30))).sqrt()
    return F.normalize(y, dim=1).float()


def deepcluster_loss(logits: Tensor, targets: Tensor, counts: Tensor, reweight_pow: float = 1.0) -> Tensor:
    """Cross entropy on pseudo-labels, each sample weighted by n_c^-pow, the size of its cluster: with pow = 1
    this is, in expectation over uniformly drawn images, the loss under the official uniform-over-clusters
    sampling. Normalised by the weights' sum over the global batch, so N processes give the loss of one.

    Args:
        logits: (B, K) head outputs.
        targets: (B,) pseudo-labels in [0, K).
        counts: (K,) cluster sizes over the training set (every target's cluster has n_c >= 1).
        reweight_pow: 0 gives plain cross entropy.

    Returns:
        scalar loss.
    """
    w = counts.to(torch.float32)[targets].pow(-reweight_pow)  # (B,)
    total = all_reduce_sum(w.sum().detach().clone())
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (B,)
    return (w * ce).sum() * world_size() / total  # DDP averages the processes' gradients: x world size


# Official main.py: SGD, lr 0.05, momentum 0.9, weight decay 1e-5 (`--wd -5`), batch 256, constant lr (the shared
# loop's cosine schedule is used instead), no warm-up.
@register_method("deepcluster", config=Config, pretrain=dict(optimizer="sgd", lr=0.05, weight_decay=1e-5, warmup_epochs=0))
class DeepCluster(nn.Module):
    uses_indices = True  # loss() looks up each sample's pseudo-label by its index in the training set

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        dim = int(backbone.dim)  # type: ignore[arg-type]
        check(cfg.num_samples is not None, "deepcluster.num_samples is unset: the runner fills it with len(splits.train)")
        # the clustered features: the backbone's, or the MLP's second layer before its ReLU (official fc7)
        self.mlp = nn.Sequential(nn.Linear(dim, cfg.mlp_dim), nn.ReLU(inplace=True), nn.Linear(cfg.mlp_dim, cfg.mlp_dim)) \
            if cfg.mlp_dim else nn.Identity()
        dim = cfg.mlp_dim or dim
        check(cfg.pca_dim <= dim, f"deepcluster.pca_dim ({cfg.pca_dim}) must be <= the clustered feature size ({dim})")
        check(cfg.k <= int(cfg.num_samples), f"deepcluster.n_clusters ({cfg.k}) must be <= num_samples ({cfg.num_samples})")  # type: ignore[arg-type]
        self.head = nn.Linear(dim, cfg.k)
        self.reset_head(torch.Generator().manual_seed(0))
        # Before the first clustering (only reachable outside the loop, e.g. in tests) the labels are i mod K.
        self.pseudo_labels: Tensor
        self.counts: Tensor
        self.register_buffer("pseudo_labels", torch.arange(int(cfg.num_samples)) % cfg.k)  # type: ignore[arg-type]
        self.register_buffer("counts", torch.bincount(self.pseudo_labels, minlength=cfg.k))

    def views(self, image_size: int) -> list[ViewSpec]:
        # Official training transform: RandomResizedCrop + horizontal flip, no colour augmentation.
        return [ViewSpec(size=image_size, scale=(self.cfg.min_scale, 1.0), jitter_p=0.0, gray_p=0.0)]

    def param_groups(self, weight_decay: float) -> list[dict[str, object]]:
        """The backbone as the loop's default groups. The head as the official code trains it: a fresh SGD every
        epoch, without momentum (momentum carried across epochs would push the new head along the old clusters'
        gradients) and at a constant lr (official: no schedule), so that late epochs still fit their new head."""
        head = dict(params=list(self.head.parameters()), weight_decay=weight_decay, momentum=0.0, lars=False,
                    fixed_lr=True, lr_mult=self.cfg.head_lr_mult)
        return [*param_groups(nn.ModuleList([self.backbone, self.mlp]), weight_decay), head]

    @torch.no_grad()
    def reset_head(self, g: torch.Generator) -> None:
        """A new classifier for the new pseudo-classes (official main.py: normal_(0, 0.01), bias 0)."""
        w = torch.randn(self.head.weight.shape, generator=g) * self.cfg.head_init_std
        self.head.weight.copy_(w)
        self.head.bias.zero_()

    @torch.no_grad()
    def before_epoch(self, epoch: int, splits: Splits, device: torch.device, seed: int) -> None:
        """Cluster the training set's features and reset the head; deterministic given `seed`."""
        check(len(splits.train) == len(self.pseudo_labels),
              f"deepcluster.num_samples ({len(self.pseudo_labels)}) != training-set size ({len(splits.train)})")
        x = pca_whiten(training_features(nn.Sequential(self.backbone, self.mlp), splits, device), self.cfg.pca_dim)
        _, labels = kmeans(x, self.cfg.k, self.cfg.kmeans_iters, torch.Generator(device).manual_seed(seed))
        # Every process clusters the same features; rank 0's labels are broadcast so tiny numeric differences
        # between devices cannot give processes different pseudo-classes.
        labels = all_reduce_sum(labels * int(rank() == 0))
        self._log_clusters(epoch, labels)
        self.pseudo_labels.copy_(labels)
        self.counts.copy_(torch.bincount(labels, minlength=self.cfg.k))
        self.reset_head(torch.Generator().manual_seed(seed))

    def _log_clusters(self, epoch: int, labels: Tensor) -> None:
        """The official log line: NMI between this epoch's and the previous epoch's assignments."""
        from sklearn.metrics import normalized_mutual_info_score

        sizes = torch.bincount(labels, minlength=self.cfg.k)
        nmi = normalized_mutual_info_score(self.pseudo_labels.cpu().numpy(), labels.cpu().numpy()) if epoch > 0 else float("nan")
        log.info("deepcluster epoch %d: %d of %d clusters non-empty, largest %d, NMI vs previous %.3f",
                 epoch + 1, int((sizes > 0).sum()), self.cfg.k, int(sizes.max()), nmi)

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None, indices: Tensor | None = None) -> Tensor:
        """views: one (B, C, H, W) crop; indices: (B,) rows of the training set, whose pseudo-labels are the targets."""
        if indices is None:
            raise ValueError("deepcluster needs each sample's training-set index: loss(..., indices=) (uses_indices = True)")
        targets = self.pseudo_labels[indices]
        z = self.mlp(self.backbone(views[0]))
        z = F.relu(z) if self.cfg.mlp_dim else z
        return deepcluster_loss(self.head(z), targets, self.counts, self.cfg.reweight_pow)

    def encoder(self) -> nn.Module:
        return self.backbone
