"""The activation cache: the same token positions in every snapshot, on disk, aligned row by row.

    store = build_store(CacheConfig(suite, steps=(0, 64, 512), hook="blocks.2.hook_resid_post"), windows)
    for batch in store.batches(2048, seed=0):       # [batch, snapshot, d_model], normalised
        ...
    store.rows("eval", limit=10_000)               # held-out rows, in order
    store.select(steps=[512])                      # a 1-snapshot view (for a per-snapshot SAE)
    tokens, acts = store.context(window=3)         # [context] tokens and [context, snapshot, d_model]

Layout of a store ``<root>/activations/<key>/``::

    config.json           what the key hashes: the cache config, the token windows' fingerprint and
                          the identity of each snapshot's weights (written last: marks completion)
    manifest.json         shapes, dtype, steps, per-snapshot mean norm, per-chunk SHA-256
    tokens.bin            int32 [n_windows, context_length]
    acts/step{N}.bin      one [n_tokens, d_model] array per snapshot (float16/bfloat16/float32)

While building, ``<key>.partial/`` also holds ``progress/step{N}.jsonl``: one line per finished
chunk (its SHA-256 and norm sum), appended after the chunk's bytes are written.

Rows are token positions in window order: row = window * context_length + position. Each
snapshot's file is written in chunks of whole windows; a chunk's checksum is recorded only once
its bytes are on disk, so a killed build resumes from its finished chunks and produces the same
bytes as an uninterrupted one (same machine, same thread count). Nothing is unpickled: arrays are
raw little-endian files read through `np.memmap`.

The model runs in float32 by default. ``compute_dtype="bfloat16"`` (autocast) is faster on CPUs
with bf16 instructions but changes the activations by up to ~1% per row (benchmarks/README.md),
far more than float16 storage rounding (~0.03%), so it is opt-in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from crosslib.artifacts import (
    CONFIG_FILE,
    ArtifactError,
    artifact_dir,
    atomic_write_json,
    build_artifact,
    corruption_message,
    display_path,
    read_json,
    sha256_file,
    unchanged_since_verified,
    verify_artifact,
    write_stamp,
)
from crosslib.config import (Check, Config, Convert, ParameterError, choice, fraction, is_int, lists_as_tuples,
                             positive_int, require, require_choice)
from crosslib.hooks import HookPoint, capture, parse_hook, validate_hook
from crosslib.sources import SPLITS, row_bounds, snapshot_positions

KIND = "activations"
FORMAT = "crosslib-activations-v1"
MANIFEST_FILE = "manifest.json"
TOKENS_FILE = "tokens.bin"
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    # name -> (torch dtype, numpy dtype of the bytes on disk; bfloat16 is stored as its raw 16 bits)
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),
    "float32": (torch.float32, np.dtype("<f4")),
}
COMPUTE_DTYPES = ("float32", "bfloat16")


class CacheError(ArtifactError):
    """Building the cache failed (non-finite activations, not enough disk); nothing was published."""


# --------------------------------------------------------------------------- config


_suite_name = Check(lambda suite: isinstance(suite, (str, os.PathLike)) and str(suite) != "",
                    "a folder of step{N}/ checkpoints or a hub id such as 'EleutherAI/pythia-70m-deduped'")
_increasing_steps = Check(
    lambda steps: isinstance(steps, tuple) and len(steps) > 0 and all(is_int(s) and s >= 0 for s in steps)
    and all(a < b for a, b in zip(steps, steps[1:])),
    "a non-empty tuple of training steps (ints >= 0), strictly increasing",
)


def _hook_name(name: str, value: Any) -> None:
    parse_hook(value)  # its error names hook= and the allowed forms


def _torch_device(name: str, value: Any) -> None:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ParameterError(f"{name}={value!r} is not allowed: use 'cpu', 'cuda' or 'cuda:N'") from None
    require(device.type in ("cpu", "cuda", "mps"), name, value, "'cpu', 'cuda', 'cuda:N' or 'mps'")


@dataclasses.dataclass(frozen=True)
class CacheConfig(Config):
    """What to cache: which snapshots of which suite, at which hook, how it is stored.

    suite          a local folder of step{N}/ checkpoints or a hub id (revisions step{N})
    steps          training steps to cache, strictly increasing
    hook           TransformerLens-style hook name, e.g. "blocks.2.hook_resid_post"
    dtype          storage dtype: "float16", "bfloat16" or "float32"
    batch_size     context windows per forward pass
    device         "cpu", "cuda", "cuda:1", ... (where the model runs)
    chunk_tokens   tokens per checksummed, resumable chunk (rounded down to whole windows)
    eval_fraction  share of windows, taken from the end, held out to evaluate dictionaries
    compute_dtype  "float32", or "bfloat16" to run the model under autocast
    """

    suite: Annotated[str, _suite_name, Convert(str)]
    steps: Annotated[tuple[int, ...], lists_as_tuples(), _increasing_steps]
    hook: Annotated[str, _hook_name]
    dtype: Annotated[str, choice(*DTYPES)] = "float16"
    batch_size: Annotated[int, positive_int()] = 32
    device: Annotated[str, _torch_device] = "cpu"
    chunk_tokens: Annotated[int, positive_int()] = 32768
    eval_fraction: Annotated[float, fraction("[0, 1)")] = 0.1
    compute_dtype: Annotated[str, choice(*COMPUTE_DTYPES)] = "float32"


@dataclasses.dataclass(frozen=True)
class StoreIdentity(Config):
    """Everything that determines a store's bytes; its hash is the store's key."""

    cache: dict
    tokens_sha256: str
    n_windows: int
    context_length: int
    weights: tuple


# --------------------------------------------------------------------------- inputs


def _is_local(suite: str) -> bool:
    from crosslib.snapshots import is_local_suite

    return is_local_suite(suite)


def weights_identity(suite: str, step: int) -> dict[str, Any]:
    """What identifies a snapshot's weights: its checksums for a local suite, repo + revision on the hub."""
    from crosslib.snapshots import checksums_path, local_checksums, step_dir

    if not _is_local(suite):
        return {"step": step, "repo": str(suite), "revision": f"step{step}"}
    folder = step_dir(suite, step)
    local_checksums(folder)  # hashed once, then remembered in checksums.json
    sums = checksums_path(folder)
    if sums.is_file():
        return {"step": step, "checksums_sha256": sha256_file(sums)}
    files = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return {"step": step, "files": {name: sha256_file(folder / name) for name in files}}


def _model_config(suite: str, step: int) -> Any:
    from crosslib.snapshots import load_config

    return load_config(suite, step)


def _block_windows(tokens: np.ndarray, block_tokens: int = 1 << 17) -> int:
    """Windows per block when streaming over the token windows (bounded memory)."""
    return max(1, block_tokens // max(1, tokens.shape[1]))


def token_fingerprint(tokens: np.ndarray) -> str:
    """SHA-256 of the token windows' shape and values (as int64), independent of their dtype."""
    digest = hashlib.sha256(f"tokens{tuple(tokens.shape)}".encode())
    step = _block_windows(tokens)
    for start in range(0, tokens.shape[0], step):
        digest.update(np.ascontiguousarray(tokens[start : start + step], dtype="<i8").tobytes())
    return digest.hexdigest()


def _check_tokens(tokens: Any) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 2 or tokens.size == 0:
        raise ParameterError(
            f"token_windows={type(tokens).__name__}{getattr(tokens, 'shape', '')} is not allowed: "
            "pass a non-empty 2-D integer np.ndarray [n_windows, context_length]"
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ParameterError(f"token_windows has dtype {tokens.dtype}: token ids must be integers")
    return tokens


def split_windows(n_windows: int, eval_fraction: float) -> tuple[int, int]:
    """(n_train_windows, n_eval_windows): the eval windows are the last ones."""
    n_eval = 0 if eval_fraction == 0 else max(1, round(n_windows * eval_fraction))
    if n_windows - n_eval < 1:
        raise ParameterError(
            f"eval_fraction={eval_fraction} leaves no training windows out of n_windows={n_windows}: "
            "pass more windows or a smaller eval_fraction"
        )
    return n_windows - n_eval, n_eval


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return ""  # pragma: no cover


def _disk_usage(path: Path):
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path)


def _allocated_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- build


def store_path(config: "CacheConfig", token_windows: np.ndarray, root: str | os.PathLike | None = None) -> Path:
    """Where the store of `config` over `token_windows` lives (whether or not it is built yet).

    Runs every check `build_store` runs before computing anything.
    """
    return artifact_dir(KIND, _prepare(config, token_windows).identity, root)


def _prepare(config: "CacheConfig", token_windows: Any) -> "_Plan":
    """Validate everything that can be checked without running a model; work out the store's identity."""
    if not isinstance(config, CacheConfig):
        raise ParameterError(f"config={type(config).__name__} is not allowed: pass a CacheConfig")
    tokens = _check_tokens(token_windows)
    n_windows, context = map(int, tokens.shape)
    point = parse_hook(config.hook)
    if torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device={config.device!r} is not allowed here: no CUDA GPU is available; use 'cpu'")

    model_configs = [_model_config(config.suite, step) for step in config.steps]
    sizes = {step: int(c.hidden_size) for step, c in zip(config.steps, model_configs)}
    if len(set(sizes.values())) > 1:
        raise ParameterError(
            f"steps={config.steps}: the snapshots have different d_model ({sizes}); one store (and one "
            "crosscoder) needs the same activation size in every snapshot"
        )
    layers = {step: int(c.num_hidden_layers) for step, c in zip(config.steps, model_configs)}
    if len(set(layers.values())) > 1:
        raise ParameterError(f"steps={config.steps}: the snapshots have different numbers of layers ({layers})")
    first = model_configs[0]
    if getattr(first, "model_type", None) != "gpt_neox":
        raise ParameterError(
            f"suite={config.suite!r} holds a {getattr(first, 'model_type', '?')!r} model: the activation cache "
            "supports GPT-NeoX (Pythia) models"
        )
    validate_hook(point, first)
    vocab = min(int(c.vocab_size) for c in model_configs)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise ParameterError(f"token_windows holds ids in [{low}, {high}]: the model's vocabulary is 0..{vocab - 1}")
    max_context = int(getattr(first, "max_position_embeddings", context))
    if context > max_context:
        raise ParameterError(
            f"token_windows has context_length={context}: the model allows at most "
            f"max_position_embeddings={max_context}"
        )
    n_train, n_eval = split_windows(n_windows, config.eval_fraction)

    cache = config.to_dict()
    if _is_local(config.suite):
        cache["suite"] = "local"  # the weights' checksums identify it, not the folder's path
    identity = StoreIdentity(
        cache=cache,
        tokens_sha256=token_fingerprint(tokens),
        n_windows=n_windows,
        context_length=context,
        weights=tuple(weights_identity(config.suite, step) for step in config.steps),
    )
    return _Plan(
        config=config, point=point, tokens=tokens, d_model=int(first.hidden_size), n_layers=int(first.num_hidden_layers),
        n_train_windows=n_train, n_eval_windows=n_eval, identity=identity,
        model_type=str(first.model_type), progress=True,
    )


def build_store(
    config: CacheConfig,
    token_windows: np.ndarray,
    root: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    progress: bool = True,
) -> "ActivationStore":
    """Return the store of `config` over `token_windows` [n_windows, context], building it if needed.

    Every check that can fail (hook, layer range, steps, d_model across snapshots, token ids,
    free disk) runs before any activation is computed. A build that fails leaves nothing
    behind; one that is killed resumes from its finished chunks when called again. A second
    process asking for the same store meanwhile waits for the first one.
    """
    plan = _prepare(config, token_windows)
    plan.progress = progress
    identity, d_model = plan.identity, plan.d_model
    n_windows, context = plan.n_windows, plan.context
    final = artifact_dir(KIND, identity, root)
    if (final / CONFIG_FILE).is_file():
        return open_store(final, verify=verify)

    n_tokens = n_windows * context
    item = DTYPES[config.dtype][1].itemsize
    activations = n_tokens * d_model * item * len(config.steps)
    estimate = activations + n_tokens * 4  # + the int32 token windows
    partial = final.with_name(final.name + ".partial")
    free = _disk_usage(final).free
    # Operational (disk space, paths): stderr, never a published notebook's output.
    print(
        f"activation cache {config.hook}: {n_tokens:,} tokens x d={d_model} x {item} B ({config.dtype}) x "
        f"{len(config.steps)} snapshots = {_human(activations)} (+ {_human(n_tokens * 4)} of tokens) on disk; "
        f"free: {_human(free)}",
        file=sys.stderr, flush=True,
    )
    missing = estimate - _allocated_bytes(partial) - free
    if missing > 0:
        raise CacheError(
            f"not enough free disk for the activation cache: it needs {_human(estimate)} and {display_path(final.parent)} has "
            f"{_human(free)} free. Free {_human(missing)} or more, point root (or $CROSSLIB_DATA) at a bigger "
            "disk, or cache fewer tokens or snapshots (or dtype='float16'/'bfloat16')"
        )

    built_here = []

    def build(partial_dir: Path) -> None:
        try:
            _build(partial_dir, plan)
        except (CacheError, ParameterError):
            shutil.rmtree(partial_dir, ignore_errors=True)  # deterministic failures: leave nothing behind
            raise
        built_here.append(True)

    path = build_artifact(KIND, identity, build, root)
    # A store this call just wrote was checksummed as it was written; one built by another process is verified.
    return open_store(path, verify=verify and not built_here)


@dataclasses.dataclass
class _Plan:
    config: CacheConfig
    point: HookPoint
    tokens: np.ndarray
    d_model: int
    n_layers: int
    n_train_windows: int
    n_eval_windows: int
    identity: StoreIdentity
    model_type: str
    progress: bool

    @property
    def context(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_windows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def chunk_windows(self) -> int:
        return max(1, self.config.chunk_tokens // self.context)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_windows / self.chunk_windows)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _chunk_sha(fd: int, offset: int, n_bytes: int) -> str:
    digest = hashlib.sha256()
    while n_bytes > 0:
        block = os.pread(fd, min(n_bytes, 1 << 22), offset)
        if not block:
            break
        digest.update(block)
        offset, n_bytes = offset + len(block), n_bytes - len(block)
    return digest.hexdigest()


def _write_tokens(path: Path, tokens: np.ndarray) -> str:
    """Write tokens as int32 through a temp file (never the whole array at once); return the SHA-256."""
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        step = _block_windows(tokens)
        for start in range(0, tokens.shape[0], step):
            block = np.ascontiguousarray(tokens[start : start + step], dtype="<i4").tobytes()
            digest.update(block)
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def _build(partial: Path, plan: _Plan) -> None:
    from crosslib.progress import progress as tqdm

    from crosslib.snapshots import load_snapshot

    config, context = plan.config, plan.context
    torch_dtype, np_dtype = DTYPES[config.dtype]
    row_bytes = plan.d_model * np_dtype.itemsize
    n_tokens = plan.n_windows * context
    for stale in partial.rglob("*.tmp"):  # temp files of atomic writes cut short by a kill
        stale.unlink(missing_ok=True)
    tokens_sha = _write_tokens(partial / TOKENS_FILE, plan.tokens)
    (partial / "acts").mkdir(exist_ok=True)
    previous = read_json(partial / MANIFEST_FILE) if (partial / MANIFEST_FILE).is_file() else None
    device = torch.device(config.device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if config.compute_dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    snapshots = []
    bar = tqdm(total=n_tokens * len(config.steps), unit="tok", unit_scale=True, desc=f"caching {config.hook}",
               disable=not plan.progress, file=sys.stderr)
    (partial / "progress").mkdir(exist_ok=True)
    for s_index, step in enumerate(config.steps):
        file = f"acts/step{step}.bin"
        log_path = partial / "progress" / f"step{step}.jsonl"
        fd = os.open(partial / file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != n_tokens * row_bytes:
                os.ftruncate(fd, n_tokens * row_bytes)
            # Finished chunks: those recorded (in the progress log or an earlier manifest) whose bytes on
            # disk still match the recorded checksum. Nothing else is trusted, so no fsync is needed for
            # correctness: a chunk whose bytes were lost is simply computed again.
            records: dict[int, dict] = {}
            if previous is not None and s_index < len(previous.get("snapshots", [])):
                records.update(enumerate(previous["snapshots"][s_index]["chunks"]))
            records.update(_read_progress(log_path))
            done: dict[int, dict] = {}
            for c, rec in sorted(records.items()):
                if 0 <= c < plan.n_chunks:
                    offset, n_bytes = _chunk_span(plan, c, row_bytes)
                    if rec.get("sha256") == _chunk_sha(fd, offset, n_bytes):
                        done[c] = {"sha256": rec["sha256"], "norm_sum": rec["norm_sum"]}
            bar.update(sum(_chunk_span(plan, c, row_bytes)[1] // row_bytes for c in done))
            todo = [c for c in range(plan.n_chunks) if c not in done]
            if todo:
                model, _ = load_snapshot(config.suite, step, device=device, with_tokenizer=False)
                if int(model.config.hidden_size) != plan.d_model:
                    raise ParameterError(
                        f"steps={config.steps}: step {step} has d_model={model.config.hidden_size}, "
                        f"the others {plan.d_model}"
                    )
                log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    for c in todo:
                        done[c] = _compute_chunk(model, plan, c, fd, torch_dtype, step, autocast, bar)
                        # one append per finished chunk; a line cut short by a kill is ignored on resume
                        os.write(log, (json.dumps({"chunk": c, **done[c]}) + "\n").encode())
                finally:
                    os.close(log)
                del model
            os.fsync(fd)
        finally:
            os.close(fd)
        chunks = [done[c] for c in range(plan.n_chunks)]
        snapshots.append({
            "step": step,
            "file": file,
            "mean_norm": math.fsum(rec["norm_sum"] for rec in chunks) / n_tokens,
            "chunks": chunks,
        })
    bar.close()
    config_dict = config.to_dict()
    manifest = {
        "format": FORMAT,
        "suite": config.suite,
        "model_type": plan.model_type,
        "steps": list(config.steps),
        "weights": [dict(w) for w in plan.identity.weights],
        "hook": plan.point.name,
        "dtype": config.dtype,
        "d_model": plan.d_model,
        "n_layers": plan.n_layers,
        "context_length": context,
        "n_windows": plan.n_windows,
        "n_tokens": n_tokens,
        "n_train_windows": plan.n_train_windows,
        "n_eval_windows": plan.n_eval_windows,
        "chunk_windows": plan.chunk_windows,
        "n_chunks": plan.n_chunks,
        "tokens": {"file": TOKENS_FILE, "dtype": "int32", "sha256": tokens_sha,
                   "fingerprint": plan.identity.tokens_sha256},
        "snapshots": snapshots,
        "config": config_dict,
    }
    atomic_write_json(partial / MANIFEST_FILE, manifest)
    shutil.rmtree(partial / "progress", ignore_errors=True)


def _read_progress(path: Path) -> dict[int, dict]:
    """Chunk records from a progress log; a torn or garbled line (from a kill) is skipped."""
    records: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                records[int(rec["chunk"])] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return records


def _chunk_span(plan: _Plan | dict, chunk: int, row_bytes: int) -> tuple[int, int]:
    """(byte offset, byte length) of `chunk` in a snapshot's file."""
    if isinstance(plan, dict):
        chunk_windows, n_windows, context = plan["chunk_windows"], plan["n_windows"], plan["context_length"]
    else:
        chunk_windows, n_windows, context = plan.chunk_windows, plan.n_windows, plan.context
    w0 = chunk * chunk_windows
    w1 = min(n_windows, w0 + chunk_windows)
    return w0 * context * row_bytes, (w1 - w0) * context * row_bytes


@torch.inference_mode()
def _compute_chunk(model, plan: _Plan, chunk: int, fd: int, torch_dtype, step: int, autocast, bar) -> dict:
    config, context = plan.config, plan.context
    device = torch.device(config.device)
    row_bytes = plan.d_model * DTYPES[config.dtype][1].itemsize
    w0 = chunk * plan.chunk_windows
    w1 = min(plan.n_windows, w0 + plan.chunk_windows)
    digest = hashlib.sha256()
    norm_sums = []
    for b0 in range(w0, w1, config.batch_size):
        b1 = min(w1, b0 + config.batch_size)
        ids = torch.from_numpy(np.ascontiguousarray(plan.tokens[b0:b1], dtype=np.int64)).to(device)
        with autocast:
            acts = capture(model, plan.point, ids)
        stored = acts.to(torch_dtype)
        if not bool(torch.isfinite(stored).all()):
            raise CacheError(
                f"non-finite activations (NaN or inf) at step {step}, {config.hook}, chunk {chunk} (windows "
                f"{b0}..{b1 - 1}) of suite {config.suite!r}: the checkpoint's weights are broken"
                + (" or the values overflow float16 (use dtype='bfloat16' or 'float32')" if config.dtype == "float16"
                   else "")
                + "; nothing was published"
            )
        norm_sums.append(float(stored.float().norm(dim=-1).double().sum()))
        host = stored.reshape(-1, plan.d_model).contiguous().cpu()
        if torch_dtype == torch.bfloat16:
            host = host.view(torch.int16)
        data = memoryview(host.numpy().view(np.uint8).reshape(-1))
        digest.update(data)
        _pwrite_all(fd, data, b0 * context * row_bytes)
        bar.update((b1 - b0) * context)
    return {"sha256": digest.hexdigest(), "norm_sum": math.fsum(norm_sums)}


# --------------------------------------------------------------------------- open


def open_store(path: str | os.PathLike, *, verify: bool | str = True) -> "ActivationStore":
    """Open a published store. Sizes are always checked. ``verify=True`` checks each chunk of each
    file against its SHA-256 unless the files are unchanged (same size and modification time)
    since they were last verified; ``verify="full"`` always re-hashes; ``False`` skips hashing."""
    require(verify in (True, False, "full"), "verify", verify, 'True, False or "full"')
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ArtifactError(
            f"{path} is not a complete activation store (no {CONFIG_FILE}): it does not exist, is still being "
            "built, or its build was interrupted; call build_store again to finish it"
        )
    if verify:
        verify_artifact(path, full=verify == "full")  # manifest.json and config files
    manifest = read_json(path / MANIFEST_FILE)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path / MANIFEST_FILE} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    row_bytes = manifest["d_model"] * DTYPES[manifest["dtype"]][1].itemsize
    files = [(manifest["tokens"]["file"], manifest["n_tokens"] * 4)]
    files += [(s["file"], manifest["n_tokens"] * row_bytes) for s in manifest["snapshots"]]
    for name, size in files:
        file = path / name
        if not file.is_file():
            raise ArtifactError(corruption_message(path, f"activation store is missing {name}"))
        if file.stat().st_size != size:
            raise ArtifactError(corruption_message(path, f"{file} has {file.stat().st_size} bytes, expected {size}"))
    names = [name for name, _ in files]
    if verify == "full" or (verify and not unchanged_since_verified(path, names)):
        if sha256_file(path / manifest["tokens"]["file"]) != manifest["tokens"]["sha256"]:
            raise ArtifactError(corruption_message(path, f"{path / manifest['tokens']['file']} does not match its checksum"))
        for snap in manifest["snapshots"]:
            fd = os.open(path / snap["file"], os.O_RDONLY)
            try:
                for c, rec in enumerate(snap["chunks"]):
                    offset, n_bytes = _chunk_span(manifest, c, row_bytes)
                    if _chunk_sha(fd, offset, n_bytes) != rec["sha256"]:
                        first_row = offset // row_bytes
                        raise ArtifactError(corruption_message(
                            path, f"{path / snap['file']}: chunk {c} (rows {first_row}..{first_row + n_bytes // row_bytes - 1}) "
                            "does not match its checksum in manifest.json"))
            finally:
                os.close(fd)
        write_stamp(path, names)
    return ActivationStore(path, manifest)


# --------------------------------------------------------------------------- shuffling


_M64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class RowPermutation:
    """A pseudo-random bijection of ``range(n)`` for every (seed, epoch), computed on the fly.

    ``perm(positions)`` maps global positions p = epoch * n + i to rows: epoch e visits every row
    exactly once, in an order set by (seed, e). A Feistel network on the next even power of two
    with cycle walking gives the bijection with O(1) memory and random access, so a loader can
    start at any batch without replaying (or storing) a permutation of n_tokens indices.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int = 0):
        require(isinstance(n, int) and n > 0, "n", n, "a positive number of rows")
        self.n = n
        self.half_bits = max(1, math.ceil(max(1, (n - 1).bit_length()) / 2))
        self.mask = np.uint64((1 << self.half_bits) - 1)
        self.seed = np.uint64(seed & _M64)

    def _feistel(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.mask
        for r in range(self.ROUNDS):
            f = _mix64(right ^ keys ^ np.uint64((r + 1) * 0x9E3779B97F4A7C15 & _M64)) & self.mask
            left, right = right, left ^ f
        return (left << shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.uint64)
        n = np.uint64(self.n)
        epoch, x = positions // n, positions % n
        keys = _mix64(_mix64(epoch ^ self.seed) + self.seed)
        y = self._feistel(x, keys)
        out_of_range = y >= n
        while out_of_range.any():
            y[out_of_range] = self._feistel(y[out_of_range], keys[out_of_range])
            out_of_range = y >= n
        return y.astype(np.int64)


# --------------------------------------------------------------------------- the store


class ActivationStore:
    """A read-only activation store (or a view over some of its snapshots).

    Attributes: `path`, `steps`, `hook`, `d_model`, `n_snapshots`, `n_tokens`, `n_windows`,
    `context_length`, `tokens` (int32 memmap [n_windows, context]), `mean_norms` [n_snapshots],
    `norm_factors` (= sqrt(d_model) / mean_norms), `dtype`, `config`, `manifest`.
    Rows are positions, row = window * context_length + position; the eval split is the last
    `n_eval_windows` windows, so no context is shared between train and eval rows.
    """

    def __init__(self, path: Path, manifest: dict, indices: Sequence[int] | None = None, _arrays: dict | None = None):
        self.path = Path(path)
        self.manifest = manifest
        all_snapshots = manifest["snapshots"]
        self._indices = list(range(len(all_snapshots))) if indices is None else list(indices)
        self._snapshots = [all_snapshots[i] for i in self._indices]
        self._arrays = {} if _arrays is None else _arrays  # file -> np.memmap, shared by views
        self.hook: str = manifest["hook"]
        self.dtype: str = manifest["dtype"]
        self.d_model: int = int(manifest["d_model"])
        self.context_length: int = int(manifest["context_length"])
        self.n_windows: int = int(manifest["n_windows"])
        self.n_tokens: int = int(manifest["n_tokens"])
        self.n_train_windows: int = int(manifest["n_train_windows"])
        self.n_eval_windows: int = int(manifest["n_eval_windows"])
        self.steps: list[int] = [int(s["step"]) for s in self._snapshots]
        self.n_snapshots: int = len(self.steps)
        self.mean_norms: np.ndarray = np.array([s["mean_norm"] for s in self._snapshots], dtype=np.float64)
        self.norm_factors: np.ndarray = math.sqrt(self.d_model) / self.mean_norms
        self.config = CacheConfig.from_dict(manifest["config"])
        self.tokens: np.ndarray = np.memmap(
            self.path / manifest["tokens"]["file"], dtype="<i4", mode="r", shape=(self.n_windows, self.context_length)
        )

    def __repr__(self) -> str:
        return (
            f"ActivationStore({self.hook}, steps={self.steps}, n_tokens={self.n_tokens:,}, d_model={self.d_model}, "
            f"dtype={self.dtype}, path={str(self.path)!r})"
        )

    def __len__(self) -> int:
        return self.n_tokens

    # ---- rows and splits

    def split_rows(self, split: str = "train") -> range:
        """The row indices of a split: "train", "eval" (the last eval_fraction of windows) or "all"."""
        require_choice("split", split, SPLITS)
        boundary = self.n_train_windows * self.context_length
        return {"train": range(0, boundary), "eval": range(boundary, self.n_tokens), "all": range(self.n_tokens)}[split]

    def row_index(self, window: Any, position: Any) -> Any:
        """Flat row index of (window, position); works on ints and integer arrays."""
        w, p = np.asarray(window), np.asarray(position)
        if (w < 0).any() or (w >= self.n_windows).any():
            raise ParameterError(f"window={window!r} is out of range: 0..{self.n_windows - 1}")
        if (p < 0).any() or (p >= self.context_length).any():
            raise ParameterError(f"position={position!r} is out of range: 0..{self.context_length - 1}")
        row = w.astype(np.int64) * self.context_length + p
        return int(row) if row.ndim == 0 else row

    def window_position(self, row: Any) -> tuple[Any, Any]:
        """(window, position) of a flat row index; works on ints and integer arrays."""
        r = np.asarray(row)
        if (r < 0).any() or (r >= self.n_tokens).any():
            raise ParameterError(f"row={row!r} is out of range: 0..{self.n_tokens - 1}")
        w, p = np.divmod(r.astype(np.int64), self.context_length)
        return (int(w), int(p)) if r.ndim == 0 else (w, p)

    # ---- low-level reads (every read of activation bytes goes through these two)

    def _array(self, i: int) -> np.memmap:
        file = self._snapshots[i]["file"]
        if file not in self._arrays:
            self._arrays[file] = np.memmap(
                self.path / file, dtype=DTYPES[self.dtype][1], mode="r", shape=(self.n_tokens, self.d_model)
            )
        return self._arrays[file]

    def _read(self, i: int, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (sorted int64) of snapshot view-index `i`."""
        return np.asarray(self._array(i)[rows])

    def _read_range(self, i: int, start: int, stop: int) -> np.ndarray:
        return np.array(self._array(i)[start:stop])

    def _to_tensor(self, block: np.ndarray, normalise: bool, device: Any, dtype: torch.dtype) -> Tensor:
        """[rows, S, d] stored values -> tensor on `device`, normalised per snapshot if asked."""
        t = torch.from_numpy(block)
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        t = t.to(device).float()
        if normalise:
            t = t * torch.as_tensor(self.norm_factors, dtype=torch.float32, device=t.device)[:, None]
        return t.to(dtype)

    def _gather(self, rows: np.ndarray, normalise: bool, device: Any, dtype: torch.dtype) -> Tensor:
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        block = np.empty((len(rows), self.n_snapshots, self.d_model), dtype=DTYPES[self.dtype][1])
        for i in range(self.n_snapshots):
            block[order, i] = self._read(i, sorted_rows)
        return self._to_tensor(block, normalise, device, dtype)

    # ---- the data-source protocol

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        start_batch: int = 0,
        split: str = "train",
        normalise: bool = True,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[Float[Tensor, "batch snapshot d_model"]]:
        """An endless stream of shuffled batches [batch, snapshot, d_model], rows aligned across snapshots.

        Each epoch visits every row of the split once in an order set by (seed, epoch). The batch
        yielded first with ``start_batch=k`` is the k-th batch of a stream started at 0, so training
        resumes exactly. Only the rows of the current batch are read from disk.
        """
        require(isinstance(batch_size, int) and batch_size > 0, "batch_size", batch_size, "a positive integer")
        require(isinstance(start_batch, int) and start_batch >= 0, "start_batch", start_batch, "an integer >= 0")
        require(isinstance(seed, int) and seed >= 0, "seed", seed, "an integer >= 0")
        rows = self.split_rows(split)
        if len(rows) == 0:
            raise ParameterError(f"split={split!r} has no rows in this store (eval_fraction=0); use split='train'")
        permutation = RowPermutation(len(rows), seed)
        return self._batches(permutation, rows.start, batch_size, start_batch, normalise, device, dtype)

    def _batches(self, permutation, first_row, batch_size, start_batch, normalise, device, dtype):
        k = start_batch
        while True:
            positions = np.arange(k * batch_size, (k + 1) * batch_size, dtype=np.uint64)
            yield self._gather(first_row + permutation(positions), normalise, device, dtype)
            k += 1

    def rows(
        self,
        split: str = "eval",
        *,
        limit: int | None = None,
        start: int = 0,
        normalise: bool = True,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Float[Tensor, "row snapshot d_model"]:
        """Rows of a split in order, from its `start`-th row, at most `limit` of them."""
        a, b = row_bounds(self.split_rows(split), start, limit)
        block = np.empty((b - a, self.n_snapshots, self.d_model), dtype=DTYPES[self.dtype][1])
        for i in range(self.n_snapshots):
            block[:, i] = self._read_range(i, a, b)
        return self._to_tensor(block, normalise, device, dtype)

    def select(self, steps: int | Sequence[int] | None = None, *, indices: Sequence[int] | None = None) -> "ActivationStore":
        """A view over some snapshots (by training step or by position in `self.steps`), same rows."""
        positions = snapshot_positions(self.steps, steps, indices, "store")
        return ActivationStore(self.path, self.manifest, [self._indices[i] for i in positions], self._arrays)

    def context(
        self, window: int, position: int | None = None, *, normalise: bool = True, device: Any = "cpu"
    ) -> tuple[np.ndarray, Tensor]:
        """Tokens of `window` [context] and its activations [context, snapshot, d_model] (or [snapshot, d_model]
        at one `position`)."""
        first = self.row_index(window, 0 if position is None else position)
        tokens = np.array(self.tokens[window], dtype=np.int64)
        if position is None:
            block = np.empty((self.context_length, self.n_snapshots, self.d_model), dtype=DTYPES[self.dtype][1])
            for i in range(self.n_snapshots):
                block[:, i] = self._read_range(i, first, first + self.context_length)
            return tokens, self._to_tensor(block, normalise, device, torch.float32)
        block = np.stack([self._read_range(i, first, first + 1)[0] for i in range(self.n_snapshots)])[None]
        return tokens, self._to_tensor(block, normalise, device, torch.float32)[0]
