"""Error types raised by the library. Only app.py and the CLI turn them into UI messages."""

from __future__ import annotations


class TunerError(Exception):
    """A problem the user can fix; the message says what and how, in plain words."""


class DataError(TunerError):
    """Bad input data. Names the file and the 1-based line (or row) when known."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None):
        self.file = file
        self.line = line
        where = ""
        if file:
            where = f"{file}, line {line}: " if line else f"{file}: "
        super().__init__(where + message)


class ModelError(TunerError):
    """A base model or adapter could not be found or loaded."""


class TrainingError(TunerError):
    """A training run could not start, or failed, with advice on what to change."""


class MachineBusy(TrainingError):
    """Another training job holds this machine (one job at a time); queue the run instead (tuner.jobs.submit)."""


class NotYourRun(TrainingError):
    """Someone tried to cancel a job that another person started."""


class RunNotFound(TunerError):
    """A run id that does not name a run folder (also raised for unsafe ids)."""
