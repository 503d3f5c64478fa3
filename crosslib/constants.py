"""The one place for constants shared across crosslib: Pythia's checkpoint schedule and paths."""

from __future__ import annotations

import os
from pathlib import Path

# Pythia saves step0, then log-spaced steps 1, 2, 4, ..., 512, then every 1000 steps to 143000.
PYTHIA_LOG_STEPS: tuple[int, ...] = (0,) + tuple(2**k for k in range(10))
PYTHIA_FINAL_STEP = 143_000
PYTHIA_STEPS: tuple[int, ...] = PYTHIA_LOG_STEPS + tuple(range(1000, PYTHIA_FINAL_STEP + 1, 1000))


def pythia_schedule(total_steps: int, linear_every: int) -> list[int]:
    """Pythia's checkpoint schedule scaled to a run of `total_steps` steps.

    step 0, powers of two up to 512 (or up to total_steps), then every `linear_every` steps,
    always ending with `total_steps` itself.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if linear_every < 1:
        raise ValueError(f"linear_every must be >= 1, got {linear_every}")
    steps = {s for s in PYTHIA_LOG_STEPS if s <= total_steps}
    steps.update(range(linear_every, total_steps + 1, linear_every))
    steps.add(total_steps)
    return sorted(steps)


REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Root of crosslib's artifact cache: $CROSSLIB_DATA, else `data/` in the repository."""
    return Path(os.environ.get("CROSSLIB_DATA", REPO_ROOT / "data")).resolve()
