"""Streamed datasets (issue 19): file trees and WebDataset shards read in DataLoader workers give the same images, hence
the same features, as the in-memory path; every file counts in the fingerprint; bad files are one line naming them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from benchmark.backbones import ConvNet
from benchmark.config import DataConfig
from benchmark.data import datasets
from benchmark.data.datasets import load_raw, load_splits
from benchmark.data.sets import ImageSet, Splits
from benchmark.data.stream import EvalTransform, StreamSet
from benchmark.errors import ConfigError, DatasetError
from benchmark.evaluate.encoder import FrozenEncoder, split_features
from tests.benchmark.data import trees


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    datasets._CACHE.clear()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trees.imagefolder(tmp_path_factory.mktemp("if"), n_train=24, n_val=8, size=48)


def _features(s: Splits) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    enc = FrozenEncoder(ConvNet(s.channels, (8, 16, 32)), 32, s.mean, s.std, key="k", batch_size=50)
    return {k: v[0] for k, v in split_features(enc, s).items()}


def test_streamed_features_equal_the_in_memory_ones_bit_for_bit(tree: Path) -> None:
    mem = load_splits("imagefolder", DataConfig(root=str(tree), storage="memory"))
    stream = load_splits("imagefolder", DataConfig(root=str(tree), storage="stream", workers=2))
    assert isinstance(mem.train, ImageSet) and isinstance(stream.train, StreamSet)
    assert (mem.storage, stream.storage, mem.transform) == ("memory", "stream (2 workers)", "resize73-crop64")
    assert mem.fingerprint == stream.fingerprint and mem.mean == stream.mean and mem.std == stream.std
    assert torch.equal(mem.val_ids, stream.val_ids) and torch.equal(mem.test.y, stream.test.y)
    assert mem.train_names == stream.train_names and len(mem.train_names) == len(mem.train)  # for SimCLR-style lists
    assert mem.train_names[0].endswith(".JPEG") and "/" not in mem.train_names[0]
    fm, fs = _features(mem), _features(stream)
    assert all(torch.equal(fm[k], fs[k]) for k in ("train", "val", "test"))
    assert fm["train"].std() > 0
    # the default (auto) keeps a small tree in memory; a transform is part of the fingerprint
    assert load_splits("imagefolder", DataConfig(root=str(tree))).storage == "memory"
    native = load_splits("imagefolder", DataConfig(root=str(tree), transform="native"))
    assert native.image_size == 48 and native.transform == "native" and native.fingerprint != mem.fingerprint


def test_the_eval_transform_is_resize_then_centre_crop() -> None:
    img = torch.arange(3 * 40 * 80, dtype=torch.float32).reshape(3, 40, 80).div(3 * 40 * 80 / 255).to(torch.uint8)
    tf = EvalTransform.named("resize_crop", 224)
    assert (tf.resize, tf.describe()) == (256, "resize256-crop224")  # ImageNet's 256 -> 224
    out = EvalTransform.named("resize_crop", 16)(img)
    assert out.shape == (3, 16, 16)
    import torchvision.transforms.v2.functional as TF

    ref = TF.resize(img, [18], antialias=True)  # shorter side 40 -> 18 (16 / 0.875), long side 36; then the centre
    assert torch.equal(out, ref[:, 1:17, 10:26])
    assert EvalTransform.named("resize", 20)(img).shape == (3, 20, 20)
    with pytest.raises(DatasetError, match="unknown data.transform"):
        EvalTransform.named("squash", 20)


def test_webdataset_shards_give_the_image_folders_features(tree: Path, tmp_path: Path) -> None:
    shards = trees.shards(tree, tmp_path / "wds", per_shard=50)
    assert len(list(shards.glob("train-*.tar"))) == 5
    cfg = DataConfig(image_size=64, storage="stream")
    a = load_splits("imagefolder", dataclasses.replace(cfg, root=str(tree)))
    b = load_splits("webdataset", dataclasses.replace(cfg, root=str(shards)))
    assert b.num_classes == 10 and torch.equal(a.train.y, b.train.y) and a.mean == b.mean
    fa, fb = _features(a), _features(b)
    assert all(torch.equal(fa[k], fb[k]) for k in ("train", "val", "test"))
    globbed = load_raw("webdataset", str(shards))
    (shards / "shards.json").write_text('{"train": "train-{000000..000004}.tar", "test": "val-{000000..000001}.tar"}')
    by_pattern = load_raw("webdataset", str(shards))  # brace patterns naming the same shards: the same dataset
    assert by_pattern.source_hash == globbed.source_hash and torch.equal(by_pattern.train.y, globbed.train.y)
    (shards / "shards.json").write_text('{"train": "train-{000000..000009}.tar", "test": "val-{000000..000001}.tar"}')
    with pytest.raises(DatasetError, match=r"shards.json: 5 of its 10 shards are missing \(.*train-000005.tar"):
        load_raw("webdataset", str(shards))


def test_every_file_is_in_the_fingerprint_and_hashed_once(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from benchmark.data import files

    root = tmp_path / "copy"
    shutil.copytree(tree, root)
    first = load_raw("imagefolder", str(root)).source_hash
    calls: list[Path] = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: calls.append(p) or real(p))
    assert load_raw("imagefolder", str(root)).source_hash == first and calls == []  # cached by path, size and mtime
    last = sorted((root / "train" / "class9").glob("*.JPEG"))[-1]  # the very last training file, one byte changed
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 1
    last.write_bytes(bytes(data))
    assert load_raw("imagefolder", str(root)).source_hash != first and calls == [last]
    shutil.copytree(root, tmp_path / "moved")  # the same bytes elsewhere: the same data
    assert load_raw("imagefolder", str(tmp_path / "moved")).source_hash == load_raw("imagefolder", str(root)).source_hash


@pytest.mark.parametrize("how", ["folders", "loc", "devkit"])
def test_the_ilsvrc_layout_reads_val_in_folders_or_flat_with_its_ground_truth(tmp_path: Path, how: str) -> None:
    from benchmark.data.layouts import IMAGENET100

    classes = sorted(IMAGENET100)
    root = trees.imagefolder(tmp_path / "in", n_train=2, n_val=1, size=32, classes=classes + trees.wnids(5))
    ref = load_raw("imagenet100", str(root))
    if how != "folders":
        trees.flatten_val(root, how)
    raw = load_raw("imagenet100", str(root))
    assert raw.num_classes == 100 and len(raw.train) == 200 and len(raw.test) == 100
    assert torch.equal(raw.test.y, ref.test.y)  # flattened in listing order: the labels must come back the same
    assert sorted(raw.test.y.tolist()) == list(range(100))  # one val image per class, each with its own label
    assert [Path(p).name.startswith(classes[int(c)]) for p, c in zip(ref.test.paths, ref.test.y)] == [True] * 100


def test_bad_layouts_are_one_line_naming_what_to_do(tmp_path: Path) -> None:
    root = trees.imagefolder(tmp_path / "in", n_train=2, n_val=1, size=32, classes=trees.wnids(12))
    with pytest.raises(DatasetError, match=r"has 12 class folders, ILSVRC2012 has 1000; expected the ILSVRC2012 layout"):
        load_raw("imagenet", str(root))
    with pytest.raises(DatasetError, match=r"lacks 100 of its 100 classes .*point --data-root at a full ImageNet"):
        load_raw("imagenet100", str(root))
    (root / "val" / "n99999999").mkdir()
    (root / "val" / "n99999999" / "x.JPEG").write_bytes((root / "val").glob("*/*.JPEG").__next__().read_bytes())
    with pytest.raises(DatasetError, match=r"has class folders that train/ lacks: n99999999"):
        load_raw("imagefolder", str(root))
    flat = trees.imagefolder(tmp_path / "flat", n_train=2, n_val=1, size=32, classes=trees.wnids(3))
    trees.flatten_val(flat, "loc")
    (flat / "LOC_val_solution.csv").unlink()
    with pytest.raises(DatasetError, match=r"val is flat but no ground truth was found"):
        from benchmark.data.layouts import _load_ilsvrc

        _load_ilsvrc(flat, trees.wnids(3), "imagenet100")
    with pytest.raises(DatasetError, match=r"webdataset root .* has no train shards; expected WebDataset shards"):
        load_raw("webdataset", str(tmp_path))


def test_a_corrupt_jpeg_is_one_line_naming_the_file_on_both_paths(tree: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tree, root)
    bad = sorted((root / "val" / "class3").glob("*.JPEG"))[2]
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    with pytest.raises(DatasetError, match=rf"{bad}: not a decodable image \(.*\); remove or replace it"):
        load_splits("imagefolder", DataConfig(root=str(root), storage="memory"))
    s = load_splits("imagefolder", DataConfig(root=str(root), storage="stream"))  # planning lists, it does not decode
    with pytest.raises(DatasetError, match=rf"^{bad}: not a decodable image") as e:
        _features(s)
    assert "\n" not in str(e.value)


def test_a_truncated_shard_is_one_line_naming_it_and_the_offset(tree: Path, tmp_path: Path) -> None:
    shards = trees.shards(tree, tmp_path / "wds", per_shard=50)
    shard = shards / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:20_000])
    with pytest.raises(DatasetError, match=rf"{shard}: truncated or corrupt shard after member .* \(byte offset \d+\)|"
                                           rf"{shard}: truncated shard: member .* at byte offset \d+"):
        load_raw("webdataset", str(shards))


def test_storage_choice_is_by_size_and_explicit_memory_is_refused_when_it_cannot_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert datasets.choose_storage(DataConfig(), 1000, 3, 224) == "memory"  # 150 MB
    assert datasets.choose_storage(DataConfig(), 1_281_167, 3, 224) == "stream"  # ImageNet: 193 GB
    assert datasets.choose_storage(DataConfig(storage="stream"), 10, 3, 8) == "stream"
    monkeypatch.setattr(datasets, "_physical_memory", lambda: 16 * 2**30)
    with pytest.raises(ConfigError, match=r"data.storage=memory would hold 1281167 images of 224 px in .* use data.storage=stream"):
        datasets.choose_storage(DataConfig(storage="memory"), 1_281_167, 3, 224)


def test_places205_and_inat2018_are_read_from_their_file_lists(tree: Path, tmp_path: Path) -> None:
    import json
    import shutil

    imgs = sorted(tree.glob("*/*/*.JPEG"))[:6]
    places = tmp_path / "places"
    for i, p in enumerate(imgs):
        dst = places / "images256" / "a" / f"abbey{i % 2}" / f"{i:08d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
    (places / "trainvalsplit_places205").mkdir()
    (places / "trainvalsplit_places205" / "train_places205.csv").write_text("".join(f"a/abbey{i % 2}/{i:08d}.jpg {i % 2}\n" for i in range(4)))
    (places / "trainvalsplit_places205" / "val_places205.csv").write_text("a/abbey0/00000004.jpg 0\na/abbey1/00000005.jpg 204\n")
    raw = load_raw("places205", str(places))
    assert raw.num_classes == 205 and raw.train.y.tolist() == [0, 1, 0, 1] and raw.test.y.tolist() == [0, 204]
    assert Path(raw.train.paths[1]).read_bytes() == imgs[1].read_bytes()
    (places / "images256" / "a" / "abbey1" / "00000003.jpg").unlink()
    with pytest.raises(DatasetError, match=r"00000003.jpg is listed by the dataset but missing"):
        load_raw("places205", str(places))
    with pytest.raises(DatasetError, match=r"places205: .* is incomplete; expected Places205 as VISSL reads it"):
        load_raw("places205", str(tmp_path))

    inat = tmp_path / "inat"
    for split, part in (("train2018", imgs[:4]), ("val2018", imgs[4:])):
        images, anns = [], []
        for i, p in enumerate(part):
            rel = f"train_val2018/Plantae/{i}/{p.stem}.jpg"
            (inat / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, inat / rel)
            images.append({"id": 100 + i, "file_name": rel})
            anns.append({"image_id": 100 + i, "category_id": 7 - i})
        (inat / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": c} for c in range(8)]}))
    raw = load_raw("inat2018", str(inat))
    assert raw.num_classes == 8 and raw.train.y.tolist() == [7, 6, 5, 4] and raw.test.y.tolist() == [7, 6]
    (inat / "val2018.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"val2018.json is not the official annotation file \(KeyError"):
        load_raw("inat2018", str(inat))


def test_worker_crops_follow_torchvisions_random_resized_crop_and_are_fixed_by_seed() -> None:
    from benchmark.data.stream import rrc_box

    g = torch.Generator().manual_seed(0)
    boxes = [rrc_box(375, 500, (0.08, 1.0), (3 / 4, 4 / 3), g) for _ in range(2000)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
    frac = torch.tensor([h * w / (375 * 500) for _, _, h, w in boxes])
    ratio = torch.tensor([w / h for _, _, h, w in boxes])
    assert 0.07 <= float(frac.min()) and float(frac.max()) <= 1.0 and 0.74 <= float(ratio.min()) and float(ratio.max()) <= 1.35
    from torchvision.transforms.v2 import RandomResizedCrop  # the reference: the same distribution of boxes

    torch.manual_seed(0)
    ref = [RandomResizedCrop.get_params(torch.zeros(3, 375, 500), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]
    ref_frac = torch.tensor([h * w / (375 * 500) for _, _, h, w in ref])
    ref_ratio = torch.tensor([w / h for _, _, h, w in ref])
    assert abs(float(frac.mean() - ref_frac.mean())) < 0.02 and abs(float(frac.std() - ref_frac.std())) < 0.02
    assert abs(float(ratio.log().mean() - ref_ratio.log().mean())) < 0.02
    assert rrc_box(10, 100, (0.9, 1.0), (1.0, 1.0), g) == (0, 45, 10, 10)  # nothing fits 10 tries: the centre at ratio 1
    a = [rrc_box(64, 64, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(5)) for _ in range(2)]
    assert a[0] == a[1]


def test_worker_crops_do_not_depend_on_the_number_of_workers(tree: Path) -> None:
    from benchmark.data.stream import CropSpec

    s = load_splits("imagefolder", DataConfig(root=str(tree), storage="stream")).train
    assert isinstance(s, StreamSet)
    batches = [torch.arange(0, 20), torch.arange(40, 50)]
    crops = [CropSpec(32, (0.2, 1.0)), CropSpec(16, (0.05, 0.4))]
    runs = [list(dataclasses.replace(s, workers=w).crops(batches, crops, seed=3)) for w in (0, 2)]
    assert [[tuple(v.shape) for v in b] for b in runs[0]] == [[(20, 3, 32, 32), (20, 3, 16, 16)], [(10, 3, 32, 32), (10, 3, 16, 16)]]
    assert all(torch.equal(a, b) for ba, bb in zip(*runs) for a, b in zip(ba, bb))
    other = list(s.crops(batches, crops, seed=4))
    assert not torch.equal(other[0][0], runs[0][0][0])  # another epoch's seed: other crops
