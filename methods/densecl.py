"""DenseCL: Wang, Zhang, Shen, Kong, Li 2021, "Dense Contrastive Learning for Self-Supervised Visual
Pre-Training", https://arxiv.org/abs/2011.09157; official code https://github.com/WXinlong/DenseCL
(openselfsup/models/densecl.py, necks.py `DenseCLNeck`, configs/selfsup/densecl/densecl_imagenet_200ep.py).

MoCo v2 plus a dense branch. The backbone's feature MAP (before pooling) goes through two heads: the MoCo v2
MLP on the pooled map (global branch) and a 1x1-conv MLP at every location (dense branch). Each query location
of view 1 is matched to the key location of view 2 whose BACKBONE feature is most cosine-similar (argmax), and
the dense InfoNCE contrasts the matched dense key against a second queue of negatives. Loss =
(1 - lambda) global + lambda dense. As in the official code, the dense queue holds one vector per image, the
mean over locations of the key's dense projection (sec. 3.2), and the key encoder's BN keeps its own statistics.

Our backbones return pooled features, so `backbone_features` re-runs the backbone's own modules up to the map
for the ConvNet, torchvision ResNets and timm ViTs (patch tokens as the map); other backbones raise ConfigError.
The global InfoNCE is methods/mocov2.py's `moco_infonce` (imported); the dense one is the same InfoNCE over
(image, location) rows. Under torch.distributed the keys use Shuffle-BN and the queues take every process's
keys, as in the official code; one process skips the shuffle (see methods/mocov2.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.backbones import ConvNet, TimmViT, TorchvisionResNet
from benchmark.config import check
from benchmark.data.augment import ViewSpec, moco_v2_pair
from benchmark.errors import ConfigError
from benchmark.registry import register_method
from benchmark.train.distributed import gather, is_distributed, rank
from methods.mocov2 import moco_infonce


@dataclass(frozen=True)
class Config:
    proj_hidden_dim: int = 2048  # hidden width of both heads (official neck `hid_channels=2048`)
    proj_dim: int = 128  # query/key size of both branches (official `feat_dim=128`)
    queue_size: int = 65536  # K of each queue, global and dense (official `queue_len=65536`)
    momentum: float = 0.999  # key encoder EMA, constant (official `momentum=0.999`)
    temperature: float = 0.2  # tau of both InfoNCE terms (official `ContrastiveHead(temperature=0.2)`)
    loss_lambda: float = 0.5  # weight of the dense term (official `loss_lambda=0.5`, the paper's choice in its ablation)
    min_scale: float = 0.2  # smallest random-resized-crop area (official pipeline: scale=(0.2, 1.))

    def __post_init__(self) -> None:
        check(self.proj_hidden_dim > 0, f"densecl.proj_hidden_dim must be > 0, got {self.proj_hidden_dim}")
        check(self.proj_dim > 0, f"densecl.proj_dim must be > 0, got {self.proj_dim}")
        check(self.queue_size > 0, f"densecl.queue_size must be > 0, got {self.queue_size}")
        check(0 <= self.momentum <= 1, f"densecl.momentum must be in [0, 1], got {self.momentum}")
        check(self.temperature > 0, f"densecl.temperature must be > 0, got {self.temperature}")
        check(0 <= self.loss_lambda <= 1, f"densecl.loss_lambda must be in [0, 1], got {self.loss_lambda}")
        check(0 < self.min_scale <= 1, f"densecl.min_scale must be in (0, 1], got {self.min_scale}")


def backbone_features(backbone: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The backbone's pooled output and the map it pools, in one pass through the backbone's own modules.

    Args:
        backbone: a ConvNet, TorchvisionResNet or TimmViT (or a deep copy of one).
        x: (N, C, H, W) normalised images.

    Returns:
        pooled (N, dim), equal to `backbone(x)`, and the map (N, dim, h, w): for the CNNs the last stage,
        whose spatial mean is `pooled`; for ViTs the final patch tokens on their grid (pooled is the CLS token).
    """
    if isinstance(backbone, ConvNet):
        fmap: Tensor = backbone.body(x)
        return fmap.mean(dim=(2, 3)), fmap
    if isinstance(backbone, TorchvisionResNet):
        net = backbone.net
        fmap = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        fmap = net.layer4(net.layer3(net.layer2(net.layer1(fmap))))
        return torch.flatten(net.avgpool(fmap), 1), fmap
    if isinstance(backbone, TimmViT):
        vit: Any = backbone.net  # a timm VisionTransformer
        tokens: Tensor = vit.forward_features(x)  # (N, prefix + h * w, dim)
        ph, pw = vit.patch_embed.patch_size
        h, w = x.shape[2] // ph, x.shape[3] // pw
        grid = tokens[:, vit.num_prefix_tokens :].transpose(1, 2).reshape(len(x), -1, h, w)
        return vit.forward_head(tokens), grid
    check_backbone(backbone)
    raise AssertionError("unreachable")


def check_backbone(backbone: nn.Module) -> None:
    """Raise ConfigError unless `backbone_features` can take this backbone's map."""
    if not isinstance(backbone, (ConvNet, TorchvisionResNet, TimmViT)):
        raise ConfigError(f"densecl needs a feature map: backbone {type(backbone).__name__} is not supported "
                          "(use convnet, convnet_tiny, resnet18, resnet50, vit_tiny or vit_small)")


def correspondence(fq: Tensor, fk: Tensor) -> Tensor:
    """For every query location, the key location of the same image with the most similar backbone feature.

    Args:
        fq: (N, C, S) backbone features of view 1 at S locations.
        fk: (N, C, T) backbone features of view 2 at T locations.

    Returns:
        (N, S) long indices into T: argmax_t cos(fq[n, :, s], fk[n, :, t]) (official `backbone_sim_matrix`).
    """
    with torch.no_grad(), torch.autocast(fq.device.type, enabled=False):
        sim = F.normalize(fq.float(), dim=1).transpose(1, 2) @ F.normalize(fk.float(), dim=1)  # (N, S, T)
        return sim.argmax(dim=2)


def dense_infonce(q_grid: Tensor, k_grid: Tensor, match: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE over every (image, location) of view 1, averaged over all N * S of them (paper eq. 2).

    Row (n, s) has the positive k_grid[n, :, match[n, s]] and the negatives in `queue`; all vectors unit-norm.

    Args:
        q_grid: (N, D, S) dense queries; the only input that receives a gradient.
        k_grid: (N, D, T) dense keys of view 2 (detached).
        match: (N, S) indices into T, from `correspondence`.
        queue: (K, D) dense negatives (detached).
        temperature: t > 0.

    Returns:
        A scalar, at least 0.
    """
    d = q_grid.shape[1]
    k_pos = torch.gather(k_grid.detach(), 2, match.unsqueeze(1).expand(-1, d, -1))  # (N, D, S)
    q = q_grid.transpose(1, 2).reshape(-1, d)  # (N * S, D), rows in (n, s) order
    k = k_pos.transpose(1, 2).reshape(-1, d)
    return moco_infonce(q, k, queue, temperature)


def densecl_loss(loss_global: Tensor, loss_dense: Tensor, loss_lambda: float) -> Tensor:
    """(1 - lambda) L_q + lambda L_r (paper eq. 3)."""
    return (1 - loss_lambda) * loss_global + loss_lambda * loss_dense


@torch.no_grad()
def enqueue(queue: Tensor, ptr: Tensor, k: Tensor) -> None:
    """Write the keys of every process over the oldest rows of `queue` (K, D), wrapping around the end, so
    batch sizes need not divide K (the official code asserts they do); the same as writing rows one by one."""
    k = gather(k).float()  # (world * B, D), the same order in every process, so the queues stay equal
    size, n = queue.shape[0], k.shape[0]
    kept = k[-size:]
    start = int(ptr) + n - len(kept)
    queue[(start + torch.arange(len(kept), device=k.device)) % size] = kept
    ptr.fill_((int(ptr) + n) % size)


@torch.no_grad()
def shuffle_bn(fn: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor) -> tuple[Tensor, ...]:
    """`fn(x)` on a batch shuffled across processes, outputs returned in this process's order (Shuffle-BN)."""
    if not is_distributed():
        return fn(x)
    b = x.shape[0]
    x_all = gather(x)
    perm = torch.randperm(len(x_all), device=x.device)
    dist.broadcast(perm, src=0)  # every process uses rank 0's shuffle
    outs = []
    for y in fn(x_all[perm[rank() * b : (rank() + 1) * b]]):
        y_all = gather(y.contiguous())  # rows in `perm` order
        y_sorted = torch.empty_like(y_all)
        y_sorted[perm] = y_all
        outs.append(y_sorted[rank() * b : (rank() + 1) * b])
    return tuple(outs)


def _global_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """fc-ReLU-fc on the pooled map; the official neck is built with `init_linear='kaiming'`."""
    head = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return head


def _dense_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """conv1x1-ReLU-conv1x1 at every location (official `mlp2`, PyTorch's default init)."""
    return nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1))


# Official recipe (densecl_imagenet_200ep.py): SGD lr 0.03 for batch 256, momentum 0.9, wd 1e-4, cosine, no warm-up.
@register_method("densecl", config=Config, pretrain=dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0))
class DenseCL(nn.Module):
    queue: Tensor
    queue_ptr: Tensor
    dense_queue: Tensor
    dense_queue_ptr: Tensor

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        check_backbone(backbone)
        self.cfg = cfg
        dim = int(backbone.dim)  # type: ignore[arg-type]
        self.backbone = backbone
        self.head = _global_head(dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.dense_head = _dense_head(dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.key_dense_head = copy.deepcopy(self.dense_head).requires_grad_(False)
        # Random unit vectors until real keys replace them (official code). Buffers: checkpoints keep them.
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("dense_queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("dense_queue_ptr", torch.zeros((), dtype=torch.long))

    def views(self, image_size: int) -> list[ViewSpec]:
        # MoCo v2's `aug_plus`, as the official config.
        return moco_v2_pair(image_size, (self.cfg.min_scale, 1.0))

    @torch.no_grad()
    def update_key_encoder(self, m: float) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q over backbone and both heads, parameters only (official code)."""
        pairs = ((self.backbone, self.key_backbone), (self.head, self.key_head), (self.dense_head, self.key_dense_head))
        for online, key in pairs:
            for pq, pk in zip(online.parameters(), key.parameters()):
                pk.mul_(m).add_(pq.detach(), alpha=1 - m)

    def _key_outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pooled, fmap = backbone_features(self.key_backbone, x)
        grid = self.key_dense_head(fmap).flatten(2)  # (B, D, T)
        k = F.normalize(self.key_head(pooled), dim=1)  # (B, D)
        k_dense = F.normalize(grid.mean(dim=2), dim=1)  # (B, D): the dense queue's entry (official `avgpool2`)
        return k, F.normalize(grid, dim=1), k_dense, fmap.flatten(2)

    @torch.no_grad()
    def keys(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Key-encoder outputs of a (B, C, H, W) batch: global key (B, D), dense keys (B, D, T), pooled dense
        key (B, D) and backbone map (B, dim, T); with Shuffle-BN across processes when there are several."""
        k, k_grid, k_dense, fk = shuffle_bn(self._key_outputs, x)
        return k, k_grid, k_dense, fk

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        """views: two (N, C, H, W) crops, queries from the first, keys from the second (official, one-way);
        progress is unused (momentum, temperature and lambda are constant)."""
        self.update_key_encoder(self.cfg.momentum)
        v1, v2 = views
        pooled, fmap = backbone_features(self.backbone, v1)
        q = self.head(pooled)  # (N, D)
        q_grid = self.dense_head(fmap).flatten(2)  # (N, D, S)
        k, k_grid, k_dense, fk = self.keys(v2)
        match = correspondence(fmap.detach().flatten(2), fk)  # (N, S)
        # Both InfoNCEs multiply by normalised copies of the queues, so the in-place enqueues below leave what
        # autograd saved intact.
        loss_global = moco_infonce(q, k, self.queue, self.cfg.temperature)
        loss_dense = dense_infonce(q_grid, k_grid, match, self.dense_queue, self.cfg.temperature)
        enqueue(self.queue, self.queue_ptr, k)
        enqueue(self.dense_queue, self.dense_queue_ptr, k_dense)
        return densecl_loss(loss_global, loss_dense, self.cfg.loss_lambda)

    def encoder(self) -> nn.Module:
        return self.backbone
