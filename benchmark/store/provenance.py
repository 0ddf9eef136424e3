"""Where a number came from: git commit, package versions, time."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]  # benchmark/store/provenance.py -> the checkout
CODE = ["benchmark", "methods", "protocols", "run_benchmark.py", "pyproject.toml"]


def git_info() -> tuple[str, bool]:
    """(commit sha or 'unknown', whether the code differs from it, untracked files included). Asked of git at each
    call (two quick commands), never cached: an edit or a commit during a long run shows in the rows after it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        # dirty: any change to the code, new plugin files included; generated results do not count
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    if sha.returncode != 0:
        return "unknown", False
    return sha.stdout.strip(), bool(dirty.stdout.strip())


def versions() -> dict[str, str]:
    import numpy
    import sklearn
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "sklearn": sklearn.__version__, "python": platform.python_version()}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
