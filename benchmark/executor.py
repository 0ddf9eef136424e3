"""Executors run task functions and hand back jobs; the runner only sees this interface.

The local executor runs each task in this process, one after the other. A cluster executor (SLURM
through submitit) implements the same two methods.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Job(Protocol[T_co]):
    job_id: str

    def result(self) -> T_co: ...  # raises the task's exception

    def exception(self) -> BaseException | None: ...


class Executor(Protocol):
    name: str

    def submit(self, fn: Callable[..., T], *args: Any) -> Job[T]: ...


class FinishedJob(Generic[T]):
    """A job that already ran: holds its value or its exception."""

    def __init__(self, job_id: str, value: T | None, error: BaseException | None) -> None:
        self.job_id = job_id
        self._value = value
        self._error = error

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def exception(self) -> BaseException | None:
        return self._error


class LocalExecutor:
    """Runs each task now, in this process. Exceptions are kept in the job, never lost."""

    name = "local"

    def __init__(self) -> None:
        self._ids = itertools.count()

    def submit(self, fn: Callable[..., T], *args: Any) -> FinishedJob[T]:
        job_id = f"local-{next(self._ids)}"
        try:
            return FinishedJob(job_id, fn(*args), None)
        except Exception as e:  # noqa: BLE001 - recorded per cell; the grid goes on
            return FinishedJob(job_id, None, e)


EXECUTORS: dict[str, Callable[[], Executor]] = {"local": LocalExecutor}
