"""The on-disk feature store (issue 19): shards with sidecars and a manifest; a killed extraction resumes shard by shard
and ends equal to an uninterrupted one; a damaged shard is recomputed, never read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmark.data.sets import ImageSet
from benchmark.evaluate.encoder import FrozenEncoder, extract_features
from benchmark.store.features import FeatureStore
from tests.conftest import REPO

IMAGES = ImageSet(torch.randint(0, 256, (50, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8),
                  torch.zeros(50, dtype=torch.long))


class Slow(torch.nn.Module):
    """A fixed random projection that sleeps per batch (so a kill lands mid-extraction)."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return x.flatten(1) @ self.w


def _encoder(cache: Path, delay: float = 0.0, dtype: str = "float16") -> FrozenEncoder:
    return FrozenEncoder(Slow(delay), 16, (0.5,), (0.25,), key="w", cache_dir=cache, batch_size=5, feature_dtype=dtype, shard_rows=10)


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_store_is_shards_sidecars_and_a_manifest_and_reads_back_what_was_extracted(tmp_path: Path) -> None:
    f = extract_features(_encoder(tmp_path), IMAGES, name="fp-train")
    plain = extract_features(_encoder(None), IMAGES, name="fp-train")  # type: ignore[arg-type]
    assert torch.equal(f, plain)  # the store changes nothing: fp16 rounding is applied with or without it
    ref = (IMAGES.x.float().div(255).sub(0.5).div(0.25)).flatten(1) @ Slow().w.detach()
    assert torch.equal(f, ref.half().float())
    (d,) = tmp_path.iterdir()
    names = sorted(p.name for p in d.iterdir())
    assert names == ["manifest.json"] + [f"shard-{k:05d}.{e}" for k in range(5) for e in ("json", "npy")]
    store = FeatureStore(d, 50, 16, "float16", 10)
    assert store.complete() and torch.equal(store.load(), f)
    shard = store.shard(3)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    assert not store.complete() and store.todo() == [3]
    assert torch.equal(extract_features(_encoder(tmp_path), IMAGES, name="fp-train"), f) and store.complete()  # recomputed


def test_a_killed_extraction_resumes_and_ends_equal_to_an_uninterrupted_one(tmp_path: Path) -> None:
    extract_features(_encoder(tmp_path / "whole"), IMAGES, name="fp-train")
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, {!r}); sys.path.insert(0, {!r})\n"
        "from tests.benchmark.store.test_features import IMAGES, _encoder\n"
        "from benchmark.evaluate.encoder import extract_features\n"
        "extract_features(_encoder(Path({!r}), delay=0.3), IMAGES, name='fp-train')\n"
    ).format(str(REPO), str(REPO), str(tmp_path / "killed"))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while len(list((tmp_path / "killed").glob("*/shard-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (d,) = (tmp_path / "killed").iterdir()
    written = len(list(d.glob("shard-*.json")))
    assert 2 <= written < 5 and not (d / "manifest.json").exists()
    store = FeatureStore(d, 50, 16, "float16", 10)
    assert store.todo() == list(range(written, 5))
    resumed = extract_features(_encoder(tmp_path / "killed"), IMAGES, name="fp-train")
    (w,) = (tmp_path / "whole").iterdir()
    assert _files(d) == _files(w) and torch.equal(resumed, FeatureStore(w, 50, 16, "float16", 10).load())


def test_extraction_can_be_split_over_processes_by_shard() -> None:
    store = FeatureStore(Path("/nonexistent"), 95, 4, "float32", 10)
    parts = [store.todo(p, 3) for p in range(3)]
    assert sorted(k for part in parts for k in part) == list(range(10)) and parts[1] == [1, 4, 7]
    assert store.rows(9) == range(90, 95)
