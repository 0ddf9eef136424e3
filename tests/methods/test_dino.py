"""DINO: the loss against its formula, centring, schedules, gradient routing, multi-crop, and training."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import methods.dino  # noqa: F401  (registers "dino")
from benchmark.config import PretrainConfig
from benchmark.data.augment import make_views
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError
from benchmark.registry import METHODS
from benchmark.train.pretrain import build_method
from methods.dino import DINO, Config, dino_loss, momentum_at, teacher_temp_at, update_center
from tests.methods.steps import assert_loss_falls

SMALL = Config(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def _dino_reference(s: list[torch.Tensor], t: list[torch.Tensor], c: torch.Tensor, ts: float, tt: float) -> float:
    """Paper alg. 1 as loops over pairs, samples and dimensions, in float64."""
    total, pairs = 0.0, 0
    for i, ti in enumerate(t):
        for v, sv in enumerate(s):
            if v == i:
                continue
            for n in range(len(sv)):
                q = [math.exp(float(ti[n, k] - c[0, k]) / tt) for k in range(ti.shape[1])]
                lse = math.log(sum(math.exp(float(x) / ts) for x in sv[n]))
                total += -sum(q[k] / sum(q) * (float(sv[n, k]) / ts - lse) for k in range(len(q))) / len(sv)
            pairs += 1
    return total / pairs


def _model(digits: Splits, backbone: str = "convnet_tiny", cfg: Config = SMALL) -> DINO:
    torch.manual_seed(0)
    model = build_method(METHODS.get("dino"), cfg, PretrainConfig(backbone=backbone), digits, seed=0)
    assert isinstance(model, DINO)
    return model


def _views(model: DINO, digits: Splits, n: int = 32) -> list[torch.Tensor]:
    return make_views(digits.train.x[:n], model.views(16), digits.mean, digits.std, torch.Generator().manual_seed(0))


def test_hand_case_and_pair_skipping() -> None:
    # K = 4, tau_s = 0.1, tau_t = 0.04, c = 0, B = 1.
    # teacher crop 0 = [1, 0, 0, 0] -> softmax([25, 0, 0, 0]) = one-hot on k = 0 (up to 3e-11);
    # teacher crop 1 = 0 -> uniform 1/4.
    # student crop 0 = [1, 0, 0, 0] -> log_softmax([10, 0, 0, 0]); crops 1, 2 = 0 -> log_softmax = -log 4.
    # Pairs (i, v), v != i: (0, 1), (0, 2): -log(1/4) = log 4 each; (1, 2): log 4;
    # (1, 0): uniform target: logsumexp([10, 0, 0, 0]) - 10/4 = log(e^10 + 3) - 2.5 = 7.500136.
    # The skipped pairs would add (0, 0): -log_softmax(...)_0 = log(1 + 3e^-10) = 1.4e-4 and (1, 1): log 4.
    t = [torch.tensor([[1.0, 0, 0, 0]]), torch.zeros(1, 4)]
    s = [torch.tensor([[1.0, 0, 0, 0]]), torch.zeros(1, 4), torch.zeros(1, 4)]
    c = torch.zeros(1, 4)
    expected = (3 * math.log(4) + math.log(math.exp(10) + 3) - 2.5) / 4
    assert math.isclose(float(dino_loss(s, t, c, 0.1, 0.04, 2)), expected, rel_tol=1e-6)
    # the same crops in the official concatenated (V*B, K) layout
    assert math.isclose(float(dino_loss(torch.cat(s), torch.cat(t), c, 0.1, 0.04, 2)), expected, rel_tol=1e-6)
    with_self_pairs = (4 * math.log(4) + math.log(math.exp(10) + 3) - 2.5 + math.log(1 + 3 * math.exp(-10))) / 6
    assert not math.isclose(float(dino_loss(s, t, c, 0.1, 0.04, 2)), with_self_pairs, rel_tol=1e-3)
    # a uniform student gives log K whatever the teacher
    assert math.isclose(float(dino_loss([torch.zeros(1, 4)] * 3, t, c, 0.1, 0.04, 2)), math.log(4), rel_tol=1e-6)


def test_loss_matches_the_loop_formula_with_a_centre() -> None:
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 5, generator=g) for _ in range(4)]  # 2 global + 2 local crops
    t = [torch.randn(3, 5, generator=g) for _ in range(2)]
    c = torch.randn(1, 5, generator=g)
    assert math.isclose(float(dino_loss(s, t, c, 0.1, 0.07, 2)), _dino_reference(s, t, c, 0.1, 0.07), rel_tol=1e-5)
    # the centre matters (it is subtracted from the teacher only)
    assert not math.isclose(float(dino_loss(s, t, c, 0.1, 0.07, 2)), float(dino_loss(s, t, 0 * c, 0.1, 0.07, 2)), rel_tol=1e-3)


def test_loss_is_symmetric_in_the_global_crops_and_invariant_to_batch_order() -> None:
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(6, 8, generator=g) for _ in range(4)]
    t = [torch.randn(6, 8, generator=g) for _ in range(2)]
    c = torch.randn(1, 8, generator=g)
    ref = dino_loss(s, t, c, 0.1, 0.04, 2)
    swapped = dino_loss([s[1], s[0], *s[2:]], [t[1], t[0]], c, 0.1, 0.04, 2)
    torch.testing.assert_close(swapped, ref)
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(dino_loss([x[perm] for x in s], [x[perm] for x in t], c, 0.1, 0.04, 2), ref)


def test_update_center_is_the_ema_of_the_batch_mean() -> None:
    c = torch.tensor([[1.0, -2.0, 0.5]])
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]])  # batch mean [2, 1, 1]
    update_center(c, t, 0.9)
    torch.testing.assert_close(c, torch.tensor([[0.9 * 1 + 0.1 * 2, 0.9 * -2 + 0.1 * 1, 0.9 * 0.5 + 0.1 * 1]]))


def test_schedules_at_the_start_and_end() -> None:
    assert math.isclose(momentum_at(0.996, 0.0), 0.996)
    assert math.isclose(momentum_at(0.996, 1.0), 1.0)
    cfg = Config(warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup=0.1)
    assert math.isclose(teacher_temp_at(cfg, 0.0), 0.04)
    assert math.isclose(teacher_temp_at(cfg, 0.05), 0.055)
    assert math.isclose(teacher_temp_at(cfg, 0.1), 0.07)
    assert math.isclose(teacher_temp_at(cfg, 1.0), 0.07)
    assert math.isclose(teacher_temp_at(Config(teacher_temp=0.07, teacher_temp_warmup=0.0), 0.0), 0.07)


def test_config_validation() -> None:
    for bad in (dict(out_dim=0), dict(teacher_temp=0.0), dict(n_local_crops=-1), dict(local_scale=(0.5, 0.4)), dict(momentum=1.5)):
        with pytest.raises(ConfigError):
            Config(**bad)  # type: ignore[arg-type]


def test_views_are_two_global_then_local_crops() -> None:
    from benchmark.backbones import ConvNet

    model = DINO(ConvNet(1, (4, 8)), Config(out_dim=8, hidden_dim=8, bottleneck_dim=4, n_local_crops=3))
    v = model.views(224)
    assert [x.size for x in v] == [224, 224, 96, 96, 96]
    assert [x.scale for x in v] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 3
    assert [x.blur_p for x in v] == [1.0, 0.1, 0.5, 0.5, 0.5] and [x.solarize_p for x in v] == [0.0, 0.2, 0.0, 0.0, 0.0]
    assert model.views(16)[2].size == 8


def test_head_is_normalised_and_weight_normed(digits: Splits) -> None:
    head = _model(digits).head
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(64))  # g fixed at 1 (norm_last_layer)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    assert head.mlp[-1].out_features == 16 and sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2


def test_centre_update_in_the_module_uses_the_teacher_global_crops(digits: Splits) -> None:
    model = _model(digits)
    views = _views(model, digits)
    ref = copy.deepcopy(model)  # at progress 0 the EMA leaves the (equal) teacher unchanged
    with torch.no_grad():
        t = ref.teacher_head(ref.teacher_backbone(torch.cat(views[:2])))
    c0 = torch.randn(1, 64)
    model.center.copy_(c0)
    model.loss(views, 0.0)
    torch.testing.assert_close(model.center, 0.9 * c0 + 0.1 * t.mean(dim=0, keepdim=True))
    assert "center" in model.state_dict()


def test_teacher_gets_no_gradient_and_the_last_layer_freezes(digits: Splits) -> None:
    model = _model(digits)
    views = _views(model, digits, n=8)
    v = model.head.last_layer.parametrizations.weight.original1
    model.loss(views, 0.0).backward()  # progress 0 < freeze_last_layer
    assert all(p.grad is None for p in [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()])
    assert all(p.grad is not None for p in model.backbone.parameters())
    assert model.head.mlp[0].weight.grad is not None and v.grad is None
    model.zero_grad(set_to_none=True)
    model.loss(views, 0.5).backward()
    assert v.grad is not None and bool(v.grad.abs().sum() > 0)
    assert all(p.grad is None for p in model.teacher_head.parameters())


def test_teacher_follows_the_student_by_ema(digits: Splits) -> None:
    model = _model(digits)
    with torch.no_grad():
        model.head.mlp[0].weight.add_(1.0)
    before = model.teacher_head.mlp[0].weight.clone()
    model.update_teacher(0.75)
    torch.testing.assert_close(model.teacher_head.mlp[0].weight, 0.75 * before + 0.25 * model.head.mlp[0].weight)
    assert model.encoder() is model.teacher_backbone
    assert _model(digits, cfg=Config(out_dim=64, hidden_dim=32, bottleneck_dim=16, evaluate_teacher=False)).encoder() is not None


def test_vit_tiny_global_crops_at_16px(digits: Splits) -> None:
    # Global crops only: TimmViT is built without timm's dynamic_img_size, so it rejects 8 px local crops.
    cfg = Config(out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local_crops=0)
    model = _model(digits, "vit_tiny", cfg)
    loss = model.loss(_views(model, digits, n=4), 0.5)
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.net.patch_embed.proj.weight.grad is not None


def test_stochastic_depth_in_the_vit_student_only(digits: Splits) -> None:
    from timm.layers import DropPath

    cfg = Config(out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local_crops=0)
    model = _model(digits, "vit_tiny", cfg)
    blocks = model.backbone.net.blocks
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in blocks]
    assert rates == pytest.approx([0.1 * i / (len(blocks) - 1) for i in range(len(blocks))])
    assert all(isinstance(b.drop_path2, DropPath) for b in blocks[1:])
    assert not any(isinstance(m, DropPath) for m in model.teacher_backbone.modules())
    assert model.backbone.state_dict().keys() == model.teacher_backbone.state_dict().keys()
    x = _views(model, digits, n=4)[0]
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.backbone(x), model.backbone(x))  # branches dropped at random
        assert torch.equal(model.teacher_backbone(x), model.teacher_backbone(x))
        model.eval()
        assert torch.equal(model.backbone(x), model.backbone(x))
    plain = _model(digits, "vit_tiny", Config(out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local_crops=0, drop_path=0))
    assert not any(isinstance(m, DropPath) for m in plain.modules())
    cnn = _model(digits)  # the official code has none for ResNets
    assert not any(isinstance(m, DropPath) for m in cnn.modules())


def test_loss_falls_within_20_steps_on_real_data(digits: Splits) -> None:
    # With the centre held (center_momentum = 1) and the teacher fixed (momentum 1 at progress 1) the loss is a
    # fixed cross entropy, which SGD must lower. With a moving centre it need not fall on a fixed batch: centring
    # raises the entropy of the teacher, a term of the loss (cross entropy = H(P_t) + KL(P_t || P_s)).
    model = _model(digits, cfg=Config(out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local_crops=1, center_momentum=1.0))
    views = _views(model, digits)  # a fixed batch
    assert_loss_falls(model, views, progress=1.0)


def _centre_on_rank(rank: int, world: int, teacher_out: torch.Tensor) -> torch.Tensor:
    b = len(teacher_out) // world
    c = torch.zeros(1, teacher_out.shape[1])
    update_center(c, teacher_out[rank * b : (rank + 1) * b], m=0.9)
    return c


def test_centre_in_two_processes_equals_one_process_on_the_global_batch() -> None:
    from tests.ddp import run_distributed

    t = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    ref = torch.zeros(1, 5)
    update_center(ref, t, m=0.9)
    for c in run_distributed(_centre_on_rank, 2, (t,)):
        torch.testing.assert_close(c, ref)
