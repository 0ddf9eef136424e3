"""Per-stage features for frozen probes: "a linear classifier from different stages" (Goyal et al. 2019).

A frozen protocol with `layers` scores each named layer with its own probe. Layer names by backbone:
- torchvision ResNets: `conv1` (the stem's conv-BN-ReLU, before the max-pool), `res2` ... `res5` (layer1 ... layer4),
  Goyal's / VISSL's names. Each map is average-pooled to about `dims` values (Goyal: ~9k) and flattened. For a
  ResNet-50 at 224 px with dims = 9216 the pooling is Goyal's own (VISSL `eval_resnet_8gpu_transfer_in1k_linear.yaml`,
  mmselfsup `MultiPooling`): conv1 AvgPool(10, s10, p4) -> 64x12x12, res2 AvgPool(16, s8) -> 256x6x6, res3
  AvgPool(13, s5) -> 512x4x4, res4 AvgPool(8, s3) -> 1024x3x3, res5 AvgPool(6, s1) -> 2048x2x2. Elsewhere each map is
  pooled adaptively to the g x g grid with C·g² closest to `dims` (g at most the map's side).
- ConvNet: `block1` ... `block4` (its conv-BN-ReLU stages), pooled the same way.
- timm ViTs: `last{k}` = the class tokens of the last k blocks after the final norm, concatenated (DINOv2
  `eval/linear.py`, `n_last_blocks` 1 or 4).
- any backbone: `out`, the encoder's own output (global pooling / the class token): what every other protocol sees.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.backbones import ConvNet, TimmViT, TorchvisionResNet, stages
from benchmark.config import check
from benchmark.errors import NotApplicable
from benchmark.evaluate.encoder import Encoder, FrozenEncoder

GOYAL_DIMS = 9216  # ~9k values per layer (Goyal et al. 2019, sec. 4)
# (channels, side) of a ResNet-50 stage at 224 px -> (kernel, stride, padding) of Goyal's average pool
GOYAL_POOL: dict[tuple[int, int], tuple[int, int, int]] = {
    (64, 112): (10, 10, 4), (256, 56): (16, 8, 0), (512, 28): (13, 5, 0), (1024, 14): (8, 3, 0), (2048, 7): (6, 1, 0),
}


def layer_names(net: nn.Module) -> tuple[str, ...]:
    """The layers `net` offers to probes, shallowest first (see the module docstring)."""
    if isinstance(net, TorchvisionResNet):
        return ("conv1", "res2", "res3", "res4", "res5", "out")
    if isinstance(net, ConvNet):
        return (*(f"block{i + 1}" for i in range(len(stages(net)))), "out")
    if isinstance(net, TimmViT):
        return (*(f"last{k}" for k in range(1, len(getattr(net.net, "blocks")) + 1)), "out")
    return ("out",)


def pool_grid(channels: int, side: int, dims: int) -> int:
    """The side g of the pooled grid: C·g² closest to `dims` (on a log scale), 1 <= g <= side."""
    best = max(1, round(math.sqrt(dims / channels)))
    return max(1, min(side, best))


def pool_map(x: Tensor, dims: int) -> Tensor:
    """(N, C, H, W) -> (N, C·g·g): Goyal's pooling where it is defined (ResNet-50 stages at 224 px), else adaptive."""
    c, h = x.shape[1], x.shape[2]
    if dims == GOYAL_DIMS and (c, h) in GOYAL_POOL and x.shape[3] == h:
        k, s, p = GOYAL_POOL[(c, h)]
        return torch.flatten(F.avg_pool2d(x, k, s, p), 1)
    g = pool_grid(c, min(h, x.shape[3]), dims)
    return torch.flatten(F.adaptive_avg_pool2d(x, g), 1)


class StageFeatures(nn.Module):
    """Images -> the pooled, flattened output of stage `index` of a stage-wise backbone (shares `net`'s modules)."""

    def __init__(self, net: nn.Module, index: int, dims: int, resnet_conv1: bool) -> None:
        super().__init__()
        parts = stages(net)
        if resnet_conv1:  # conv1 is the stem before its max-pool (Goyal's 112 px map at 224 px)
            stem = parts[0]
            parts = [nn.Sequential(*list(stem.children())[:-1])]
        self.body = nn.Sequential(*parts[: index + 1])
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return pool_map(self.body(x), self.dims)


class LastBlocks(nn.Module):
    """Images -> the final-normed class tokens of the last `k` blocks of a timm ViT, concatenated (DINOv2)."""

    def __init__(self, net: TimmViT, k: int) -> None:
        super().__init__()
        self.vit, self.k = net.net, k

    def forward(self, x: Tensor) -> Tensor:
        n = len(getattr(self.vit, "blocks"))
        outs = getattr(self.vit, "forward_intermediates")(x, indices=list(range(n - self.k, n)), norm=True, return_prefix_tokens=True,
                                             intermediates_only=True, output_fmt="NLC")
        return torch.cat([prefix[:, 0] for _, prefix in outs], dim=1)


def layer_module(net: nn.Module, layer: str, dims: int) -> nn.Module:
    """The module mapping normalised images to `layer`'s probe features (modules shared with `net`).

    Raises:
        NotApplicable: `net` has no layer of that name (the cell is skipped with the reason).
    """
    names = layer_names(net)
    if layer not in names:
        raise NotApplicable(f"layer {layer!r} does not exist in a {type(net).__name__} backbone; it has {', '.join(names)}")
    if layer == "out":
        return net
    if isinstance(net, TimmViT):
        return LastBlocks(net, int(layer.removeprefix("last")))
    # stage i of stages(net) ends layer i (ResNets: stem+maxpool, layer1 = res2, ...; conv1 is the stem before its pool)
    return StageFeatures(net, names.index(layer), dims, resnet_conv1=layer == "conv1" and isinstance(net, TorchvisionResNet))


def at_layer(encoder: FrozenEncoder, layer: str, image_size: int, dims: int = GOYAL_DIMS) -> FrozenEncoder:
    """`encoder` seen at `layer` for images of side `image_size`: same weights, normalisation, device and feature
    store, its own cache key (`layer` and `dims` go into it), `dim` found by one forward of a dummy batch."""
    if layer == "out":
        return encoder
    module = layer_module(encoder.module, layer, dims)
    probe = torch.zeros(2, len(encoder.mean), image_size, image_size, device=encoder.device)
    with torch.inference_mode():
        dim = int(module.eval()(probe).shape[1])
    tag = layer if isinstance(encoder.module, TimmViT) else f"{layer}-pool{dims}"
    return dataclasses.replace(encoder, module=module, dim=dim, layer=tag)


def check_layers(protocol: str, layers: tuple[str, ...], dims: int) -> None:
    """Config validation of a protocol's `layers` / `layer_dims` (names are checked against the backbone at run time)."""
    check(len(layers) > 0, f"{protocol}.layers must name at least one layer (out: the encoder's output)")
    check(len(set(layers)) == len(layers), f"{protocol}.layers has duplicates: {layers}")
    check(all(isinstance(n, str) and n.isidentifier() for n in layers), f"{protocol}.layers are names like out, res4, last4; got {layers}")
    check(dims > 0, f"{protocol}.layer_dims must be > 0, got {dims}")


def layer_encoders(encoder: Encoder, layers: tuple[str, ...], image_size: int, dims: int) -> list[tuple[str, Encoder]]:
    """(metric suffix, encoder at that layer) per layer: "" for `out`, "_<layer>" otherwise. Every name is checked
    before any feature is extracted, so a misspelt layer fails (NotApplicable, with the backbone's names) at once."""
    if layers == ("out",):
        return [("", encoder)]
    if not isinstance(encoder, FrozenEncoder):
        raise NotApplicable(f"per-layer probes need the harness's FrozenEncoder, got {type(encoder).__name__}")
    names = layer_names(encoder.module)
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise NotApplicable(f"layer {unknown[0]!r} does not exist in a {type(encoder.module).__name__} backbone; "
                            f"it has {', '.join(names)}")
    return [("" if n == "out" else f"_{n}", at_layer(encoder, n, image_size, dims)) for n in layers]
