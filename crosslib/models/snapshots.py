"""Loading pre-training snapshots: a local folder of `step{N}/` checkpoints or a hub repo.

One code path serves both. A *suite* is either

* a local directory holding `step{N}/` Hugging Face checkpoints (what `crosslib.models.suite` trains), or
* a Hugging Face repo id such as ``EleutherAI/pythia-70m-deduped`` whose revisions are named
  ``step{N}`` (Pythia's convention), loaded with ``transformers`` from the hub or its local cache.

    model, tokenizer = load_snapshot("data/suite/<key>", 512)
    model, tokenizer = load_snapshot("EleutherAI/pythia-70m-deduped", 1000)

A local `step{N}/` folder holds what `save_pretrained` writes (``config.json`` and
``model.safetensors`` or ``pytorch_model.bin``, possibly sharded). The tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) is looked for in
``step{N}/`` first, then in ``<suite>/tokenizer/``, which is how all steps share one tokenizer.

Weights are hashed once: the first time a folder without ``checksums.json`` is read, one is
written (or, for a read-only folder, kept under the data directory), with each file's size and
modification time beside it; later reads re-hash only files whose size or time changed.

Snapshots are fingerprinted by their weight files' SHA-256: two different steps with an identical
weight file are refused (`DuplicateSnapshotError`), since published branches are known to serve
one checkpoint under several step names. ``on_duplicate="warn"`` (or the environment variable
``CROSSLIB_ON_DUPLICATE_SNAPSHOTS=warn``) only warns.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from crosslib.artifacts import atomic_write_json, read_json, sha256_bytes, sha256_file
from crosslib.constants import PYTHIA_STEPS, data_dir

STEP_DIR = re.compile(r"^step(\d+)$")
CHECKSUMS_FILE = "checksums.json"
# Size and modification time of each file when its checksum was last confirmed.
FILE_STATS_FILE = ".checksums-stat.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DUPLICATE_ACTIONS = ("error", "warn")
ON_DUPLICATE_ENV = "CROSSLIB_ON_DUPLICATE_SNAPSHOTS"


class SnapshotError(RuntimeError):
    """A snapshot cannot be found or loaded; the message says what to do instead."""


class TokenizerNotFoundError(SnapshotError):
    """A local suite has no tokenizer files where the loader looks for them."""


class DuplicateSnapshotError(SnapshotError):
    """Two different steps of a suite carry an identical weight file."""


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
            local_checksums(step_dir(suite, step))  # written on first use, so always there below
            sums = checksums_path(step_dir(suite, step))
            identity[step] = sha256_file(sums) if sums.is_file() else str(step_dir(suite, step).resolve())
        return content_hash({"local": identity})
    return content_hash({"hub": str(suite), "revisions": [f"step{s}" for s in steps]})


def _record_dir(folder: Path) -> Path:
    """Where the checksums of `folder` are remembered: the folder itself, or (read-only) the data directory."""
    if os.access(folder, os.W_OK):
        return folder
    return data_dir() / "snapshot-checksums" / sha256_bytes(str(folder.resolve()).encode())[:24]


def _file_stat(file: Path) -> list[int]:
    stat = file.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _try_write_json(path: Path, obj: Any) -> None:
    try:
        atomic_write_json(path, obj)
    except OSError:  # nowhere to remember it: the next read hashes again
        pass


def checksums_path(folder: str | os.PathLike) -> Path:
    """The `checksums.json` that describes a local step folder (its own, or the remembered one)."""
    folder = Path(folder)
    own = folder / CHECKSUMS_FILE
    return own if own.is_file() else _record_dir(folder) / CHECKSUMS_FILE


def local_checksums(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file of a local step folder, verified; each file is hashed once and remembered.

    A folder with `checksums.json` is checked against it, re-hashing only the files whose size or
    modification time changed since they last matched. A folder without one (made by another tool)
    is hashed once and the result written, so the next call costs a `stat` per file.
    """
    folder = Path(folder)
    sums_path = checksums_path(folder)
    stats_path = _record_dir(folder) / FILE_STATS_FILE
    stats = read_json(stats_path) if stats_path.is_file() else {}
    if sums_path.is_file():
        sums = read_json(sums_path)
        confirmed = dict(stats)
        for name, expected in sums.items():
            file = folder / name
            if not file.is_file():
                raise SnapshotError(f"corrupted checkpoint {folder}: {name} is missing")
            stat = _file_stat(file)
            if stats.get(name) == stat:
                continue
            if sha256_file(file) != expected:
                raise SnapshotError(f"corrupted checkpoint {folder}: {name} does not match its checksum in "
                                    f"{sums_path} (if you replaced the file on purpose, delete that checksums file)")
            confirmed[name] = stat
        if confirmed != stats:
            _try_write_json(stats_path, confirmed)
        return sums
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name != CHECKSUMS_FILE)
    stats = {p.name: _file_stat(p) for p in files}  # before hashing: a file changed meanwhile is re-hashed later
    sums = {p.name: sha256_file(p) for p in files}
    _try_write_json(sums_path, sums)
    _try_write_json(stats_path, stats)
    return sums


def _hub_weight_hashes(repo_id: str, step: int, cache_dir: str | os.PathLike | None) -> dict[str, str]:
    """Content ids of a hub revision's weight files: the blob names of the local cache (the SHA-256 of
    large files), else the hub's file metadata; empty when neither is reachable."""
    repo = Path(cache_dir or _hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / f"step{step}"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return {p.name: (Path(os.readlink(p)).name if p.is_symlink() else sha256_file(p))
                    for p in sorted(snapshot.iterdir()) if p.suffix in WEIGHT_SUFFIXES}
    if os.environ.get("HF_HUB_OFFLINE"):
        return {}
    return dict(_hub_metadata_hashes(repo_id, step))


@functools.lru_cache(maxsize=4096)  # one request per revision and process
def _hub_metadata_hashes(repo_id: str, step: int) -> tuple[tuple[str, str], ...]:
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=f"step{step}", files_metadata=True)
        return tuple((f.rfilename, f.lfs.sha256) for f in info.siblings or []
                     if f.lfs and f.rfilename.endswith(WEIGHT_SUFFIXES))
    except Exception:  # offline or unknown revision: nothing to compare
        return ()


def snapshot_fingerprint(suite: str | os.PathLike, step: int, *, cache_dir: str | os.PathLike | None = None
                         ) -> dict[str, str]:
    """The SHA-256 (or hub content id) of each weight file of `suite` at `step`, by file name."""
    if is_local_suite(suite):
        return {name: digest for name, digest in local_checksums(step_dir(suite, step)).items()
                if name.endswith(WEIGHT_SUFFIXES)}
    return _hub_weight_hashes(str(suite), step, cache_dir)


def check_distinct_snapshots(
    suite: str | os.PathLike,
    steps: Sequence[int],
    *,
    on_duplicate: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[tuple[int, int]]:
    """Refuse (or warn about) different steps that carry an identical weight file; returns the pairs.

    Published revisions are known to hold copies (a later checkpoint served under early step
    names, or two branches sharing a shard); analysing them as distinct snapshots would show
    features "forming" at steps where nothing was trained. `on_duplicate` is "error" (default,
    or $CROSSLIB_ON_DUPLICATE_SNAPSHOTS) or "warn".
    """
    from crosslib.config import require_choice

    on_duplicate = on_duplicate or os.environ.get(ON_DUPLICATE_ENV, "error")
    require_choice("on_duplicate", on_duplicate, DUPLICATE_ACTIONS)
    owner: dict[str, tuple[int, str]] = {}
    duplicates: list[tuple[int, int, str]] = []
    for step in sorted(set(steps)):
        for name, digest in snapshot_fingerprint(suite, step, cache_dir=cache_dir).items():
            if digest in owner and owner[digest][0] != step:
                duplicates.append((owner[digest][0], step, name))
            owner.setdefault(digest, (step, name))
    pairs = sorted({(a, b) for a, b, _ in duplicates})
    if not pairs:
        return []
    described = "; ".join(f"step{a} and step{b} ({', '.join(sorted({n for x, y, n in duplicates if (x, y) == (a, b)}))})"
                          for a, b in pairs)
    message = (f"suite {str(suite)!r}: different steps carry identical weights: {described}. One of each pair "
               "is probably a mislabelled copy (published branches have served a later checkpoint under "
               "earlier step names); drop it from `steps`, or pass on_duplicate='warn' "
               f"(or set {ON_DUPLICATE_ENV}=warn) to go on anyway")
    if on_duplicate == "error":
        raise DuplicateSnapshotError(message)
    warnings.warn(message, stacklevel=2)
    return pairs


def load_config(suite: str | os.PathLike, step: int, *, cache_dir: str | os.PathLike | None = None) -> Any:
    """The model config of `suite` at `step` (`transformers.AutoConfig`), without loading any weights."""
    from transformers import AutoConfig

    check_step(suite, step, cache_dir=cache_dir)
    offline = {"local_files_only": True} if os.environ.get("HF_HUB_OFFLINE") else {}
    try:
        if is_local_suite(suite):
            return AutoConfig.from_pretrained(step_dir(suite, step))
        return AutoConfig.from_pretrained(str(suite), revision=f"step{step}", cache_dir=cache_dir, **offline)
    except (OSError, ValueError) as e:
        raise SnapshotError(f"cannot read the config of {suite}@step{step}: {e}") from None


def context_length(suite: str | os.PathLike, step: int, *, at_most: int | None = None,
                   cache_dir: str | os.PathLike | None = None) -> int:
    """The model's context length (`max_position_embeddings`), read from its config, capped at `at_most`."""
    length = int(load_config(suite, step, cache_dir=cache_dir).max_position_embeddings)
    return length if at_most is None else min(at_most, length)


def tokenizer_location(suite: str | os.PathLike, step: int) -> Path:
    """Where a local suite's tokenizer for `step` is: `step{N}/`, else `<suite>/tokenizer/`."""
    candidates = [step_dir(suite, step), Path(suite) / TOKENIZER_DIR]
    for folder in candidates:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    looked = " and ".join(f"{folder}/" for folder in candidates)
    raise TokenizerNotFoundError(
        f"no tokenizer for {suite}@step{step}: looked for {' or '.join(TOKENIZER_FILES)} in {looked}. The weights "
        f"may be fine; put the tokenizer files in {Path(suite) / TOKENIZER_DIR}/ to share one tokenizer between "
        "all steps (for Pythia: AutoTokenizer.from_pretrained('EleutherAI/pythia-70m-deduped')"
        f".save_pretrained('{Path(suite) / TOKENIZER_DIR}'))"
    )


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

    Local suites are checksum-verified (cheaply after the first time, see the module docstring);
    any missing or unexpected weight is an error rather than a silently re-initialised parameter.
    A local suite without tokenizer files raises `TokenizerNotFoundError` naming where it looked.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if not isinstance(step, int) or isinstance(step, bool):
        raise SnapshotError(f"step={step!r} must be an int")
    check_step(suite, step, cache_dir=cache_dir)
    if is_local_suite(suite):
        source, revision = step_dir(suite, step), None
        # Tokenizer files sit in each step folder, as in Pythia's revisions; fall back on the suite's.
        tokenizer_source = tokenizer_location(suite, step) if with_tokenizer else None
        if with_model:
            local_checksums(source)
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
            "`crosslib.models.suite.train_suite`), or set HF_HOME to a cache that holds this revision."
        ) from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SnapshotError(f"checkpoint {source} does not match its config: {bad}")
    return (model.to(device).eval() if model is not None else None), tokenizer
