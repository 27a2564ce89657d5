"""Progress a person can follow, on a terminal and in a log file.

On a terminal `progress` is a tqdm bar. When stderr is not a terminal (output sent to a file, a
job scheduler, CI) tqdm would print nothing useful (a bar redrawn with carriage returns, or no
bar at all when disabled), so the same bar is written as a plain line every LOG_SECONDS
instead: a long run leaves a readable log. The rate, and so the time left, is the average since
the start (smoothing 0): on a shared machine a momentary rate makes the estimate jump.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm

LOG_SECONDS = 30.0  # seconds between progress lines when stderr is not a terminal


class _Lines:
    """A file-like object that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, desc: str, total: float | None = None,
             unit: str = "it", leave: bool = True, stream=None, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal, a line every LOG_SECONDS otherwise (see the module docstring).

    `stream` (default sys.stderr) is where it writes; the other keywords go to tqdm.
    """
    stream = sys.stderr if stream is None else stream
    common = dict(desc=desc, total=total, unit=unit, smoothing=0, **kwargs)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, file=stream, leave=leave, **common)
    return tqdm(iterable, file=_Lines(stream), mininterval=LOG_SECONDS, maxinterval=LOG_SECONDS,
                ncols=100, ascii=True, leave=True, **common)
