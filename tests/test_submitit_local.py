"""T2, T10 and T15 through submitit's local cluster (subprocesses with submitit's time limit, USR2 signal and
requeue), so that they run where no SLURM is: tests/test_slurm.py runs the same on a real cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from benchmark.run.executor import SlurmConfig, SubmititExecutor
from benchmark.run.runner import Request, plan, run_pretrain
from tests.jobs import TINY, check_a_raising_and_a_killed_task_keep_the_others

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the functions below run inside jobs


def test_t10_an_array_with_a_raising_and_a_killed_task_keeps_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit

    monkeypatch.setattr(submitit.local.local.LocalJob, "_results_timeout_s", 2)
    check_a_raising_and_a_killed_task_keep_the_others(SubmititExecutor("local", tmp_path / "jobs", SlurmConfig(timeout_min=5)))


def test_t2_a_pretraining_at_its_time_limit_is_requeued_and_equals_an_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs inherit it: one core each, so an epoch's time is predictable
    # 200 epochs of about 0.15 s (2 cores, 2026-12-03): more than one 15 s attempt even on a machine twice as fast,
    # and within the 20 requeues on one half as fast
    ov = {**TINY, "pretrain": {**TINY["pretrain"], "epochs": 200, "checkpoint_every": 1}}
    tasks = [plan(Request(methods=("simclr",), protocols=("knn",), datasets=("digits",), seeds=(0,), overrides=ov,
                          out=str(tmp_path / name), suite="test", progress=False)).pretrain[0] for name in ("ref", "limited")]
    # the reference through the same kind of job (the same thread settings), without a time limit that it reaches
    (ref_job,) = SubmititExecutor("local", tmp_path / "ref-jobs", SlurmConfig(timeout_min=10)).map(run_pretrain, [tasks[0]], kind="pretrain")
    ex = SubmititExecutor("local", tmp_path / "jobs", SlurmConfig(max_requeues=20), timeout_s=15)  # USR2 at 13 s
    (job,) = ex.map(run_pretrain, [tasks[1]], kind="pretrain")
    assert job.exception() is None and ref_job.exception() is None
    meta, ref = job.result(), ref_job.result()
    assert ref["attempts"] == 1
    assert meta["attempts"] >= 2, meta["attempts"]  # the time limit was reached at least once
    assert meta["encoder_sha256"] == ref["encoder_sha256"]  # resumed from its checkpoints: bit-identical weights
    log = Path(job.log).read_text() + Path(job.log.replace(".err", ".out")).read_text()
    assert "Requeued" in log or "requeue" in log.lower(), log[-2000:]


def _submit_from_inside(folder: str) -> dict[str, str]:
    """Runs in a job: with fake parent variables set (as inside a SLURM array or a DDP job), submits a child job."""
    os.environ.update(SLURM_ARRAY_JOB_ID="999999", SLURM_JOB_ID="424242", SUBMITIT_FAKE_PARENT="1", MASTER_PORT="29999", RANK="3")
    (child,) = SubmititExecutor("local", Path(folder), SlurmConfig(timeout_min=5)).map(_environ_of_child, [0])
    return child.result()


def _environ_of_child(_: int) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "SUBMITIT_FAKE", "MASTER_", "RANK"))}


def test_t15_a_job_submitted_from_inside_a_job_does_not_inherit_its_variables(tmp_path: Path) -> None:
    (parent,) = SubmititExecutor("local", tmp_path / "parent", SlurmConfig(timeout_min=5)).map(_submit_from_inside, [str(tmp_path / "child")])
    env: dict[str, Any] = parent.result()
    assert not [k for k in env if k.startswith(("SLURM_", "SUBMITIT_FAKE"))], env  # nothing of the fake parent leaked
    assert "MASTER_PORT" not in env and "RANK" not in env
