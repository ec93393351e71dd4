"""Progress bars that fit where they go: live on a terminal, a plain line every few seconds
in logs and CI (no carriage-return spam)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

# seconds between two lines when the output is a log file or a CI console, not a terminal
LOG_INTERVAL = 10.0


class _LineBar(tqdm):
    """tqdm that writes whole lines, each a status, at most every ``LOG_INTERVAL`` seconds."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        self.fp.write((msg or self.__str__()).strip() + "\n")
        self.fp.flush()
        return True


def bar(*, disable: bool = False, **kwargs) -> tqdm:
    """A progress bar on stderr: live when stderr is a terminal, else a line every few seconds."""
    if disable or sys.stderr.isatty():
        return tqdm(disable=disable, **kwargs)
    return _LineBar(mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, ascii=True, **kwargs)
