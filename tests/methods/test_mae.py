"""MAE: patchify, masking, the masked-patch loss on hand cases; the plugin's wiring on a timm ViT-Tiny at 16 px."""

from __future__ import annotations

import math

import pytest
import torch

import methods.mae  # noqa: F401  (registers "mae")
from benchmark.backbones import ConvNet, vit_tiny
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.mae import MAE, Config, mae_loss, normalize_patches, patchify, random_masking, sincos_2d, unpatchify
from tests.methods.steps import assert_loss_falls

SMALL = Config(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def _model(size: int = 16, channels: int = 1, cfg: Config = SMALL) -> MAE:
    torch.manual_seed(0)
    return MAE(vit_tiny(channels, size, True), cfg)


def test_patchify_order_and_round_trip() -> None:
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, 4)  # grid 2 x 3
    assert patches.shape == (2, 6, 4 * 4 * 3)
    # patch 4 is grid row 1, column 1; its pixels are ordered (row, column, channel)
    torch.testing.assert_close(patches[:, 4], x[:, :, 4:8, 4:8].permute(0, 2, 3, 1).reshape(2, -1))
    assert float(patches[1, 4, 3 * (4 * 2 + 1) + 2]) == float(x[1, 2, 4 + 2, 4 + 1])  # pixel (2, 1), channel 2
    torch.testing.assert_close(unpatchify(patches, 4, (2, 3), 3), x, rtol=0, atol=0)
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 1, 10, 10), 4)


def test_patch_order_matches_the_vits_tokens() -> None:
    # a linear patch embedding is the same map as a Linear over the patchified pixels, token by token
    model = _model()
    proj = model.vit.patch_embed.proj
    x = torch.randn(2, 1, 16, 16)
    tokens = model.vit.patch_embed(x).reshape(2, 16, -1)  # (N, L, D), NHWC flattened row-major
    w = proj.weight.permute(0, 2, 3, 1).reshape(proj.weight.shape[0], -1)  # (D, p*p*C) in patchify's order
    torch.testing.assert_close(tokens, patchify(x, 4) @ w.T + proj.bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length", [16, 49])
def test_masking_keeps_a_quarter_and_ids_restore_inverts_the_shuffle(length: int) -> None:
    n, keep = 5, round(length * 0.25)  # 4 of 16 (16 px), 12 of 49 (28 px)
    ids_keep, mask, ids_restore = random_masking(n, length, 0.75, generator=torch.Generator().manual_seed(0))
    assert ids_keep.shape == (n, keep) and mask.shape == (n, length)
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - keep)))  # exactly L - K masked per sample
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    for i in range(n):
        assert sorted(ids_restore[i].tolist()) == list(range(length))  # a permutation
        assert torch.equal(ids_shuffle[i, ids_restore[i]], torch.arange(length))  # inverse of the shuffle
        assert torch.equal(ids_shuffle[i, :keep], ids_keep[i])
        assert torch.equal(mask[i, ids_keep[i]], torch.zeros(keep))  # the kept patches are the visible ones
    # per-sample masks differ; the same generator seed repeats them
    assert len({tuple(r.tolist()) for r in mask}) > 1
    again = random_masking(n, length, 0.75, generator=torch.Generator().manual_seed(0))[1]
    assert torch.equal(mask, again)
    with pytest.raises(ValueError):
        random_masking(1, 4, 0.9)  # would keep no patch


def test_loss_hand_case() -> None:
    pred = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])  # (N=1, L=2, P=2)
    target = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])
    # raw pixels: patch 0's error (1 + 9) / 2 = 5, patch 1's (25 + 25) / 2 = 25
    assert float(mae_loss(pred, target, torch.tensor([[1.0, 0.0]]), norm_pix=False)) == 5.0
    assert float(mae_loss(pred, target, torch.tensor([[0.0, 1.0]]), norm_pix=False)) == 25.0
    assert float(mae_loss(pred, target, torch.tensor([[1.0, 1.0]]), norm_pix=False)) == 15.0
    # norm_pix: [1, 3] has mean 2 and unbiased variance 2 -> [-1/sqrt 2, 1/sqrt 2], error against 0 is 1/2
    assert math.isclose(float(mae_loss(pred, target, torch.tensor([[1.0, 0.0]]))), 0.5, rel_tol=1e-5)
    # two samples: the mean is over all masked patches of the batch, not per sample
    pred2, target2 = torch.cat([pred, pred]), torch.cat([target, target])
    mask2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert math.isclose(float(mae_loss(pred2, target2, mask2, norm_pix=False)), (5 + 5 + 25) / 3, rel_tol=1e-6)


def test_loss_counts_only_masked_patches() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 16, 16, generator=g), torch.randn(4, 16, 16, generator=g)
    _, mask, _ = random_masking(4, 16, 0.75, generator=g)
    for norm_pix in (True, False):
        ref = float(mae_loss(pred, target, mask, norm_pix))
        visible, masked = (mask == 0), (mask == 1)
        changed = target.clone()
        changed[visible] = torch.randn(int(visible.sum()), 16, generator=g) * 10
        assert float(mae_loss(pred, changed, mask, norm_pix)) == ref  # visible targets do not count
        changed = pred.clone()
        changed[visible] += 100.0
        assert float(mae_loss(changed, target, mask, norm_pix)) == ref  # nor do predictions there
        changed = target.clone()
        changed[masked] += torch.randn(int(masked.sum()), 16, generator=g)
        assert float(mae_loss(pred, changed, mask, norm_pix)) != ref
    # as an explicit loop over the masked patches
    t = normalize_patches(target)
    errors = [float(((pred[i, j] - t[i, j]) ** 2).mean()) for i in range(4) for j in range(16) if mask[i, j] == 1]
    assert math.isclose(float(mae_loss(pred, target, mask)), sum(errors) / len(errors), rel_tol=1e-5)


def test_norm_pix_target_is_each_patch_standardised() -> None:
    target = torch.randn(3, 5, 12) * 4 + torch.arange(5.0).view(1, 5, 1) * 10  # patches of different means
    t = normalize_patches(target)
    torch.testing.assert_close(t.mean(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.std(-1), torch.ones(3, 5), atol=1e-5, rtol=0)  # unbiased, as the official code
    row = target[1, 2].tolist()
    mu = sum(row) / 12
    sd = math.sqrt(sum((v - mu) ** 2 for v in row) / 11 + 1e-6)
    torch.testing.assert_close(t[1, 2], torch.tensor([(v - mu) / sd for v in row]))
    # a constant patch stays finite (eps) and maps to zeros
    assert torch.equal(normalize_patches(torch.full((1, 1, 4), 3.0)), torch.zeros(1, 1, 4))


def test_sincos_positions_and_the_encoders_fixed_embedding() -> None:
    pos = sincos_2d(8, (2, 3))  # (6, 8): [sin, cos](col * w), [sin, cos](row * w), w = [1, 1/100]
    assert pos.shape == (6, 8)
    r, c = 1, 2  # token 5
    w = [1.0, 0.01]
    expect = [math.sin(c * w[0]), math.sin(c * w[1]), math.cos(c * w[0]), math.cos(c * w[1]),
              math.sin(r * w[0]), math.sin(r * w[1]), math.cos(r * w[0]), math.cos(r * w[1])]
    torch.testing.assert_close(pos[5], torch.tensor(expect))
    model = _model()
    pe = model.vit.pos_embed
    assert not pe.requires_grad  # fixed, as the official code
    assert torch.equal(pe[0, 0], torch.zeros(192))  # the CLS token's position
    torch.testing.assert_close(pe[0, 1:], sincos_2d(192, (4, 4)))
    torch.testing.assert_close(model.decoder_pos, sincos_2d(32, (4, 4)))
    assert "decoder_pos" not in model.state_dict()  # recomputed, never stale in a checkpoint


def test_decoder_puts_each_token_back_at_its_patch() -> None:
    # with the decoder's blocks and norm removed, each prediction reads one token: at a visible patch the
    # embedded latent of that patch, at a masked one the mask token, each plus the patch's position
    model = _model()
    model.decoder_blocks, model.decoder_norm = torch.nn.Sequential(), torch.nn.Identity()
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 1 + 4, 192, generator=g)
    ids_keep, mask, ids_restore = random_masking(2, 16, 0.75, generator=g)
    with torch.no_grad():
        pred = model.forward_decoder(latent, ids_restore, (4, 4))
        pos = sincos_2d(32, (4, 4))
        for i in range(2):
            for k, patch in enumerate(ids_keep[i].tolist()):
                expect = model.decoder_pred(model.decoder_embed(latent[i, 1 + k]) + pos[patch])
                torch.testing.assert_close(pred[i, patch], expect)
            for patch in mask[i].nonzero().flatten().tolist():
                torch.testing.assert_close(pred[i, patch], model.decoder_pred(model.mask_token[0, 0] + pos[patch]))


def test_encoder_sees_the_visible_tokens_as_evaluation_embeds_them() -> None:
    # with the blocks removed, the training path must give the evaluation path's tokens at the kept patches
    model = _model()
    model.vit.blocks = torch.nn.Sequential()
    x = torch.randn(3, 1, 16, 16)
    torch.manual_seed(4)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(x)
        full = model.vit.forward_features(x)  # (N, 1 + 16, D)
    torch.manual_seed(4)
    ids_keep = random_masking(3, 16, 0.75)[0]  # the same draw
    torch.testing.assert_close(latent[:, 0], full[:, 0])  # CLS
    torch.testing.assert_close(latent[:, 1:], torch.stack([full[i, 1 + ids_keep[i]] for i in range(3)]))
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))


def test_gradients_reach_the_decoder_and_the_encoder() -> None:
    model = _model()
    model.loss([torch.randn(4, 1, 16, 16)], 0.0).backward()
    frozen = {"backbone.net.pos_embed"}
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_evaluated_encoder_is_the_unmasked_vit_and_ignores_the_mask_rng() -> None:
    model = _model()
    enc = model.encoder()
    assert enc is model.backbone
    x = torch.randn(4, 1, 16, 16)
    enc.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = enc(x)
        model.loss([x], 0.0)  # draws a mask from the global RNG
        torch.manual_seed(2)
        b = enc(x)
        feats = model.vit.forward_features(x)
    assert a.shape == (4, 192)
    assert torch.equal(a, b)
    assert feats.shape == (4, 17, 192)  # CLS + all 16 patches: nothing is masked at evaluation
    torch.testing.assert_close(a, feats[:, 0])  # the CLS token, as timm pools it
    # while the training loss does depend on the mask
    torch.manual_seed(1)
    with torch.no_grad():
        l1 = float(model.loss([x], 0.0))
        torch.manual_seed(2)
        l2 = float(model.loss([x], 0.0))
        torch.manual_seed(1)
        assert float(model.loss([x], 0.0)) == l1 != l2


def test_views_config_registry_and_backbone_check() -> None:
    model = _model()
    (view,) = model.views(28)
    assert (view.size, view.scale, view.flip_p) == (28, (0.2, 1.0), 0.5)
    assert view.jitter_p == view.gray_p == view.blur_p == view.solarize_p == 0.0  # crop and flip only
    assert (model.patch, model.channels, model.prefix, model.grid) == (4, 1, 1, (4, 4))
    assert model.decoder_pred.out_features == 16 and len(model.decoder_blocks) == 1
    entry = METHODS.entry("mae")
    assert entry.meta["backbones"] == ("vit_tiny", "vit_small")
    assert entry.meta["pretrain"]["optimizer"] == "adamw" and entry.meta["pretrain"]["weight_decay"] == 0.05
    c = Config()
    assert (c.mask_ratio, c.norm_pix_loss, c.min_scale) == (0.75, True, 0.2)
    with pytest.raises(ConfigError, match="timm ViT"):
        MAE(ConvNet(1, (4, 8)), SMALL)
    bad = [dict(mask_ratio=0.0), dict(mask_ratio=1.0), dict(decoder_depth=0), dict(decoder_dim=30, decoder_heads=2),
           dict(decoder_dim=32, decoder_heads=3), dict(mlp_ratio=0.0), dict(min_scale=0.0)]
    for kw in bad:
        with pytest.raises(ConfigError, match="mae"):
            Config(**kw)  # type: ignore[arg-type]


def test_three_channels_and_28_px() -> None:
    model = _model(size=28)
    x = torch.randn(2, 1, 28, 28)
    latent, mask, ids_restore = model.forward_encoder(x)
    assert latent.shape == (2, 1 + 12, 192) and mask.shape == (2, 49) and ids_restore.shape == (2, 49)
    assert model.forward_decoder(latent, ids_restore, (7, 7)).shape == (2, 49, 16)
    model = _model(size=16, channels=3)
    loss = model.loss([torch.randn(2, 3, 16, 16)], 0.0)
    assert model.decoder_pred.out_features == 48 and torch.isfinite(loss)


def test_loss_falls_within_20_sgd_steps_on_real_data(digits: Splits) -> None:
    torch.manual_seed(0)
    model = build_method(METHODS.get("mae"), SMALL, PretrainConfig(backbone="vit_tiny"), digits, seed=0)
    views = make_views(digits.train.x[:16], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    assert_loss_falls(model, views)  # a fresh random mask every step, on the same 16 digits


def test_reconstruction_beats_predicting_each_patch_mean(digits: Splits) -> None:
    # Falling alone can mean the decoder's output scale shrinking to 0 (each standardised patch's mean), where
    # the loss is (P - 1) / P = 15/16 (less on blank patches, whose targets are 0). Below it, masked patches
    # are predicted from the visible ones.
    torch.manual_seed(0)
    model = build_method(METHODS.get("mae"), SMALL, PretrainConfig(backbone="vit_tiny"), digits, seed=0)
    (x,) = make_views(digits.train.x[:16], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(40):
        loss = model.loss([x], 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    zero = float(mae_loss(torch.zeros(16, 16, 16), patchify(x, 4), torch.ones(16, 16)))
    assert 0.8 < zero <= 15 / 16 + 1e-6
    assert sum(losses[-5:]) / 5 < 0.9 * zero, (zero, losses)
