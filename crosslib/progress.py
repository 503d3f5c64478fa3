"""Progress bars that stay small in executed notebooks and logs.

tqdm's notebook widget needs ipywidgets; without them a notebook kernel falls back on text bars,
and since a kernel's stderr is not a terminal, every redraw becomes text stored in the executed
notebook (hundreds of KB per chapter). `progress` is tqdm's text bar that, when its stream is not
a terminal, redraws at most every `NON_TERMINAL_INTERVAL` seconds: a long step still shows signs
of life, a short one prints its first and last state only.

    for item in progress(items, desc="caching"):
        ...
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.std import tqdm

NON_TERMINAL_INTERVAL = 30.0  # seconds between redraws off a terminal


def progress(iterable: Any = None, **options: Any) -> tqdm:
    """`tqdm(iterable, **options)` as a text bar, redrawn rarely when its stream is not a terminal."""
    stream = options.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        interval = max(float(options.get("mininterval", 0.1)), NON_TERMINAL_INTERVAL)
        # maxinterval too: tqdm's monitor thread otherwise forces a redraw every 10 s
        options.update(mininterval=interval, maxinterval=max(interval, float(options.get("maxinterval", 10.0))))
    return tqdm(iterable, **options)
