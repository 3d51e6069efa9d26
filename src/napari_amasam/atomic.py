"""Atomic file writes with the user's file mode.

Every file the package writes goes to a temporary sibling ``.<name>.<random>.tmp``, is
flushed to disk and renamed over the target, so a kill at any moment leaves either the old
or the new file, never half of one. ``tempfile.mkstemp`` creates its file with mode 0600;
the finished file gets ``0666 & ~umask`` instead, as ``open()`` would give it, so a model
folder or an export on a shared drive is readable by whoever the user's umask allows.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

#: Name pattern of the temporary files made here (``.<target name>.<random>.tmp``).
TEMP_FILE_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (threads run)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no read-only query elsewhere: set and restore at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode a new regular file gets from ``open()``: ``0666 & ~umask``."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None], fsync: bool = True) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it.

    The temporary file is removed if ``write`` or the rename fails (or is interrupted).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, file_mode())
        os.close(fd)
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_can_create(path: str | Path) -> None:
    """Raise ``OutputError`` if ``path`` (a file or folder, made later) cannot be created:
    its nearest existing ancestor is a file or is not writable."""
    from .errors import OutputError

    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: folder is not writable (permission denied)")


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder``; return what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.is_file() and TEMP_FILE_PATTERN.match(entry.name):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
