"""One command at a time per `--out`: an exclusive `flock` on `OUT/.lock`, held while a grid runs.

The operating system releases the lock when the process ends, however it ends (Ctrl-C, SIGKILL, a lost node), so
`OUT/run.json` (who ran, since when, whether it finished) together with the lock tells `status` whether the last
run is alive, finished, or died part-way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmark.errors import ConfigError
from benchmark.store.io import atomic_write_json
from benchmark.store.provenance import now


def _holder(out: Path) -> dict[str, Any]:
    try:
        info = json.loads((out / "run.json").read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _who(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started_at', '?')}"


@contextlib.contextmanager
def holding(out: Path) -> Iterator[None]:
    """Hold `out` for this command, or raise ConfigError naming the command that holds it."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another sslbench command is running on {out} ({_who(_holder(out))}); wait for it to "
                              "finish or pass another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now(), "argv": sys.argv[1:], "state": "running"}
        atomic_write_json(out / "run.json", info)
        yield
        atomic_write_json(out / "run.json", {**info, "state": "finished", "finished_at": now()})
    finally:
        f.close()  # releases the lock


def last_run(out: Path) -> str:
    """One line on the last command run into `out`: running, finished, or ended part-way (its lock is free)."""
    info = _holder(out)
    if not info:
        return ""
    lock = out / ".lock"
    alive = False
    if lock.is_file():
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                alive = True
    if alive:
        return f"last run: running ({_who(info)})"
    if info.get("state") == "finished":
        return f"last run: finished at {info.get('finished_at', '?')} ({_who(info)})"
    return (f"last run: ended without finishing ({_who(info)}; interrupted, killed or its machine lost): rerun the same "
            "command to resume")
