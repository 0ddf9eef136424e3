"""Multi-process pretraining started with torchrun (2 CPU processes, gloo): the same global batch gives the same
training as one process, only rank 0 writes and evaluates. `supervised` on a ViT: no BatchNorm anywhere, because
BN statistics are per process without SyncBN, which PyTorch runs only on GPUs (methods that declare `sync_bn` get
it there). The global-batch losses' own 2-process equality is tested with each method (tests/ddp.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmark.train.distributed import launched_processes
from tests.conftest import REPO, run_cli

ARGS = ["--methods", "supervised", "--protocols", "knn", "--datasets", "digits", "--suite", "smoke",
        "--set", "data.image_size=16", "--set", "data.train_size=512", "--set", "pretrain.backbone=vit_tiny",
        "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=64", "--set", "pretrain.optimizer=sgd",
        "--set", "pretrain.lr=0.02", "--set", "pretrain.warmup_epochs=0"]  # a small step: float noise stays small


def _encoder(out: Path) -> dict[str, torch.Tensor]:
    (path,) = out.glob("runs/digits/supervised/*/encoder.safetensors")
    return load_file(str(path))


def test_two_torchrun_processes_train_like_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    one = run_cli(*ARGS, "--out", str(tmp_path / "one"), "--device", "cpu", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "run_benchmark.py"), "--no-progress", *ARGS, "--out", str(tmp_path / "two"), "--device", "cpu"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("sslbench leaderboard") == 1  # rank 0 evaluated and reported; rank 1 only trained
    a, b = _encoder(tmp_path / "one"), _encoder(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
    (meta,) = (tmp_path / "two").glob("runs/digits/supervised/*/pretrain.json")
    assert json.loads(meta.read_text())["processes"] == 2
    (meta1,) = (tmp_path / "one").glob("runs/digits/supervised/*/pretrain.json")
    assert json.loads(meta.read_text())["history"][0]["loss"] == pytest.approx(json.loads(meta1.read_text())["history"][0]["loss"], rel=1e-4)


def test_a_plain_run_inside_an_allocation_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")  # salloc -n 8, then a plain python: not 8 processes
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert launched_processes() == 1
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # a submitit job with 8 tasks
    assert launched_processes() == 8
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun
    assert launched_processes() == 2
