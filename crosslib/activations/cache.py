"""Building the activation cache: the same token positions in every snapshot, on disk, aligned row by row.

    store = build_store(CacheConfig(suite, steps=(0, 64, 512), hook="blocks.2.hook_resid_post"), windows)

`build_store` runs every snapshot over the token windows and writes a store whose layout, and the
`ActivationStore` that reads it, are in `crosslib.activations.store`; it returns the opened store.
`build_stores` builds the stores of several hooks (a model's layers) in one pass of each snapshot. While
building, ``<key>.partial/`` also holds ``progress/step{N}.jsonl``: one line per finished chunk
(its SHA-256 and norm sum), appended after the chunk's bytes are written.

Each snapshot's file is written in chunks of whole windows; a chunk's checksum is recorded only
once its bytes are on disk, so a killed build resumes from its finished chunks and produces the
same bytes as an uninterrupted one (same machine, same thread count).

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
from typing import Annotated, Any

import numpy as np
import torch

from crosslib.activations.sources import held_out_split
from crosslib.activations.store import (DTYPES, FORMAT, KIND, MANIFEST_FILE, TOKENS_FILE, ActivationStore, chunk_sha256, chunk_span,
                                        open_store)
from crosslib.artifacts import (
    CONFIG_FILE,
    ArtifactError,
    artifact_dir,
    atomic_write_json,
    build_artifacts,
    display_path,
    read_json,
    sha256_file,
)
from crosslib.config import (Check, Config, Convert, ParameterError, choice, fraction, is_int, lists_as_tuples,
                             positive_int, require)
from crosslib.models.hooks import HookPoint, capture_all, parse_hook, validate_hook

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
    from crosslib.models.snapshots import is_local_suite

    return is_local_suite(suite)


def weights_identity(suite: str, step: int) -> dict[str, Any]:
    """What identifies a snapshot's weights: its checksums for a local suite, repo + revision on the hub."""
    from crosslib.models.snapshots import checksums_path, local_checksums, step_dir

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
    from crosslib.models.snapshots import load_config

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
    n_train, n_eval = held_out_split(n_windows, config.eval_fraction, "windows")

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
    return build_stores([config], token_windows, root, verify=verify, progress=progress)[0]


def build_stores(
    configs: list[CacheConfig],
    token_windows: np.ndarray,
    root: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    progress: bool = True,
) -> list["ActivationStore"]:
    """`build_store` for configs that differ in their hook only, built together: each snapshot runs
    once over the windows for all of them (built one by one, a layer's store runs every layer below
    it again). Each store is its own artifact, byte for byte what `build_store` makes of its config.
    """
    configs = list(configs) if isinstance(configs, (list, tuple)) else configs
    require(isinstance(configs, list) and len(configs) > 0 and all(isinstance(c, CacheConfig) for c in configs),
            "configs", configs, "a non-empty list of CacheConfig")
    hooks = [c.hook for c in configs]
    require(len(set(hooks)) == len(hooks) and all(c.replace(hook=configs[0].hook) == configs[0] for c in configs),
            "configs", hooks, "CacheConfigs that differ in their hook only, each hook once")
    plans = [_prepare(config, token_windows) for config in configs]
    finals = [artifact_dir(KIND, plan.identity, root) for plan in plans]
    missing = [i for i, final in enumerate(finals) if not (final / CONFIG_FILE).is_file()]
    if not missing:
        return [open_store(final, verify=verify) for final in finals]
    _check_disk([plans[i] for i in missing], [finals[i] for i in missing])
    for plan in plans:
        plan.progress = progress

    built_here: set[int] = set()

    def build(partials: dict[int, Path]) -> None:
        try:
            _build([(partials[i], plans[i]) for i in sorted(partials)])
        except (CacheError, ParameterError):
            for partial in partials.values():  # deterministic failures: leave nothing behind
                shutil.rmtree(partial, ignore_errors=True)
            raise
        built_here.update(partials)

    paths = build_artifacts(KIND, [plan.identity for plan in plans], build, root)
    # A store this call just wrote was checksummed as it was written; one built by another process is verified.
    return [open_store(path, verify=verify and i not in built_here) for i, path in enumerate(paths)]


def _check_disk(plans: list["_Plan"], finals: list[Path]) -> None:
    """Say what the stores will take on disk; refuse, before computing anything, if the disk lacks it."""
    needed = written = 0
    for plan, final in zip(plans, finals):
        config = plan.config
        n_tokens = plan.n_windows * plan.context
        item = DTYPES[config.dtype][1].itemsize
        activations = n_tokens * plan.d_model * item * len(config.steps)
        free = _disk_usage(final).free
        # Operational (disk space, paths): stderr, never a published notebook's output.
        print(
            f"activation cache {config.hook}: {n_tokens:,} tokens x d={plan.d_model} x {item} B ({config.dtype}) x "
            f"{len(config.steps)} snapshots = {_human(activations)} (+ {_human(n_tokens * 4)} of tokens) on disk; "
            f"free: {_human(free)}",
            file=sys.stderr, flush=True,
        )
        needed += activations + n_tokens * 4  # + the int32 token windows
        written += _allocated_bytes(final.with_name(final.name + ".partial"))  # by an interrupted build
    missing = needed - written - free
    if missing > 0:
        raise CacheError(
            f"not enough free disk for the activation cache: it needs {_human(needed)} and "
            f"{display_path(finals[0].parent)} has {_human(free)} free. Free {_human(missing)} or more, point root "
            "(or $CROSSLIB_DATA) at a bigger disk, or cache fewer tokens or snapshots (or dtype='float16'/'bfloat16')"
        )


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

    def chunk_span(self, chunk: int, row_bytes: int) -> tuple[int, int]:
        """(byte offset, byte length) of `chunk` in a snapshot's file."""
        return chunk_span(chunk, self.chunk_windows, self.n_windows, self.context, row_bytes)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


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


@dataclasses.dataclass
class _Output:
    """One store being written, at one snapshot: its file, progress log and finished chunks."""

    partial: Path
    plan: _Plan
    fd: int = -1
    log: int = -1
    done: dict[int, dict] = dataclasses.field(default_factory=dict)


def _build(jobs: list[tuple[Path, _Plan]]) -> None:
    """Write the stores of `jobs` (partial folder, plan; the plans differ in their hook only): each
    snapshot runs once over the windows, and each store takes its hook's activations."""
    from crosslib.progress import progress as tqdm

    from crosslib.models.snapshots import load_snapshot

    outputs = [_Output(partial, plan) for partial, plan in jobs]
    plan = outputs[0].plan  # what the stores share: snapshots, windows, chunks, dtypes
    config, context = plan.config, plan.context
    torch_dtype, np_dtype = DTYPES[config.dtype]
    row_bytes = plan.d_model * np_dtype.itemsize
    n_tokens = plan.n_windows * context
    tokens_sha, previous, snapshots = [], [], [[] for _ in outputs]
    for out in outputs:
        for stale in out.partial.rglob("*.tmp"):  # temp files of atomic writes cut short by a kill
            stale.unlink(missing_ok=True)
        tokens_sha.append(_write_tokens(out.partial / TOKENS_FILE, out.plan.tokens))
        (out.partial / "acts").mkdir(exist_ok=True)
        (out.partial / "progress").mkdir(exist_ok=True)
        manifest = out.partial / MANIFEST_FILE
        previous.append(read_json(manifest) if manifest.is_file() else None)
    device = torch.device(config.device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if config.compute_dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    hooks = [out.plan.config.hook for out in outputs]
    label = ", ".join(hooks) if len(hooks) < 3 else f"{len(hooks)} hooks, {hooks[0]} to {hooks[-1]}"
    # (on stderr, or under `crosslib book` as lines of its progress log: crosslib.progress)
    bar = tqdm(total=n_tokens * len(config.steps) * len(outputs), unit="tok", unit_scale=True,
               desc=f"caching {label}", disable=not plan.progress)
    for s_index, step in enumerate(config.steps):
        file = f"acts/step{step}.bin"
        with contextlib.ExitStack() as opened:
            for out, earlier in zip(outputs, previous):
                out.fd = os.open(out.partial / file, os.O_RDWR | os.O_CREAT, 0o644)
                opened.callback(os.close, out.fd)
                if os.fstat(out.fd).st_size != n_tokens * row_bytes:
                    os.ftruncate(out.fd, n_tokens * row_bytes)
                out.done = _finished_chunks(out, earlier, s_index, step, row_bytes)
                bar.update(sum(plan.chunk_span(c, row_bytes)[1] // row_bytes for c in out.done))
            todo = sorted({c for c in range(plan.n_chunks) for out in outputs if c not in out.done})
            if todo:
                model, _ = load_snapshot(config.suite, step, device=device, with_tokenizer=False)
                if int(model.config.hidden_size) != plan.d_model:
                    raise ParameterError(
                        f"steps={config.steps}: step {step} has d_model={model.config.hidden_size}, "
                        f"the others {plan.d_model}"
                    )
                for out in outputs:
                    out.log = os.open(out.partial / "progress" / f"step{step}.jsonl",
                                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    opened.callback(os.close, out.log)
                for c in todo:
                    needing = [out for out in outputs if c not in out.done]
                    for out, record in zip(needing, _compute_chunk(model, needing, c, torch_dtype, step, autocast, bar)):
                        out.done[c] = record
                        # one append per finished chunk; a line cut short by a kill is ignored on resume
                        os.write(out.log, (json.dumps({"chunk": c, **record}) + "\n").encode())
                del model
            for out in outputs:
                os.fsync(out.fd)
        for out, kept in zip(outputs, snapshots):
            chunks = [out.done[c] for c in range(plan.n_chunks)]
            kept.append({
                "step": step,
                "file": file,
                "mean_norm": math.fsum(rec["norm_sum"] for rec in chunks) / n_tokens,
                "chunks": chunks,
            })
    bar.close()
    for out, sha, kept in zip(outputs, tokens_sha, snapshots):
        manifest = {
            "format": FORMAT,
            "suite": config.suite,
            "model_type": plan.model_type,
            "steps": list(config.steps),
            "weights": [dict(w) for w in plan.identity.weights],
            "hook": out.plan.point.name,
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
            "tokens": {"file": TOKENS_FILE, "dtype": "int32", "sha256": sha,
                       "fingerprint": plan.identity.tokens_sha256},
            "snapshots": kept,
            "config": out.plan.config.to_dict(),
        }
        atomic_write_json(out.partial / MANIFEST_FILE, manifest)
        shutil.rmtree(out.partial / "progress", ignore_errors=True)


def _finished_chunks(out: _Output, previous: dict | None, s_index: int, step: int, row_bytes: int) -> dict[int, dict]:
    """Chunks of a snapshot's file recorded as finished (in the progress log or an earlier manifest) whose
    bytes on disk still match the recorded checksum. Nothing else is trusted, so no fsync is needed for
    correctness: a chunk whose bytes were lost is simply computed again."""
    plan = out.plan
    records: dict[int, dict] = {}
    if previous is not None and s_index < len(previous.get("snapshots", [])):
        records.update(enumerate(previous["snapshots"][s_index]["chunks"]))
    records.update(_read_progress(out.partial / "progress" / f"step{step}.jsonl"))
    done: dict[int, dict] = {}
    for c, rec in sorted(records.items()):
        if 0 <= c < plan.n_chunks:
            offset, n_bytes = plan.chunk_span(c, row_bytes)
            if rec.get("sha256") == chunk_sha256(out.fd, offset, n_bytes):
                done[c] = {"sha256": rec["sha256"], "norm_sum": rec["norm_sum"]}
    return done


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


@torch.inference_mode()
def _compute_chunk(model, outputs: list[_Output], chunk: int, torch_dtype, step: int, autocast, bar) -> list[dict]:
    """Compute and write one chunk of each store in `outputs` (one forward pass per batch for all of them);
    their records (SHA-256 and norm sum of the chunk's bytes)."""
    plan = outputs[0].plan
    config, context = plan.config, plan.context
    device = torch.device(config.device)
    row_bytes = plan.d_model * DTYPES[config.dtype][1].itemsize
    w0 = chunk * plan.chunk_windows
    w1 = min(plan.n_windows, w0 + plan.chunk_windows)
    digests = [hashlib.sha256() for _ in outputs]
    norm_sums: list[list[float]] = [[] for _ in outputs]
    for b0 in range(w0, w1, config.batch_size):
        b1 = min(w1, b0 + config.batch_size)
        ids = torch.from_numpy(np.ascontiguousarray(plan.tokens[b0:b1], dtype=np.int64)).to(device)
        with autocast:
            activations = capture_all(model, [out.plan.point for out in outputs], ids)
        for out, acts, digest, sums in zip(outputs, activations, digests, norm_sums):
            stored = acts.to(torch_dtype)
            if not bool(torch.isfinite(stored).all()):
                raise CacheError(
                    f"non-finite activations (NaN or inf) at step {step}, {out.plan.config.hook}, chunk {chunk} "
                    f"(windows {b0}..{b1 - 1}) of suite {config.suite!r}: the checkpoint's weights are broken"
                    + (" or the values overflow float16 (use dtype='bfloat16' or 'float32')"
                       if config.dtype == "float16" else "")
                    + "; nothing was published"
                )
            sums.append(float(stored.float().norm(dim=-1).double().sum()))
            host = stored.reshape(-1, plan.d_model).contiguous().cpu()
            if torch_dtype == torch.bfloat16:
                host = host.view(torch.int16)
            data = memoryview(host.numpy().view(np.uint8).reshape(-1))
            digest.update(data)
            _pwrite_all(out.fd, data, b0 * context * row_bytes)
            bar.update((b1 - b0) * context)
    return [{"sha256": digest.hexdigest(), "norm_sum": math.fsum(sums)} for digest, sums in zip(digests, norm_sums)]
