"""RELIABILITY.md T3 (atomic writes) and T4 (corrupt checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from benchmark.errors import CheckpointIntegrityError
from benchmark.store.checkpoints import CheckpointDir, load_verified
from benchmark.store.io import atomic_write_bytes


def _state(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((1000,), v), "step": torch.tensor(int(v))}


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "bitflip":  # the case plain torch.load misses: it loads, with different values
        b = bytearray(data)
        b[len(b) // 2] ^= 0x01
        path.write_bytes(bytes(b))


@pytest.mark.parametrize("how", ["truncate", "empty", "garbage", "bitflip"])
def test_corrupt_latest_falls_back_to_previous(tmp_path: Path, how: str) -> None:
    ck = CheckpointDir(tmp_path, keep=2)
    ck.save(_state(1.0), 1)
    latest = ck.save(_state(2.0), 2)
    _corrupt(latest, how)
    with pytest.raises(CheckpointIntegrityError, match=f"{latest.name}.*(sha256|cannot be read)"):
        load_verified(latest)
    state = ck.load_latest()
    assert state is not None and torch.equal(state["w"], _state(1.0)["w"])


def test_no_valid_checkpoint_raises_instead_of_restarting(tmp_path: Path) -> None:
    ck = CheckpointDir(tmp_path, keep=2)
    for e in (1, 2):
        _corrupt(ck.save(_state(float(e)), e), "truncate")
    with pytest.raises(CheckpointIntegrityError, match="no valid checkpoint"):
        ck.load_latest()
    assert CheckpointDir(tmp_path / "fresh").load_latest() is None


def test_missing_sidecar_is_not_trusted(tmp_path: Path) -> None:
    p = CheckpointDir(tmp_path).save(_state(1.0), 1)
    p.with_name(p.name + ".sha256").unlink()
    with pytest.raises(CheckpointIntegrityError, match="cannot verify"):
        load_verified(p)


def test_only_the_newest_k_are_kept(tmp_path: Path) -> None:
    ck = CheckpointDir(tmp_path, keep=2)
    for e in range(1, 5):
        ck.save(_state(float(e)), e)
    assert [p.name for p in ck.paths()] == ["epoch0004.pt", "epoch0003.pt"]


def test_failed_write_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "r.json"
    atomic_write_bytes(target, b"old complete")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old complete"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the temp file is cleaned up


def test_the_sidecar_exists_before_the_checkpoint_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18.11: a Ctrl-C between writing epoch0001.pt and its sidecar left a checkpoint that could not be verified,
    and the rerun failed ('no valid checkpoint'). An interrupted save now leaves no checkpoint at all."""
    from benchmark.store import checkpoints

    def interrupted(path: object, text: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "atomic_write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_verified({"w": torch.ones(2)}, tmp_path / "epoch0001.pt")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    checkpoints.save_verified({"w": torch.ones(2)}, tmp_path / "epoch0001.pt")
    assert torch.equal(checkpoints.load_verified(tmp_path / "epoch0001.pt")["w"], torch.ones(2))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Issue 18.12: every atomically written file was 0600 (mkstemp's mode), unreadable to a lab's group."""
    import os

    from benchmark.store.io import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.csv", "x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "results.csv").stat().st_mode & 0o777 == mode
