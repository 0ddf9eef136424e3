from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from benchmark.backbones import build_backbone
from benchmark.config import PretrainConfig
from benchmark.data.sets import ImageSet, Splits
from benchmark.errors import ConfigError
from benchmark.evaluate.encoder import FrozenEncoder
from benchmark.evaluate.finetune import Recipe, train_classifier
from benchmark.evaluate.protocol import EvalContext
from benchmark.registry import PROTOCOLS
from benchmark.store.results import Row
from protocols.semisup import Config, MMSelfSupConfig, SimCLRConfig, label_subset, pct_tag, semisup
from tests.protocols.test_knn import blobs

# Blobs are 4x4 one-channel images whose class lights one pixel of column 0: crops would cut it away.
FAST: dict[str, Any] = {"batch_size": 16, "lrs": (2.0,), "crop_scale": 1.0}


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> flatten: keeps the position of the lit pixel, and has BN buffers to move."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.dim = 64

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)  # type: ignore[no-any-return]


@dataclass
class RecordingEncoder(FrozenEncoder):
    """A FrozenEncoder that keeps every trainable copy it hands out."""

    copies: list[nn.Module] = field(default_factory=list)

    def trainable_copy(self) -> nn.Module:
        m = super().trainable_copy()
        self.copies.append(m)
        return m


def tiny_encoder(seed: int = 0) -> RecordingEncoder:
    torch.manual_seed(seed)
    net = TinyNet()
    net.train()  # a protocol must not move BN statistics of the encoder it was handed, even in train mode
    return RecordingEncoder(net, net.dim, (0.0,), (1.0,), key="tiny")


def values(rows: list[Row]) -> dict[tuple[str, str], float]:
    return {(r.metric, r.split): r.value for r in rows}


def state(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_decay_recipe_hand_values() -> None:
    r = Recipe(epochs=20, batch_size=8, lr=0.1, schedule="step", milestones=(0.6, 0.8), gamma=0.2)
    assert [r.lr_at(s, 100) for s in (0, 59, 60, 79)] == [1.0, 1.0, 0.2, 0.2]
    assert r.lr_at(80, 100) == pytest.approx(0.04)
    base = Recipe(epochs=20, batch_size=8, lr=0.1, schedule="step", milestones=(0.6, 0.8))
    same = Recipe(epochs=20, batch_size=8, lr=0.1, schedule="step", milestones=(0.6, 0.8))
    assert [same.lr_at(s, 100) for s in range(100)] == [base.lr_at(s, 100) for s in range(100)]
    cos = Recipe(epochs=20, batch_size=8, lr=0.1, schedule="cosine", gamma=0.2)
    assert cos.lr_at(50, 100) == pytest.approx(0.5) and cos.lr_at(100, 100) == pytest.approx(0.0)


def test_recipes_follow_their_sources() -> None:
    vissl = Config().recipe_for(1)  # VISSL semi_sup_fulltune: 70 epochs, x0.1 at epoch 30, lr 0.05, wd 0, Nesterov
    per_epoch = 7
    assert (vissl.epochs, vissl.lr, vissl.weight_decay, vissl.nesterov, vissl.batch_size) == (70, 0.05, 0.0, True, 256)
    assert vissl.lr_at(30 * per_epoch - 1, 70 * per_epoch) == 1.0 and vissl.lr_at(30 * per_epoch, 70 * per_epoch) == pytest.approx(0.1)
    simclr = SimCLRConfig()
    assert [simclr.recipe_for(i).epochs for i in (0, 1)] == [60, 30] and simclr.recipe_for(0).schedule == "cosine"
    assert simclr.batch_size == 4096 and simclr.head_init == "zero"
    mm = MMSelfSupConfig()
    assert [mm.recipe_for(i).weight_decay for i in (0, 1)] == [5e-4, 1e-4]
    r = mm.recipe_for(0)
    assert (r.epochs, r.nesterov, r.gamma) == (20, False, 0.2) and r.lr_at(12, 20) == pytest.approx(0.2) and r.lr_at(16, 20) == pytest.approx(0.04)
    assert (mm.lrs, mm.head_lr_mults) == ((0.01,), (10.0,))
    for name in ("semisup", "semisup_simclr", "semisup_mmselfsup"):
        assert PROTOCOLS.get(name) is semisup and PROTOCOLS.entry(name).meta["version"] == "1"


def test_pct_tag() -> None:
    assert [pct_tag(f) for f in (0.01, 0.1, 0.005, 1.0, 0.25)] == ["1", "10", "0p5", "100", "25"]


def test_subsets_are_class_balanced_stable_and_saved(digits: Splits, tmp_path: Path) -> None:
    ctx = EvalContext(out=tmp_path)
    n = len(digits.train)
    one, note = label_subset(digits, 0.01, 0, None, ctx)
    ten, _ = label_subset(digits, 0.1, 0, None, ctx)
    assert len(one) == max(10, round(0.01 * n)) and len(ten) == round(0.1 * n)  # 1% of 1213 = 12: still one per class
    for ids in (one, ten):
        c = torch.bincount(digits.train.y[ids], minlength=10)
        assert int(c.min()) >= 1 and int(c.max() - c.min()) <= 1
        assert len(torch.unique(ids)) == len(ids) and int(ids.max()) < n
    again, note_again = label_subset(digits, 0.01, 0, None, EvalContext())
    assert torch.equal(one, again) and note == note_again and note.startswith("balanced seed 0 #")
    assert not torch.equal(ten, label_subset(digits, 0.1, 1, None, EvalContext())[0])  # subset_seed picks the draw
    saved = json.loads((tmp_path / "splits" / f"digits-{digits.fingerprint}-semisup-1pct-s0.json").read_text())
    assert saved["ids"] == one.tolist() and saved["n"] == len(one) and saved["of"] == "train"
    assert (tmp_path / "splits" / f"digits-{digits.fingerprint}-semisup-10pct-s0.json").is_file()


def test_a_conflicting_saved_split_raises(digits: Splits, tmp_path: Path) -> None:
    path = tmp_path / "splits" / f"digits-{digits.fingerprint}-semisup-1pct-s0.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"ids": list(range(12))}))
    with pytest.raises(RuntimeError, match="different draw"):
        label_subset(digits, 0.01, 0, None, EvalContext(out=tmp_path))


def test_user_subset_file_is_honoured(tmp_path: Path) -> None:
    data = blobs()
    ids = [0, 5, 41, 42, 90, 130, 159]  # deliberately unbalanced, unsorted below
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"ids": ids[::-1]}))
    got, note = label_subset(data, 0.5, 0, str(f), EvalContext(out=tmp_path))
    assert got.tolist() == ids and note.startswith("file mine.json #")
    assert not (tmp_path / "splits").exists()  # the user's file is the record; nothing is drawn or saved
    rows = semisup(tiny_encoder(), data, Config(fractions=(0.5,), subset_files=(str(f),), epochs=(1,), **FAST), 0)
    assert {r.metric for r in rows} == {"top1_50pct", "mean_class_acc_50pct"} and all(r.n_train == len(ids) for r in rows)
    assert all("file mine.json" in r.selection for r in rows)


@pytest.mark.parametrize(("content", "match"), [
    ({"ids": [0, 160]}, "outside"), ({"ids": [3, 3]}, "repeats"), ({"ids": [0.5]}, "must hold"), ({"idx": [1]}, "must hold"),
    ({"ids": [1], "fingerprint": "other"}, "fingerprint"), (None, "cannot read"),
])
def test_bad_user_subset_files_raise(tmp_path: Path, content: Any, match: str) -> None:
    f = tmp_path / "s.json"
    if content is not None:
        f.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=match):
        label_subset(blobs(), 0.1, 0, str(f), EvalContext())


def test_separable_blobs_give_top1_of_one() -> None:
    data = blobs()  # 160 train: 1% -> one image per class, 10% -> 16
    rows = semisup(tiny_encoder(), data, Config(epochs=(15, 5), **FAST), 0)
    assert values(rows) == {(f"{m}_{p}pct", s): 1.0 for p in (1, 10) for m, s in (("top1", "val"), ("top1", "test"), ("mean_class_acc", "test"))}
    assert [r.n_train for r in rows] == [4, 4, 4, 16, 16, 16] and rows[1].selection.startswith("fixed lr=2; subset balanced seed 0 #")


def test_frozen_encoder_is_bit_identical_and_the_copy_is_trained() -> None:
    enc = tiny_encoder()
    enc.module.train()
    before = state(enc.module)
    semisup(enc, blobs(), Config(fractions=(0.1,), epochs=(2,), **FAST), 0)
    assert all(torch.equal(v, enc.module.state_dict()[k]) for k, v in before.items())
    (copy,) = enc.copies
    moved = [k for k, v in before.items() if not torch.equal(v, copy.state_dict()[k])]
    assert "body.0.weight" in moved and "body.1.running_mean" in moved  # conv weights and BN statistics were fine-tuned


def test_wiring_batch_cap_per_fraction_recipe_and_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, Recipe]] = []

    def fake_train(model: nn.Module, train: ImageSet, recipe: Recipe, *args: Any, **kwargs: Any) -> list[float]:
        seen.append((len(train), recipe))
        return []

    monkeypatch.setattr("protocols.semisup.train_classifier", fake_train)
    cfg = Config(epochs=(7, 3), weight_decay=(0.5, 0.25), batch_size=10, lrs=(0.1, 0.2), head_lr_mults=(1.0, 10.0))
    rows = semisup(tiny_encoder(), blobs(), cfg, 0)
    assert [(n, r.batch_size, r.epochs, r.weight_decay) for n, r in seen] == [(4, 4, 7, 0.5)] * 4 + [(16, 10, 3, 0.25)] * 4
    assert [(r.lr, r.head_lr_mult) for _, r in seen[:4]] == [(0.1, 1.0), (0.1, 10.0), (0.2, 1.0), (0.2, 10.0)]
    # untrained models tie on val: the first candidate is kept, and the val row lists the sweep
    assert rows[0].split == "val" and rows[0].selection.startswith("val top1: lr=0.1 head x1 of 4;") and "0.2x10:" in rows[0].selection


def test_selection_is_made_on_val_and_survives_a_diverging_lr(monkeypatch: pytest.MonkeyPatch) -> None:

    def diverge_at_3(model: nn.Module, train: ImageSet, recipe: Recipe, *args: Any, **kwargs: Any) -> list[float]:
        if recipe.lr == 3.0:
            raise FloatingPointError("loss is nan")
        return train_classifier(model, train, recipe, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("protocols.semisup.train_classifier", diverge_at_3)
    cfg = Config(fractions=(0.1,), epochs=(5,), batch_size=16, lrs=(1e-7, 3.0, 2.0), crop_scale=1.0)
    rows = semisup(tiny_encoder(), blobs(), cfg, 0)
    val = next(r for r in rows if r.split == "val")
    assert val.selection.startswith("val top1: lr=2 of 3;") and "3x1:diverged" in val.selection and "1e-07x1:0.2500" in val.selection
    assert values(rows)[("top1_10pct", "test")] == 1.0
    with pytest.raises(FloatingPointError, match="every learning rate diverged"):
        semisup(tiny_encoder(), blobs(), dataclasses.replace(cfg, lrs=(3.0,)), 0)


def test_deterministic_given_the_seed() -> None:
    cfg = Config(fractions=(0.1,), epochs=(2,), batch_size=4, lrs=(0.5,), crop_scale=0.5)
    a, b, c = tiny_encoder(), tiny_encoder(), tiny_encoder()
    ra, rb = semisup(a, blobs(), cfg, 3), semisup(b, blobs(), cfg, 3)
    semisup(c, blobs(), cfg, 4)
    assert ra == rb
    sa, sb, sc = (state(e.copies[0]) for e in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # the run seed drives order, crops and head init


@pytest.mark.parametrize(("changes", "field_name"), [
    ({"fractions": ()}, "fractions"), ({"fractions": (0.0,)}, "fractions"), ({"fractions": (1.5,)}, "fractions"),
    ({"fractions": (0.1, 0.1)}, "fractions"), ({"subset_files": ("a.json",)}, "subset_files"),
    ({"epochs": (1, 2, 3)}, "epochs"), ({"epochs": (0,)}, "epochs"), ({"weight_decay": (-1.0,)}, "weight_decay"),
    ({"lrs": ()}, "lrs"), ({"lrs": (-0.1,)}, "lrs"), ({"lrs": (0.1, 0.1)}, "lrs"), ({"lrs": (math.inf,)}, "lrs"),
    ({"head_lr_mults": (0.0,)}, "head_lr_mults"), ({"batch_size": 0}, "batch_size"), ({"momentum": 1.0}, "momentum"),
    ({"milestones": (0.8, 0.6)}, "milestones"), ({"milestones": (1.0,)}, "milestones"), ({"gamma": 0.0}, "gamma"),
    ({"crop_scale": 0.0}, "crop_scale"), ({"head_init": "xavier"}, "head_init"), ({"schedule": "linear"}, "schedule"),
])
def test_config_validation(changes: dict[str, Any], field_name: str) -> None:
    with pytest.raises(ConfigError, match=f"semisup.{field_name}"):
        Config(**changes)


def test_multilabel_data_is_refused() -> None:
    data = blobs()
    ml = dataclasses.replace(data, train=ImageSet(data.train.x, torch.zeros(len(data.train), 4, dtype=torch.int64)))
    with pytest.raises(ValueError, match="one label per image"):
        semisup(tiny_encoder(), ml, Config(), 0)


def test_real_digits_with_a_random_convnet(digits: Splits) -> None:
    torch.manual_seed(0)
    module = build_backbone(PretrainConfig(backbone="convnet_tiny"), 1, 16)
    enc = FrozenEncoder(module, int(getattr(module, "dim")), digits.mean, digits.std, key="random")
    rows = semisup(enc, digits, Config(epochs=(20, 8), batch_size=32, lrs=(4.0,), crop_scale=1.0), 0)
    v = values(rows)
    # measured 0.22 (1%: 12 images) and 0.675 (10%: 121 images); chance is 0.1
    assert v[("top1_1pct", "test")] > 0.15 and v[("top1_10pct", "test")] > 0.5
    assert v[("top1_10pct", "test")] > v[("top1_1pct", "test")] and v[("top5_10pct", "test")] >= v[("top1_10pct", "test")]


def test_a_simclr_style_file_list_is_read_by_name_and_taken_out_of_val(tmp_path: Path) -> None:
    """Issue 19: SimCLR's `1percent.txt` names files; listed images that fell into val are trained on, not selected on."""
    from protocols.semisup import listed_subset

    data = blobs()
    named = dataclasses.replace(data, train_names=tuple(f"t{i}.JPEG" for i in range(len(data.train))),
                                val_names=tuple(f"v{i}.JPEG" for i in range(len(data.val))))
    f = tmp_path / "1percent.txt"
    f.write_text("t7.JPEG\nv3.JPEG\n\nt2.JPEG\nv0.JPEG\n")
    labelled, rest, note = listed_subset(named, str(f))
    assert torch.equal(labelled.x, torch.cat([data.train.x[[2, 7]], data.val.x[[0, 3]]]))
    assert len(rest.val) == len(data.val) - 2 and torch.equal(rest.val.x, data.val.x[[i for i in range(len(data.val)) if i not in (0, 3)]])
    assert note.startswith("file 1percent.txt (4 images, 2 of them taken from the validation split) #")
    rows = semisup(tiny_encoder(), named, Config(fractions=(0.01,), subset_files=(str(f),), epochs=(1,), **FAST), 0)
    assert all(r.n_train == 4 for r in rows) and all("file 1percent.txt" in r.selection for r in rows)
    f.write_text("t7.JPEG\nnope.JPEG\n")
    with pytest.raises(ConfigError, match=r"1 of the 2 files .* are not in 'blobs' \(nope.JPEG\); is it the list for this dataset"):
        listed_subset(named, str(f))
    with pytest.raises(ConfigError, match=r"does not keep them .*use a file-based dataset"):
        listed_subset(data, str(f))
