"""MAE: He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners", https://arxiv.org/abs/2111.06377;
official code https://github.com/facebookresearch/mae (models_mae.py, main_pretrain.py).

A ViT encoder sees only a random 25% of the patches (per-sample masking by argsort of uniform noise); a light
Transformer decoder gets the encoded visible tokens plus a shared mask token at every masked position, adds
its own positional embedding, and regresses the pixels of each patch. The loss is the mean squared error on
the masked patches only, against per-patch standardised pixels (`norm_pix_loss`, official default).
Followed from the code, which the paper leaves open: fixed 2-D sin-cos positions in encoder and decoder,
xavier-uniform Linear layers (timm's ViT starts from a truncated normal), unbiased per-patch variance.
The backbone is our timm ViT (`TimmViT.net`); protocols evaluate it unmasked on the full image (CLS token).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.errors import ConfigError
from benchmark.registry import register_method


@dataclass(frozen=True)
class Config:
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder (paper sec. 4, `--mask_ratio`)
    norm_pix_loss: bool = True  # per-patch standardised targets (`--norm_pix_loss`, used in every README recipe)
    decoder_dim: int = 256  # decoder width; official 512 (sized for ViT-B/L/H, 768-1280 wide; paper table 1b: 256 costs 2 pts linear)
    decoder_depth: int = 4  # decoder blocks; official 8 (paper table 1a: 4 blocks cost 1.6 pts linear, 0 fine-tuned)
    decoder_heads: int = 8  # decoder attention heads; official 16 (head width 32 either way)
    mlp_ratio: float = 4.0  # decoder MLP hidden width / decoder_dim (official)
    min_scale: float = 0.2  # RandomResizedCrop(scale=(0.2, 1.0)) in main_pretrain.py

    def __post_init__(self) -> None:
        check(0 < self.mask_ratio < 1, f"mae.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        check(self.decoder_depth >= 1, f"mae.decoder_depth must be >= 1, got {self.decoder_depth}")
        check(self.decoder_heads >= 1, f"mae.decoder_heads must be >= 1, got {self.decoder_heads}")
        check(self.decoder_dim > 0 and self.decoder_dim % 4 == 0,
              f"mae.decoder_dim must be a positive multiple of 4 (2-D sin-cos positions), got {self.decoder_dim}")
        check(self.decoder_dim % self.decoder_heads == 0,
              f"mae.decoder_dim ({self.decoder_dim}) must be divisible by mae.decoder_heads ({self.decoder_heads})")
        check(self.mlp_ratio > 0, f"mae.mlp_ratio must be > 0, got {self.mlp_ratio}")
        check(0 < self.min_scale <= 1, f"mae.min_scale must be in (0, 1], got {self.min_scale}")


def patchify(x: Tensor, p: int) -> Tensor:
    """(N, C, H, W) images -> (N, L, p*p*C) patches, row-major over the (H/p, W/p) grid (the order of the
    ViT's patch tokens); pixels within a patch ordered (row, column, channel) as the official `patchify`."""
    n, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = x.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, p: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of `patchify`: (N, L, p*p*C) -> (N, C, gh*p, gw*p)."""
    gh, gw = grid
    x = patches.reshape(patches.shape[0], gh, gw, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(patches.shape[0], channels, gh * p, gw * p)


def random_masking(n: int, length: int, mask_ratio: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by argsort of uniform noise (official `random_masking`).

    Keeps `int(length * (1 - mask_ratio))` patches per sample (the official floor).

    Returns:
        ids_keep: (N, K) indices of the visible patches, in shuffled order.
        mask: (N, L) float, 0 for visible and 1 for masked patches, in the original patch order.
        ids_restore: (N, L) the inverse permutation of the shuffle: gathering the (visible, masked)
            sequence with it puts every token back at its patch position.
    """
    keep = int(length * (1 - mask_ratio))
    if not 0 < keep < length:
        raise ValueError(f"mask ratio {mask_ratio} on {length} patches keeps {keep}: need 1 to {length - 1}")
    noise = torch.rand(n, length, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first `keep` are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


def normalize_patches(target: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardise each patch over its pixels, (t - mean) / sqrt(var + eps), var unbiased (official)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Mean squared error per patch, averaged over the masked patches only (official `forward_loss`).

    Args:
        pred: (N, L, P) decoder predictions for every patch.
        target: (N, L, P) patchified input pixels; receives no gradient.
        mask: (N, L) 1 where the patch was masked, 0 where visible.
        norm_pix: standardise each target patch first (`normalize_patches`).
    """
    target = target.detach().float()
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum()


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos positions, (gh*gw, dim): the first half of the channels encodes the column, the
    second half the row, each as [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4))
    (official `get_2d_sincos_pos_embed`)."""
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_d(pos: Tensor) -> Tensor:
        out = pos.double()[:, None] * omega[None]  # (gh*gw, dim/4)
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.cat([one_d(cols.flatten()), one_d(rows.flatten())], dim=1).float()


def _init_official(module: nn.Module) -> None:
    """models_mae.py `_init_weights`: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# Official recipe (main_pretrain.py, PRETRAIN.md): AdamW, base lr 1.5e-4 x batch/256, weight decay 0.05
# (biases and norms excluded, the mask and CLS tokens decayed: `add_weight_decay` without a skip list),
# 40 warm-up epochs of 800, no gradient clipping. The official betas are (0.9, 0.95); the shared loop's
# AdamW takes beta1 from `momentum` and fixes beta2 at 0.999.
@register_method("mae", config=Config, backbones=("vit_tiny", "vit_small"),
                 pretrain=dict(optimizer="adamw", lr=1.5e-4, weight_decay=0.05, momentum=0.9, warmup_epochs=40))
class MAE(nn.Module):
    decoder_pos: Tensor

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        vit: Any = getattr(backbone, "net", None)
        if not all(hasattr(vit, a) for a in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "_pos_embed")):
            raise ConfigError(f"mae needs a timm ViT backbone (vit_tiny, vit_small); got {type(backbone).__name__}")
        self.cfg = cfg
        self.backbone = backbone
        self.patch = int(vit.patch_embed.patch_size[0])
        self.channels = int(vit.patch_embed.proj.in_channels)
        self.prefix = int(vit.num_prefix_tokens)  # CLS (and register) tokens ahead of the patch tokens
        d = cfg.decoder_dim
        self.decoder_embed = nn.Linear(int(vit.embed_dim), d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        from timm.models.vision_transformer import Block

        self.decoder_blocks = nn.Sequential(*(Block(d, cfg.decoder_heads, cfg.mlp_ratio, qkv_bias=True,
                                                    norm_layer=partial(nn.LayerNorm, eps=1e-6))  # type: ignore[arg-type]
                                              for _ in range(cfg.decoder_depth)))
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, self.patch**2 * self.channels)
        gh, gw = vit.patch_embed.grid_size
        self.grid = (int(gh), int(gw))  # the patch grid the backbone was built for
        # fixed, so not saved: recomputed for any other grid (official: a frozen parameter)
        self.register_buffer("decoder_pos", sincos_2d(d, self.grid), persistent=False)  # (L, d)
        self._initialize(vit)

    def _initialize(self, vit: Any) -> None:
        """The official initialisation, encoder included; the encoder's positions become fixed sin-cos."""
        self.apply(_init_official)
        w = vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.normal_(vit.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            pos = torch.zeros_like(vit.pos_embed)  # (1, prefix + gh*gw, D) when the CLS token has a position
            n_patch = pos.shape[1] - (0 if vit.no_embed_class else self.prefix)
            pos[0, pos.shape[1] - n_patch :] = sincos_2d(pos.shape[2], self.grid)
            vit.pos_embed.copy_(pos)
        vit.pos_embed.requires_grad_(False)  # fixed, as the official `requires_grad=False`

    @property
    def vit(self) -> Any:
        return self.backbone.net

    def views(self, image_size: int) -> list[ViewSpec]:
        # One view: RandomResizedCrop(scale 0.2-1) + horizontal flip, nothing else (main_pretrain.py).
        # Official resampling is bicubic; ours is bilinear.
        return [ViewSpec(size=image_size, scale=(self.cfg.min_scale, 1.0), jitter_p=0.0, gray_p=0.0)]

    def forward_encoder(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible patches of x (N, C, H, W): latent (N, prefix + K, D), mask and ids_restore (N, L)."""
        vit = self.vit
        # timm's own positional step (resampled for dynamic sizes, CLS/register tokens prepended), so training
        # and evaluation embed positions identically; then drop the masked patch tokens.
        tokens = vit._pos_embed(vit.patch_embed(x))  # (N, prefix + L, D)
        prefix, patches = tokens[:, : self.prefix], tokens[:, self.prefix :]
        n, length, dim = patches.shape
        ids_keep, mask, ids_restore = random_masking(n, length, self.cfg.mask_ratio, x.device, generator)
        visible = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, dim))  # (N, K, D)
        latent = vit.norm(vit.blocks(vit.norm_pre(torch.cat([prefix, visible], dim=1))))
        return latent, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor, grid: tuple[int, int]) -> Tensor:
        """Predict every patch's pixels: (N, L, p*p*C)."""
        y = self.decoder_embed(latent)  # (N, prefix + K, d)
        n, length = ids_restore.shape
        visible = y[:, self.prefix :]
        masked = self.mask_token.to(y.dtype).expand(n, length - visible.shape[1], -1)
        tokens = torch.cat([visible, masked], dim=1)  # shuffled order: visible first
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, y.shape[2]))  # patch order
        pos = self.decoder_pos if grid == self.grid else sincos_2d(y.shape[2], grid)
        tokens = tokens + pos.to(tokens)
        # the CLS token's decoder position is zero (the official table's first row)
        y = self.decoder_norm(self.decoder_blocks(torch.cat([y[:, : self.prefix], tokens], dim=1)))
        pred: Tensor = self.decoder_pred(y[:, self.prefix :])
        return pred

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None) -> Tensor:
        (x,) = views
        # The mask draws from the global RNG, as the official code; the loop's checkpoints save its state.
        latent, mask, ids_restore = self.forward_encoder(x)
        pred = self.forward_decoder(latent, ids_restore, (x.shape[2] // self.patch, x.shape[3] // self.patch))
        return mae_loss(pred, patchify(x, self.patch), mask, self.cfg.norm_pix_loss)

    def encoder(self) -> nn.Module:
        return self.backbone
