"""Executors run task functions and hand back jobs; the runner only sees this interface.

- `local` (default): each task runs in this process when the runner first waits for it.
- `debug`: submitit's DebugExecutor: the same pickled submissions and log files as on SLURM, run in this
  process (for checking a grid's plumbing without a cluster).
- `slurm`: submitit's SLURM executor. Tasks go out as job arrays (one sbatch per batch, `array_parallelism`
  running at once); a preempted or timed-out job is requeued by submitit and its task resumes from its own
  checkpoints on disk (pretraining: the newest valid epoch checkpoint; evaluations rerun from the start).
  Submissions made from inside a SLURM job do not inherit that job's SLURM/distributed variables.

A job answers `done()` without blocking, and `exception()` / `result()` after waiting. A task's result is
also on disk (the runner checks the record file, not only what the job says).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from benchmark.config import check
from benchmark.errors import ConfigError, NotApplicable

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Job(Protocol[T_co]):
    job_id: str

    def done(self) -> bool: ...  # never blocks

    def result(self) -> T_co: ...  # waits; raises the task's exception

    def exception(self) -> BaseException | None: ...  # waits

    @property
    def log(self) -> str: ...  # where the job's output goes ("" when it is this process's)


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[Any], T], items: Sequence[Any], kind: str = "eval") -> list[Job[T]]: ...


def current_job_id() -> str:
    """The SLURM job (array task) this process runs in, or "local"."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return env.get("SLURM_JOB_ID", "local")


class LazyJob(Generic[T]):
    """A task run in this process the first time anyone waits for it; exceptions are kept, never lost."""

    log = ""

    def __init__(self, job_id: str, fn: Callable[[Any], T], item: Any) -> None:
        self.job_id = job_id
        self._fn, self._item = fn, item
        self._ran = False
        self._value: T | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        if not self._ran:
            self._ran = True
            try:
                self._value = self._fn(self._item)
            except Exception as e:  # noqa: BLE001 - recorded per cell; the grid goes on
                self._error = e

    def done(self) -> bool:
        self._run()  # local: nothing else would run it
        return True

    def result(self) -> T:
        self._run()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def exception(self) -> BaseException | None:
        self._run()
        return self._error


class LocalExecutor:
    """Runs each task in this process, one after the other, in the order the runner waits for them."""

    name = "local"

    def __init__(self) -> None:
        self._ids = itertools.count()

    def map(self, fn: Callable[[Any], T], items: Sequence[Any], kind: str = "eval") -> list[Job[T]]:
        return [LazyJob(f"local-{next(self._ids)}", fn, item) for item in items]


@dataclass(frozen=True)
class SlurmConfig:
    """What `--executor slurm` asks SLURM for. Pretraining jobs get `gpus_per_node` GPUs on each of `nodes`
    nodes with one task per GPU (DDP); evaluation jobs one task with one GPU (none when gpus_per_node is 0)."""

    partition: str | None = None  # --slurm-partition; None: the cluster's default
    account: str | None = None  # --slurm-account
    qos: str | None = None  # --slurm-qos
    gpus_per_node: int = 0  # --gpus-per-node (pretraining)
    nodes: int = 1  # --nodes (pretraining)
    cpus_per_task: int = 2  # --cpus-per-task
    mem_gb: float | None = None  # --mem-gb per node; None: the partition's default
    timeout_min: int = 60  # --timeout-min per job (a job at its limit is checkpointed and requeued)
    array_parallelism: int = 64  # --array-parallelism: array tasks running at once
    max_requeues: int = 3  # preemptions / timeouts a job may be requeued after
    extra: dict[str, Any] = field(default_factory=dict)  # --slurm-set KEY=VALUE: more sbatch options

    def __post_init__(self) -> None:
        check(self.gpus_per_node >= 0, f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        check(self.nodes >= 1, f"--nodes must be >= 1, got {self.nodes}")
        check(self.cpus_per_task >= 1, f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        check(self.mem_gb is None or self.mem_gb > 0, f"--mem-gb must be > 0, got {self.mem_gb}")
        check(self.timeout_min >= 1, f"--timeout-min must be >= 1, got {self.timeout_min}")
        check(self.array_parallelism >= 1, f"--array-parallelism must be >= 1, got {self.array_parallelism}")
        check(self.max_requeues >= 0, f"--max-requeues must be >= 0, got {self.max_requeues}")


class Requeueable:
    """A task function that submitit may checkpoint and requeue: on preemption or time-out it resubmits the
    same call, and the task resumes from what it saved on disk. (A subclass of submitit's Checkpointable is
    made lazily so that importing this module does not need submitit.)"""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, item: Any) -> Any:
        return self.fn(item)

    def checkpoint(self, item: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, item)


class RemoteTaskError(RuntimeError):
    """A task that raised inside a job: `remote_type` is its exception's class name, `str()` its message and
    `text` the job's whole report (remote traceback, log paths)."""

    def __init__(self, remote_type: str, message: str, text: str) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.text = text


_RAISED = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|NotApplicable)): (.*)$", re.MULTILINE)


def remote_error(err: BaseException) -> BaseException:
    """submitit's FailedJobError unwrapped to what the task raised (the last "Type: message" line of the remote
    traceback); NotApplicable stays NotApplicable so that the cell is recorded as skipped."""
    if type(err).__name__ != "FailedJobError":
        return err
    text = str(err)
    found = _RAISED.findall(text.split("has not produced any output")[0])
    if not found:
        return err
    name, message = found[-1]
    name = name.rsplit(".", 1)[-1]
    if name == "NotApplicable":
        return NotApplicable(message)
    return RemoteTaskError(name, message, text)


class SubmititJob(Generic[T]):
    """A submitit job behind the runner's Job interface."""

    def __init__(self, job: Any) -> None:
        self._job = job
        self.job_id = str(job.job_id)

    @property
    def log(self) -> str:
        return str(self._job.paths.stderr)

    def done(self) -> bool:
        if type(self._job).__name__ == "DebugJob":
            self._job.exception()  # runs it; done() would open pdb on a failure
            return True
        return bool(self._job.done())

    def exception(self) -> BaseException | None:
        try:
            err: BaseException | None = self._job.exception()  # waits; a killed job gives UncompletedJobError
        except Exception as e:  # noqa: BLE001 - e.g. a job that vanished from the queue
            err = e
        return None if err is None else remote_error(err)

    def result(self) -> T:
        err = self.exception()
        if err is not None:
            raise err
        value: T = self._job.result()
        return value


class SubmititExecutor:
    """`slurm` or `debug` through submitit; logs and pickles under `folder/<job id>/`."""

    def __init__(self, cluster: str, folder: Path, cfg: SlurmConfig | None = None, timeout_s: float | None = None) -> None:
        """cluster: "slurm", "debug" (in this process), or "local" (submitit's local subprocesses, with its time limit,
        USR2 signal and requeue as on SLURM: where the reliability tests run without a cluster). timeout_s: the
        local cluster's time limit in seconds (default cfg.timeout_min), signalled 2 s ahead."""
        import submitit

        self.name = cluster
        self.folder = Path(folder)
        self.cfg = cfg or SlurmConfig()
        self._executors: dict[str, Any] = {}
        for kind in ("pretrain", "eval"):
            ex: Any
            if cluster == "local":
                ex = submitit.LocalExecutor(folder=self.folder / "%j", max_num_timeout=self.cfg.max_requeues)
                ex.update_parameters(timeout_min=(timeout_s / 60) if timeout_s else self.cfg.timeout_min, signal_delay_s=2)
            else:
                ex = submitit.AutoExecutor(folder=self.folder / "%j", cluster=cluster, slurm_max_num_timeout=self.cfg.max_requeues)
                if cluster == "slurm":
                    ex.update_parameters(**self._parameters(kind))
            self._executors[kind] = ex

    def _parameters(self, kind: str) -> dict[str, Any]:
        c = self.cfg
        gpus = c.gpus_per_node if kind == "pretrain" else min(1, c.gpus_per_node)
        params: dict[str, Any] = dict(
            timeout_min=c.timeout_min, nodes=c.nodes if kind == "pretrain" else 1, tasks_per_node=max(1, gpus),
            cpus_per_task=c.cpus_per_task, slurm_array_parallelism=c.array_parallelism, name=f"sslbench-{kind}",
            slurm_signal_delay_s=min(120, 6 * c.timeout_min),
        )
        if gpus:
            params["gpus_per_node"] = gpus
        if c.mem_gb is not None:
            params["mem_gb"] = c.mem_gb
        for key, value in (("slurm_partition", c.partition), ("slurm_account", c.account), ("slurm_qos", c.qos)):
            if value:
                params[key] = value
        if c.extra:
            params["slurm_additional_parameters"] = dict(c.extra)
        return params

    def map(self, fn: Callable[[Any], T], items: Sequence[Any], kind: str = "eval") -> list[Job[T]]:
        import submitit

        if not items:
            return []
        # A grid launched from inside a job must not hand that job's SLURM_* / distributed variables to its
        # children (they would join the parent's allocation): submit with a clean environment.
        with submitit.helpers.clean_env():
            jobs = self._executors[kind].map_array(Requeueable(fn), list(items))
        return [SubmititJob(j) for j in jobs]


def make_executor(name: str, out: Path, slurm: SlurmConfig | None = None) -> Executor:
    """The executor called `name`; submitit's live under `out/slurm/`."""
    if name == "local":
        return LocalExecutor()
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ConfigError(f"--executor {name} needs submitit: `pip install submitit`") from None
    if name == "slurm":
        import shutil

        if shutil.which("sbatch") is None:
            raise ConfigError("--executor slurm: no `sbatch` on this machine; run from a SLURM login node "
                              "(or try it locally: `bash scripts/slurm-local.sh up`)")
    return SubmititExecutor(name, out / "slurm", slurm)


EXECUTORS = ("debug", "local", "slurm")
