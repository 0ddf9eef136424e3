"""segmentation@1: the schedule, a linear head learning a synthetic task, parallel heads equal to separate runs,
diverged heads dropped, the frozen encoder untouched, end to end on the embedded set."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from benchmark.backbones import ConvNet, Pixels
from benchmark.data.segmentation import SegmentationSet
from benchmark.data.sets import ImageSet, Splits
from benchmark.errors import ConfigError, DivergedError, NotApplicable
from benchmark.evaluate.encoder import FrozenEncoder
from benchmark.evaluate.protocol import EvalContext
from benchmark.evaluate.segmentation import dense_features, segment_confusions, segmentation_scores
from protocols.segmentation import LIGHTLY_LRS, Config, LinearHead, segmentation, train_heads

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CPU = torch.device("cpu")
SMALL = dict(warmup_iters=5, batch_size=8, crop_size=32, img_size=None, eval_size=None, stride=32, scale_range=(0.75, 1.5))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention



def regions(n: int, seed: int, size: int = 32) -> SegmentationSet:
    """Grey noise (class 0) with a bright flat rectangle (class 1) and a striped one (class 2, drawn on top)."""
    g = torch.Generator().manual_seed(seed)
    images, masks = [], []
    stripes = (torch.arange(size) % 2 * 255).expand(size, size)
    for _ in range(n):
        m = torch.zeros(size, size, dtype=torch.uint8)
        for c in (1, 2):
            h, w = (int(v) for v in torch.randint(8, 16, (2,), generator=g))
            y, x = (int(v) for v in torch.randint(0, size - 15, (2,), generator=g))
            m[y : y + h, x : x + w] = c
        im = torch.randint(20, 60, (size, size), generator=g)
        im = torch.where(m == 1, torch.randint(190, 220, (size, size), generator=g), im)
        images.append(torch.where(m == 2, stripes, im).to(torch.uint8)[None])
        masks.append(m)
    return SegmentationSet("regions", ("background", "bright", "stripes"), images, masks, [str(i) for i in range(n)], f"r{seed}")


def random_features() -> torch.nn.Module:
    torch.manual_seed(0)
    return dense_features(ConvNet(1, (8, 16, 32))).eval().requires_grad_(False)  # a fixed random conv "encoder"


def _train(cfg: Config, train: SegmentationSet, seed: int = 0) -> tuple[list[LinearHead], dict[int, int]]:
    heads = [LinearHead(32, 3, cfg.dropout, seed) for _ in cfg.lrs]
    return heads, train_heads(random_features(), heads, train, cfg, 1, (0.3,), (0.3,), seed, CPU)


@pytest.mark.parametrize("bad", [dict(lrs=()), dict(lrs=(1e-3, 1e-3)), dict(lrs=(float("inf"),)), dict(dataset="coco"),
                                 dict(stride=600), dict(warmup_iters=40000), dict(inference="tta"), dict(scale_range=(2.0, 0.5))])
def test_bad_config_is_one_clear_error(bad: dict) -> None:
    with pytest.raises(ConfigError, match="segmentation"):
        Config(**bad)


def test_schedule_is_warmup_from_1e6_then_cosine() -> None:
    cfg = Config()  # DINOv3: 40k iterations, 1500 warm-up from lr x 1e-6
    assert cfg.lr_factor(0) == pytest.approx(1e-6) and cfg.lr_factor(750) == pytest.approx(0.5, abs=1e-6)
    assert cfg.lr_factor(1500) == 1.0 and cfg.lr_factor(1500 + 38500 // 2) == pytest.approx(0.5)
    assert cfg.lr_factor(39999) == pytest.approx(0.0, abs=1e-8)
    assert (cfg.lrs, cfg.weight_decay, cfg.betas, cfg.batch_size, cfg.crop_size, cfg.stride) == ((1e-3,), 1e-3, (0.9, 0.999), 16, 512, 341)
    assert len(LIGHTLY_LRS) == 9 and Config(lrs=LIGHTLY_LRS).lrs[4] == 1e-3


def test_a_linear_head_learns_regions_on_random_features() -> None:
    cfg = Config(lrs=(1e-2,), iterations=80, **SMALL)  # type: ignore[arg-type]
    heads, diverged = _train(cfg, regions(64, 0))
    untrained = LinearHead(32, 3, 0.1, 0).eval()
    heads[0].eval()
    cms = segment_confusions(random_features(), [heads[0], untrained], regions(16, 1), 1, (0.3,), (0.3,), cfg.eval(), CPU)
    trained, before = (segmentation_scores(cm).miou for cm in cms)
    # measured: 0.17 untrained -> 0.73 after 80 iterations (3 classes)
    assert not diverged and trained > 0.6 > 0.3 > before, (before, trained)


def test_parallel_heads_equal_separate_runs_exactly() -> None:
    cfg = Config(lrs=(1e-3, 3e-2), iterations=8, **SMALL)  # type: ignore[arg-type]  # dropout and photometric on
    data = regions(16, 0)
    both, _ = _train(cfg, data)
    for i, lr in enumerate(cfg.lrs):
        (alone,), _ = _train(Config(lrs=(lr,), iterations=8, **SMALL), data)  # type: ignore[arg-type]
        a, b = both[i].state_dict(), alone.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), lr  # bit-identical: disjoint heads, per-parameter AdamW
    assert not torch.equal(both[0].conv.weight, both[1].conv.weight)


def test_a_diverging_head_is_dropped_and_the_others_go_on() -> None:
    cfg = Config(lrs=(1e-2, 1e30), iterations=6, **SMALL)  # type: ignore[arg-type]
    data = regions(16, 0)
    heads, diverged = _train(cfg, data)
    assert list(diverged) == [1] and 0 < diverged[1] < 6
    (alone,), _ = _train(Config(lrs=(1e-2,), iterations=6, **SMALL), data)  # type: ignore[arg-type]
    assert all(torch.equal(v, alone.state_dict()[k]) for k, v in heads[0].state_dict().items())
    with pytest.raises(DivergedError, match="loss is not finite"):
        _train(Config(lrs=(1e30,), iterations=6, **SMALL), data)  # type: ignore[arg-type]


def _splits() -> Splits:
    x, y = torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)
    return Splits("t", ImageSet(x, y), ImageSet(x, y), ImageSet(x, y), 10, (0.3,), (0.3,), "fp", torch.arange(0))


def test_end_to_end_on_fmnist_seg_frozen_and_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path))
    torch.manual_seed(0)
    enc = FrozenEncoder(ConvNet(1, (8, 16, 32)), 32, (0.3,), (0.3,), key="test")
    before = {k: v.clone() for k, v in enc.module.state_dict().items()}
    cfg = Config(lrs=(1e-3, 1e-2), iterations=4, warmup_iters=1, batch_size=2, crop_size=64, img_size=None, eval_size=None, stride=48,
                 embedded_train=8, embedded_val=4, embedded_test=4)
    rows = segmentation(enc, _splits(), cfg, seed=0, ctx=EvalContext(out=tmp_path / "out"))
    assert all(torch.equal(v, enc.module.state_dict()[k]) for k, v in before.items())  # frozen: bit-identical
    assert [(r.metric, r.split) for r in rows[:4]] == [("mIoU", "val"), ("mIoU", "test"), ("aAcc", "test"), ("mAcc", "test")]
    assert rows[4].metric == "IoU.background" and all(r.metric.startswith("IoU.") for r in rows[4:])
    assert all(0 <= r.value <= 1 and r.n_train == 8 for r in rows)
    assert "val mIoU: lr=" in rows[0].selection and "1e-03:" in rows[0].selection.replace("0.001:", "1e-03:")
    assert list((tmp_path / "out" / "splits").glob("fmnist_seg-*-val.json"))
    again = segmentation(enc, _splits(), cfg, seed=0)
    assert [r.value for r in again] == [r.value for r in rows]


def test_backbones_without_a_spatial_map_are_not_applicable() -> None:
    enc = FrozenEncoder(Pixels(1, 28), 784, (0.3,), (0.3,), key="pixels")
    with pytest.raises(NotApplicable, match="spatial feature map"):
        segmentation(enc, _splits(), Config(), seed=0)


def test_a_voc_tree_is_read_lazily_decoded_by_workers_and_made_grey(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from tests.benchmark.data.test_segmentation_data import _voc_tree

    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    root = _voc_tree(tmp_path, [f"t{i}" for i in range(8)], ["v0", "v1"])  # RGB JPEGs, palette masks, 255 borders
    torch.manual_seed(0)
    enc = FrozenEncoder(ConvNet(1, (8, 16, 32)), 32, (0.3,), (0.3,), key="test")  # a grey encoder: RGB -> luma
    cfg = Config(dataset="voc12", data_root=str(root), iterations=3, warmup_iters=1, batch_size=2, crop_size=16,
                 img_size=None, eval_size=None, stride=16, workers=2)
    rows = segmentation(enc, _splits(), cfg, seed=0, ctx=EvalContext(out=tmp_path / "out"))
    assert rows[0].n_train == 7 and all(0 <= r.value <= 1 for r in rows)  # val: round(0.1 x 8) = 1 train image
    assert rows[0].selection.endswith("val: 1 of 8 train images (fraction 0.1, seed 0)")
    (split,) = (tmp_path / "out" / "splits").glob("voc12-*-val.json")
    assert json.loads(split.read_text())["n"] == 1
    serial = segmentation(enc, _splits(), dataclasses.replace(cfg, workers=0), seed=0)
    assert [r.value for r in serial] == [r.value for r in rows]  # decoding threads change no draw
