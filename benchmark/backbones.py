"""Backbones: a small ConvNet for CPU runs, torchvision ResNets (optional small-image stem), timm ViTs.

A backbone factory takes `(in_channels, image_size, small_stem)` and returns a module mapping
(N, C, H, W) images to (N, dim) pooled features, with the feature width in `module.dim`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from benchmark.config import PretrainConfig
from benchmark.errors import ConfigError
from benchmark.registry import BACKBONES, register_backbone


class ConvNet(nn.Module):
    """Four conv-BN-ReLU stages and global average pooling: fast enough for 2 CPU cores."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.body = nn.Sequential(*layers)
        self.dim = c

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x).mean(dim=(2, 3))
        return out


@register_backbone("convnet")
def convnet(in_channels: int, image_size: int, small_stem: bool) -> nn.Module:
    del image_size, small_stem
    return ConvNet(in_channels)


@register_backbone("convnet_tiny")
def convnet_tiny(in_channels: int, image_size: int, small_stem: bool) -> nn.Module:
    del image_size, small_stem
    return ConvNet(in_channels, (8, 16, 32))


class TorchvisionResNet(nn.Module):
    """torchvision ResNet without its classifier; keys keep torchvision's names (conv1, layer1, ...)."""

    def __init__(self, arch: str, in_channels: int, small_stem: bool) -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if small_stem:  # CIFAR variant (SimCLR appendix B.9): 3x3 stride-1 conv, no max-pool
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.net(x), 1)


@register_backbone("resnet18")
def resnet18(in_channels: int, image_size: int, small_stem: bool) -> nn.Module:
    return TorchvisionResNet("resnet18", in_channels, small_stem)


@register_backbone("resnet50")
def resnet50(in_channels: int, image_size: int, small_stem: bool) -> nn.Module:
    return TorchvisionResNet("resnet50", in_channels, small_stem)


class TimmViT(nn.Module):
    """A timm Vision Transformer with `num_classes=0` (pooled CLS token out)."""

    def __init__(self, name: str, in_channels: int, image_size: int, small_stem: bool) -> None:
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ImportError("ViT backbones need timm: `pip install timm`") from None
        patch = 4 if small_stem else 16  # 4 px patches for 32 px images (as MoCo v3's CIFAR runs)
        self.net = timm.create_model(
            name, pretrained=False, num_classes=0, img_size=image_size, patch_size=patch, in_chans=in_channels,
            dynamic_img_size=True,  # multi-crop: local crops are smaller than the global size
        )
        self.dim = int(getattr(self.net, "num_features"))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def set_drop_path(backbone: nn.Module, rate: float) -> bool:
    """Stochastic depth on a timm ViT backbone: residual branch i of d dropped with probability rate * i / (d - 1)
    (timm's and DINO's linear rule). False, changing nothing, for backbones without residual blocks to drop."""
    blocks = getattr(getattr(backbone, "net", None), "blocks", None)
    if not isinstance(backbone, TimmViT) or blocks is None:
        return False
    from timm.layers.drop import DropPath

    d = len(blocks)
    for i, blk in enumerate(blocks):
        p = rate * i / max(1, d - 1)
        blk.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        blk.drop_path2 = DropPath(p) if p > 0 else nn.Identity()
    return True


@register_backbone("vit_tiny")
def vit_tiny(in_channels: int, image_size: int, small_stem: bool) -> nn.Module:
    return TimmViT("vit_tiny_patch16_224", in_channels, image_size, small_stem)


@register_backbone("vit_small")
def vit_small(in_channels: int, image_size: int, small_stem: bool) -> nn.Module:
    return TimmViT("vit_small_patch16_224", in_channels, image_size, small_stem)


class Pixels(nn.Module):
    """The normalised image itself, flattened: features no network influences (the `pixels` baseline)."""

    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.dim = in_channels * image_size * image_size

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(x, 1)


@register_backbone("pixels")
def pixels(in_channels: int, image_size: int, small_stem: bool) -> nn.Module:
    del small_stem
    return Pixels(in_channels, image_size)


def build_backbone(cfg: PretrainConfig, in_channels: int, image_size: int) -> nn.Module:
    """Build the backbone named in `cfg` for images of this shape."""
    small = cfg.small_stem if cfg.small_stem is not None else image_size <= 64
    module: nn.Module = BACKBONES.get(cfg.backbone)(in_channels, image_size, small)
    return module


def first_conv(net: nn.Module, why: str) -> tuple[str, nn.Conv2d]:
    """(name, module) of the first Conv2d in module order: the layer that sees the image in ConvNet (`body.0`),
    torchvision ResNets (`net.conv1`) and timm ViTs (`net.patch_embed.proj`). `why` starts the error for a
    backbone without one (or with a grouped one)."""
    found = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None or found[1].groups != 1:
        raise ConfigError(f"{why}; this backbone has no plain first Conv2d: use convnet, resnet18/50 or a ViT")
    return found


def stages(net: nn.Module) -> list[nn.Module]:
    """The backbone as a chain of spatial stages (no pooling), for dense protocols (detection).

    ConvNet: its four conv-BN-ReLU blocks (strides 1, 2, 2, 2). torchvision ResNets: stem (conv1, bn1, relu,
    max-pool), layer1 ... layer4 (Detectron2's stem, res2 ... res5). The modules are `net`'s own (shared
    weights), so train a `trainable_copy()`. Anything else (ViTs, the pixels baseline, two-encoder methods)
    raises `NotApplicable`.
    """
    from benchmark.errors import NotApplicable

    if isinstance(net, ConvNet):
        layers = list(net.body)
        return [nn.Sequential(*layers[i : i + 3]) for i in range(0, len(layers), 3)]
    if isinstance(net, TorchvisionResNet):
        r = net.net
        return [nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool), r.layer1, r.layer2, r.layer3, r.layer4]
    raise NotApplicable(f"dense protocols need a convolutional backbone with stages (convnet, resnet18/50); "
                        f"{type(net).__name__} has none")


@torch.no_grad()
def stage_widths(parts: Sequence[nn.Module], channels: int, size: int = 64) -> list[int]:
    """Output channels of each module of the chain `parts` on a (2, channels, size, size) input (modes restored)."""
    p0 = next((p for part in parts for p in part.parameters()), None)
    x = torch.zeros(2, channels, size, size, device=p0.device if p0 is not None else None)
    was = [p.training for p in parts]
    out = []
    for p in parts:
        p.eval()
        x = p(x)
        out.append(int(x.shape[1]))
    for p, w in zip(parts, was):
        p.train(w)
    return out


class Blocks(NamedTuple):
    """A backbone cut into the blocks partial fine-tuning counts (see `finetune_blocks`)."""

    blocks: list[nn.Module]  # in forward order; the last k are trained
    after: list[nn.Module]  # modules after the last block (a ViT's final norm): trained with it
    kind: str  # what a block is, for selection notes ("transformer block", "residual block", "stage")


def finetune_blocks(net: nn.Module, unit: Literal["block", "stage"] = "block") -> Blocks:
    """The units MAE's partial fine-tuning (He et al. 2021, fig. 9) counts from the end, as `net`'s own modules.

    timm ViTs: the transformer blocks of `net.blocks`, then the modules registered after them (final `norm`,
    `fc_norm`, the pooling head). torchvision ResNets, unit "block": the residual blocks of layer1 ... layer4 in
    order (8 BasicBlocks in ResNet-18, 16 Bottlenecks in ResNet-50), counted as MAE counts transformer blocks; unit
    "stage": layer1 ... layer4 (res2 ... res5). ConvNet: its conv-BN-ReLU stages (`stages`) for either unit. In no
    block: the ResNet stem (conv1, bn1) and the ViT patch embedding, class token and position embedding.

    Raises:
        NotApplicable: a backbone without blocks (the pixels baseline, two-encoder methods).
    """
    from benchmark.errors import NotApplicable

    if isinstance(net, TimmViT) and isinstance(getattr(net.net, "blocks", None), nn.Sequential):
        children = list(net.net.named_children())
        at = next(i for i, (name, _) in enumerate(children) if name == "blocks")
        return Blocks(list(getattr(net.net, "blocks")), [m for _, m in children[at + 1 :]], "transformer block")
    if isinstance(net, TorchvisionResNet):
        r = net.net
        layers: list[nn.Sequential] = [r.layer1, r.layer2, r.layer3, r.layer4]
        if unit == "stage":
            return Blocks(list(layers), [], "stage")
        return Blocks([b for layer in layers for b in layer], [], "residual block")
    if isinstance(net, ConvNet):
        return Blocks(stages(net), [], "stage")
    raise NotApplicable(f"partial fine-tuning needs a backbone made of blocks (convnet, resnet18/50, a ViT); "
                        f"{type(net).__name__} has none")


def torchvision_resnet_state(net: nn.Module) -> dict[str, Tensor] | None:
    """The weights of a torchvision ResNet backbone under torchvision's own key names (conv1.weight,
    layer1.0.bn1.running_mean, ...), the layout detection converters start from; None for other backbones."""
    if not isinstance(net, TorchvisionResNet):
        return None
    return {k: v for k, v in net.net.state_dict().items() if not k.startswith("fc.")}
