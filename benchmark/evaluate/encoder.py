"""The frozen `Encoder` every protocol receives, and cached feature extraction.

Protocols never see an architecture: they call `extract_features(encoder, images)` or, for
fine-tuning, `encoder.trainable_copy()` (a deep copy, so the registered encoder stays frozen).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from benchmark.data.sets import Images, Splits
from benchmark.device import is_oom
from benchmark.errors import NonFiniteError
from benchmark.store.features import SHARD_ROWS, FeatureStore

log = logging.getLogger(__name__)


class Encoder(Protocol):
    dim: int
    mean: tuple[float, ...]  # per-channel input normalisation (in [0, 1] units) the encoder expects
    std: tuple[float, ...]

    def features(self, x: Tensor) -> Tensor: ...  # (N, dim); eval mode, no grad

    def trainable_copy(self) -> nn.Module: ...  # for fine-tuning protocols only


@dataclass
class FrozenEncoder:
    """Wraps a backbone: eval mode, no gradients; inputs are uint8 images, normalised here.

    Args:
        module: maps normalised (N, C, H, W) float images to (N, dim).
        dim: feature width.
        mean, std: per-channel normalisation (in [0, 1] units) applied to uint8 inputs.
        key: identifies the weights (e.g. the checkpoint sha256) for the feature cache.
        device: where features are computed.
    """

    module: nn.Module
    dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    key: str
    layer: str = "out"  # which representation `module` returns (part of the feature-cache key)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache_dir: Path | None = None  # on-disk feature cache (shared by every protocol of a run)
    memo: dict[str, Tensor] = field(default_factory=dict)  # in-process feature cache
    batch_size: int = 512  # feature-extraction batch (eval mode: features do not depend on it)
    effective_batch_size: int | None = None  # set by extract_features (after any OOM back-off)
    feature_dtype: str = "float32"  # what features are rounded to and stored as ("float16" halves the store)
    shard_rows: int = SHARD_ROWS  # rows per feature-store shard (the unit a killed extraction resumes from)

    def __post_init__(self) -> None:
        self.module.eval().requires_grad_(False).to(self.device)

    @property
    def cache_key(self) -> str:
        """Weights hash + layer + input transform: features cached under it are this encoder's."""
        t = hashlib.sha256(repr((self.layer, self.mean, self.std)).encode()).hexdigest()[:8]
        dtype = "" if self.feature_dtype == "float32" else f"-{self.feature_dtype}"
        return f"{self.key}-{self.layer}-{t}{dtype}"

    def normalise(self, x: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> normalised float on the encoder's device."""
        x = x.to(self.device, non_blocking=True).float().div_(255)
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)  # in place: one float copy of the batch, not three (224 px batches are large)

    @torch.inference_mode()
    def features(self, x: Tensor) -> Tensor:
        self.module.eval()
        amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            f: Tensor = self.module(self.normalise(x))
        return f.float()

    def trainable_copy(self) -> nn.Module:
        m = copy.deepcopy(self.module)
        return m.train().requires_grad_(True)


def _finite(features: Tensor, name: str) -> Tensor:
    """`features`, or NonFiniteError: a protocol scoring inf/NaN features reports chance accuracy as a result."""
    bad = int((~torch.isfinite(features)).any(dim=1).sum()) if features.numel() else 0
    if bad:
        raise NonFiniteError(f"the encoder's features of {bad} of {len(features)} images{f' ({name})' if name else ''} are "
                             "inf or NaN: its weights overflowed (pretraining diverged) or the checkpoint holds inf/NaN")
    return features


def split_features(encoder: Encoder, data: Splits) -> dict[str, tuple[Tensor, Tensor]]:
    """{"train" | "val" | "test": (features (N, dim), labels (N,))}, extracted once per encoder."""
    return {
        split: (extract_features(encoder, images, name=f"{data.fingerprint}-{split}"), images.y)
        for split, images in (("train", data.train), ("val", data.val), ("test", data.test))
    }


def _extract(encoder: Encoder, images: Images, rows: range, bs: int) -> Tensor:
    """Features of images[rows] (float32, CPU), halving the batch on out-of-memory (eval mode: the batch does not
    change them); the batch used is stored in `encoder.effective_batch_size`."""
    while True:
        try:
            batches = [torch.arange(i, min(i + bs, rows.stop)) for i in range(rows.start, rows.stop, bs)]
            pin = getattr(encoder, "device", torch.device("cpu")).type == "cuda"
            parts = [encoder.features(xb).cpu() for xb in images.loader(batches, pin=pin)]
            out = torch.cat(parts) if parts else torch.zeros(0, encoder.dim)
            break
        except RuntimeError as e:
            if not is_oom(e) or bs == 1:
                if is_oom(e):
                    raise RuntimeError(f"OOM at feature-extraction batch 1: {e}") from e
                raise
            bs = max(1, bs // 2)
            log.warning("out of memory during feature extraction; retrying with batch %d", bs)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if hasattr(encoder, "effective_batch_size"):
        encoder.effective_batch_size = bs
    return out


def extract_features(encoder: Encoder, images: Images, batch_size: int | None = None, name: str = "") -> Tensor:
    """Features of all `images` as a (N, dim) float32 CPU tensor (rounded through `encoder.feature_dtype`).

    With a `cache_dir` and a `name` (dataset fingerprint + split), features go to a `FeatureStore` under the
    encoder's `cache_key` (weights, layer, transform, dtype): content-addressed, shared by every protocol, extracted
    shard by shard (a killed extraction resumes at its first missing shard). A store that cannot be written (a full
    disk) costs a recomputation next time, not the cell.
    """
    memo: dict[str, Tensor] | None = getattr(encoder, "memo", None)
    key = f"{getattr(encoder, 'cache_key', '')}-{name}"  # the memo is shared by an encoder's layers (`at_layer`)
    if memo is not None and key in memo:
        return memo[key]
    bs = batch_size or int(getattr(encoder, "batch_size", 512))
    dtype = str(getattr(encoder, "feature_dtype", "float32"))
    store = _store_of(encoder, images, name)
    out = _stored(store, encoder, images, bs, name) if store is not None else None
    if out is None:
        out = _extract(encoder, images, range(len(images)), bs)
        if dtype != "float32":
            out = out.to(getattr(torch, dtype)).float()  # the numbers do not depend on whether a store is used
    _finite(out, name)
    if memo is not None and name:
        memo[key] = out
    return out


def _store_of(encoder: Encoder, images: Images, name: str) -> FeatureStore | None:
    cache_dir = getattr(encoder, "cache_dir", None)
    if cache_dir is None or not name:
        return None
    return FeatureStore(Path(cache_dir) / f"{getattr(encoder, 'cache_key', 'enc')}-{name}", len(images), encoder.dim,
                        str(getattr(encoder, "feature_dtype", "float32")), int(getattr(encoder, "shard_rows", SHARD_ROWS)))


def extract_shards(encoder: Encoder, images: Images, name: str, part: int, parts: int) -> int:
    """Extract only the shards k ≡ `part` (mod `parts`) of the store `extract_features` would fill, so that `parts`
    processes (SLURM array tasks, GPUs) share one extraction; the one that finds every shard valid writes the
    manifest. Returns the number of shards written."""
    store = _store_of(encoder, images, name)
    if store is None:
        raise ValueError("extract_shards needs an encoder with a cache_dir (the feature store) and a name")
    todo = store.todo(part, parts)
    for k in todo:
        store.write(k, _finite(_extract(encoder, images, store.rows(k), int(getattr(encoder, "batch_size", 512))), name))
    if not store.todo():  # every shard valid: this part was the last (a manifest already there is rewritten alike)
        store.finish()
    return len(todo)


def _stored(store: FeatureStore, encoder: Encoder, images: Images, bs: int, name: str) -> Tensor | None:
    """The store's features, extracting its missing shards first. A shard that cannot be written (a full disk) is
    kept in memory and the store is left incomplete; None where the store cannot be read at all (recompute)."""
    if store.manifest_matches():
        try:
            return store.load()  # one read of each shard, checked against its sidecar as it is read
        except (OSError, ValueError) as e:
            log.warning("feature store %s damaged (%s); extracting its bad shards again", store.path.name, e)
    todo = store.todo()
    if todo and len(todo) < store.n_shards:
        log.info("feature store %s: resuming, %d of %d shards to extract", store.path.name, len(todo), store.n_shards)
    kept: dict[int, Tensor] = {}
    for k in todo:
        f = _finite(_extract(encoder, images, store.rows(k), bs), name)
        if not kept:
            try:
                store.write(k, f)
                continue
            except (OSError, RuntimeError) as e:  # an optimisation: a full disk costs a recomputation next time, not the cell
                log.warning("feature store %s not written (%s); going on without it", store.path, e)
        kept[k] = f.to(getattr(torch, store.dtype)).float()  # what the shard would have held
    try:
        if not kept:
            store.finish()
        return store.load(kept)
    except (OSError, ValueError) as e:
        log.warning("feature store %s unreadable (%s); going on without it", store.path, e)
        return None
