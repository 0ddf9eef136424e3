"""What the submitit tests (tests/test_slurm.py on a real SLURM, tests/test_submitit_local.py on submitit's local
cluster) share: a tiny pretraining config and the array of T10 (RELIABILITY.md). Functions here run inside jobs,
whose python cannot import the tests: this module is shipped by value."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = {"data": {"image_size": 16}, "pretrain": {"backbone": "convnet_tiny", "epochs": 1, "batch_size": 64, "deterministic": True},
        "simclr": {"proj_hidden_dim": 32, "proj_dim": 16}}


def square_or_fail(x: int) -> int:
    """Cell 1 raises, cell 2 is SIGKILLed, the others return x²."""
    if x == 1:
        raise ValueError(f"bad cell {x}")
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def check_a_raising_and_a_killed_task_keep_the_others(executor: Any) -> None:
    """T10 on `executor`: an array of 4 where one task raises and one is killed keeps the two others."""
    jobs = executor.map(square_or_fail, [0, 1, 2, 3])
    errors = [j.exception() for j in jobs]  # collected one by one, never [j.result() for j in jobs]
    assert errors[0] is None and errors[3] is None and (jobs[0].result(), jobs[3].result()) == (0, 9)
    assert getattr(errors[1], "remote_type", "") == "ValueError" and str(errors[1]) == "bad cell 1"
    assert errors[2] is not None and type(errors[2]).__name__ in ("UncompletedJobError", "FailedJobError")
    assert all(Path(j.log).parent.is_dir() for j in jobs)
