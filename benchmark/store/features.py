"""The on-disk feature store: the frozen features of one (encoder weights, layer, input transform, dataset fingerprint,
split, dtype) as shards of `shard_rows` rows in .npy files (memory-mappable), each followed by a sidecar holding its row
count, dtype and sha256, and a manifest written last.

A shard counts only when its bytes match its sidecar: a killed extraction resumes at the first missing or damaged shard
and never reads a partial one; the manifest (shapes, dtype, sha256 per shard) marks the store complete. Shards are
independent, so extraction can be spread over processes (`todo(part, parts)`). Reading converts shard by shard into
one float32 tensor, checking each shard's sha256 as it is read, so the peak is that tensor plus one shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmark.store.checkpoints import sha256_file
from benchmark.store.io import atomic_save, atomic_write_json

log = logging.getLogger(__name__)

SHARD_ROWS = 65_536  # ImageNet's 1.28M train images in 20 shards (268 MB each for 2048-d float16)
DTYPES = {"float16": np.float16, "float32": np.float32}


class FeatureStore:
    """Features (n, dim) of `dtype` ("float16" | "float32") under `path` (a folder)."""

    def __init__(self, path: Path, n: int, dim: int, dtype: str = "float32", shard_rows: int = SHARD_ROWS) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"feature dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        self.path, self.n, self.dim, self.dtype, self.shard_rows = Path(path), n, dim, dtype, max(1, shard_rows)

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n // self.shard_rows))

    def rows(self, k: int) -> range:
        return range(k * self.shard_rows, min(self.n, (k + 1) * self.shard_rows))

    def shard(self, k: int) -> Path:
        return self.path / f"shard-{k:05d}.npy"

    def _sidecar(self, k: int) -> Path:
        return self.path / f"shard-{k:05d}.json"

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    def _expected(self, k: int) -> dict[str, Any]:
        return {"rows": len(self.rows(k)), "dim": self.dim, "dtype": self.dtype, "first": self.rows(k).start}

    def _meta(self, k: int) -> dict[str, Any] | None:
        """Shard `k`'s sidecar when it matches what this store expects (None: missing, unreadable or another store's)."""
        try:
            meta = json.loads(self._sidecar(k).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or any(meta.get(key) != v for key, v in self._expected(k).items()):
            return None
        return meta

    def valid(self, k: int) -> bool:
        """Shard `k` is written whole: its sidecar matches what this store expects and the file's sha256."""
        meta = self._meta(k)
        try:
            return meta is not None and bool(meta.get("sha256") == sha256_file(self.shard(k)))
        except OSError:
            return False

    def todo(self, part: int = 0, parts: int = 1) -> list[int]:
        """The shards still to extract, of those assigned to `part` of `parts` (k ≡ part mod parts)."""
        return [k for k in range(part, self.n_shards, parts) if not self.valid(k)]

    def write(self, k: int, features: Tensor) -> None:
        """Shard `k` atomically, then its sidecar (a shard without a matching sidecar is recomputed)."""
        want = len(self.rows(k))
        if tuple(features.shape) != (want, self.dim):
            raise ValueError(f"shard {k} of {self.path} needs ({want}, {self.dim}) features, got {tuple(features.shape)}")
        self.path.mkdir(parents=True, exist_ok=True)
        self._sidecar(k).unlink(missing_ok=True)
        arr = features.detach().cpu().numpy().astype(DTYPES[self.dtype], copy=False)

        def save(p: Path) -> None:
            with open(p, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
                np.save(f, arr, allow_pickle=False)

        atomic_save(self.shard(k), save)
        atomic_write_json(self._sidecar(k), {**self._expected(k), "sha256": sha256_file(self.shard(k))})

    def finish(self) -> None:
        shards = []
        for k in range(self.n_shards):
            meta = json.loads(self._sidecar(k).read_text())
            shards.append({"file": self.shard(k).name, "rows": meta["rows"], "sha256": meta["sha256"]})
        atomic_write_json(self.manifest, {"n": self.n, "dim": self.dim, "dtype": self.dtype, "shard_rows": self.shard_rows,
                                          "shards": shards})

    def manifest_matches(self) -> bool:
        """The manifest exists and describes this store (the shards' bytes are not read: `complete`, `load` check them)."""
        try:
            m = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(m, dict) and (m.get("n"), m.get("dim"), m.get("dtype"), m.get("shard_rows")) == (
            self.n, self.dim, self.dtype, self.shard_rows)

    def complete(self) -> bool:
        return self.manifest_matches() and all(self.valid(k) for k in range(self.n_shards))

    def load_shard(self, k: int) -> Tensor:
        """Shard `k` as float32, its file read once and checked against its sidecar's sha256 on the way (ValueError
        when it does not match: damaged or from another store)."""
        meta = self._meta(k)
        data = self.shard(k).read_bytes()
        if meta is None or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise ValueError(f"{self.shard(k)} does not match its sidecar (damaged, or not written whole)")
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f))
        r = self.rows(k)
        if shape != (len(r), self.dim) or fortran or dtype != DTYPES[self.dtype]:
            raise ValueError(f"{self.shard(k)} holds {shape} {dtype}, its sidecar says ({len(r)}, {self.dim}) {self.dtype}")
        arr = np.frombuffer(data, dtype=dtype, offset=f.tell()).reshape(shape)  # no copy of the bytes
        return torch.from_numpy(arr.astype(np.float32))

    def load(self, computed: dict[int, Tensor] | None = None) -> Tensor:
        """All features as one float32 (n, dim) tensor, filled shard by shard, each read once and checked (or from
        `computed`, shards held in memory that could not be written). ValueError on a damaged shard."""
        out = torch.empty(self.n, self.dim, dtype=torch.float32)
        for k in range(self.n_shards):
            r = self.rows(k)
            out[r.start : r.stop] = computed[k] if computed and k in computed else self.load_shard(k)
        return out
