"""The grid runner: failures stay in their cell (T10), divergence ends in a status (T7), OOM back-off (T8)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from benchmark.data.sets import ImageSet
from benchmark.errors import NotApplicable
from benchmark.evaluate.encoder import FrozenEncoder, extract_features
from benchmark.registry import PROTOCOLS
from benchmark.run.executor import LocalExecutor
from benchmark.run.runner import Request, plan, run
from tests.conftest import run_cli

TINY = {"data": {"image_size": 16}, "pretrain": {"backbone": "convnet_tiny", "epochs": 1, "batch_size": 64},
        "linear": {"grid_points": 2}, "simclr": {"proj_hidden_dim": 32, "proj_dim": 16}}


def _request(out: Path, **kw: Any) -> Request:
    base = dict(methods=("random", "simclr"), protocols=("knn", "linear"), datasets=("digits",), seeds=(0,),
                overrides=TINY, out=str(out), suite="test", progress=False)
    return Request(**{**base, **kw})


def test_a_failing_cell_is_recorded_and_its_neighbours_survive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> list[object]:
        raise ValueError("bad protocol argument")

    entry = PROTOCOLS.entry("linear")
    monkeypatch.setitem(PROTOCOLS._entries, "linear", dataclasses.replace(entry, obj=boom))
    summary = run(plan(_request(tmp_path)), LocalExecutor(), tmp_path, echo=lambda *a: None)
    assert summary.done == 2 and len(summary.failed) == 2
    fails = pd.read_csv(tmp_path / "failures.csv")
    assert set(fails.protocol) == {"linear"} and fails["flags"].str.contains("ValueError: bad protocol argument").all()
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert "digits/knn@1/top1" in board.columns and not any("linear" in c for c in board.columns)
    monkeypatch.undo()  # fixed: the rerun runs only the failed cells and clears the failure
    again = run(plan(_request(tmp_path)), LocalExecutor(), tmp_path, echo=lambda *a: None)
    assert again.skipped == 2 and again.done == 2 and not again.failed
    assert not (tmp_path / "failures.csv").exists()
    assert "digits/linear@1/top1" in pd.read_csv(tmp_path / "leaderboard.csv").columns


def test_a_cell_that_does_not_apply_is_skipped_not_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def grey(*args: object) -> list[object]:
        raise NotApplicable("needs 3-channel images; digits has 1")

    entry = PROTOCOLS.entry("linear")
    monkeypatch.setitem(PROTOCOLS._entries, "linear", dataclasses.replace(entry, obj=grey))
    summary = run(plan(_request(tmp_path)), LocalExecutor(), tmp_path, echo=lambda *a: None)
    assert summary.done == 2 and not summary.failed and len(summary.not_applicable) == 2
    assert all("needs 3-channel images" in line for line in summary.not_applicable)
    assert not (tmp_path / "failures.csv").exists()
    df = pd.read_csv(tmp_path / "results.csv")
    assert set(df[df.protocol == "linear"].status) == {"skipped"}
    again = run(plan(_request(tmp_path)), LocalExecutor(), tmp_path, echo=lambda *a: None)
    assert again.skipped == 4 and again.done == 0  # finished: not retried


def test_divergence_is_a_status_without_metrics(tmp_path: Path) -> None:
    r = run_cli("--suite", "smoke", "--datasets", "digits", "--set", "data.image_size=16", "--set", "pretrain.optimizer=sgd",
                "--set", "pretrain.lr=1e30", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "diverged (no metrics): simclr/digits/seed0 knn@1" in r.stdout
    df = pd.read_csv(tmp_path / "results.csv")
    assert df.status.tolist() == ["diverged"] and df.value.isna().all()
    assert pd.read_csv(tmp_path / "failures.csv").status.tolist() == ["diverged"]
    assert "simclr" not in pd.read_csv(tmp_path / "leaderboard.csv").get("method", pd.Series(dtype=str)).tolist()


class OOMAbove(nn.Module):
    """Raises CUDA-style OOM for batches larger than `limit` (T8)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.calls, self.dim = limit, 0, 16
        self.lin = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return self.lin(x.flatten(1))


def test_feature_extraction_halves_the_batch_on_oom() -> None:
    images = ImageSet(torch.randint(0, 255, (200, 1, 4, 4), dtype=torch.uint8), torch.zeros(200, dtype=torch.long))
    enc = FrozenEncoder(OOMAbove(32), 16, (0.5,), (0.25,), key="oom", batch_size=256)
    feats = extract_features(enc, images)
    assert enc.effective_batch_size == 32
    ref = FrozenEncoder(enc.module, 16, (0.5,), (0.25,), key="ref", batch_size=32)
    torch.testing.assert_close(feats, extract_features(ref, images))
    with pytest.raises(RuntimeError, match="OOM at feature-extraction batch 1"):
        extract_features(FrozenEncoder(OOMAbove(0), 16, (0.5,), (0.25,), key="x"), images)


def test_non_oom_errors_are_not_retried() -> None:
    class Broken(OOMAbove):
        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            raise RuntimeError("shape mismatch")

    m = Broken(0)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        extract_features(FrozenEncoder(m, 16, (0.5,), (0.25,), key="b"), ImageSet(torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)))
    assert m.calls == 1


def test_a_pretrain_at_method_section_overrides_only_that_method(tmp_path: Path) -> None:
    ov = {**TINY, "pretrain@simclr": {"lr": 0.7, "epochs": 3}}
    tasks = {t.method: t for t in plan(_request(tmp_path, overrides=ov)).pretrain}
    assert (tasks["simclr"].pretrain.lr, tasks["simclr"].pretrain.epochs) == (0.7, 3)
    assert tasks["random"].pretrain.epochs == 1 and tasks["random"].pretrain.lr != 0.7
    base = {t.method: t for t in plan(_request(tmp_path)).pretrain}
    assert base["simclr"].pretrain_hash != tasks["simclr"].pretrain_hash  # a changed setting is a new run
    assert base["random"].pretrain_hash == tasks["random"].pretrain_hash
    with pytest.raises(Exception, match="unknown config section 'pretrain@simclrr'"):
        plan(_request(tmp_path, overrides={**TINY, "pretrain@simclrr": {"lr": 0.7}}))


def test_a_method_whose_encoder_is_not_the_backbone_is_evaluated(tmp_path: Path) -> None:
    """CMC's encoder is its two halves side by side: evaluation rebuilds `encoder()`, not the bare backbone."""
    ov = {**TINY, "cmc": {"feat_dim": 16}}
    summary = run(plan(_request(tmp_path, methods=("cmc",), protocols=("knn",), overrides=ov)), LocalExecutor(), tmp_path,
                  echo=lambda *a: None)
    assert summary.done == 1 and not summary.failed


def test_a_job_that_returns_without_a_valid_record_counts_as_failed_and_is_rerun(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """T15: the task swallows its own error and returns normally, writing nothing."""
    import benchmark.run.runner as runner

    monkeypatch.setattr(runner, "run_eval", lambda task: {"status": "ok", "rows": []})
    summary = run(plan(_request(tmp_path)), LocalExecutor(), tmp_path, echo=lambda *a: None)
    assert summary.done == 0 and len(summary.failed) == 4
    fails = pd.read_csv(tmp_path / "failures.csv")
    assert fails["flags"].str.contains("without a valid result file").all()
    monkeypatch.undo()
    again = run(plan(_request(tmp_path)), LocalExecutor(), tmp_path, echo=lambda *a: None)
    assert again.done == 4 and again.skipped == 0 and not again.failed


@pytest.mark.parametrize("content", ['{"status": "ok"}', '{"status": "ok", "rows": []}', '[1, 2]', '"ok"',
                                     '{"status": "ok", "rows": [{"config_hash": "someone-else"}]}'])
def test_a_record_without_rows_of_its_cell_is_not_done(tmp_path: Path, content: str) -> None:
    """Issue 18 item 4: a record edited to `{"status": "ok"}` counted as done (the method vanished from the tables);
    a record that is a JSON list crashed the rerun with a traceback. Both are rerun now."""
    req = _request(tmp_path, methods=("random",), protocols=("knn",))
    first = run(plan(req), LocalExecutor(), tmp_path, echo=lambda *_: None)
    assert first.done == 1
    (task,) = plan(req).evals
    Path(task.record_path).write_text(content)
    again = run(plan(req), LocalExecutor(), tmp_path, echo=lambda *_: None)
    assert (again.done, again.skipped, again.failed) == (1, 0, [])
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert list(board["method"]) == ["random"]


def test_a_rerun_never_shows_another_configurations_numbers(tmp_path: Path) -> None:
    """Issue 18.1: smoke, then `--set knn.k=5`, then smoke again: each configuration keeps its own number and row."""
    args = ("--suite", "smoke", "--datasets", "digits", "--no-progress", "--out", str(tmp_path))

    def board() -> dict[str, str]:
        table = pd.read_csv(tmp_path / "leaderboard.csv", dtype=str).set_index("method")
        return table[[c for c in table.columns if c.endswith("/top1")]].loc["simclr"].to_dict()

    assert run_cli(*args).returncode == 0
    (first,) = board().values()
    r = run_cli(*args, "--set", "knn.k=5")
    assert r.returncode == 0, r.stderr
    second = board()
    assert second == {"digits/knn@1/top1": first, "digits/knn@1 [k=5]/top1": second["digits/knn@1 [k=5]/top1"]}
    r = run_cli(*args)
    assert r.returncode == 0 and "0 cells done, 1 reused" in r.stdout, r.stdout
    assert board() == second
    df = pd.read_csv(tmp_path / "results.csv").query("metric == 'top1'")
    assert df["config_hash"].nunique() == 2 and df["setting"].nunique() == 2 and df["pretrain_setting"].nunique() == 1
    assert sorted(df["protocol_variant"].fillna("")) == ["", "knn.k=5"] and df["variant"].isna().all()


@pytest.mark.parametrize("overrides, variant", [
    ({"pretrain": {"epochs": 0}}, "pretrain.epochs=0"),
    ({"pretrain": {"backbone": "pixels"}}, "pretrain.backbone=pixels"),
    ({"knn": {"k": 5}, "simclr": {"temperature": 0.3}}, "simclr.temperature=0.3 | knn.k=5"),
    ({"knn": {"k": 20}}, " | "),  # the suite's own value: not a variant
])
def test_a_cell_is_labelled_by_what_it_changes_from_the_suite(tmp_path: Path, overrides: dict[str, Any], variant: str) -> None:
    """Issue 18.5: an untrained encoder or the pixels baseline never reads as the method's result."""
    from benchmark import config as C

    base = {**TINY, "knn": {"k": 20}}
    req = _request(tmp_path, methods=("simclr",), protocols=("knn",), overrides=C.merge(base, overrides), base_overrides=base)
    (task,) = plan(req).evals
    assert f"{task.pretrain.variant} | {task.variant}".strip(" |") == variant.strip(" |")
    seeds = plan(dataclasses.replace(req, seeds=(0, 1))).evals
    assert len({t.setting for t in seeds}) == 1 and len({t.config_hash for t in seeds}) == 2
    assert len({t.pretrain.setting for t in seeds}) == 1


def test_nan_weights_are_not_a_changed_encoder_and_inf_features_are_no_result() -> None:
    """Issue 18.3: `torch.equal(nan, nan)` is False, which blamed the protocol; features of inf weights scored chance."""
    from benchmark.errors import NonFiniteError
    from benchmark.run.runner import _same

    nan = torch.tensor([1.0, float("nan")])
    assert _same(nan, nan.clone()) and not _same(nan, torch.tensor([2.0, float("nan")]))
    assert not _same(nan, torch.tensor([1.0, 0.0])) and _same(torch.arange(3), torch.arange(3))
    inf = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    nn.init.constant_(inf[1].weight, float("inf"))
    enc = FrozenEncoder(inf, 4, (0.0,), (1.0,), key="inf")
    images = ImageSet(torch.full((6, 1, 4, 4), 7, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
    with pytest.raises(NonFiniteError, match=r"features of 6 of 6 images \(x\) are inf or NaN"):
        extract_features(enc, images, name="x")


def test_absurd_learning_rates_end_diverged_not_on_the_leaderboard(tmp_path: Path) -> None:
    """Issue 18.2: at lr 1e6 only byol was `diverged`; simclr, simsiam and supervised kept finite losses (supervised
    3e16, or weights at inf) and reached the leaderboard at chance, flagged collapsed."""
    r = run_cli("--suite", "smoke", "--datasets", "digits", "--methods", "simclr,simsiam,supervised", "--no-progress",
                "--set", "pretrain.lr=1e6", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    fails = pd.read_csv(tmp_path / "failures.csv").set_index("method")
    assert sorted(fails.index) == ["simclr", "simsiam", "supervised"] and set(fails.status) == {"diverged"}
    assert "beyond the method's bound" in fails.loc["supervised", "flags"]
    assert not (tmp_path / "leaderboard.csv").read_text().strip("method\n")


def test_a_full_disk_costs_only_what_cannot_be_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18.10: on a full disk the run died writing a failure record; the finished encoders were never evaluated
    and no table was left. Now a failure record that cannot be written is skipped (the rerun retries the cell), a
    feature cache that cannot be written is recomputed, and tables that cannot be written are one line."""
    from benchmark.run import runner
    from benchmark.store import features as store_module

    def boom(*args: object) -> list[object]:
        raise ValueError("bad protocol argument")

    def disk_full(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    def torch_save_full(*args: object, **kw: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 896 vs 790")  # what torch.save raises

    monkeypatch.setitem(PROTOCOLS._entries, "linear", dataclasses.replace(PROTOCOLS.entry("linear"), obj=boom))
    monkeypatch.setattr(runner, "failed_record", disk_full)
    monkeypatch.setattr(store_module, "atomic_save", torch_save_full)
    summary = run(plan(_request(tmp_path)), LocalExecutor(), tmp_path, echo=lambda *a: None)
    assert summary.done == 2 and len(summary.failed) == 2  # both kNN cells evaluated after the first failure
    assert not list((tmp_path / "runs").rglob("features/*/*.npy")) and not list(tmp_path.rglob("*.tmp"))
    assert "digits/knn@1/top1" in pd.read_csv(tmp_path / "leaderboard.csv").columns
    monkeypatch.setattr(runner, "rebuild", disk_full)
    with pytest.raises(runner.TablesNotWritten, match=r"could not be written \(No space left on device\); free space and "
                       r"rerun the same command: 0 finished cells are kept"):
        run(plan(_request(tmp_path)), LocalExecutor(), tmp_path, echo=lambda *a: None)


def test_one_command_at_a_time_per_out_and_status_tells_a_dead_run(tmp_path: Path) -> None:
    """Issue 18.14: two commands on one --out both ran the same cells; status could not tell a dead run from a live one."""
    import subprocess
    import sys

    from benchmark.errors import ConfigError
    from benchmark.run.lock import holding, last_run

    with holding(tmp_path):
        assert last_run(tmp_path).startswith("last run: running (pid ")
        with pytest.raises(ConfigError, match=r"another sslbench command is running on .* \(pid \d+ on .*\); wait for it"):
            run(plan(_request(tmp_path)), LocalExecutor(), tmp_path, echo=lambda *a: None)
    assert last_run(tmp_path).startswith("last run: finished at ")
    # a command killed while it holds the lock: the OS frees the lock, run.json still says running
    code = ("import sys, os; from pathlib import Path; from benchmark.run.lock import holding\n"
            f"with holding(Path({str(tmp_path)!r})):\n    os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3]).returncode == 9
    assert last_run(tmp_path).startswith("last run: ended without finishing (pid ")
    assert "rerun the same command to resume" in last_run(tmp_path)
    with holding(tmp_path):  # and the next command may take it
        pass
