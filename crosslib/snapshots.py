"""Loading pre-training snapshots: a local folder of `step{N}/` checkpoints or a hub repo.

One code path serves both. A *suite* is either

* a local directory holding `step{N}/` Hugging Face checkpoints (what `crosslib.suite` trains), or
* a Hugging Face repo id such as ``EleutherAI/pythia-70m-deduped`` whose revisions are named
  ``step{N}`` (Pythia's convention), loaded with ``transformers`` from the hub or its local cache.

    model, tokenizer = load_snapshot("data/suite/<key>", 512)
    model, tokenizer = load_snapshot("EleutherAI/pythia-70m-deduped", 1000)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from crosslib.artifacts import read_json, sha256_file
from crosslib.constants import PYTHIA_STEPS

STEP_DIR = re.compile(r"^step(\d+)$")
CHECKSUMS_FILE = "checksums.json"


class SnapshotError(RuntimeError):
    """A snapshot cannot be found or loaded; the message says what to do instead."""


def is_local_suite(suite: str | os.PathLike) -> bool:
    return Path(suite).is_dir()


def step_dir(suite: str | os.PathLike, step: int) -> Path:
    return Path(suite) / f"step{step}"


def _hub_cache_dir() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def _cached_hub_steps(repo_id: str, cache_dir: str | os.PathLike | None) -> list[int]:
    """Revisions `step{N}` that the local Hugging Face cache knows for `repo_id`."""
    refs = Path(cache_dir or _hub_cache_dir()) / ("models--" + repo_id.replace("/", "--")) / "refs"
    if not refs.is_dir():
        return []
    return sorted(int(m.group(1)) for p in refs.iterdir() if (m := STEP_DIR.match(p.name)))


def list_steps(suite: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> list[int]:
    """The training steps available in `suite`, ascending."""
    if is_local_suite(suite):
        steps = sorted(
            int(m.group(1)) for p in Path(suite).iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
        )
        if not steps:
            raise SnapshotError(f"suite={str(suite)!r} is a folder without any step{{N}}/ checkpoints")
        return steps
    repo_id = str(suite)
    if "/" not in repo_id:
        raise SnapshotError(
            f"suite={repo_id!r} is neither an existing folder of step{{N}}/ checkpoints nor a hub id like "
            "'EleutherAI/pythia-70m-deduped'"
        )
    steps = _cached_hub_steps(repo_id, cache_dir)
    if not os.environ.get("HF_HUB_OFFLINE"):
        try:
            from huggingface_hub import list_repo_refs

            branches = list_repo_refs(repo_id).branches
            steps = sorted({*steps, *(int(m.group(1)) for b in branches if (m := STEP_DIR.match(b.name)))})
        except Exception:  # offline or unknown repo: fall back on what we know
            pass
    if not steps and repo_id.startswith("EleutherAI/pythia"):
        steps = list(PYTHIA_STEPS)
    if not steps:
        raise SnapshotError(f"found no step{{N}} revisions for suite={repo_id!r} (offline and not in the local cache)")
    return steps


def check_step(suite: str | os.PathLike, step: int, *, cache_dir: str | os.PathLike | None = None) -> None:
    available = list_steps(suite, cache_dir=cache_dir)
    if step not in available:
        raise SnapshotError(f"step={step!r} is not in suite {str(suite)!r}: available steps are {available}")


def suite_fingerprint(suite: str | os.PathLike, steps: list[int] | None = None) -> str:
    """A hash of the weights' identity: local checksums per step, or the hub repo and revisions.

    Artifacts derived from snapshots (caches, metrics) use it in their key, so retraining a suite
    in the same folder invalidates them while moving the folder does not.
    """
    from crosslib.config import content_hash

    steps = list_steps(suite) if steps is None else list(steps)
    if is_local_suite(suite):
        identity = {}
        for step in steps:
            sums = step_dir(suite, step) / CHECKSUMS_FILE
            identity[step] = sha256_file(sums) if sums.is_file() else str(step_dir(suite, step).resolve())
        return content_hash({"local": identity})
    return content_hash({"hub": str(suite), "revisions": [f"step{s}" for s in steps]})


def _verify_local_checkpoint(path: Path) -> None:
    """Compare every file named in `checksums.json` with its recorded SHA-256."""
    sums_path = path / CHECKSUMS_FILE
    if not sums_path.is_file():
        return  # a folder made by another tool: transformers' own checks still apply
    for name, expected in read_json(sums_path).items():
        file = path / name
        if not file.is_file():
            raise SnapshotError(f"corrupted checkpoint {path}: {name} is missing")
        if sha256_file(file) != expected:
            raise SnapshotError(f"corrupted checkpoint {path}: {name} does not match its checksum")


def load_tokenizer(suite: str | os.PathLike, step: int | None = None, *, cache_dir=None):
    """The tokenizer of `suite` (at `step`, default its last step)."""
    step = list_steps(suite, cache_dir=cache_dir)[-1] if step is None else step
    return load_snapshot(suite, step, cache_dir=cache_dir, with_model=False)[1]


def load_snapshot(
    suite: str | os.PathLike,
    step: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    with_tokenizer: bool = True,
    with_model: bool = True,
) -> tuple[Any, Any]:
    """Return `(model, tokenizer)` for `suite` at training step `step`, in eval mode.

    Local suites are checksum-verified; any missing or unexpected weight is an error rather than
    a silently re-initialised parameter.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if not isinstance(step, int) or isinstance(step, bool):
        raise SnapshotError(f"step={step!r} must be an int")
    check_step(suite, step, cache_dir=cache_dir)
    if is_local_suite(suite):
        source, revision = step_dir(suite, step), None
        _verify_local_checkpoint(source)
        # Tokenizer files sit in each step folder, as in Pythia's revisions; fall back on the suite's.
        tokenizer_source = source if (source / "tokenizer.json").is_file() else Path(suite) / "tokenizer"
    else:
        source, revision, tokenizer_source = str(suite), f"step{step}", str(suite)
    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour it as it is now.
    offline = {"local_files_only": True} if os.environ.get("HF_HUB_OFFLINE") else {}
    try:
        model, info = (
            AutoModelForCausalLM.from_pretrained(
                source, revision=revision, cache_dir=cache_dir, dtype=dtype, output_loading_info=True, **offline
            )
            if with_model
            else (None, {})
        )
        tokenizer = (
            AutoTokenizer.from_pretrained(tokenizer_source, revision=revision, cache_dir=cache_dir, **offline)
            if with_tokenizer
            else None
        )
    except Exception as e:  # OSError, ValueError, SafetensorError, ...: one message either way
        if is_local_suite(suite):
            raise SnapshotError(f"corrupted or unreadable checkpoint {source}: {e}") from None
        raise SnapshotError(
            f"cannot load {suite}@step{step}: it is not in the local Hugging Face cache and the hub is not "
            "reachable. Point `suite` at a local folder of step{N}/ checkpoints (for example one trained by "
            "`crosslib.suite.train_suite`), or set HF_HOME to a cache that holds this revision."
        ) from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SnapshotError(f"checkpoint {source} does not match its config: {bad}")
    return (model.to(device).eval() if model is not None else None), tokenizer
