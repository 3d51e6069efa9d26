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


class OutputError(AmaSamError):
    """An output file or folder cannot or must not be written (the message names it)."""


def describe_os_error(exc: OSError, path: str | Path | None = None) -> str:
    """One line for a failed file operation: ``"<path>: <what went wrong>"``.

    The path is the one the operating system reports, else ``path``.
    """
    where = exc.filename if exc.filename is not None else path
    problem = os_error_problem(exc)
    return f"{where}: {problem}" if where is not None else problem


def os_error_problem(exc: OSError) -> str:
    """What went wrong in words (disk full, permission denied, ...), without the path."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        problem = "disk full (no space left on the device)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        problem = "permission denied"
    elif exc.errno == errno.EROFS:
        problem = "read-only file system"
    elif exc.errno == errno.ENOENT:
        problem = "no such file or folder"
    elif exc.errno == errno.EISDIR:
        problem = "is a folder, not a file"
    elif exc.errno == errno.ENOTDIR:
        problem = "a part of this path is a file, not a folder"
    else:
        problem = exc.strerror or str(exc) or type(exc).__name__
    return problem
