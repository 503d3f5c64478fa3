"""Where dictionaries get their activations: the `ActivationSource` protocol, the `RowSource` base
that implements it, and an in-memory source.

Training code reads activations only through the protocol, so the disk-backed activation cache
(`crosslib.activations.store.ActivationStore`) and an in-memory tensor (`TensorSource`, for tests and
synthetic data) are interchangeable. A source holds rows aligned across snapshots: row r is the
same token position in every snapshot.

    source = TensorSource(acts)                     # acts: [row, snapshot, d_model]
    for batch in source.batches(2048, seed=0):      # endless, shuffled, [batch, snapshot, d_model]
        ...
    source.batches(2048, seed=0, start_batch=k)     # its first batch is the k-th of the stream above

Both sources are `RowSource`s: the base owns the train/eval split, the shuffle (`RowPermutation`)
and the batching, so the same rows give the same batches for the same seed, whichever holds them;
a subclass only reads rows (`_gather`, `_slice`) and makes snapshot views (`select`).

Normalisation (the book's Methods page, section Activations and normalisation): snapshot θ is
scaled by `norm_factors[θ] = sqrt(d_model) / E‖x^θ‖`, so every snapshot's rows have mean norm
sqrt(d_model).
"""

from __future__ import annotations

import abc
import hashlib
import math
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from crosslib.config import ParameterError, require, require_choice, require_fraction

SPLITS = ("train", "eval", "all")


@runtime_checkable
class ActivationSource(Protocol):
    """Rows of activations aligned across snapshots (what crosscoder training reads).

    Implemented by every `RowSource` (`crosslib.activations.store.ActivationStore` on disk, `TensorSource`
    in memory) and by wrappers that pass another source's batches through. Optional extras that
    training uses when present: `norm_factors` (per-snapshot normalisation, for exporting to
    sae-lens) and `fingerprint` (a content id, for caching trained dictionaries).
    """

    steps: list[int]
    n_snapshots: int
    d_model: int

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
        """Endless shuffled batches, deterministic in (seed, start_batch): with start_batch=k the
        first batch equals the k-th batch of the stream started at 0."""
        ...

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
        """The rows of a split, in order, from its `start`-th row (at most `limit`)."""
        ...

    def select(self, steps: int | Sequence[int] | None = None, *, indices: Sequence[int] | None = None) -> "ActivationSource":
        """A view over some snapshots (by training step or by position), same rows."""
        ...


def snapshot_positions(available: Sequence[int], steps: int | Sequence[int] | None,
                       indices: int | Sequence[int] | None, what: str) -> list[int]:
    """Positions in `available` (a source's steps) chosen by training step or by position (exactly one
    of `steps`, `indices`; negative indices count from the end). `what` names the source in errors."""
    if (steps is None) == (indices is None):
        raise ParameterError("select needs exactly one of steps=[...] or indices=[...]")
    available = list(available)
    if steps is not None:
        wanted = [steps] if isinstance(steps, int) else list(steps)
        if not wanted or any(s not in available for s in wanted):
            raise ParameterError(f"steps={steps!r} is not allowed: choose among this {what}'s steps {available}")
        return [available.index(s) for s in wanted]
    n = len(available)
    positions = [indices] if isinstance(indices, int) else list(indices)
    if not positions or any(not isinstance(i, int) or not -n <= i < n for i in positions):
        raise ParameterError(f"indices={indices!r} is not allowed: use indices in 0..{n - 1}")
    return [i % n for i in positions]


def row_bounds(rows: range, start: int, limit: int | None) -> tuple[int, int]:
    """[a, b) of the rows of a split from its `start`-th row, at most `limit` of them (checked)."""
    require(limit is None or (isinstance(limit, int) and limit >= 0), "limit", limit, "None or an integer >= 0")
    require(isinstance(start, int) and 0 <= start <= len(rows), "start", start, f"an integer in 0..{len(rows)}")
    a = rows.start + start
    return a, rows.stop if limit is None else min(rows.stop, a + limit)


def held_out_split(n: int, eval_fraction: float, units: str) -> tuple[int, int]:
    """(n_train, n_eval) of `n` windows or rows (`units`): the eval ones are the last
    round(n · eval_fraction), at least one unless eval_fraction is 0."""
    n_eval = 0 if eval_fraction == 0 else max(1, round(n * eval_fraction))
    if n - n_eval < 1:
        raise ParameterError(
            f"eval_fraction={eval_fraction} leaves no training {units} out of n_{units}={n}: "
            f"pass more {units} or a smaller eval_fraction"
        )
    return n - n_eval, n_eval


def source_fingerprint(source: Any) -> str:
    """A content identity for `source`, used to key cached dictionaries.

    `source.fingerprint` when the source has one; for a cache store without it, the name of its
    content-addressed directory plus the selected steps. Otherwise a `ParameterError`.
    """
    fp = getattr(source, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    path, steps = getattr(source, "path", None), getattr(source, "steps", None)
    if path is not None and steps is not None:
        hook = getattr(source, "hook", "")
        return hashlib.sha256(f"{type(source).__name__}|{getattr(path, 'name', path)}|{hook}|{list(steps)}".encode()).hexdigest()[:32]
    raise ParameterError(
        f"source={type(source).__name__} has no 'fingerprint' attribute: caching a trained dictionary needs a "
        "content identity of its data; pass a TensorSource/ActivationStore or train without the cache (out_dir=...)"
    )


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


# --------------------------------------------------------------------------- the shared row source


class RowSource(abc.ABC):
    """An `ActivationSource` over numbered rows: owns the split, the shuffle and the batching.

    The "eval" split is the last `n_eval` rows, "train" the `n_train` before them. Batch k of a
    split is rows ``permutation(k * batch_size ... (k + 1) * batch_size)`` of a `RowPermutation`
    of the split seeded by `seed`: epoch e visits every row once in an order set by (seed, e), so
    batch k is a pure function of (seed, k) and a stream can start at any batch.

    A subclass sets `steps`, `d_model`, the row counts (through `__init__`) and `norm_factors`,
    `mean_norms`; it reads rows (`_gather`, `_slice`) and makes snapshot views (`select`).
    """

    noun = "source"  # how errors name this kind of source

    def __init__(self, steps: Sequence[int], d_model: int, n_rows: int, n_eval: int):
        self.steps: list[int] = list(steps)
        self.n_snapshots: int = len(self.steps)
        self.d_model: int = d_model
        self.n_tokens: int = n_rows
        self.n_train: int = n_rows - n_eval
        self.n_eval: int = n_eval
        self.norm_factors: np.ndarray
        self.mean_norms: np.ndarray

    def __len__(self) -> int:
        return self.n_tokens

    # ---- what a subclass provides

    @abc.abstractmethod
    def _gather(self, rows: np.ndarray, normalise: bool, device: Any, dtype: torch.dtype) -> Tensor:
        """Rows `rows` (int64, in that order) as [row, snapshot, d_model]."""

    @abc.abstractmethod
    def _slice(self, start: int, stop: int, normalise: bool, device: Any, dtype: torch.dtype) -> Tensor:
        """Rows start..stop-1 as [row, snapshot, d_model]."""

    @abc.abstractmethod
    def select(self, steps: int | Sequence[int] | None = None, *, indices: Sequence[int] | None = None) -> "RowSource":
        """A view over some snapshots (by training step or by position in `self.steps`), same rows."""

    # ---- shared

    def _normalised(self, x: Tensor) -> Tensor:
        """`x` [row, snapshot, d_model] (float32) scaled per snapshot by `norm_factors`."""
        return x * torch.as_tensor(self.norm_factors, dtype=torch.float32, device=x.device)[:, None]

    def split_rows(self, split: str = "train") -> range:
        """The row indices of a split: "train", "eval" (the last `n_eval` rows) or "all"."""
        require_choice("split", split, SPLITS)
        return {"train": range(0, self.n_train), "eval": range(self.n_train, self.n_tokens),
                "all": range(self.n_tokens)}[split]

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
        resumes exactly. Only the rows of the current batch are read.
        """
        require(isinstance(batch_size, int) and batch_size > 0, "batch_size", batch_size, "a positive integer")
        require(isinstance(start_batch, int) and start_batch >= 0, "start_batch", start_batch, "an integer >= 0")
        require(isinstance(seed, int) and seed >= 0, "seed", seed, "an integer >= 0")
        rows = self.split_rows(split)
        if len(rows) == 0:
            raise ParameterError(f"split={split!r} has no rows in this {self.noun} (eval_fraction=0); use split='train'")
        return self._batches(RowPermutation(len(rows), seed), rows.start, batch_size, start_batch, normalise, device,
                             dtype)

    def _batches(self, permutation: RowPermutation, first_row: int, batch_size: int, start_batch: int,
                 normalise: bool, device: Any, dtype: torch.dtype) -> Iterator[Tensor]:
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
        return self._slice(a, b, normalise, device, dtype)


class TensorSource(RowSource):
    """A `RowSource` over an in-memory tensor [row, snapshot, d_model].

    The last round(n_rows · eval_fraction) rows (at least one unless eval_fraction is 0) form
    the "eval" split, the rest "train", the rule the activation cache applies to its windows.
    """

    def __init__(
        self,
        activations: Float[Tensor, "row snapshot d_model"],
        steps: Sequence[int] | None = None,
        eval_fraction: float = 0.1,
        *,
        _norm_factors: np.ndarray | None = None,
    ):
        if not isinstance(activations, Tensor) or activations.ndim != 3:
            shape = tuple(activations.shape) if isinstance(activations, Tensor) else type(activations).__name__
            raise ParameterError(f"activations={shape} is not allowed: a tensor of shape [row, snapshot, d_model]")
        require(activations.shape[0] >= 1 and activations.shape[1] >= 1 and activations.shape[2] >= 1,
                "activations", tuple(activations.shape), "a non-empty [row, snapshot, d_model] tensor")
        require(activations.is_floating_point(), "activations.dtype", activations.dtype, "a floating-point dtype")
        require_fraction("eval_fraction", eval_fraction, open_interval=False)
        require(eval_fraction < 1, "eval_fraction", eval_fraction, "a number in [0, 1)")
        n_rows, n_snapshots, d_model = activations.shape
        steps = list(range(n_snapshots)) if steps is None else [int(s) for s in steps]
        require(len(steps) == n_snapshots, "steps", steps, f"one step per snapshot ({n_snapshots} of them)")
        require(len(set(steps)) == len(steps), "steps", steps, "distinct steps")
        _, n_eval = held_out_split(n_rows, eval_fraction, "rows")
        super().__init__(steps, d_model, n_rows, n_eval)
        self._data = activations.detach().cpu()
        self.eval_fraction = float(eval_fraction)
        if _norm_factors is None:
            mean_norms = self._data.double().norm(dim=-1).mean(dim=0).numpy()
            if not np.all(np.isfinite(mean_norms)) or np.any(mean_norms <= 0):
                bad = [s for s, m in zip(steps, mean_norms) if not (np.isfinite(m) and m > 0)]
                raise ParameterError(f"activations at steps {bad} have a zero or non-finite mean norm: cannot normalise them")
            _norm_factors = math.sqrt(d_model) / mean_norms
        self.norm_factors: np.ndarray = np.asarray(_norm_factors, dtype=np.float64)
        self.mean_norms: np.ndarray = math.sqrt(d_model) / self.norm_factors
        self._fingerprint: str | None = None
        self._normalised_rows: Tensor | None = None

    def __repr__(self) -> str:
        return f"TensorSource(rows={self.n_tokens}, steps={self.steps}, d_model={self.d_model})"

    @property
    def fingerprint(self) -> str:
        """sha256 of the rows, steps and split (computed once)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(f"TensorSource|{self.steps}|{self.n_eval}|{tuple(self._data.shape)}|{self._data.dtype}".encode())
            digest.update(self._data.contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:32]
        return self._fingerprint

    def _finish(self, block: Tensor, normalise: bool, device: Any, dtype: torch.dtype) -> Tensor:
        block = block.float()
        if normalise:
            block = self._normalised(block)
        return block.to(device=device, dtype=dtype)

    def _normalised_data(self) -> Tensor:
        """The rows scaled once (fp32), so a normalised batch is a single gather."""
        if self._normalised_rows is None:
            self._normalised_rows = self._finish(self._data, True, "cpu", torch.float32)
        return self._normalised_rows

    def _gather(self, rows: np.ndarray, normalise: bool, device: Any, dtype: torch.dtype) -> Tensor:
        index = torch.from_numpy(rows)
        if normalise:  # (index_select: the same rows as [index], ~5x faster on CPU)
            return self._normalised_data().index_select(0, index).to(device=device, dtype=dtype)
        return self._finish(self._data.index_select(0, index), False, device, dtype)

    def _slice(self, start: int, stop: int, normalise: bool, device: Any, dtype: torch.dtype) -> Tensor:
        return self._finish(self._data[start:stop], normalise, device, dtype)

    def select(self, steps: int | Sequence[int] | None = None, *, indices: Sequence[int] | None = None) -> "TensorSource":
        positions = snapshot_positions(self.steps, steps, indices, self.noun)
        view = TensorSource.__new__(TensorSource)
        view.__dict__.update(self.__dict__)
        view._data = self._data[:, positions]
        view.steps = [self.steps[i] for i in positions]
        view.n_snapshots = len(positions)
        view.norm_factors = self.norm_factors[positions]
        view.mean_norms = self.mean_norms[positions]
        view._fingerprint = None
        view._normalised_rows = None
        return view


def planted_features(
    n_rows: int = 20_000,
    n_snapshots: int = 4,
    d_model: int = 32,
    n_shared: int = 12,
    n_partial: int = 12,
    *,
    density: float = 0.05,
    noise: float = 0.01,
    rotate: float = 0.0,
    seed: int = 0,
    eval_fraction: float = 0.1,
) -> tuple[TensorSource, dict[str, Tensor]]:
    """Synthetic activations with known sparse features, for testing dictionary learning.

    `n_shared` features are present in every snapshot, `n_partial` in a random contiguous run of
    1..S−1 snapshots (like features that form or fade during training). Feature i fires on a row
    with probability `density` with an exponential magnitude, the same magnitude at every snapshot
    where it is present; x^θ = Σ_i a_i · present[i, θ] · u_i^θ + noise. `rotate` > 0 tilts each
    feature's direction from snapshot to snapshot (cosine between neighbours ≈ 1 − rotate²/2).

    Returns the source and the truth: directions [feature, snapshot, d_model] (unit vectors),
    present [feature, snapshot] (bool).
    """
    require(n_snapshots >= 2 or n_partial == 0, "n_partial", n_partial, "0 when n_snapshots = 1")
    g = torch.Generator().manual_seed(seed)
    n_features = n_shared + n_partial
    present = torch.ones(n_features, n_snapshots, dtype=torch.bool)
    for i in range(n_shared, n_features):
        length = int(torch.randint(1, n_snapshots, (1,), generator=g))
        first = int(torch.randint(0, n_snapshots - length + 1, (1,), generator=g))
        present[i] = False
        present[i, first:first + length] = True
    base = torch.randn(n_features, d_model, generator=g)
    directions = [base]
    for _ in range(1, n_snapshots):
        directions.append(directions[-1] + rotate * torch.randn(n_features, d_model, generator=g) * base.norm(dim=-1, keepdim=True) / math.sqrt(d_model))
    directions = torch.stack(directions, dim=1)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    fires = torch.rand(n_rows, n_features, generator=g) < density
    magnitude = -torch.log(torch.rand(n_rows, n_features, generator=g).clamp_min(1e-12)) + 0.5
    a = torch.where(fires, magnitude, 0.0)
    x = torch.einsum("rf,fs,fsd->rsd", a, present.float(), directions)
    x = x + noise * torch.randn(x.shape, generator=g)
    source = TensorSource(x, eval_fraction=eval_fraction)
    return source, {"directions": directions, "present": present}
