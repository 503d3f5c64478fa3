"""Progress bars that stay small in executed notebooks and logs.

tqdm's notebook widget needs ipywidgets; without them a notebook kernel falls back on text bars,
and since a kernel's stderr is not a terminal, every redraw becomes text stored in the executed
notebook (hundreds of KB per chapter). `progress` is tqdm's text bar that, when its stream is not
a terminal, redraws at most every `NON_TERMINAL_INTERVAL` seconds: a long step still shows signs
of life, a short one prints its first and last state only.

Every long loop has a bar, so each step of a bar is also where torch's thread count follows the
machine's load (`crosslib.runtime.follow_load`, a no-op unless an entry point turned it on).

    for item in progress(items, desc="caching"):
        ...
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.std import tqdm

from crosslib.runtime import follow_load

NON_TERMINAL_INTERVAL = 30.0  # seconds between redraws off a terminal
# `crosslib book` sets this to a file it follows: bars then go there as plain lines (which the runner
# prints on the terminal or log) instead of into the executed notebook
PROGRESS_LOG_ENV = "CROSSLIB_PROGRESS_LOG"
PROGRESS_LOG_INTERVAL = 10.0  # seconds between lines in that file


class _LineFile:
    """A stream for tqdm that appends each redraw to a file as one plain line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def flush(self) -> None:
        pass


class _Bar(tqdm):
    """tqdm's bar, letting the thread count follow the load at each step (also when the bar is disabled)."""

    def __iter__(self):
        for item in super().__iter__():
            follow_load()
            yield item

    def update(self, n: float | None = 1) -> bool | None:
        follow_load()
        return super().update(n)


def progress(iterable: Any = None, **options: Any) -> tqdm:
    """`tqdm(iterable, **options)` as a text bar, redrawn rarely when its stream is not a terminal."""
    log = os.environ.get(PROGRESS_LOG_ENV)
    if log and "file" not in options:
        options.update(file=_LineFile(log), mininterval=PROGRESS_LOG_INTERVAL, maxinterval=PROGRESS_LOG_INTERVAL,
                       ascii=True, ncols=100)
        return _Bar(iterable, **options)
    stream = options.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        interval = max(float(options.get("mininterval", 0.1)), NON_TERMINAL_INTERVAL)
        # maxinterval too: tqdm's monitor thread otherwise forces a redraw every 10 s
        options.update(mininterval=interval, maxinterval=max(interval, float(options.get("maxinterval", 10.0))))
    return _Bar(iterable, **options)
