"""The runner writes each record's test predictions beside it (`<record>.samples.npz`), before the record, and every
stored set gives back its rows' values."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.run.runner import _write_samples
from benchmark.store.predictions import base_metric, load_samples, record_samples, rescore, single_label
from benchmark.store.results import Row, record_files, record_problems
from tests.conftest import run_cli

GRID = ["--suite", "smoke", "--datasets", "digits", "--methods", "random,simclr", "--protocols", "knn,linear,svm",
        "--seeds", "0", "--set", "data.image_size=16", "--set", "linear.grid_points=2", "--set", "svm.costs=[1.0]",
        "--set", "pretrain.epochs=1", "--no-report"]


@pytest.mark.slow
def test_every_record_of_a_grid_stores_predictions_that_rescore_its_rows(tmp_path: Path) -> None:
    r = run_cli(*GRID, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    files = record_files(tmp_path)
    assert len(files) == 6
    for path, record in files:
        assert record_problems(record) == []
        assert record["samples"]["file"] == path.name.replace(".json", ".samples.npz")
        samples = record_samples(record, path)
        tests = [row for row in record["rows"] if row["split"] == "test"]
        assert tests and set(samples) == {row["metric"] for row in tests}
        for row in tests:
            assert rescore(samples[row["metric"]], base_metric(row["metric"])) == pytest.approx(row["value"], abs=1e-6)
        kinds = {p.kind for p in samples.values()}
        assert kinds == ({"multilabel"} if "/svm@" in str(path) else {"single"})
    assert not [p for p in tmp_path.rglob("*.tmp")]
    # a rerun rewrites each record's predictions with it
    npz = sorted(tmp_path.rglob("*.samples.npz"))
    before = {p: p.stat().st_mtime_ns for p in npz}
    r = run_cli(*GRID, "--out", str(tmp_path), "--protocols", "knn", "--force")
    assert r.returncode == 0, r.stderr
    changed = {p for p in npz if p.stat().st_mtime_ns != before[p]}
    assert changed and all("/knn@" in str(p) for p in changed) and len(changed) == 2


def _rows() -> list[Row]:
    g = torch.Generator().manual_seed(0)
    a = single_label(torch.randn(40, 6, generator=g), torch.randint(0, 6, (40,), generator=g))
    b = single_label(torch.randn(40, 6, generator=g), torch.randint(0, 6, (40,), generator=g))
    return [Row("top1", rescore(a, "top1"), samples=a), Row("top5", rescore(a, "top5"), samples=a),
            Row("top1_1pct", rescore(b, "top1"), samples=b), Row("top1", 0.5, split="val")]


def test_shared_sets_are_written_once_and_a_record_without_samples_removes_the_old_file(tmp_path: Path) -> None:
    record = tmp_path / "r.json"
    entry = _write_samples(record, _rows())
    assert entry == {"samples": {"file": "r.samples.npz", "metrics": {"top1": "s0", "top5": "s0", "top1_1pct": "s1"}}}
    stored = load_samples(tmp_path / "r.samples.npz")
    assert set(stored) == {"s0", "s1"} and np.array_equal(stored["s1"].y, _rows()[2].samples.y)  # type: ignore[union-attr]
    assert _write_samples(record, [Row("AP", 0.3)]) == {}
    assert not (tmp_path / "r.samples.npz").exists()


def test_predictions_that_cannot_be_written_cost_only_the_paired_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    import benchmark.run.runner as runner

    def full(path: Path, data: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "save_samples", full)
    with caplog.at_level(logging.WARNING):
        assert _write_samples(tmp_path / "r.json", _rows()) == {}
    assert "not written" in caplog.text
