from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from benchmark.backbones import ConvNet, Pixels, TorchvisionResNet, build_backbone, finetune_blocks
from benchmark.config import PretrainConfig
from benchmark.data.sets import Splits
from benchmark.errors import ConfigError, NotApplicable
from benchmark.registry import PROTOCOLS
from protocols.finetune import Config as FinetuneConfig
from protocols.finetune import finetune
from protocols.partial_finetune import Config, PartiallyFrozen, partial_finetune, trained_part
from tests.protocols.test_semisup import RecordingEncoder, state, values

FAST: dict[str, Any] = {"epochs": 3, "batch_size": 64, "lrs": (2.0,), "crop_scale": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def convnet_encoder(digits: Splits) -> RecordingEncoder:
    torch.manual_seed(0)
    module = build_backbone(PretrainConfig(backbone="convnet_tiny"), 1, 16)  # 3 conv-BN-ReLU stages
    module.train()  # the protocol must not move the BN statistics of the encoder it was handed, even in train mode
    return RecordingEncoder(module, int(getattr(module, "dim")), digits.mean, digits.std, key="random")


@pytest.fixture(scope="module")
def small(digits: Splits) -> Splits:
    return dataclasses.replace(digits, train=digits.train.subset(torch.arange(640)))


def test_defaults_are_finetunes_recipe_and_maes_ks() -> None:
    cfg, ft = Config(), FinetuneConfig()
    assert cfg.blocks == (0, 1, 2, 4) and cfg.unit == "block"
    assert cfg.recipe(cfg.epochs, cfg.weight_decay) == ft.recipe(ft.epochs, ft.weight_decay)  # VISSL's SGD fine-tune
    assert (cfg.lrs, cfg.head_lr_mults, cfg.head_init) == (ft.lrs, ft.head_lr_mults, ft.head_init)
    assert PROTOCOLS.get("partial_finetune") is partial_finetune and PROTOCOLS.entry("partial_finetune").config is Config


@pytest.mark.parametrize(("changes", "field_name"), [
    ({"blocks": ()}, "blocks"), ({"blocks": (0, -1)}, "blocks"), ({"blocks": (1, 1)}, "blocks"), ({"unit": "layer"}, "unit"),
    ({"epochs": 0}, "epochs"), ({"lrs": ()}, "lrs"), ({"gamma": 2.0}, "gamma"),
])
def test_config_validation(changes: dict[str, Any], field_name: str) -> None:
    with pytest.raises(ConfigError, match=f"partial_finetune.{field_name}"):
        Config(**changes)


def test_blocks_of_each_backbone() -> None:
    conv = ConvNet(1)
    b = finetune_blocks(conv)
    assert len(b.blocks) == 4 and b.kind == "stage" and b.after == [] and next(b.blocks[0].children()) is conv.body[0]
    r18 = TorchvisionResNet("resnet18", 1, small_stem=True)
    blocks = finetune_blocks(r18).blocks
    assert [type(m).__name__ for m in blocks] == ["BasicBlock"] * 8 and blocks[2] is r18.net.layer2[0]
    assert finetune_blocks(r18, "stage").blocks == [r18.net.layer1, r18.net.layer2, r18.net.layer3, r18.net.layer4]
    part, note = trained_part(r18, 3, "block")
    assert part == [r18.net.layer3[1], r18.net.layer4[0], r18.net.layer4[1]] and note == "trained: last 3 of 8 residual blocks"
    assert trained_part(r18, 8, "block")[0] == [r18]  # k = all: the stem trains too (full fine-tuning)
    with pytest.raises(NotApplicable, match="Pixels has none"):
        finetune_blocks(Pixels(1, 4))


def test_vit_trains_its_last_blocks_and_final_norm() -> None:
    pytest.importorskip("timm")
    vit = build_backbone(PretrainConfig(backbone="vit_tiny"), 1, 16)
    net: Any = getattr(vit, "net")
    part, note = trained_part(vit, 2, "block")
    assert part == [net.blocks[10], net.blocks[11], net.norm] and note == "trained: last 2 of 12 transformer blocks + LayerNorm after them"
    model = PartiallyFrozen(vit, part).train()
    assert net.blocks[11].training and net.norm.training and not net.blocks[9].training and not net.patch_embed.training
    grads = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert "net.blocks.10.attn.qkv.weight" in grads and "net.norm.weight" in grads
    assert not {"net.cls_token", "net.pos_embed", "net.patch_embed.proj.weight", "net.blocks.9.mlp.fc1.weight"} & grads
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 192)


def test_frozen_stages_stay_bit_identical_and_the_trained_ones_move(small: Splits) -> None:
    enc = convnet_encoder(small)
    before = state(enc.module)
    rows = partial_finetune(enc, small, Config(blocks=(0, 1, 3), **FAST), 0)
    assert all(torch.equal(v, enc.module.state_dict()[k]) for k, v in before.items())  # the registered encoder
    probe, k0, k1, k3 = enc.copies  # the first copy only counts the blocks, before any training
    assert all(torch.equal(v, state(k0)[k]) for k, v in before.items())  # k = 0: the whole backbone, BN buffers too
    moved1 = {k for k, v in state(k1).items() if not torch.equal(v, before[k])}
    assert moved1 == {"body.6.weight", "body.7.weight", "body.7.bias", "body.7.running_mean", "body.7.running_var",
                      "body.7.num_batches_tracked"}  # the last stage only: stages 1 and 2 frozen, BN statistics included
    assert all(p.grad is None for n, p in k1.named_parameters() if not n.startswith("body.6") and not n.startswith("body.7"))
    moved3 = {k for k, v in state(k3).items() if not torch.equal(v, before[k])}
    assert "body.0.weight" in moved3 and "body.1.running_mean" in moved3
    v = values(rows)
    assert {m for m, _ in v} == {f"{m}_k{k}" for m in ("top1", "top5", "mean_class_acc") for k in (0, 1, 3)}
    assert [r.metric for r in rows if r.split == "val"] == ["top1_k0", "top1_k1", "top1_k3"]
    sel = {r.metric: r.selection for r in rows if r.split == "test"}
    assert sel["top1_k0"] == "fixed lr=2; trained: the head only (all 3 stages frozen)"
    assert sel["top1_k1"] == "fixed lr=2; trained: last 1 of 3 stages" and "whole backbone" in sel["top1_k3"]
    # a random ConvNet (chance 0.1): its features are too small for a plain linear probe; one trained stage learns
    assert v[("top1_k3", "test")] > v[("top1_k1", "test")] > 0.3


def test_all_blocks_is_finetune_exactly(small: Splits) -> None:
    cfg = FinetuneConfig(**{**FAST, "epochs": 1, "lrs": (0.5, 2.0)})
    full = finetune(convnet_encoder(small), small, cfg, 1)
    part = partial_finetune(convnet_encoder(small), small, Config(blocks=(3,), **{**FAST, "epochs": 1, "lrs": (0.5, 2.0)}), 1)
    assert [(r.metric, r.split, r.value) for r in full] == [(r.metric.removesuffix("_k3"), r.split, r.value) for r in part]
    assert part[0].selection.startswith(full[0].selection.split(" (")[0] + "; trained: the whole backbone")


def test_an_oversize_k_is_one_clear_line_before_any_training(small: Splits) -> None:
    enc = convnet_encoder(small)
    with pytest.raises(ConfigError) as e:
        partial_finetune(enc, small, Config(blocks=(0, 5), **FAST), 0)
    assert str(e.value) == "partial_finetune.blocks: k=5 is more than the 3 stages of this ConvNet; use values in 0..3"
    assert len(enc.copies) == 1  # only the copy that counted the blocks: nothing was trained


def test_a_backbone_without_blocks_is_not_applicable(small: Splits) -> None:
    module = Pixels(1, 16)
    enc = RecordingEncoder(module, module.dim, small.mean, small.std, key="pixels")
    with pytest.raises(NotApplicable, match="partial fine-tuning needs a backbone made of blocks"):
        partial_finetune(enc, small, Config(blocks=(0,), **FAST), 0)


def test_partially_frozen_keeps_frozen_modules_in_eval_mode() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2), nn.BatchNorm1d(2))
    m = PartiallyFrozen(net, [net[2], net[3]]).train()
    assert [x.training for x in net] == [False, False, True, True]
    assert [p.requires_grad for p in net.parameters()] == [False] * 4 + [True] * 4
    m.eval()
    assert not net[3].training and list(m.state_dict()) == [f"net.{k}" for k in net.state_dict()]
