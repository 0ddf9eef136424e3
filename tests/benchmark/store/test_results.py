"""Aggregation: duplicates, failures, divergence and NaN rows never leak into the leaderboard (T13)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmark.store.results import Row, leaderboard, rebuild, row_dict, write_record


def _rec(out: Path, name: str, method: str, seed: int, value: float, status: str = "ok", finished: str = "2026-01-01T00:00:01",
         protocol: str = "knn", version: str = "1", **prov_kw: str) -> None:
    prov = {"run_id": name, "method": method, "protocol": protocol, "protocol_version": version, "dataset": "digits",
            "seed": seed, "status": status, "finished_at": finished, "suite": "t", "backbone": "convnet", "device": "cpu",
            **prov_kw}
    write_record(out / "records" / f"{name}.json", {"status": status, "rows": [row_dict(Row("top1", value), prov)]})


GOLDEN = Path(__file__).parent / "golden"


def _mixed_records(tmp_path: Path) -> None:
    """Seeds, an older attempt, a failure, a divergence, another protocol version, a NaN value, half-written and
    broken files: every kind of row the tables must sort out."""
    for seed, v in enumerate([0.80, 0.82, 0.84]):
        _rec(tmp_path, f"a{seed}", "byol", seed, v)
    _rec(tmp_path, "old", "byol", 0, 0.10, finished="2025-01-01T00:00:00")  # an older attempt of seed 0
    _rec(tmp_path, "b0", "simclr", 0, 0.90)
    _rec(tmp_path, "b1", "simclr", 1, float("nan"), status="failed")
    _rec(tmp_path, "c0", "mocov2", 0, float("nan"), status="diverged")
    _rec(tmp_path, "v2", "simclr", 0, 0.5, protocol="knn", version="2")  # never mixed with @1
    (tmp_path / "records" / ".half.json.123.tmp").write_text('{"rows": [')  # an interrupted write
    (tmp_path / "records" / "broken.json").write_text('{"rows": [')
    _rec(tmp_path, "n0", "dino", 0, float("nan"))  # an "ok" row without a value: not a number on the board


def test_leaderboard_means_latest_attempts_and_excludes_failures(tmp_path: Path) -> None:
    _mixed_records(tmp_path)
    df, table = rebuild(tmp_path)
    assert df.duplicated(["method", "protocol", "protocol_version", "dataset", "seed", "split", "metric"]).sum() == 0
    board = table.set_index("method")
    assert board.loc["byol", "digits/knn@1/top1"] == "82.00 ± 2.00" and board.loc["byol", "n_seeds"] == 3
    assert board.loc["simclr", "digits/knn@1/top1"] == "90.00" and board.loc["simclr", "digits/knn@2/top1"] == "50.00"
    assert "mocov2" not in board.index
    assert list(table.method) == ["simclr", "byol"]  # ranked by the first column
    fails = pd.read_csv(tmp_path / "failures.csv")
    assert set(zip(fails.method, fails.status)) == {("simclr", "failed"), ("mocov2", "diverged")}
    assert "dino" not in board.index


@pytest.mark.parametrize("name", ["leaderboard.csv", "leaderboard.md", "failures.csv", "results.csv"])
def test_tables_match_the_golden_files_byte_for_byte(tmp_path: Path, name: str) -> None:
    """T13: the tables of `_mixed_records`, checked by eye once and kept in tests/benchmark/store/golden/. A change
    to a table's format or content fails here; regenerate with SSLBENCH_REGOLD=1 and review the diff."""
    import os

    _mixed_records(tmp_path)
    rebuild(tmp_path)
    got = (tmp_path / name).read_bytes()
    if os.environ.get("SSLBENCH_REGOLD"):
        GOLDEN.mkdir(exist_ok=True)
        (GOLDEN / name).write_bytes(got)
    assert got == (GOLDEN / name).read_bytes()


def test_configurations_keep_their_own_rows_and_are_never_averaged(tmp_path: Path) -> None:
    """Issue 18.1: results are keyed by the cell's config hash; the leaderboard averages seeds of one setting only."""
    common = dict(variant="", pretrain_setting="P")
    for seed, v in enumerate([0.50, 0.60]):  # the suite's configuration, two seeds
        _rec(tmp_path, f"d{seed}", "simclr", seed, v, config_hash=f"d{seed}", setting="S", **common)
    # a later run of the same method/protocol/dataset/seed under --set knn.k=5: a new cell, not a newer attempt
    _rec(tmp_path, "k0", "simclr", 0, 0.90, finished="2026-01-02T00:00:00", config_hash="k0", setting="K",
         protocol_variant="knn.k=5", **common)
    # the same encoder with an untrained pretraining: another row
    _rec(tmp_path, "e0", "simclr", 0, 0.20, config_hash="e0", setting="E", variant="pretrain.epochs=0", pretrain_setting="P0")
    # a code default changed between runs: same (empty) variant, another setting -> two rows, the older tagged
    _rec(tmp_path, "b0", "byol", 0, 0.10, config_hash="b0", setting="B0", variant="", pretrain_setting="aaaaaa1")
    _rec(tmp_path, "b1", "byol", 1, 0.30, config_hash="b1", setting="B1", variant="", pretrain_setting="bbbbbb1")
    # the same method from another suite is another row
    _rec(tmp_path, "o0", "mocov2", 0, 0.40, config_hash="o0", setting="M1", suite="smoke", **common)
    _rec(tmp_path, "o1", "mocov2", 0, 0.20, config_hash="o1", setting="M2", suite="default", **common)
    df, table = rebuild(tmp_path)
    assert len(df) == 8 and set(df["protocol_variant"].fillna("")) == {"", "knn.k=5"}
    board = table.set_index("method")
    assert list(board.columns[:2]) == ["digits/knn@1/top1", "digits/knn@1 [k=5]/top1"]
    assert board["digits/knn@1/top1"].to_dict() == {
        "simclr": "55.00 ± 7.07", "simclr [pretrain.epochs=0]": "20.00", "byol {aaaaaa}": "10.00", "byol": "30.00",
        "mocov2 (smoke)": "40.00", "mocov2 (default)": "20.00"}
    assert board.loc["simclr", "digits/knn@1 [k=5]/top1"] == "90.00"
    again = pd.read_csv(tmp_path / "results.csv")
    assert sorted(again.query("method == 'simclr' and seed == 0").value) == [0.2, 0.5, 0.9]


def test_empty_results_give_an_empty_leaderboard(tmp_path: Path) -> None:
    df, table = rebuild(tmp_path)
    assert df.empty and list(table.columns) == ["method"]
    assert leaderboard(df).empty


def _writer(out: str, worker: int, n: int) -> None:
    for i in range(n):
        _rec(Path(out), f"w{worker}-{i}", f"m{worker}", i, 0.5 + 0.01 * i)


def test_concurrent_writers_and_a_looping_aggregator_lose_nothing(tmp_path: Path) -> None:
    """T3(c): 8 processes write records while the tables are rebuilt over and over."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 5)) for w in range(8)]
    for p in procs:
        p.start()
    rebuilds = 0
    while any(p.is_alive() for p in procs) or rebuilds == 0:
        df, _ = rebuild(tmp_path)  # must never crash on files being written
        pd.read_csv(tmp_path / "results.csv")
        rebuilds += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    df, table = rebuild(tmp_path)
    assert len(df) == 40 and not list(tmp_path.rglob("*.tmp"))
    assert set(table.method) == {f"m{w}" for w in range(8)} and (table.n_seeds == 5).all()


def test_git_dirty_flags_new_plugin_files_but_not_generated_results(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from benchmark.store import provenance

    repo = tmp_path / "repo"
    (repo / "methods").mkdir(parents=True)
    (repo / "results").mkdir()
    (repo / "methods" / "a.py").write_text("x = 1\n")
    (repo / "results" / "leaderboard.csv").write_text("a\n")
    run = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    run("add", ".")
    run("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    monkeypatch.setattr(provenance, "REPO", repo)
    assert provenance.git_info()[1] is False
    (repo / "results" / "leaderboard.csv").write_text("b\n")  # a generated table changed: still clean
    assert provenance.git_info()[1] is False
    (repo / "methods" / "new.py").write_text("y = 2\n")  # an uncommitted plugin: dirty
    assert provenance.git_info()[1] is True  # issue 18.15: seen at once in the same process (it was cached)
