"""A method and a protocol added as files in a plugin folder run through the command line with no other edit: the
examples of docs/write-a-method.md and docs/write-a-protocol.md, as they stand there."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def example(doc: str) -> str:
    """The first python block after the heading "## An example" of `docs/<doc>`."""
    text = (REPO / "docs" / doc).read_text()
    after = text[text.index("## An example"):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)  # type: ignore[union-attr]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "run_benchmark.py", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("plugins")
    (d / "methods").mkdir()
    (d / "protocols").mkdir()
    (d / "methods" / "tiny_simsiam.py").write_text(example("write-a-method.md"))
    (d / "protocols" / "ncm.py").write_text(example("write-a-protocol.md"))
    return d


@pytest.mark.slow
def test_a_plugin_method_and_protocol_run_through_the_cli(plugin_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = cli("--plugins", str(plugin_dir), "--suite", "smoke", "--methods", "tiny_simsiam", "--protocols", "knn,ncm",
            "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [row for row in csv.DictReader((out / "results.csv").open()) if row["split"] == "test" and row["metric"] == "top1"]
    got = {row["protocol"]: float(row["value"]) for row in rows if row["method"] == "tiny_simsiam"}
    assert set(got) == {"knn", "ncm"}, rows
    assert all(0.2 < v <= 1 for v in got.values()), got  # 10 classes: chance is 0.1
    assert "tiny_simsiam" in (out / "leaderboard.md").read_text()
    # the tiny_simsiam section in its resolved config: the method ran with no suite entry, on its own defaults
    (config,) = (out / "runs" / "fashion_mnist" / "tiny_simsiam").glob("seed0-*/config.yaml")
    assert "tiny_simsiam:\n  dim: 64" in config.read_text()
    # the ncm number, recomputed by hand (numpy, no torch ops of the plugin) on the same encoder's features
    check = f"""
import json, sys
import numpy as np, torch
sys.path.insert(0, {str(REPO)!r})
from benchmark.run.cli import build_request, get_args_parser, load_plugins
from benchmark.run.runner import load_encoder, plan
from benchmark.data.datasets import load_splits
from benchmark.evaluate.encoder import extract_features
load_plugins([])
args = get_args_parser().parse_args(["--suite", "smoke", "--methods", "tiny_simsiam", "--protocols", "ncm", "--out", {str(out)!r}, "--device", "cpu"])
(task,) = plan(build_request(args)).evals
splits = load_splits(task.pretrain.dataset, task.pretrain.data)
enc = load_encoder(task.pretrain, splits, torch.device("cpu"), task.eval_cfg)
f = {{s: extract_features(enc, getattr(splits, s)).double().numpy() for s in ("train", "val", "test")}}
x = np.concatenate([f["train"], f["val"]]); y = np.concatenate([splits.train.y.numpy(), splits.val.y.numpy()])
x /= np.linalg.norm(x, axis=1, keepdims=True); q = f["test"] / np.linalg.norm(f["test"], axis=1, keepdims=True)
means = np.stack([x[y == c].mean(0) for c in range(splits.num_classes)])
pred = ((q[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
print(json.dumps(float((pred == splits.test.y.numpy()).mean())))
"""
    r = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "SSLBENCH_PLUGINS": str(plugin_dir)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert abs(json.loads(r.stdout.strip().splitlines()[-1]) - got["ncm"]) <= 1 / 500 + 1e-9  # one test image at most


def test_the_environment_variable_registers_plugins_too(plugin_dir: Path) -> None:
    r = cli("--list", env={"SSLBENCH_PLUGINS": str(plugin_dir)})
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line and not line.startswith(" "))
    assert "tiny_simsiam" in lines["methods"].split(", ") and "ncm@1" in lines["protocols"].split(", ")
    assert "tiny_simsiam" not in cli("--list").stdout  # nothing leaks into a plain run


@pytest.mark.parametrize("source, name, message", [
    ("from benchmark.registry import register_method\n"
     "@register_method('typo', backbone=('convnet',))\nclass Typo: ...\n", "typo.py",
     r"error: method 'typo': unknown registration key 'backbone'; did you mean 'backbones'\? "
     r"valid keys: backbones, pretrain, pretrain_fixed \(their meaning: benchmark.registry.METHODS\)"),
    ("from benchmark.registry import register_method\n@register_method('byol')\nclass Again: ...\n", "again.py",
     "error: method 'byol' is already registered"),
    ("", "simclr.py", "error: plugin .*simclr.py has the name of a built-in methods module; rename it"),
])
def test_a_bad_plugin_stops_with_one_line(tmp_path: Path, source: str, name: str, message: str) -> None:
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / name).write_text(source)
    r = cli("--plugins", str(tmp_path), "--suite", "smoke", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and re.fullmatch(message, r.stderr.strip()), r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_missing_plugin_folder_stops_with_one_line(tmp_path: Path) -> None:
    r = cli("--plugins", str(tmp_path / "nowhere"), "--list")
    assert r.returncode == 2 and r.stderr.strip() == f"error: --plugins {tmp_path / 'nowhere'}: not a folder " \
        "(it should hold methods/*.py and/or protocols/*.py)", r.stderr
    r = cli("--list", env={"SSLBENCH_PLUGINS": str(tmp_path / "nowhere")})
    assert r.returncode == 2 and r.stderr.strip().startswith("error: $SSLBENCH_PLUGINS names "), r.stderr
