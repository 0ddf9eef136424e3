"""Atomic file writes: a reader sees the old complete file or the new complete file, never a part."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success fsync it and `os.replace` it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make shared results unreadable to the group
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def atomic_save(path: str | Path, save: Callable[[Path], None]) -> None:
    """Atomically write a file produced by `save(tmp_path)` (e.g. `lambda p: torch.save(obj, p)`)."""
    with atomic_path(path) as tmp:
        save(tmp)


def is_temp(path: Path) -> bool:
    """True for the leftovers of an interrupted atomic write; readers skip them."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _probe(folder: Path) -> None:
    """Create and remove a file in `folder` (raises OSError where nothing can be written there)."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".sslbench-probe-")
    os.close(fd)
    os.unlink(name)


def check_writable_dir(path: str | Path, flag: str) -> None:
    """Make `path` a folder files can be written to, or raise ConfigError in one line naming `flag` (--out)."""
    from benchmark.errors import ConfigError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        _probe(p)
    except OSError as e:
        raise ConfigError(f"{flag} {p} cannot be written ({e.strerror or e}); pass a folder you can write to") from None


def check_writable_file(path: str | Path, flag: str) -> None:
    """Check that a file can be written at `path` (its folder created if missing), or raise ConfigError in one line."""
    from benchmark.errors import ConfigError

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder; pass a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        _probe(p.parent)
    except OSError as e:
        raise ConfigError(f"{flag} {p} cannot be written ({e.strerror or e}); pass a path you can write to") from None


def remove_stale_temps(root: str | Path, older_than_s: float = 3600.0) -> int:
    """Delete the temporary files of interrupted atomic writes under `root` (a SIGKILL between write and rename leaves
    them) that are older than `older_than_s` (a younger one may belong to a job still writing). Returns how many."""
    import time

    cutoff, n = time.time() - older_than_s, 0
    for p in Path(root).rglob(".*.tmp"):
        try:
            if is_temp(p) and p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
                n += 1
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return n
