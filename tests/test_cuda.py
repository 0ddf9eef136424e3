"""The GPU suite: the CUDA fast path against the CPU path. Skipped without a CUDA device (CI has none); run on a
GPU machine with `python -m pytest -q tests/test_cuda.py`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import pytest
import torch

from benchmark.backbones import ConvNet
from benchmark.config import PretrainConfig
from benchmark.data.augment import ViewSpec, make_views
from benchmark.data.sets import Splits
from benchmark.evaluate.encoder import FrozenEncoder, extract_features
from benchmark.registry import METHODS
from benchmark.run.throughput import main as throughput
from benchmark.train.pretrain import build_method, device_resident, pretrain
from protocols.linear import Config as LinearConfig
from protocols.linear import linear
from tests.protocols.test_knn import Flatten

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def _encoder(module: torch.nn.Module, dim: int, splits: Splits, device: torch.device) -> FrozenEncoder:
    return FrozenEncoder(module, dim, splits.mean, splits.std, key=f"cuda-test-{device.type}", device=device)


def test_linear_sweep_on_cuda_matches_the_cpu_sweep(digits: Splits) -> None:
    dim = digits.channels * digits.image_size**2
    rows = {d.type: linear(_encoder(Flatten(dim), dim, digits, d), digits, LinearConfig(), seed=0) for d in (CPU, CUDA)}
    test = {k: {r.metric: r.value for r in v if r.split == "test"} for k, v in rows.items()}
    assert abs(test["cuda"]["top1"] - test["cpu"]["top1"]) <= 0.01, test
    assert test["cuda"]["top1"] > 0.9  # pixels of digits are nearly linearly separable


def test_features_on_cuda_match_cpu_within_bf16(digits: Splits) -> None:
    torch.manual_seed(0)
    net = ConvNet(digits.channels, (16, 32, 64))
    cpu = extract_features(_encoder(net, 64, digits, CPU), digits.test)
    torch.manual_seed(0)
    gpu = extract_features(_encoder(ConvNet(digits.channels, (16, 32, 64)), 64, digits, CUDA), digits.test)
    assert gpu.device == CPU and gpu.shape == cpu.shape
    cos = torch.nn.functional.cosine_similarity(cpu, gpu, dim=1)
    assert float(cos.min()) > 0.99  # bf16 autocast on CUDA, float32 on the CPU


def test_batched_augmentations_on_cuda_have_the_cpu_statistics(digits: Splits) -> None:
    spec = ViewSpec(size=16, scale=(0.2, 1.0), blur_p=0.5, solarize_p=0.2)
    x = digits.train.x[:1].repeat(4096, 1, 1, 1)  # one image, 4096 independent draws
    out = {}
    for d in (CPU, CUDA):
        (v,) = make_views(x.to(d), [spec], digits.mean, digits.std, torch.Generator(d).manual_seed(0))
        assert v.device.type == d.type and v.shape == (4096, digits.channels, 16, 16)
        out[d.type] = v.cpu()
    for stat in (torch.mean, torch.std):
        a, b = float(stat(out["cpu"])), float(stat(out["cuda"]))
        assert abs(a - b) < 0.03 * max(1.0, abs(a)), (stat.__name__, a, b)
    assert not torch.equal(out["cuda"][0], out["cuda"][1])  # per-sample randomness


@pytest.mark.parametrize("compile_mode", ["none", "default"])
def test_pretraining_on_cuda_is_finite_resident_and_hands_back_an_encoder(digits: Splits, tmp_path: Path,
                                                                          compile_mode: Literal["none", "default"]) -> None:
    assert device_resident(digits.train.x, CUDA).device.type == "cuda"  # a few MB: fits
    cfg = PretrainConfig(backbone="convnet_tiny", epochs=2, batch_size=128, lr=0.05, compile=compile_mode)
    model = build_method(METHODS.get("simclr"), METHODS.default_config("simclr"), cfg, digits, seed=0)
    out = pretrain(model, digits, cfg, 0, tmp_path, CUDA, progress=False)
    assert out.status == "ok" and len(out.history) == 2
    assert all(math.isfinite(h["loss"]) for h in out.history)
    assert out.history[1]["loss"] < out.history[0]["loss"] + 0.5
    assert next(out.encoder.parameters()).device.type == "cuda"


def test_throughput_command_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    js = tmp_path / "tp.json"
    rc = throughput(["--backbone", "convnet_tiny", "--image-size", "16", "--train-size", "2000", "--batch-size", "256",
                     "--steps", "5", "--warmup", "2", "--workers", "2", "--device", "cuda", "--json", str(js)])
    assert rc == 0, capsys.readouterr().out
    r = json.loads(js.read_text())
    assert r["device"].startswith("cuda") and r["fast"]["peak_gpu_mib"] > 0 and r["loader"]["peak_gpu_mib"] > 0
    assert r["probe"]["seconds"] > 0 and r["features_images_per_s"] > 0
