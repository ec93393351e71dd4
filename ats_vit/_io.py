"""Files written whole or not at all: a crash, a full disk or Ctrl-C leaves the old file (or
none), never half of a new one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["default_mode", "write_atomic", "write_text_atomic"]


def write_atomic(path: str | Path, write: Callable[[IO[Any]], object], binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file in ``path``'s folder (a name of this process's
    own), flush and fsync it, then move it over ``path`` in one step (``os.replace``). On any
    failure the temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, default_mode())  # mkstemp makes it private; the file is an ordinary output
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def default_mode() -> int:
    """The permissions a file created here would get (0o666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda file: file.write(text))
