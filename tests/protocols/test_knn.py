from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import Tensor, nn

from benchmark.backbones import build_backbone
from benchmark.config import PretrainConfig
from benchmark.data.sets import ImageSet, Splits
from benchmark.evaluate.encoder import FrozenEncoder
from protocols.knn import Config, knn, knn_predict, topk_accuracy


class Flatten(nn.Module):
    """Raw pixels as features (a fixed, known encoder)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def blobs(n_per_class: int = 40, classes: int = 4, seed: int = 0) -> Splits:
    """Linearly separable 'images': each class lights up its own pixel block."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> ImageSet:
        y = torch.arange(classes).repeat_interleave(n)
        x = torch.randint(0, 40, (len(y), 1, 4, 4), generator=g)
        x.view(len(y), -1)[torch.arange(len(y)), y * 4] += 200
        return ImageSet(x.to(torch.uint8), y)

    return Splits("blobs", make(n_per_class), make(n_per_class // 4), make(n_per_class // 2), classes,
                  (0.0,), (1.0,), "blobs", torch.arange(0))


def frozen(module: nn.Module, dim: int) -> FrozenEncoder:
    return FrozenEncoder(module, dim, (0.0,), (1.0,), key="test")


def test_knn_predict_hand_case() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    scores = knn_predict(train, y, torch.tensor([[0.1, 1.0]]), k=2, t=1.0, num_classes=2)
    # neighbours: [0,1] (cos 0.995) and [0.9,0.1] (cos ~0.21): votes e^cos for classes 1 and 0
    c1 = torch.nn.functional.cosine_similarity(torch.tensor([0.1, 1.0]), torch.tensor([0.0, 1.0]), dim=0).exp()
    c0 = torch.nn.functional.cosine_similarity(torch.tensor([0.1, 1.0]), torch.tensor([0.9, 0.1]), dim=0).exp()
    torch.testing.assert_close(scores, torch.stack([c0, c1]).view(1, 2))
    assert topk_accuracy(scores, torch.tensor([1]), 1) == 1.0


def test_a_bank_compared_in_chunks_votes_as_the_whole_bank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: a bank larger than BANK_CHUNK (ImageNet's 1.28M) is compared a chunk at a time with a running top-k."""
    import benchmark.train.monitors as knn_module  # where knn_predict lives (protocols.knn re-exports it)

    g = torch.Generator().manual_seed(0)
    bank, y, test = torch.randn(1000, 16, generator=g), torch.randint(0, 7, (1000,), generator=g), torch.randn(300, 16, generator=g)
    whole = knn_predict(bank, y, test, k=20, t=0.07, num_classes=7)
    monkeypatch.setattr(knn_module, "BANK_CHUNK", 64)
    parts = knn_predict([bank[:700], bank[700:]], y, test, k=20, t=0.07, num_classes=7, chunk=128)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    assert torch.equal(parts.argmax(1), whole.argmax(1))


def test_separable_blobs_give_top1_of_one() -> None:
    rows = knn(frozen(Flatten(16), 16), blobs(), Config(), seed=0)
    assert {r.metric: r.value for r in rows} == {"top1": 1.0, "mean_class_acc": 1.0}
    assert rows[0].selection == "fixed k=20 T=0.07"



def test_a_k_beyond_the_bank_is_recorded_as_the_k_used() -> None:
    """Issue 18.5: k=100000 on a 200-sample bank votes with 200 neighbours, and the selection says so."""
    data, enc = blobs(), frozen(Flatten(16), 16)
    asked, full = knn(enc, data, Config(k=100000), seed=0), knn(enc, data, Config(k=200), seed=0)
    assert [r.value for r in asked] == [r.value for r in full]
    assert asked[0].selection == "fixed k=200 T=0.07 (k=100000 asked; the bank holds 200)"
    assert full[0].selection == "fixed k=200 T=0.07"

@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_frozen_encoder_is_bit_identical_after_the_protocol(protocol: str, digits: Splits) -> None:
    from benchmark.registry import PROTOCOLS

    module = build_backbone(PretrainConfig(backbone="convnet_tiny"), 1, 16)
    enc = frozen(module, module.dim)  # FrozenEncoder puts the module in eval mode ...
    module.train()  # ... so hand the protocol one in train mode again: it must still not update BN statistics
    before = {k: v.clone() for k, v in module.state_dict().items()}
    probe = copy.deepcopy(module)  # the check can fail: a train-mode forward does move the running statistics
    with torch.no_grad():
        probe(torch.randn(8, 1, 16, 16))
    assert any(not torch.equal(before[k], v) for k, v in probe.state_dict().items() if "running_mean" in k)
    cfg = PROTOCOLS.default_config(protocol)
    cfg = dataclasses.replace(cfg, grid_points=3) if protocol == "linear" else cfg
    PROTOCOLS.get(protocol)(enc, digits, cfg, 0)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
