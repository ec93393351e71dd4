"""Progress bars that fit where they go: live on a terminal, a plain line every few seconds
in logs and CI (no carriage-return spam)."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

# seconds between two lines when the output is a log file or a CI console, not a terminal
LOG_INTERVAL = 10.0


class _LineBar(tqdm):
    """tqdm that writes whole lines, each a status, at most every ``LOG_INTERVAL`` seconds,
    never the same status twice, and the final one when it closes."""

    monitor_interval = 0  # no monitor thread: it would print out of turn

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        last_n, last_time = getattr(self, "_line", (None, -float("inf")))
        final = self.total is not None and self.n >= self.total
        if self.n == last_n or (now - last_time < LOG_INTERVAL and not final):
            return True
        self._line = (self.n, now)
        self.fp.write((msg or self.__str__()).replace("\r", "").strip() + "\n")
        self.fp.flush()
        return True


class _WholeLines:
    """A stream that passes on whole status lines and drops tqdm's own bare "\n" and "\r"."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip("\r\n"):
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def bar(*, disable: bool = False, **kwargs: Any) -> tqdm:
    """A progress bar on stderr: live when stderr is a terminal, else a line every few seconds."""
    if disable or sys.stderr.isatty():
        return tqdm(disable=disable, **kwargs)
    kwargs["file"] = _WholeLines(kwargs.get("file") or sys.stderr)
    return _LineBar(mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, ascii=True, **kwargs)
