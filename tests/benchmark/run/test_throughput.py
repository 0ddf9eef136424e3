"""The throughput command at CI size: both paths train, the report is complete, the JSON is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark.data.augment import ViewSpec, make_views, torchvision_view
from benchmark.run.throughput import main


def test_throughput_command_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tp.json"
    rc = main(["--backbone", "convnet_tiny", "--image-size", "16", "--train-size", "300", "--batch-size", "32",
               "--steps", "2", "--warmup", "1", "--workers", "0", "--feature-batch", "64", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fast / loader:" in text and "feature extraction:" in text and "loader (0 workers)" in text
    r = json.loads(out.read_text())
    assert r["fast"]["steps"] == r["loader"]["steps"] == 2
    for key in ("fast", "loader"):
        assert r[key]["images_per_s"] > 0 and torch.isfinite(torch.tensor(r[key]["final_loss"]))
        assert r[key]["peak_gpu_mib"] is None  # CPU
    assert r["ratio"] == pytest.approx(r["fast"]["images_per_s"] / r["loader"]["images_per_s"])
    assert r["features_images_per_s"] > 0 and r["device"].startswith("cpu")
    probe = r["probe"]  # linear@1's sweep on the untrained encoder's features of the 300-image subset
    assert probe["protocol"] == "linear@1" and probe["seconds"] > 0 and 0.1 < probe["test_top1"] <= 1
    assert probe["features"][1] == 32 and "linear@1 on " in text


def test_unknown_probe_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--probe", "linearr", "--device", "cpu"]) == 2
    assert "unknown protocol 'linearr' for --probe" in capsys.readouterr().err


def test_unknown_method_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--method", "simclrr", "--device", "cpu"]) == 2
    assert "unknown method 'simclrr'" in capsys.readouterr().err


@pytest.mark.parametrize("channels", [1, 3])
def test_reference_pipeline_matches_the_batched_views_in_shape_and_range(channels: int) -> None:
    spec = ViewSpec(size=12, blur_p=0.5, solarize_p=0.2)
    mean, std = (0.5,) * channels, (0.25,) * channels
    x = torch.randint(0, 256, (8, channels, 20, 20), dtype=torch.uint8)
    pipe = torchvision_view(spec, mean, std)
    ref = torch.stack([pipe(im) for im in x])
    ours = make_views(x, [spec], mean, std, torch.Generator().manual_seed(0))[0]
    assert ref.shape == ours.shape == (8, channels, 12, 12) and ref.dtype == ours.dtype == torch.float32
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25  # images in [0, 1], normalised
    for v in (ref, ours):
        assert v.min() >= lo - 1e-5 and v.max() <= hi + 1e-5
