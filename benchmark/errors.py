"""Harness errors: each one carries a single line telling the user what to do."""

from __future__ import annotations


class SSLBenchError(Exception):
    """Base class; the CLI prints `error: <message>` and exits with status 2."""


class ConfigError(SSLBenchError, ValueError):
    """A bad name, key, type or value in the configuration."""


class PluginError(SSLBenchError, ValueError):
    """A plugin registers itself wrongly: a malformed or duplicate name, a config that is not a dataclass, an
    unknown registration key."""


class DatasetError(SSLBenchError):
    """A dataset is missing, empty or corrupt."""


class CheckpointIntegrityError(SSLBenchError):
    """A checkpoint fails its sha256 check or cannot be read."""


class NotApplicable(SSLBenchError):
    """A method or protocol does not apply to this data (e.g. colourisation on grey-scale images).

    The cell is recorded with status `skipped` and the reason, not as a failure.
    """


class DivergedError(SSLBenchError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, last_finite: float | None) -> None:
        super().__init__(f"loss is not finite at step {step} (last finite loss: {last_finite})")
        self.step = step
        self.last_finite = last_finite


class NonFiniteError(SSLBenchError):
    """Weights or features hold inf or NaN: nothing computed from them is a result."""
