"""Errors with one-line, user-facing messages (the CLI prints them without a traceback)."""

from __future__ import annotations

from pathlib import Path


class AmaSamError(Exception):
    """Base class: the message is complete and meant for the user."""


class DataError(AmaSamError):
    """A data file or folder is unusable. ``str()`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class CheckpointError(AmaSamError):
    """A SAM checkpoint or model folder cannot be loaded."""


class DeviceError(AmaSamError):
    """A requested compute device is not available."""
