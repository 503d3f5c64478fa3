"""Reading the activation cache: `open_store` checks a published store, `ActivationStore` hands out its rows.

    store = open_store(path)                        # or build_store(...) (crosslib.activations.cache), which opens it
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

Rows are token positions in window order: row = window * context_length + position. Each
snapshot's file is checksummed in chunks of whole windows (`chunk_span`). Nothing is unpickled:
arrays are raw little-endian files read through `np.memmap`. The split, the shuffle and the
batching are those of every `crosslib.activations.sources.RowSource`.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from crosslib.activations.sources import RowSource, snapshot_positions
from crosslib.artifacts import (
    CONFIG_FILE,
    ArtifactError,
    corruption_message,
    read_json,
    sha256_file,
    unchanged_since_verified,
    verify_artifact,
    write_stamp,
)
from crosslib.config import ParameterError, require

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


def chunk_span(chunk: int, chunk_windows: int, n_windows: int, context_length: int, row_bytes: int) -> tuple[int, int]:
    """(byte offset, byte length) of `chunk` in a snapshot's file: windows chunk·chunk_windows onwards."""
    w0 = chunk * chunk_windows
    w1 = min(n_windows, w0 + chunk_windows)
    return w0 * context_length * row_bytes, (w1 - w0) * context_length * row_bytes


def chunk_sha256(fd: int, offset: int, n_bytes: int) -> str:
    """SHA-256 of `n_bytes` of an open file from `offset`, read in blocks of 4 MiB."""
    digest = hashlib.sha256()
    while n_bytes > 0:
        block = os.pread(fd, min(n_bytes, 1 << 22), offset)
        if not block:
            break
        digest.update(block)
        offset, n_bytes = offset + len(block), n_bytes - len(block)
    return digest.hexdigest()


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
                    offset, n_bytes = chunk_span(c, manifest["chunk_windows"], manifest["n_windows"],
                                                 manifest["context_length"], row_bytes)
                    if chunk_sha256(fd, offset, n_bytes) != rec["sha256"]:
                        first_row = offset // row_bytes
                        raise ArtifactError(corruption_message(
                            path, f"{path / snap['file']}: chunk {c} (rows {first_row}..{first_row + n_bytes // row_bytes - 1}) "
                            "does not match its checksum in manifest.json"))
            finally:
                os.close(fd)
        write_stamp(path, names)
    return ActivationStore(path, manifest)


class ActivationStore(RowSource):
    """A read-only activation store (or a view over some of its snapshots).

    Attributes: `path`, `steps`, `hook`, `d_model`, `n_snapshots`, `n_tokens`, `n_windows`,
    `context_length`, `tokens` (int32 memmap [n_windows, context]), `mean_norms` [n_snapshots],
    `norm_factors` (= sqrt(d_model) / mean_norms), `dtype`, `config`, `manifest`.
    Rows are positions, row = window * context_length + position; the eval split is the last
    `n_eval_windows` windows, so no context is shared between train and eval rows.
    """

    noun = "store"

    def __init__(self, path: Path, manifest: dict, indices: Sequence[int] | None = None, _arrays: dict | None = None):
        from crosslib.activations.cache import CacheConfig  # the writer's module imports this one

        all_snapshots = manifest["snapshots"]
        self._indices = list(range(len(all_snapshots))) if indices is None else list(indices)
        self._snapshots = [all_snapshots[i] for i in self._indices]
        self.context_length: int = int(manifest["context_length"])
        self.n_train_windows: int = int(manifest["n_train_windows"])
        self.n_eval_windows: int = int(manifest["n_eval_windows"])
        super().__init__([int(s["step"]) for s in self._snapshots], int(manifest["d_model"]), int(manifest["n_tokens"]),
                         self.n_eval_windows * self.context_length)
        self.path = Path(path)
        self.manifest = manifest
        self._arrays = {} if _arrays is None else _arrays  # file -> np.memmap, shared by views
        self.hook: str = manifest["hook"]
        self.dtype: str = manifest["dtype"]
        self.n_windows: int = int(manifest["n_windows"])
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

    # ---- windows and positions

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
            t = self._normalised(t)
        return t.to(dtype)

    # ---- the rows a RowSource reads

    def _gather(self, rows: np.ndarray, normalise: bool, device: Any, dtype: torch.dtype) -> Tensor:
        order = np.argsort(rows, kind="stable")  # each snapshot's file is read in row order
        sorted_rows = rows[order]
        block = np.empty((len(rows), self.n_snapshots, self.d_model), dtype=DTYPES[self.dtype][1])
        for i in range(self.n_snapshots):
            block[order, i] = self._read(i, sorted_rows)
        return self._to_tensor(block, normalise, device, dtype)

    def _slice(self, start: int, stop: int, normalise: bool, device: Any, dtype: torch.dtype) -> Tensor:
        block = np.empty((stop - start, self.n_snapshots, self.d_model), dtype=DTYPES[self.dtype][1])
        for i in range(self.n_snapshots):
            block[:, i] = self._read_range(i, start, stop)
        return self._to_tensor(block, normalise, device, dtype)

    def select(self, steps: int | Sequence[int] | None = None, *, indices: Sequence[int] | None = None) -> "ActivationStore":
        """A view over some snapshots (by training step or by position in `self.steps`), same rows."""
        positions = snapshot_positions(self.steps, steps, indices, self.noun)
        return ActivationStore(self.path, self.manifest, [self._indices[i] for i in positions], self._arrays)

    def context(
        self, window: int, position: int | None = None, *, normalise: bool = True, device: Any = "cpu"
    ) -> tuple[np.ndarray, Tensor]:
        """Tokens of `window` [context] and its activations [context, snapshot, d_model] (or [snapshot, d_model]
        at one `position`)."""
        first = self.row_index(window, 0 if position is None else position)
        tokens = np.array(self.tokens[window], dtype=np.int64)
        if position is None:
            return tokens, self._slice(first, first + self.context_length, normalise, device, torch.float32)
        block = np.stack([self._read_range(i, first, first + 1)[0] for i in range(self.n_snapshots)])[None]
        return tokens, self._to_tensor(block, normalise, device, torch.float32)[0]
