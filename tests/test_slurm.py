"""The grid on a real SLURM cluster through submitit (`bash scripts/slurm-local.sh up` brings one up on this
machine; `.ci/run` does, and checks `sinfo`, so in CI these never skip): a smoke grid end to end with one failing
cell per array (T10), an idempotent rerun (T9), a preempted pretraining that requeues and equals an uninterrupted
run (T1/T2 through SLURM), a killed array task, and a grid submitted from inside a job (T15)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pandas as pd
import pytest

from benchmark.run.executor import SlurmConfig, SubmititExecutor
from benchmark.run.runner import Request, plan, run, run_pretrain
from benchmark.run.status import grid_status
from tests.jobs import TINY, check_a_raising_and_a_killed_task_keep_the_others

# functions defined here run inside jobs, whose python cannot import this test module: ship them by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

HAVE_SLURM = shutil.which("sbatch") is not None and shutil.which("sacct") is not None
if not HAVE_SLURM and os.environ.get("SSLBENCH_REQUIRE_SLURM") == "1":
    raise RuntimeError("SSLBENCH_REQUIRE_SLURM=1 but sbatch/sacct are missing: the SLURM tests must run here")
pytestmark = pytest.mark.skipif(not HAVE_SLURM, reason="no SLURM here (bash scripts/slurm-local.sh up starts one)")

FAST = SlurmConfig(timeout_min=10, cpus_per_task=1, array_parallelism=4)


def _request(out: Path, protocols: tuple[str, ...], overrides: dict[str, Any]) -> Request:
    return Request(methods=("random", "simclr"), protocols=protocols, datasets=("digits",), seeds=(0,),
                   overrides=overrides, out=str(out), suite="test", progress=False)


def _executor(out: Path, cfg: SlurmConfig = FAST) -> SubmititExecutor:
    return SubmititExecutor("slurm", out / "slurm", cfg)


def test_a_grid_runs_on_slurm_one_failing_cell_per_array_and_a_rerun_submits_only_what_is_missing(tmp_path: Path) -> None:
    bad = {**TINY, "fewshot": {"dataset": "digits", "shots": [500], "episodes": 5}}  # 500-shot: fails inside the job
    lines: list[str] = []
    s = run(plan(_request(tmp_path, ("knn", "fewshot"), bad)), _executor(tmp_path), tmp_path, echo=lines.append, poll_s=0.5)
    assert s.done == 2 and sorted(s.failed) == ["random/digits/seed0 fewshot@1", "simclr/digits/seed0 fewshot@1"]
    assert any(line.startswith("submitted 2 pretraining jobs (slurm:") for line in lines), lines
    fails = pd.read_csv(tmp_path / "failures.csv")
    assert fails["flags"].str.contains("ConfigError").all() and fails["job_id"].astype(str).str.contains("_").all()
    assert all(Path(p).is_file() for p in fails["log"]), "each failure names its job's log file"
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    assert set(board.method) == {"random", "simclr"} and "digits/knn@1/top1" in board.columns
    ok = pd.read_csv(tmp_path / "results.csv").query("status == 'ok'")
    assert ok["job_id"].astype(str).str.match(r"^\d+_\d+$").all(), "rows carry the SLURM array job id"
    st = grid_status(tmp_path)
    assert sorted(st.state) == ["done", "done", "failed", "failed"]

    fixed = {**TINY, "fewshot": {"dataset": "digits", "shots": [5], "episodes": 5}}
    again = run(plan(_request(tmp_path, ("knn", "fewshot"), fixed)), _executor(tmp_path), tmp_path, echo=lines.append, poll_s=0.5)
    assert (again.skipped, again.done, again.failed) == (2, 2, [])  # only the two fewshot cells ran
    jobs = json.loads((tmp_path / "jobs.json").read_text())
    assert {k for k, v in jobs.items() if v["kind"] == "pretrain"} == {"random/digits/seed0", "simclr/digits/seed0"}
    assert not (tmp_path / "failures.csv").exists()
    third = run(plan(_request(tmp_path, ("knn", "fewshot"), fixed)), _executor(tmp_path), tmp_path, echo=lines.append, poll_s=0.5)
    assert (third.skipped, third.done) == (4, 0)  # nothing submitted
    assert set(grid_status(tmp_path).state) == {"done"}


def test_an_array_with_a_raising_and_a_killed_task_keeps_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit

    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "_results_timeout_s", 2)
    check_a_raising_and_a_killed_task_keep_the_others(_executor(tmp_path))


def _wait(cond: Any, what: str, timeout: float = 240) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_preempted_pretraining_requeues_resumes_and_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    ov = {**TINY, "pretrain": {**TINY["pretrain"], "epochs": 6, "checkpoint_every": 1}}
    tasks = {}
    for name in ("ref", "pre"):
        p = plan(Request(methods=("simclr",), protocols=("knn",), datasets=("digits",), seeds=(0,), overrides=ov,
                         out=str(tmp_path / name), suite="test", progress=False))
        tasks[name] = p.pretrain[0]
    ex = _executor(tmp_path)
    ref, pre = ex.map(run_pretrain, [tasks["ref"], tasks["pre"]], kind="pretrain")
    ckpts = Path(tasks["pre"].run_dir) / "checkpoints"
    _wait(lambda: any(ckpts.glob("epoch0001*.pt")), "the first epoch checkpoint")
    pre._job._interrupt()  # SIGTERM + USR2, as SLURM does before preempting: checkpoint and requeue
    assert pre.exception() is None and ref.exception() is None
    meta_ref, meta_pre = ref.result(), pre.result()
    assert meta_ref["attempts"] == 1 and meta_pre["attempts"] >= 2, meta_pre["attempts"]
    assert meta_pre["encoder_sha256"] == meta_ref["encoder_sha256"]  # bit-identical weights
    log = Path(pre.log).read_text() + Path(pre.log.replace(".err", ".out")).read_text()
    assert "Requeued" in log or "requeue" in log.lower(), log[-2000:]


def _submit_from_inside(folder: str) -> dict[str, str]:
    """Runs in a job: with fake parent variables set (as inside a DDP job array), submits a child job, which
    reports the variables it sees."""
    os.environ.update(SLURM_ARRAY_JOB_ID="999999", SLURM_FAKE_PARENT="1", MASTER_PORT="29999", RANK="3")
    ex = SubmititExecutor("slurm", Path(folder), FAST)
    (child,) = ex.map(_environ_of_child, [0])
    return dict(child.result(), parent=os.environ.get("SLURM_JOB_ID", ""))


def _environ_of_child(_: int) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "MASTER_", "RANK"))}


def test_jobs_submitted_from_inside_a_job_do_not_inherit_its_slurm_variables(tmp_path: Path) -> None:
    (parent,) = _executor(tmp_path, dataclasses.replace(FAST, cpus_per_task=1)).map(_submit_from_inside, [str(tmp_path / "child")])
    env = parent.result()
    assert env["parent"] and env.get("SLURM_JOB_ID") and env["SLURM_JOB_ID"] != env["parent"]
    assert env.get("SLURM_ARRAY_JOB_ID") != "999999" and "SLURM_FAKE_PARENT" not in env
    assert "MASTER_PORT" not in env and "RANK" not in env


def test_status_command_lists_cells(tmp_path: Path) -> None:
    run(plan(_request(tmp_path, ("knn",), TINY)), _executor(tmp_path), tmp_path, echo=lambda *a: None, poll_s=0.5)
    res = subprocess.run([sys.executable, "run_benchmark.py", "status", "--out", str(tmp_path), "--all"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent, check=False)
    assert res.returncode == 0, res.stderr
    assert "2 cells: 2 done, 0 skipped, 0 running, 0 pending, 0 waiting, 0 failed" in res.stdout
