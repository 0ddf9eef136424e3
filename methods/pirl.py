"""PIRL: Misra & van der Maaten 2019, "Self-Supervised Learning of Pretext-Invariant Representations",
https://arxiv.org/abs/1912.01991; reference code VISSL, https://github.com/facebookresearch/vissl
(`vissl/losses/nce_loss.py`, `configs/config/pretrain/pirl/pirl_jigsaw_4node_resnet.yaml`,
`vissl/data/ssl_transforms/img_pil_to_patches_and_image.py`).

Two inputs per image: a crop I and a jigsaw transform I^t of another crop (a 3x3 grid of tiles, one tile per
cell at a random offset, shown in a random order). The image embedding is f(v_I) = Linear(backbone(I)); the
SHARED backbone encodes each tile, a per-tile Linear maps it to a vector, the 9 vectors are concatenated in
shuffled order and a Linear gives g(v_It). Both are L2-normalised 128-d. A memory bank holds one
momentum-averaged f(v_I) per training image, m_I, and the loss is
L = lam NCE(m_I, g(v_It)) + (1 - lam) NCE(m_I, f(v_I)), each term contrasting the own bank row with K rows drawn
uniformly from the bank. After each step the batch's rows become normalise(0.5 m_I + 0.5 f(v_I)).

Where the code differs from the paper, the code is followed:
- h(v, m) divides exp(s / T) by a normaliser Z = |D| x mean(exp(s / T)), estimated once on the first batch
  (NCEAverage); the paper prints h = exp(s/T) / (exp(s/T) + K / |D|), i.e. Z = 1 (`z_estimate: false`);
- the bank starts as uniform noise, L2-normalised (`norm_init: True`), and is updated with f(v_I) only;
- the two heads are linear (VISSL's default PIRL head: per-patch Linear 2048->128, concat, Linear 1152->128);
- the tiles come from their own crop (area 0.6-1, `crop_scale_patches`) of the image, not from I's crop;
  each tile is flipped independently (VISSL applies the flip to every patch).
Not reproduced: VISSL applies colour jitter and grayscale to every patch independently, here to the tiles'
crop as a whole (the loop's augmentation works on whole images); ImgPilRandomPhotometric; the 255 px tile crop
(here the tiles' crop has the image's size); the VISSL cosine lr schedule has no warm-up, as here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import check
from benchmark.data.augment import ViewSpec
from benchmark.errors import ConfigError
from benchmark.registry import register_method
from benchmark.train.distributed import gather
from methods import npid


@dataclass(frozen=True)
class Config:
    proj_dim: int = 128  # D, embeddings and bank rows (VISSL `embedding_dim: 128`)
    tile_dim: int = 128  # per-tile Linear before the concatenation (VISSL head 0: mlp [2048, 128])
    num_negatives: int = 32000  # K, bank rows drawn per sample and term (VISSL); clamped to the bank size
    temperature: float = 0.07  # T (VISSL and paper)
    # nce: the paper's and VISSL's default; softmax: cross entropy over the whole bank (VISSL's NCELoss
    # `loss_type: cross_entropy`, InfoNCE), steadier on small data where a fixed Z meets a fast-changing bank
    loss_type: Literal["nce", "softmax"] = "nce"
    bank_momentum: float = 0.5  # m_I <- normalise(m m_I + (1 - m) f(v_I)) (VISSL `momentum: 0.5`)
    lam: float = 0.5  # lambda, weight of the jigsaw term (VISSL `loss_weights: [0.5, 0.5]`, paper 0.5)
    z_estimate: bool = True  # Z from the first batch (VISSL `norm_constant: -1`); False: Z = 1, the paper's h as printed
    grid: int = 3  # tiles per side (paper and VISSL: 9 patches)
    jitter_fraction: float = 0.25  # room for a tile's random offset in its cell (VISSL: 21 px of an 85 px cell)
    image_min_scale: float = 0.08  # smallest crop area of I (VISSL `crop_scale_image: [0.08, 1]`)
    patch_min_scale: float = 0.6  # smallest crop area the tiles are cut from (VISSL `crop_scale_patches: [0.6, 1]`)
    tile_flip_p: float = 0.5  # each tile flipped on its own (VISSL's RandomHorizontalFlip acts per patch)
    num_samples: int | None = None  # |D|, rows of the memory bank; None: filled in with the training-set size

    def __post_init__(self) -> None:
        check(self.proj_dim > 0 and self.tile_dim > 0, f"pirl.proj_dim and pirl.tile_dim must be > 0, got {self.proj_dim}, {self.tile_dim}")
        check(self.num_negatives > 0, f"pirl.num_negatives must be > 0, got {self.num_negatives}")
        check(self.temperature > 0, f"pirl.temperature must be > 0, got {self.temperature}")
        check(self.loss_type in ("nce", "softmax"), f"pirl.loss_type must be 'nce' or 'softmax', got {self.loss_type!r}")
        check(0 <= self.bank_momentum < 1, f"pirl.bank_momentum must be in [0, 1), got {self.bank_momentum}")
        check(0 <= self.lam <= 1, f"pirl.lam must be in [0, 1], got {self.lam}")
        check(self.grid >= 2, f"pirl.grid must be >= 2 (a 1x1 grid has nothing to shuffle), got {self.grid}")
        check(0 <= self.jitter_fraction < 1, f"pirl.jitter_fraction must be in [0, 1), got {self.jitter_fraction}")
        for name in ("image_min_scale", "patch_min_scale"):
            check(0 < getattr(self, name) <= 1, f"pirl.{name} must be in (0, 1], got {getattr(self, name)}")
        check(0 <= self.tile_flip_p <= 1, f"pirl.tile_flip_p must be in [0, 1], got {self.tile_flip_p}")
        check(self.num_samples is None or self.num_samples > 0, f"pirl.num_samples must be > 0 or null, got {self.num_samples}")


def nce_h(s: Tensor, temperature: float, num_negatives: int, num_samples: int, log_z: Tensor | float = 0.0) -> Tensor:
    """The NCE posterior that a pair (v, m) comes from the data, not the noise (paper eq. 2):
    h(v, m) = P / (P + K / |D|) with P = exp(s(v, m) / T) / Z; Z = 1 is the paper's formula as printed.

    Computed as sigmoid(s / T - log Z - log(K / |D|)), which cannot overflow at small T.

    Args:
        s: (...) cosine similarities s(v, m).
        temperature: T.
        num_negatives: K, noise rows per sample (uniform noise: P_n = 1 / |D|).
        num_samples: |D|, the size of the memory bank.
        log_z: log Z.

    Returns:
        (...) h in (0, 1).
    """
    return torch.sigmoid(s.float() / temperature - log_z - math.log(num_negatives / num_samples))


def nce_loss(s: Tensor, temperature: float, num_samples: int, log_z: Tensor | float = 0.0) -> Tensor:
    """L_NCE (paper eq. 3, VISSL's NCECriterion): -log h(positive) - sum_k log(1 - h(noise k)), batch mean; NPID's
    NCE (`methods.npid.nce_loss`) on the logits s / T. VISSL adds float32 eps to each denominator instead of working
    in log space, a difference far below K / |D| for any real bank.

    Args:
        s: (B, 1 + K) cosine similarities; column 0 with the sample's own bank row, columns 1..K with noise rows.
        temperature, num_samples, log_z: as for `nce_h`.
    """
    return npid.nce_loss(s.float() / temperature, log_z, num_samples)


def pirl_loss(s_t: Tensor, s_i: Tensor, lam: float, temperature: float, num_samples: int, log_z: Tensor | float) -> Tensor:
    """L = lam L_NCE(m_I, g(v_It)) + (1 - lam) L_NCE(m_I, f(v_I)) (paper eq. 5).
    s_t, s_i: (B, 1 + K) similarities of g(v_It) and f(v_I) to bank rows, as for `nce_loss`."""
    return lam * nce_loss(s_t, temperature, num_samples, log_z) + (1 - lam) * nce_loss(s_i, temperature, num_samples, log_z)


def pirl_softmax_loss(s_t: Tensor, s_i: Tensor, indices: Tensor, lam: float, temperature: float) -> Tensor:
    """lam * CE(s_t / T, i) + (1 - lam) * CE(s_i / T, i): each sample must pick its own bank row i out of the whole
    bank, from its jigsaw embedding (s_t) and from its image embedding (s_i). s_t, s_i: (B, |D|) similarities to
    every bank row; indices: (B,) the samples' rows."""
    return (lam * F.cross_entropy(s_t.float() / temperature, indices)
            + (1 - lam) * F.cross_entropy(s_i.float() / temperature, indices))


def estimate_log_z(s: Tensor, temperature: float, num_samples: int) -> Tensor:
    """log Z for Z = |D| x mean(exp(s / T)) over a batch's sampled rows (VISSL NCEAverage, first batch; NPID's
    estimate on the logits s / T), averaged over processes. s: (B, 1 + K)."""
    return npid.estimate_log_z(s / temperature, num_samples)


# PIRL's memory bank is NPID's: rows <- normalise(m rows + (1 - m) f) (VISSL NCEAverage.update_memory)
bank_update = npid.bank_update


def tile_geometry(image_size: int, grid: int, jitter_fraction: float) -> tuple[int, int]:
    """(cell, tile) sides in pixels: cells of image_size // grid px, tiles of cell - round(jitter_fraction cell)
    px (28 px: 9 and 7; 16 px: 5 and 4; VISSL's 255 px: 85 and 64)."""
    cell = image_size // grid
    tile = cell - math.floor(jitter_fraction * cell + 0.5)
    if tile < 1:
        raise ConfigError(f"pirl: {image_size} px images give empty {grid}x{grid} tiles; lower pirl.grid or pirl.jitter_fraction")
    return cell, tile


def cut_tiles(x: Tensor, order: Tensor, offsets: Tensor, grid: int, cell: int, tile: int) -> Tensor:
    """The jigsaw transform: tile j of image n is cut from cell order[n, j] (row-major) at offsets[n, j].

    Args:
        x: (N, C, S, S), S >= grid cell.
        order: (N, T) long, T = grid^2, a permutation of the cells per image.
        offsets: (N, T, 2) long in [0, cell - tile], (row, column) of each shown tile inside its cell.

    Returns:
        (N, T, C, tile, tile) with out[n, j] = x[n, :, r:r + tile, q:q + tile], r = (order[n, j] // grid) cell
        + offsets[n, j, 0], q = (order[n, j] % grid) cell + offsets[n, j, 1].
    """
    span = torch.arange(tile, device=x.device)
    r = ((order // grid) * cell + offsets[..., 0])[..., None] + span  # (N, T, tile) rows of each tile
    q = ((order % grid) * cell + offsets[..., 1])[..., None] + span  # (N, T, tile) columns
    n = torch.arange(len(x), device=x.device)[:, None, None, None]
    return x.permute(0, 2, 3, 1)[n, r[..., :, None], q[..., None, :]].permute(0, 1, 4, 2, 3)  # (N, T, tile, tile, C) -> ...


# VISSL pirl_jigsaw_4node_resnet.yaml: SGD lr 0.03 per 256 (cosine), momentum 0.9, weight decay 1e-4 without
# BN and bias (the loop's default parameter groups), no warm-up.
@register_method("pirl", config=Config, pretrain=dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, warmup_epochs=0))
class PIRL(nn.Module):
    uses_indices = True  # the loss reads and writes the bank rows of the batch's images
    memory: Tensor
    log_z: Tensor

    def __init__(self, backbone: nn.Module, cfg: Config) -> None:
        super().__init__()
        if cfg.num_samples is None:
            raise ConfigError("pirl.num_samples (the training-set size, which sizes the memory bank) must be set; "
                              "the runner fills it in from the dataset")
        self.cfg = cfg
        self.backbone = backbone
        dim: int = backbone.dim  # type: ignore[assignment]
        self.f_head = nn.Linear(dim, cfg.proj_dim)  # f: image -> 128 (VISSL head 1)
        self.tile_fc = nn.Linear(dim, cfg.tile_dim)  # per tile, shared (VISSL head 0, first mlp)
        self.g_head = nn.Linear(cfg.grid**2 * cfg.tile_dim, cfg.proj_dim)  # g: concatenated tiles -> 128
        stdv = 1 / math.sqrt(cfg.proj_dim / 3)
        # Buffers: checkpoints carry the bank and Z, so a resumed run continues bit for bit.
        self.register_buffer("memory", F.normalize(torch.rand(cfg.num_samples, cfg.proj_dim) * (2 * stdv) - stdv, dim=1))
        self.register_buffer("log_z", torch.tensor(float("nan") if cfg.z_estimate else 0.0))  # NaN until the first batch

    def views(self, image_size: int) -> list[ViewSpec]:
        """I's crop, then the crop the tiles are cut from. VISSL: ColorJitter(0.4, 0.4, 0.4, 0.2) always,
        grayscale 0.2, flip (per patch for the tiles, see `puzzles`)."""
        tile_geometry(image_size, self.cfg.grid, self.cfg.jitter_fraction)  # fail early on images too small to cut
        base = ViewSpec(size=image_size, jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2, gray_p=0.2, blur_p=0.0)
        return [dataclasses.replace(base, scale=(self.cfg.image_min_scale, 1.0), flip_p=0.5),
                dataclasses.replace(base, scale=(self.cfg.patch_min_scale, 1.0), flip_p=0.0)]

    def puzzles(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Tiles (N, T, C, tile, tile) in a random order per image, and that order (N, T): position j shows cell
        order[n, j]. Drawn from torch's global generator (checkpointed by the loop) in the order: order, offsets,
        flips."""
        cfg, n, t = self.cfg, len(x), self.cfg.grid**2
        cell, tile = tile_geometry(x.shape[-1], cfg.grid, cfg.jitter_fraction)
        order = torch.rand(n, t, device=x.device).argsort(dim=1)  # a uniform random permutation per image
        offsets = torch.randint(cell - tile + 1, (n, t, 2), device=x.device)
        tiles = cut_tiles(x, order, offsets, cfg.grid, cell, tile)
        flip = (torch.rand(n, t, device=x.device) < cfg.tile_flip_p)[..., None, None, None]
        return torch.where(flip, tiles.flip(-1), tiles), order

    def embed_image(self, x: Tensor) -> Tensor:
        """f(v_I): (N, C, H, W) -> L2-normalised float32 (N, D)."""
        return F.normalize(self.f_head(self.backbone(x)).float(), dim=1)

    def embed_tiles(self, tiles: Tensor) -> Tensor:
        """g(v_It): (N, T, C, h, w) tiles, all through the backbone in one batch -> L2-normalised float32 (N, D)."""
        n, t = tiles.shape[:2]
        h = self.tile_fc(self.backbone(tiles.flatten(0, 1)))  # (N T, tile_dim)
        return F.normalize(self.g_head(h.reshape(n, t * h.shape[1])).float(), dim=1)  # concatenated in shuffled order

    @torch.no_grad()
    def update_memory(self, indices: Tensor, f: Tensor) -> None:
        """Move the batch's rows (of every process, so the banks stay equal) towards f(v_I)."""
        indices, f = gather(indices), gather(f.detach().float())
        self.memory[indices] = bank_update(self.memory[indices], f, self.cfg.bank_momentum)

    def loss(self, views: list[Tensor], progress: float, labels: Tensor | None = None, indices: Tensor | None = None) -> Tensor:
        """views: I's crop and the tiles' crop, (B, C, S, S) each; indices: (B,) the images' rows in the bank."""
        if indices is None:
            raise ValueError("pirl needs each sample's training-set index: loss(..., indices=) (uses_indices = True)")
        cfg, n = self.cfg, self.memory.shape[0]
        tiles, _ = self.puzzles(views[1])
        g = self.embed_tiles(tiles)  # (B, D); the tiles and I pass separately, so BatchNorm sees each alone (VISSL)
        f = self.embed_image(views[0])  # (B, D)
        k = min(cfg.num_negatives, n)
        noise = torch.randint(n, (2, len(f), k), device=f.device)  # uniform, with replacement, per term (VISSL)
        with torch.autocast(f.device.type, enabled=False):
            # All |D| similarities, then the 1 + K sampled ones: less memory than gathering (B, 1 + K, D) rows.
            # A copy of the bank, as the update below writes in place while autograd still needs these values.
            s = torch.cat([g, f]) @ self.memory.clone().T  # (2B, |D|)
            s_t, s_i = s.split(len(f))
            if cfg.loss_type == "softmax":
                loss = pirl_softmax_loss(s_t, s_i, indices, cfg.lam, cfg.temperature)
                self.update_memory(indices, f)
                return loss
            s_t = s_t.gather(1, torch.cat([indices[:, None], noise[0]], dim=1))  # (B, 1 + K)
            s_i = s_i.gather(1, torch.cat([indices[:, None], noise[1]], dim=1))
            if bool(torch.isnan(self.log_z)):
                self.log_z.copy_(estimate_log_z(s_t, cfg.temperature, n))  # VISSL: from the first term's scores
            loss = pirl_loss(s_t, s_i, cfg.lam, cfg.temperature, n, self.log_z)
        self.update_memory(indices, f)
        return loss

    def encoder(self) -> nn.Module:
        return self.backbone
