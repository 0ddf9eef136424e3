"""Shared fixtures: tiny real data (scikit-learn digits, a Fashion-MNIST subset) and tiny configs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import benchmark.run.suites  # noqa: F401  (registers the named suites)
import methods  # noqa: F401
import protocols  # noqa: F401
from benchmark.config import DataConfig, PretrainConfig
from benchmark.data.datasets import load_splits
from benchmark.data.sets import Splits

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> Splits:
    """1347 train / 450 test real 8x8 digits, resized to 16 px."""
    return load_splits("digits", DataConfig(image_size=16))


@pytest.fixture(scope="session")
def fmnist_small() -> Splits:
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return load_splits("fashion_mnist", DataConfig(train_size=1000, test_size=500, image_size=16))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: tiny models gain nothing from a second one on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_cfg() -> PretrainConfig:
    return PretrainConfig(backbone="convnet_tiny", epochs=2, batch_size=64, lr=0.05, deterministic=True)


def run_cli(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run `run_benchmark.py` as a user would, in a subprocess."""
    e = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "run_benchmark.py"), "--no-progress", *args],
                          cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
