"""Checkpoints written atomically with a sha256 sidecar, loaded safely, newest valid first."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch

from benchmark.errors import CheckpointIntegrityError
from benchmark.store.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_verified(obj: Any, path: Path) -> str:
    """`torch.save` to a temporary file, write `<path>.sha256` atomically, then move the file into place; returns the
    hash. The sidecar exists before the file does, so an interrupted save never leaves a file that cannot be verified."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        digest = sha256_file(tmp)
        atomic_write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")
    return digest


def verify(path: Path) -> str:
    """Check `path` against its sidecar; returns the hash or raises `CheckpointIntegrityError`."""
    side = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise CheckpointIntegrityError(f"checkpoint {path} does not exist")
    if not side.is_file():
        raise CheckpointIntegrityError(f"checkpoint {path} has no {side.name}: cannot verify it")
    expected = side.read_text().split()[0] if side.read_text().strip() else ""
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointIntegrityError(f"checkpoint {path} is corrupt: sha256 {actual[:16]}… expected {expected[:16]}…")
    return actual


def load_verified(path: Path) -> Any:
    """Verify, then `torch.load(weights_only=True)`; any failure names the file."""
    verify(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointIntegrityError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None


_EPOCH = re.compile(r"^epoch(\d+)\.pt$")


class CheckpointDir:
    """`epochNNNN.pt` files in one folder; keeps the newest `keep`."""

    def __init__(self, folder: Path, keep: int = 2) -> None:
        self.folder = folder
        self.keep = keep

    def paths(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _EPOCH.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict[str, Any], epoch: int) -> Path:
        path = self.folder / f"epoch{epoch:04d}.pt"
        save_verified(state, path)
        for old in self.paths()[self.keep :]:
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        return path

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that verifies; None if there are none at all.

        Corrupt checkpoints are skipped with a warning. If checkpoints exist but none verifies, this
        raises rather than silently restarting from scratch.
        """
        paths = self.paths()
        errors = []
        for p in paths:
            try:
                state = load_verified(p)
            except CheckpointIntegrityError as e:
                log.warning("%s; falling back to an older checkpoint", e)
                errors.append(str(e))
                continue
            return dict(state)
        if paths:
            raise CheckpointIntegrityError(
                f"no valid checkpoint in {self.folder} ({'; '.join(errors)}); delete the folder or rerun with --force to start over"
            )
        return None
