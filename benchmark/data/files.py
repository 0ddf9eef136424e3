"""Content fingerprints of file-based datasets: the path, size and sha256 of every file, so that a changed byte anywhere
changes the fingerprint. Hashes are cached by (path, size, mtime) in one SQLite file under the cache root, so a second
run over ImageNet's 140 GB reads nothing but the directory entries."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmark.errors import DatasetError
from benchmark.store.checkpoints import sha256_file


def cache_root() -> Path:
    """Where generated data and caches are written once: `$SSLBENCH_CACHE`, else ~/.cache/sslbench."""
    return Path(os.environ.get("SSLBENCH_CACHE") or "~/.cache/sslbench").expanduser()


class _HashCache:
    """(absolute path, size, mtime_ns) -> sha256, in SQLite (safe for concurrent processes: WAL, retried writes).
    An unusable cache file (read-only home, a corrupt database) means hashing without a cache, never a failure."""

    def __init__(self, path: Path) -> None:
        self.db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), timeout=60)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS h (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, sha TEXT)")
        except (OSError, sqlite3.Error):
            self.db = None

    def get(self, keys: Sequence[tuple[str, int, int]]) -> dict[str, str]:
        if self.db is None:
            return {}
        found: dict[str, str] = {}
        try:
            for i in range(0, len(keys), 500):
                part = keys[i : i + 500]
                q = f"SELECT path, size, mtime, sha FROM h WHERE path IN ({','.join('?' * len(part))})"
                want = {p: (s, m) for p, s, m in part}
                for p, s, m, sha in self.db.execute(q, [p for p, _, _ in part]):
                    if want.get(p) == (s, m):
                        found[p] = sha
        except sqlite3.Error:
            return {}
        return found

    def put(self, rows: Sequence[tuple[str, int, int, str]]) -> None:
        if self.db is None or not rows:
            return
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO h VALUES (?, ?, ?, ?)", rows)
        except sqlite3.Error:
            pass


def fingerprint_files(paths: Sequence[str], root: Path, extra: str = "", progress: bool = False, threads: int = 8) -> str:
    """sha256 prefix over (path relative to `root`, size, sha256) of every file in `paths` (sorted), and `extra`
    (e.g. the class list and the labels). Files unchanged since they were last hashed are not read again."""
    from tqdm import tqdm

    files = sorted(set(paths))
    keys = []
    for p in files:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise DatasetError(f"{p} is listed by the dataset but missing; restore it or fix the file list") from None
        keys.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    cache = _HashCache(cache_root() / "file-sha256.sqlite")
    known = cache.get(keys)
    todo = [k for k in keys if k[0] not in known]
    if todo:
        with ThreadPoolExecutor(max(1, threads)) as pool, \
                tqdm(total=len(todo), desc="hashing dataset files", unit="file", disable=None if progress and len(todo) >= 1000 else True) as bar:
            new = []
            for k, sha in zip(todo, pool.map(lambda k: sha256_file(Path(k[0])), todo)):  # hashlib releases the GIL
                known[k[0]] = sha
                new.append((*k, sha))
                bar.update()
                if len(new) >= 10_000:
                    cache.put(new)
                    new = []
            cache.put(new)
    h = hashlib.sha256(extra.encode())
    base = os.path.abspath(root)
    for p, size, _ in keys:
        h.update(f"{os.path.relpath(p, base)}\0{size}\0{known[p]}\n".encode())
    return h.hexdigest()[:16]
