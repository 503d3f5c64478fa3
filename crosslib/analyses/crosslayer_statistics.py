"""Streaming statistics between SAE features of adjacent layers (Lerner et al., arXiv 2410.08869;
the book's Methods page, section Features across layers).

Encoding the *same* token positions with the SAE of layer L and the SAE of layer L+1 gives two
aligned activation tables, acts_upstream [row, feature_up] and acts_downstream [row, feature_down].
`layer_chain_statistics` (every adjacent pair of a chain of layers) and `pair_statistics` (one pair)
compare every upstream feature A with every downstream feature B over many rows (≥ 1M tokens)
without holding the tables in memory: the Pearson correlation of the activations, and on binarised
activity (a feature is *active* on a row when its activation > binarise_fraction × its maximum over
all rows) the Jaccard index, the sufficiency P(B active | A active) and the necessity
P(A active | B active). Result: one `PairStatistics` per pair of adjacent layers, which
`crosslib.analyses.crosslayer_findings` turns into findings. Thresholds live in `CrossLayerConfig`.

Memory: the statistics keep, per pair of adjacent layers, two dense float64 matrices
[feature_up, feature_down] (the cross products, then the correlation, and the co-activity
counts): 2 × 8 × F² bytes, i.e. 16 MB at F = 1024 and 268 MB at F = 4096. The Jaccard, necessity
and sufficiency matrices are derived from the counts when first asked for (8 × F² bytes each).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Sequence

import numpy as np
import safetensors
import safetensors.numpy
import scipy.sparse
import torch
from jaxtyping import Float
from crosslib.progress import progress as tqdm

from crosslib.artifacts import atomic_write_bytes
from crosslib.config import (Config, ParameterError, choice, fraction, integer, is_number, positive, require,
                             require_choice)

# Feature activations of one batch of rows, as the caller's encoder returns them.
Activations = (
    Float[torch.Tensor, "batch feature"]
    | Float[np.ndarray, "batch feature"]
    | Float[torch.Tensor, "batch 1 feature"]
    | Float[np.ndarray, "batch 1 feature"]
)
# A function that returns a fresh iterator over the same batches each time it is called.
BatchFactory = Callable[[], Iterable[Sequence[Activations]]]

MEASURES: tuple[str, ...] = ("pearson", "jaccard", "necessity", "sufficiency")
EDGE_MEASURES: tuple[str, ...] = ("pearson", "jaccard")

# Below this share of non-zero entries a batch's cross products use sparse matrices: SAE
# activations are very sparse (L0 ≈ 30 of 1000s of features), which makes them ~5× faster.
SPARSE_DENSITY = 0.1


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CrossLayerConfig(Config):
    """Thresholds for the cross-layer statistics and findings.

    binarise_fraction: a feature is *active* on a row when its activation is strictly greater
        than binarise_fraction × its maximum activation over all rows (paper: 0.2). A feature
        whose maximum is ≤ 0 is never active ("dead"). In [0, 1).
    pass_through: an upstream feature *passes through* when its best Pearson correlation with
        any next-layer feature is ≥ this (paper: 0.95); a downstream feature was *passed
        through* when its best upstream correlation is ≥ this.
    partner_threshold: a feature has a *partner* in the adjacent layer when some feature there
        correlates with it at ≥ this. A downstream feature without an upstream partner
        *appears*; an upstream feature without a downstream partner *disappears*; features with
        a partner that do not pass through are *transformed*. Must be ≤ pass_through; set it
        equal to pass_through for a two-way split (passed through or not).
    gate: necessity / sufficiency threshold of a quasi-boolean gate (paper: 0.999).
    gate_min_active: a conditional probability only counts for gates when the feature it is
        conditioned on was active on at least this many rows (P(A|B) = 1 from B active once
        says nothing).
    edge_measure: "pearson" or "jaccard": which statistic makes the edges of the layer graph.
    edge_threshold: the graph has an edge between two features of adjacent layers when their
        edge_measure is ≥ this.
    top_k: how many partners `top_partners` lists per feature.
    louvain_resolution: Louvain resolution (> 1 gives more, smaller communities).
    seed: seeds Louvain, so the communities are the same on every run.
    """

    binarise_fraction: Annotated[float, fraction("[0, 1)", allowed="a number in [0, 1) (share of each feature's maximum)")] = 0.2
    pass_through: Annotated[float, fraction("(0, 1]", allowed="a correlation in (0, 1]")] = 0.95
    partner_threshold: float = 0.5
    gate: Annotated[float, fraction("(0, 1]", allowed="a probability in (0, 1]")] = 0.999
    gate_min_active: Annotated[int, integer(1, allowed="an integer >= 1 (rows)")] = 10
    edge_measure: Annotated[str, choice(*EDGE_MEASURES)] = "pearson"
    edge_threshold: Annotated[float, fraction("(0, 1]")] = 0.5
    top_k: Annotated[int, integer(1)] = 5
    louvain_resolution: Annotated[float, positive()] = 1.0
    seed: Annotated[int, integer()] = 0

    def validate(self) -> None:
        require(
            is_number(self.partner_threshold) and 0 < self.partner_threshold <= self.pass_through,
            "partner_threshold",
            self.partner_threshold,
            f"a correlation in (0, pass_through={self.pass_through}]",
        )


# --------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PairStatistics:
    """Statistics between every upstream feature A (layer L) and downstream feature B (layer L+1).

    Matrices are indexed [feature_up, feature_down]. Definitions (n = number of rows):

    - pearson[A, B]: Pearson correlation of the raw activations over the rows; 0 where either
      feature has zero variance (e.g. a dead feature).
    - active: act > binarise_fraction × max over rows (strictly; a feature with max ≤ 0 is
      never active).
    - co_active_count[A, B]: rows where A and B are both active.
    - jaccard[A, B] = |A ∧ B| / |A ∨ B| (0 when neither is ever active).
    - sufficiency[A, B] = P(B active | A active) = |A ∧ B| / |A|: "A being on is enough for B to
      be on" (0 when A is never active). An OR gate B = A1 ∨ A2 has two sufficient inputs.
    - necessity[A, B] = P(A active | B active) = |A ∧ B| / |B|: "B is only on when A is on"
      (0 when B is never active). An AND gate B = A1 ∧ A2 has two necessary inputs.
    """

    upstream_layer: int
    downstream_layer: int
    n_rows: int
    binarise_fraction: float
    max_upstream: Float[np.ndarray, "feature_up"]
    max_downstream: Float[np.ndarray, "feature_down"]
    mean_upstream: Float[np.ndarray, "feature_up"]
    mean_downstream: Float[np.ndarray, "feature_down"]
    std_upstream: Float[np.ndarray, "feature_up"]
    std_downstream: Float[np.ndarray, "feature_down"]
    active_count_upstream: Float[np.ndarray, "feature_up"]
    active_count_downstream: Float[np.ndarray, "feature_down"]
    co_active_count: Float[np.ndarray, "feature_up feature_down"]
    pearson: Float[np.ndarray, "feature_up feature_down"]

    @property
    def n_upstream(self) -> int:
        return int(self.max_upstream.shape[0])

    @property
    def n_downstream(self) -> int:
        return int(self.max_downstream.shape[0])

    @property
    def alive_upstream(self) -> np.ndarray:
        """Upstream features active on at least one row."""
        return self.active_count_upstream > 0

    @property
    def alive_downstream(self) -> np.ndarray:
        return self.active_count_downstream > 0

    @functools.cached_property
    def jaccard(self) -> Float[np.ndarray, "feature_up feature_down"]:
        union = self.active_count_upstream[:, None] + self.active_count_downstream[None, :] - self.co_active_count
        return _safe_divide(self.co_active_count, union)

    @functools.cached_property
    def sufficiency(self) -> Float[np.ndarray, "feature_up feature_down"]:
        """P(B active | A active), conditioned on the upstream feature (rows of the matrix)."""
        return _safe_divide(self.co_active_count, self.active_count_upstream[:, None])

    @functools.cached_property
    def necessity(self) -> Float[np.ndarray, "feature_up feature_down"]:
        """P(A active | B active), conditioned on the downstream feature (columns of the matrix)."""
        return _safe_divide(self.co_active_count, self.active_count_downstream[None, :])

    def measure(self, name: str) -> Float[np.ndarray, "feature_up feature_down"]:
        """One of the four matrices by name: pearson, jaccard, necessity or sufficiency."""
        require_choice("measure", name, MEASURES)
        return getattr(self, name)

    # Saved as safetensors (arrays) with the scalars as metadata: no pickle.
    _ARRAYS = (
        "max_upstream", "max_downstream", "mean_upstream", "mean_downstream", "std_upstream",
        "std_downstream", "active_count_upstream", "active_count_downstream", "co_active_count", "pearson",
    )

    def save(self, path: str | os.PathLike) -> Path:
        """Write to one .safetensors file (atomically)."""
        metadata = {
            "upstream_layer": str(self.upstream_layer),
            "downstream_layer": str(self.downstream_layer),
            "n_rows": str(self.n_rows),
            "binarise_fraction": repr(float(self.binarise_fraction)),
        }
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in self._ARRAYS}
        data = safetensors.numpy.save(arrays, metadata=metadata)
        atomic_write_bytes(path, data)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PairStatistics":
        path = Path(path)
        if not path.is_file():
            raise ParameterError(f"path={str(path)!r} is not allowed: no such file (write it with PairStatistics.save)")
        with safetensors.safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in cls._ARRAYS}
        return cls(
            upstream_layer=int(meta["upstream_layer"]),
            downstream_layer=int(meta["downstream_layer"]),
            n_rows=int(meta["n_rows"]),
            binarise_fraction=float(meta["binarise_fraction"]),
            **arrays,
        )


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    denominator = np.broadcast_to(denominator, numerator.shape)
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _as_rows(batch: Any, name: str) -> Float[np.ndarray, "batch feature"]:
    """One batch as a float32/float64 numpy array [batch, feature]; accepts [batch, 1, feature] too."""
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().to("cpu")
        if batch.dtype not in (torch.float32, torch.float64):  # fp16/bf16 caches: numpy lacks bf16
            batch = batch.to(torch.float32)
        batch = batch.contiguous().numpy()  # (torch transposes ~3x faster than numpy)
    try:
        array = np.asarray(batch)
        if array.dtype not in (np.float32, np.float64):
            array = array.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise ParameterError(f"{name} must be a numeric array, got {type(batch).__name__}") from error
    if array.ndim == 3 and array.shape[1] == 1:  # an SAE's encode() keeps a snapshot axis of size 1
        array = array[:, 0, :]
    if array.ndim != 2:
        raise ParameterError(
            f"{name} has shape {tuple(array.shape)}: give feature activations [batch, feature] (or [batch, 1, feature])"
        )
    if not np.isfinite(array).all():
        raise ParameterError(f"{name} contains NaN or infinite activations: check the encoder and its inputs")
    # row-major once: an encoder's output is feature-major in memory, and every pass below reads rows
    # (on such a view each reshape and nonzero made its own strided copy, most of the statistics' time)
    return np.ascontiguousarray(array)


# One layer's batch, as the cross products want it: a dense float64 array, or a float64 CSR
# matrix when the batch is sparse (SAE activations: L0 ≈ 30 of 1000s of features).
Table = np.ndarray | scipy.sparse.csr_matrix


def _to_table(values: Float[np.ndarray, "batch feature"]) -> Table:
    """Dense float64 when at least SPARSE_DENSITY of the entries are non-zero, else CSR float64."""
    nonzero = values != 0
    if nonzero.sum() >= SPARSE_DENSITY * max(values.size, 1):
        return values.astype(np.float64, copy=False)
    # Build the CSR directly from the row-major positions: ~5× faster than scipy's converter.
    flat_positions = np.flatnonzero(nonzero)
    indptr = np.zeros(values.shape[0] + 1, dtype=np.int64)
    np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
    return scipy.sparse.csr_matrix(
        (values.reshape(-1)[flat_positions].astype(np.float64), flat_positions % values.shape[1], indptr),
        shape=values.shape,
    )


def _column_sums(table: Table, squared: bool = False) -> Float[np.ndarray, "feature"]:
    if isinstance(table, np.ndarray):
        return np.einsum("rf,rf->f", table, table) if squared else table.sum(axis=0)
    weights = table.data**2 if squared else table.data
    return np.bincount(table.indices, weights=weights, minlength=table.shape[1])


def _binarise(table: Table, cut: Float[np.ndarray, "feature"]) -> Table:
    """1.0 where the activation is > cut (per feature), else 0 — sparse stays sparse."""
    if isinstance(table, np.ndarray):
        return (table > cut).astype(np.float64)
    # Active entries are a subset of the non-zero ones (cut ≥ 0), so only the stored values matter.
    active = table.copy()
    active.data = (table.data > cut[table.indices]).astype(np.float64)
    active.eliminate_zeros()
    return active


def _cross_product(upstream: Table, downstream: Table) -> Float[np.ndarray, "feature_up feature_down"]:
    """Σ_rows upstream[row, a] · downstream[row, b] as a dense float64 matrix (exact sums of products)."""
    up_sparse, down_sparse = scipy.sparse.issparse(upstream), scipy.sparse.issparse(downstream)
    if up_sparse and down_sparse:
        return (upstream.T @ downstream).toarray()
    if up_sparse:
        return np.asarray(upstream.T @ downstream)
    if down_sparse:
        return np.asarray(downstream.T @ upstream).T
    return upstream.T @ downstream


class _PairAccumulator:
    """Running sums for one pair of adjacent layers (see `PairStatistics` for the definitions)."""

    def __init__(self, n_upstream: int, n_downstream: int) -> None:
        self.n_rows = 0
        self.cross = np.zeros((n_upstream, n_downstream))
        self.active_up = np.zeros(n_upstream)
        self.active_down = np.zeros(n_downstream)
        self.co_active = np.zeros((n_upstream, n_downstream))

    def add_moments(self, up: Table, down: Table) -> None:
        self.n_rows += up.shape[0]
        self.cross += _cross_product(up, down)

    def add_activity(self, up_active: Table, down_active: Table) -> None:
        # Counts are whole numbers far below 2^53, so float64 keeps them exact.
        self.active_up += _column_sums(up_active)
        self.active_down += _column_sums(down_active)
        self.co_active += _cross_product(up_active, down_active)

    def finish(
        self,
        layers: tuple[int, int],
        sums: tuple[np.ndarray, np.ndarray],
        sums_sq: tuple[np.ndarray, np.ndarray],
        maxima: tuple[np.ndarray, np.ndarray],
        fraction: float,
    ) -> PairStatistics:
        n = self.n_rows
        mean_up, mean_down = sums[0] / n, sums[1] / n
        mean_sq_up, mean_sq_down = sums_sq[0] / n, sums_sq[1] / n
        # Variances from raw moments; clip the tiny negatives that rounding can leave.
        var_up = np.clip(mean_sq_up - mean_up**2, 0, None)
        var_down = np.clip(mean_sq_down - mean_down**2, 0, None)
        std_up, std_down = np.sqrt(var_up), np.sqrt(var_down)
        covariance = self.cross / n - np.outer(mean_up, mean_down)
        pearson = np.clip(_safe_divide(covariance, np.outer(std_up, std_down)), -1.0, 1.0)
        # A feature whose variance is at rounding level (constant) has no defined correlation: 0.
        pearson[var_up <= 1e-12 * np.maximum(mean_sq_up, 1e-300), :] = 0.0
        pearson[:, var_down <= 1e-12 * np.maximum(mean_sq_down, 1e-300)] = 0.0
        self.cross = None  # free the cross products: the correlation replaces them
        return PairStatistics(
            upstream_layer=int(layers[0]),
            downstream_layer=int(layers[1]),
            n_rows=int(n),
            binarise_fraction=float(fraction),
            max_upstream=maxima[0].copy(),
            max_downstream=maxima[1].copy(),
            mean_upstream=mean_up,
            mean_downstream=mean_down,
            std_upstream=std_up,
            std_downstream=std_down,
            active_count_upstream=self.active_up,
            active_count_downstream=self.active_down,
            co_active_count=self.co_active,
            pearson=pearson,
        )


def _layer_batches(batch: Any, n_layers: int | None) -> list[np.ndarray]:
    """Check one item of the iterator: a sequence of per-layer activations with equal row counts."""
    if isinstance(batch, (torch.Tensor, np.ndarray)) or not isinstance(batch, Sequence):
        raise ParameterError(
            "each batch must be a tuple/list of per-layer feature activations (acts_layer0, acts_layer1, ...), "
            f"got {type(batch).__name__}"
        )
    if len(batch) < 2:
        raise ParameterError(f"each batch must hold the activations of at least 2 layers, got {len(batch)}")
    if n_layers is not None and len(batch) != n_layers:
        raise ParameterError(f"a batch holds {len(batch)} layers but earlier ones held {n_layers}: keep it fixed")
    arrays = [_as_rows(x, f"activations of layer position {i}") for i, x in enumerate(batch)]
    rows = {a.shape[0] for a in arrays}
    if len(rows) != 1:
        raise ParameterError(
            f"the layers of one batch have different row counts {[a.shape[0] for a in arrays]}: "
            "encode the same rows (token positions) with every layer's SAE"
        )
    return arrays


def _flat(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _check_widths(arrays: list[np.ndarray], widths: list[int] | None) -> list[int]:
    current = [a.shape[1] for a in arrays]
    if widths is not None and current != widths:
        raise ParameterError(f"feature counts changed between batches: {widths} then {current}")
    return current


def feature_maxima(
    batches: Iterable[Sequence[Activations]], *, progress: bool = False
) -> list[Float[np.ndarray, "feature"]]:
    """Each feature's largest activation over all rows, per layer (one pass).

    Use it on a sample of rows to get approximate maxima for a one-pass run of
    `layer_chain_statistics(..., maxima=...)`: a feature whose true maximum is larger than the
    sample's is then binarised at a slightly lower threshold than the exact two-pass run uses.
    """
    maxima: list[np.ndarray] | None = None
    for batch in tqdm(batches, desc="feature maxima", disable=not progress, leave=False):
        arrays = _layer_batches(batch, None if maxima is None else len(maxima))
        if maxima is None:
            maxima = [np.full(a.shape[1], -np.inf) for a in arrays]
        _check_widths(arrays, [m.shape[0] for m in maxima])
        for m, a in zip(maxima, arrays):
            if a.shape[0]:
                np.maximum(m, a.max(axis=0), out=m)
    if maxima is None:
        raise ParameterError("batches is empty: give at least one batch of activations")
    return maxima


def layer_chain_statistics(
    batches: BatchFactory | Iterable[Sequence[Activations]],
    config: CrossLayerConfig | None = None,
    *,
    layers: Sequence[int] | None = None,
    maxima: Sequence[Any] | None = None,
    progress: bool = True,
    total: int | None = None,
) -> list[PairStatistics]:
    """Streaming statistics between every pair of adjacent layers, in one or two passes.

    batches: a function with no arguments that returns a fresh iterator over batches; each batch
        is a tuple (acts_layer0, acts_layer1, ..., acts_layerN) of feature activations of the
        same rows, each [batch, feature] (torch or numpy; [batch, 1, feature] is accepted).
        The statistics are exact: the first pass finds every feature's maximum (and sums the
        moments for the correlations), the second binarises with those maxima and counts
        co-activity. The function must yield the same rows in both passes.
    maxima: per-layer arrays of feature maxima (e.g. from `feature_maxima` on a sample). When
        given, one pass is enough and `batches` may be a plain iterable; the binarisation then
        uses these maxima (exact if they are the true maxima).
    layers: the layer number of each position in a batch (default 0, 1, 2, ...); only labels.
    total: number of batches per pass, for the progress bar.

    Returns one `PairStatistics` per adjacent pair (layers[0]→layers[1], layers[1]→layers[2], ...).
    Memory: two float64 matrices [F_L, F_L+1] per pair, independent of the number of rows.
    Speed (2 CPU cores, F = 1024, ~2% of activations non-zero, batches of 4096 rows): about
    30 s per million rows and pair of layers for both passes together; sparse batches are much
    faster than dense ones.
    """
    config = config or CrossLayerConfig()
    fraction = config.binarise_fraction
    if maxima is None:
        if not callable(batches):
            raise ParameterError(
                "batches must be a function returning a fresh iterator over the same batches (two passes: "
                "feature maxima, then binarised counts), or give maxima= for a single pass"
            )
        make_batches: Callable[[], Iterable] = batches
    else:
        one_pass = batches() if callable(batches) else batches
        make_batches = lambda: one_pass  # noqa: E731 - only iterated once below

    accumulators: list[_PairAccumulator] = []
    widths: list[int] | None = None
    sums: list[np.ndarray] = []
    sums_sq: list[np.ndarray] = []
    running_max: list[np.ndarray] | None = None
    if maxima is not None:
        running_max = [_as_rows(_flat(m)[None, :], f"maxima[{i}]")[0].astype(np.float64) for i, m in enumerate(maxima)]

    def start(arrays: list[np.ndarray]) -> None:
        nonlocal widths, running_max
        if widths is not None:
            _check_widths(arrays, widths)
            return
        widths = _check_widths(arrays, None)
        if running_max is not None and [m.shape[0] for m in running_max] != widths:
            raise ParameterError(
                f"maxima has feature counts {[m.shape[0] for m in running_max]} but the batches have {widths}: "
                "give one maximum per feature of every layer"
            )
        accumulators.extend(_PairAccumulator(widths[i], widths[i + 1]) for i in range(len(widths) - 1))
        sums.extend(np.zeros(w) for w in widths)
        sums_sq.extend(np.zeros(w) for w in widths)
        if running_max is None:
            running_max = [np.full(w, -np.inf) for w in widths]

    def thresholds() -> list[np.ndarray]:
        # A feature with max ≤ 0 is never active: its threshold is +inf.
        return [np.where(m > 0, fraction * m, np.inf) for m in running_max]

    def count_activity(tables: list[Table], cut: list[np.ndarray]) -> None:
        active = [_binarise(t, c) for t, c in zip(tables, cut)]
        for i, acc in enumerate(accumulators):
            acc.add_activity(active[i], active[i + 1])

    # Pass 1: moments (+ maxima when not given; + activity when maxima were given).
    cut = thresholds() if maxima is not None else None
    label = "layer statistics" + (" (pass 1/2)" if maxima is None else "")
    for batch in tqdm(make_batches(), desc=label, total=total, disable=not progress, leave=False):
        arrays = _layer_batches(batch, None if widths is None else len(widths))
        start(arrays)
        if arrays[0].shape[0] == 0:
            continue
        if maxima is None:
            for m, a in zip(running_max, arrays):
                np.maximum(m, a.max(axis=0), out=m)
        tables = [_to_table(a) for a in arrays]  # each layer converted once, used by both its pairs
        for i, table in enumerate(tables):
            sums[i] += _column_sums(table)
            sums_sq[i] += _column_sums(table, squared=True)
        for i, acc in enumerate(accumulators):
            acc.add_moments(tables[i], tables[i + 1])
        if cut is not None:
            count_activity(tables, cut)
    if not accumulators or accumulators[0].n_rows == 0:
        raise ParameterError("batches is empty: give at least one batch with rows of activations")

    # Pass 2: binarise with the exact maxima and count co-activity.
    if maxima is None:
        cut = thresholds()
        rows_second_pass = 0
        label = "layer statistics (pass 2/2)"
        for batch in tqdm(make_batches(), desc=label, total=total, disable=not progress, leave=False):
            arrays = _layer_batches(batch, len(widths))
            _check_widths(arrays, widths)
            rows_second_pass += arrays[0].shape[0]
            if arrays[0].shape[0]:
                count_activity([_to_table(a) for a in arrays], cut)
        if rows_second_pass != accumulators[0].n_rows:
            raise ParameterError(
                f"batches gave {accumulators[0].n_rows} rows in the first pass and {rows_second_pass} in the second: "
                "the factory must yield the same rows every time it is called"
            )

    if layers is None:
        layers = list(range(len(widths)))
    layers = [int(layer) for layer in layers]
    if len(layers) != len(widths):
        raise ParameterError(
            f"layers={layers} is not allowed: give one layer number per position in a batch ({len(widths)})"
        )
    return [
        acc.finish(
            (layers[i], layers[i + 1]),
            (sums[i], sums[i + 1]),
            (sums_sq[i], sums_sq[i + 1]),
            (running_max[i], running_max[i + 1]),
            fraction,
        )
        for i, acc in enumerate(accumulators)
    ]


def pair_statistics(
    batches: BatchFactory | Iterable[tuple[Activations, Activations]],
    config: CrossLayerConfig | None = None,
    *,
    upstream_layer: int = 0,
    maxima: tuple[Any, Any] | None = None,
    progress: bool = True,
    total: int | None = None,
) -> PairStatistics:
    """Streaming statistics for one pair of layers: batches yield (acts_upstream, acts_downstream).

    Same rules as `layer_chain_statistics` (a factory for the exact two-pass run, or maxima= for
    one pass); `upstream_layer` labels the result (downstream = upstream_layer + 1).
    """
    (stats,) = layer_chain_statistics(
        batches, config, layers=[upstream_layer, upstream_layer + 1], maxima=maxima, progress=progress, total=total
    )
    return stats

