"""Issue 19's reproduction command end to end on a generated ILSVRC2012 tree (1000 class folders of real Fashion-MNIST
JPEGs) with a torchvision ResNet checkpoint, streamed, on the CPU; and its bad roots as one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision

from tests.benchmark.data import trees
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trees.imagefolder(tmp_path_factory.mktemp("imagenet"), n_train=2, n_val=1, size=40, classes=trees.wnids(1000))


def test_the_reproduction_command_runs_streamed_on_an_ilsvrc_tree(ilsvrc: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ck = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), ck)
    out, env = tmp_path / "out", {"SSLBENCH_CACHE": str(tmp_path / "cache")}
    cmd = ["--checkpoint", f"r18={ck}@resnet18", "--datasets", "imagenet", "--data-root", str(ilsvrc), "--protocols", "linear,knn",
           "--set", "data.image_size=64", "--out", str(out)]
    r = run_cli(*cmd, "--set", "data.storage=stream", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    df = pd.read_csv(out / "results.csv")
    assert set(df.protocol) == {"linear", "knn"} and set(df.status) == {"ok"} and (df.n_train.max() == 2000)
    assert set(df.data_storage) == {"stream (2 workers)"} and set(df.data_transform) == {"resize73-crop64"}
    assert set(df.feature_dtype) == {"float16"} and df.value.notna().all()
    stores = list((out / "runs").rglob("features/*/manifest.json"))
    assert len(stores) == 3  # train, val, test: extracted once, shared by both protocols
    again = run_cli(*cmd, "--set", "data.storage=memory", env=env)  # where images live is not part of the cell
    assert again.returncode == 0 and "0 cells done, 2 reused" in again.stdout, again.stdout + again.stderr


def test_a_missing_or_wrong_imagenet_root_is_one_line_naming_the_layout(ilsvrc: Path, tmp_path: Path) -> None:
    small = trees.imagefolder(tmp_path / "small", n_train=2, n_val=1, size=32, classes=trees.wnids(10))
    for root, msg in ((tmp_path / "nowhere", "dataset 'imagenet' not found at"),
                      (small, "has 10 class folders, ILSVRC2012 has 1000; expected the ILSVRC2012 layout: DIR/train/<wnid>/*.JPEG")):
        r = run_cli("--datasets", "imagenet", "--data-root", str(root), "--protocols", "knn", "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "o").exists()


def test_a_corrupt_image_in_a_streamed_set_fails_its_cell_with_one_line_naming_the_file(tmp_path: Path) -> None:
    root = trees.imagefolder(tmp_path / "if", n_train=12, n_val=4, size=32)
    bad = sorted((root / "val" / "class4").glob("*.JPEG"))[1]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    out = tmp_path / "out"
    r = run_cli("--methods", "random", "--protocols", "knn", "--datasets", "imagefolder", "--data-root", str(root),
                "--set", "data.storage=stream", "--set", "pretrain.backbone=convnet_tiny", "--out", str(out),
                env={"SSLBENCH_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1, r.stdout + r.stderr
    fails = pd.read_csv(out / "failures.csv")
    assert len(fails) == 1 and fails["flags"][0].startswith(f"DatasetError: {bad}: not a decodable image"), fails["flags"][0]
    assert len(list(out.rglob("features/*-train/manifest.json"))) == 1  # the folder val/ is the test split:
    assert not list(out.rglob("features/*-test/manifest.json"))  # the split with the bad file is never marked complete


def test_pretraining_and_fine_tuning_on_a_streamed_set_equal_the_in_memory_run(tmp_path: Path) -> None:
    root = trees.imagefolder(tmp_path / "if", n_train=12, n_val=4, size=24)
    values = {}
    for storage in ("memory", "stream"):
        out = tmp_path / storage
        r = run_cli("--suite", "smoke", "--methods", "simclr", "--protocols", "knn,finetune", "--datasets", "imagefolder",
                    "--data-root", str(root), "--set", f"data.storage={storage}", "--set", "finetune.epochs=1",
                    "--set", "finetune.lrs=[0.1]", "--out", str(out), env={"SSLBENCH_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 0, r.stdout + r.stderr
        df = pd.read_csv(out / "results.csv")
        assert set(df.data_storage) == {storage if storage == "memory" else "stream (2 workers)"}
        values[storage] = df.set_index(["protocol", "metric", "split"]).value.sort_index()
    assert values["memory"].notna().all() and len(values["memory"]) >= 3
    pd.testing.assert_series_equal(values["memory"], values["stream"])  # the same images, batches and draws


def test_pretraining_with_worker_crops_runs_reproducibly_and_needs_a_streamed_set(tmp_path: Path) -> None:
    root = trees.imagefolder(tmp_path / "if", n_train=12, n_val=4, size=40)
    env = {"SSLBENCH_CACHE": str(tmp_path / "cache")}
    base = ["--suite", "smoke", "--methods", "simclr", "--datasets", "imagefolder", "--data-root", str(root),
            "--set", "pretrain.crops=worker"]
    losses = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        r = run_cli(*base, "--set", "data.storage=stream", "--set", f"data.workers={workers}", "--out", str(out), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        (meta,) = out.rglob("pretrain.json")
        losses.append([(h["loss"], h["rankme"]) for h in pd.read_json(meta, typ="series")["history"]])
    assert losses[0] == losses[1] and len(losses[0]) == 1  # the crops are fixed by the seed, not by the workers
    batch = [*base[:-1], "pretrain.crops=batch", "--set", "data.storage=stream", "--out", str(tmp_path / "batch")]
    assert run_cli(*batch, env=env).returncode == 0
    (meta,) = (tmp_path / "batch").rglob("pretrain.json")
    assert [(h["loss"], h["rankme"]) for h in pd.read_json(meta, typ="series")["history"]] != losses[0]  # other views
    r = run_cli(*base, "--out", str(tmp_path / "mem"), env=env)
    assert r.returncode == 2 and "pretrain.crops=worker crops views from the full decoded images of a streamed set" in r.stderr


def test_feature_extraction_split_over_parts_then_the_grid_reads_the_stores(ilsvrc: Path, tmp_path: Path) -> None:
    """Issue 19: N processes (SLURM array tasks, GPUs) each extract their shards; the grid then reads complete stores."""
    torch.manual_seed(0)
    ck = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), ck)
    env = {"SSLBENCH_CACHE": str(tmp_path / "cache")}
    grid = ["--checkpoint", f"r18={ck}@resnet18", "--datasets", "imagenet", "--data-root", str(ilsvrc), "--protocols", "knn",
            "--set", "data.image_size=32", "--set", "eval.shard_rows=500"]
    out = tmp_path / "parts"
    first = run_cli(*grid, "--out", str(out), "--extract-part", "1/2", env=env)
    # train, val and test hold 1000 images each (val: one per class, carved from train): 2 shards of 500 each
    assert first.returncode == 0 and "3 feature shards extracted (part 1 of 2)" in first.stdout, first.stdout + first.stderr
    assert not list(out.rglob("manifest.json")) and not (out / "results.csv").exists()  # shard 0 of each store only
    second = run_cli(*grid, "--out", str(out), "--extract-part", "2/2", env=env)
    assert second.returncode == 0 and "3 feature shards extracted (part 2 of 2)" in second.stdout, second.stdout + second.stderr
    assert len(list(out.rglob("manifest.json"))) == 3  # the last part to finish each store wrote its manifest
    shards = {p: p.stat().st_mtime_ns for p in out.rglob("shard-*.npy")}
    r = run_cli(*grid, "--out", str(out), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("shard-*.npy")} == shards  # read, not recomputed
    whole = run_cli(*grid, "--out", str(tmp_path / "whole"), env=env)
    a, b = (pd.read_csv(d / "results.csv").set_index("metric").value for d in (out, tmp_path / "whole"))
    assert whole.returncode == 0 and a.equals(b)
    bad = run_cli(*grid, "--out", str(out), "--extract-part", "3/2", env=env)
    assert bad.returncode == 2 and "--extract-part '3/2': I must be in 1..N" in bad.stderr
