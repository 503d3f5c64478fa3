"""How SAE features of adjacent layers relate (Lerner et al., arXiv 2410.08869; the book's
Methods page, section Features across layers).

Each layer of the residual stream gets its own SAE. Encoding the *same* token positions with the
SAE of layer L and the SAE of layer L+1 gives two aligned activation tables,
acts_upstream [row, feature_up] and acts_downstream [row, feature_down]. This module compares
every upstream feature A with every downstream feature B over many rows (≥ 1M tokens) without
holding the tables in memory, and turns the comparison into findings:

- `pair_statistics` / `layer_chain_statistics`: streaming statistics for every (A, B) pair —
  the Pearson correlation of the activations, and on binarised activity (a feature is *active*
  on a row when its activation > binarise_fraction × its maximum over all rows) the Jaccard
  index, the sufficiency P(B active | A active) and the necessity P(A active | B active).
  Result: one `PairStatistics` per pair of adjacent layers.
- `top_partners`: the k best partners of every feature under one measure.
- `pass_through_table`, `layer_flow`, `pass_through_fractions`, `plot_layer_flow`: features
  that pass through to the next layer almost unchanged (best next-layer correlation ≥ 0.95),
  and the share of features that appear or disappear between layers (stacked-bar figure).
- `gate_candidates`: quasi-boolean gates — a downstream feature with exactly two necessary
  upstream features (AND) or exactly two sufficient ones (OR).
- `layer_graph`, `assign_communities`: a networkx graph over all layers with an edge wherever
  the correlation (or Jaccard) is above a threshold, and its Louvain communities.
- `graph_page_html`, `write_graph_page`: a self-contained interactive HTML page of that graph
  (pan, zoom, click a node to read its feature's top contexts); no network needed.
- `pass_through_over_time`, `summarise_cross_layer`: the same numbers at several training
  snapshots as one tidy table, and flat summary numbers ready to glue into the book.

Everything works on plain arrays (numpy or torch), so the caller decides where activations come
from (an activation cache and per-layer SAEs in the book). Thresholds live in
`CrossLayerConfig`; bad values raise `ParameterError` naming the parameter. Sketch of a caller
(one SAE and one activation iterator per layer, all over the same token positions):

    def batches():                      # called twice: pass 1 maxima + moments, pass 2 counts
        with torch.inference_mode():
            for per_layer in zip(*(rows_of(layer) for layer in layers)):
                yield tuple(sae.encode(x) for sae, x in zip(saes, per_layer))

    chain = layer_chain_statistics(batches, config, layers=layers)
    graph = layer_graph(chain, config); assign_communities(graph, config)
    summary = summarise_cross_layer(chain, config, graph=graph)

Memory: the statistics keep, per pair of adjacent layers, two dense float64 matrices
[feature_up, feature_down] (the cross products, then the correlation, and the co-activity
counts): 2 × 8 × F² bytes, i.e. 16 MB at F = 1024 and 268 MB at F = 4096. The Jaccard, necessity
and sufficiency matrices are derived from the counts when first asked for (8 × F² bytes each).
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np
import pandas as pd
import safetensors
import safetensors.numpy
import scipy.sparse
import scipy.stats
import torch
from jaxtyping import Float
from crosslib.progress import progress as tqdm

from crosslib.artifacts import atomic_write_bytes, atomic_write_text
from crosslib.config import Config, ParameterError, require, require_choice, require_positive

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
DIRECTIONS: tuple[str, ...] = ("downstream", "upstream")
UPSTREAM_CATEGORIES: tuple[str, ...] = ("passes_through", "transformed", "disappears")
DOWNSTREAM_CATEGORIES: tuple[str, ...] = ("passed_through", "transformed", "appears")

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

    binarise_fraction: float = 0.2
    pass_through: float = 0.95
    partner_threshold: float = 0.5
    gate: float = 0.999
    gate_min_active: int = 10
    edge_measure: str = "pearson"
    edge_threshold: float = 0.5
    top_k: int = 5
    louvain_resolution: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        require(
            _is_number(self.binarise_fraction) and 0 <= self.binarise_fraction < 1,
            "binarise_fraction",
            self.binarise_fraction,
            "a number in [0, 1) (share of each feature's maximum)",
        )
        require(
            _is_number(self.pass_through) and 0 < self.pass_through <= 1,
            "pass_through",
            self.pass_through,
            "a correlation in (0, 1]",
        )
        require(
            _is_number(self.partner_threshold) and 0 < self.partner_threshold <= self.pass_through,
            "partner_threshold",
            self.partner_threshold,
            f"a correlation in (0, pass_through={self.pass_through}]",
        )
        require(_is_number(self.gate) and 0 < self.gate <= 1, "gate", self.gate, "a probability in (0, 1]")
        require(
            _is_int(self.gate_min_active) and self.gate_min_active >= 1,
            "gate_min_active",
            self.gate_min_active,
            "an integer ≥ 1 (rows)",
        )
        require_choice("edge_measure", self.edge_measure, EDGE_MEASURES)
        require(
            _is_number(self.edge_threshold) and 0 < self.edge_threshold <= 1,
            "edge_threshold",
            self.edge_threshold,
            "a number in (0, 1]",
        )
        require(_is_int(self.top_k) and self.top_k >= 1, "top_k", self.top_k, "an integer ≥ 1")
        require_positive("louvain_resolution", self.louvain_resolution)
        require(_is_int(self.seed), "seed", self.seed, "an integer")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        batch = batch.numpy()
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
    return array


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


# --------------------------------------------------------------------------------------------
# Partners and pass-through
# --------------------------------------------------------------------------------------------


def _top_indices(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the indices and values of the k largest entries, largest first (ties: lower index)."""
    k = min(k, matrix.shape[1])
    # A stable sort of the negated values keeps ties in index order, so results are reproducible.
    order = np.argsort(-matrix, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(matrix, order, axis=1)


def top_partners(
    stats: PairStatistics,
    measure: str = "pearson",
    *,
    k: int | None = None,
    direction: str = "downstream",
    config: CrossLayerConfig | None = None,
) -> pd.DataFrame:
    """The k best partners of every feature under `measure`, as a tidy table.

    direction="downstream": for each upstream feature, its best next-layer features;
    direction="upstream": for each downstream feature, its best previous-layer features.
    Columns: layer, feature, rank (0 = best), partner_layer, partner, and all four measures for
    the pair. Dead features (never active) are left out, as features and as partners.
    """
    config = config or CrossLayerConfig()
    k = config.top_k if k is None else k
    require(_is_int(k) and k >= 1, "k", k, "an integer ≥ 1")
    require_choice("direction", direction, DIRECTIONS)
    matrix = stats.measure(measure)
    if direction == "downstream":
        alive, alive_partner, oriented = stats.alive_upstream, stats.alive_downstream, matrix
        layer, partner_layer = stats.upstream_layer, stats.downstream_layer
    else:
        alive, alive_partner, oriented = stats.alive_downstream, stats.alive_upstream, matrix.T
        layer, partner_layer = stats.downstream_layer, stats.upstream_layer
    features, candidates = np.flatnonzero(alive), np.flatnonzero(alive_partner)
    if len(candidates) == 0:
        features = features[:0]
    ranked, _ = _top_indices(oriented[np.ix_(features, candidates)], k)
    partners = candidates[ranked]
    feature_col = np.repeat(features, partners.shape[1])
    partner_col = partners.reshape(-1)
    up, down = (feature_col, partner_col) if direction == "downstream" else (partner_col, feature_col)
    table = pd.DataFrame(
        {
            "layer": layer,
            "feature": feature_col,
            "rank": np.tile(np.arange(partners.shape[1]), len(features)),
            "partner_layer": partner_layer,
            "partner": partner_col,
        }
    )
    for name in MEASURES:
        table[name] = stats.measure(name)[up, down]
    return table


def pass_through_table(stats: PairStatistics, config: CrossLayerConfig | None = None) -> pd.DataFrame:
    """One row per live upstream feature: its best next-layer partner by correlation.

    Columns: upstream_layer, feature, best_partner, best_pearson, category — "passes_through"
    (best_pearson ≥ pass_through), "transformed" (≥ partner_threshold) or "disappears".
    """
    config = config or CrossLayerConfig()
    features = np.flatnonzero(stats.alive_upstream)
    # Only live downstream features can be partners (dead ones have no defined correlation).
    rows = np.where(stats.alive_downstream[None, :], stats.pearson[features], -np.inf)
    if rows.size and stats.alive_downstream.any():
        best = rows.argmax(axis=1)
        value = rows[np.arange(len(features)), best]
    else:
        best, value = np.zeros(len(features), dtype=int), np.full(len(features), -1.0)
    return pd.DataFrame(
        {
            "upstream_layer": stats.upstream_layer,
            "downstream_layer": stats.downstream_layer,
            "feature": features,
            "best_partner": best,
            "best_pearson": value,
            "category": _categorise(value, config, UPSTREAM_CATEGORIES),
        }
    )


def _categorise(best: np.ndarray, config: CrossLayerConfig, names: tuple[str, str, str]) -> np.ndarray:
    partnered = np.where(best >= config.partner_threshold, names[1], names[2])
    return np.where(best >= config.pass_through, names[0], partnered)


def _best_correlations(stats: PairStatistics) -> tuple[np.ndarray, np.ndarray]:
    """Best partner correlation of every live upstream and every live downstream feature."""
    live = stats.pearson[np.ix_(stats.alive_upstream, stats.alive_downstream)]
    if live.size == 0:
        return np.full(int(stats.alive_upstream.sum()), -1.0), np.full(int(stats.alive_downstream.sum()), -1.0)
    return live.max(axis=1), live.max(axis=0)


def layer_flow(stats_list: Sequence[PairStatistics], config: CrossLayerConfig | None = None) -> pd.DataFrame:
    """What happens to features between adjacent layers: data for a stacked bar or Sankey figure.

    For each pair L → L+1, upstream features (layer L) are counted as passes_through /
    transformed / disappears by their best next-layer correlation, and downstream features
    (layer L+1) as passed_through / transformed / appears by their best previous-layer
    correlation (thresholds pass_through and partner_threshold; only live partners count).
    Columns: upstream_layer, downstream_layer, side ("upstream"/"downstream"), layer, category,
    count, fraction (of the live features on that side), n_alive, n_dead.
    """
    config = config or CrossLayerConfig()
    records = []
    for stats in _as_list(stats_list):
        best_up, best_down = _best_correlations(stats)
        for side, layer, best, names, alive in (
            ("upstream", stats.upstream_layer, best_up, UPSTREAM_CATEGORIES, stats.alive_upstream),
            ("downstream", stats.downstream_layer, best_down, DOWNSTREAM_CATEGORIES, stats.alive_downstream),
        ):
            categories = _categorise(best, config, names)
            n_alive = int(alive.sum())
            for name in names:
                count = int(np.sum(categories == name))
                records.append(
                    {
                        "upstream_layer": stats.upstream_layer,
                        "downstream_layer": stats.downstream_layer,
                        "side": side,
                        "layer": layer,
                        "category": name,
                        "count": count,
                        "fraction": count / n_alive if n_alive else float("nan"),
                        "n_alive": n_alive,
                        "n_dead": int(alive.size - n_alive),
                    }
                )
    return pd.DataFrame.from_records(records)


def plot_layer_flow(flow: pd.DataFrame, axes: Sequence[Any] | None = None) -> Any:
    """Stacked bars of `layer_flow`: where each layer's features come from and where they go.

    Left panel: features of each layer L+1 by origin (passed through / transformed / appeared);
    right panel: features of each layer L by fate (passes through / transformed / disappears).
    Bars are fractions of the live features. Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, constrained_layout=True)
    else:
        figure = axes[0].figure
    colours = {"pass": "#3b7dd8", "transformed": "#9bbbe8", "new": "#e8a33b"}
    panels = (
        ("downstream", DOWNSTREAM_CATEGORIES, "features of layer L+1, by origin in layer L"),
        ("upstream", UPSTREAM_CATEGORIES, "features of layer L, by fate in layer L+1"),
    )
    for ax, (side, names, heading) in zip(axes, panels):
        part = flow[flow.side == side].pivot(index="layer", columns="category", values="fraction")
        part = part.reindex(columns=list(names))
        bottom = np.zeros(len(part))
        for name, colour in zip(names, colours.values()):
            heights = part[name].to_numpy()
            ax.bar(part.index.astype(str), heights, bottom=bottom, color=colour, label=name.replace("_", " "))
            bottom += heights
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel("layer")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    axes[0].set_ylabel("fraction of live features")
    axes[0].set_ylim(0, 1)
    return figure


def pass_through_fractions(
    stats_list: Sequence[PairStatistics], config: CrossLayerConfig | None = None
) -> pd.DataFrame:
    """One row per adjacent pair: the pass-through, appearing and disappearing fractions.

    pass_through_fraction: share of live upstream features whose best next-layer correlation is
    ≥ pass_through; appear_fraction: share of live downstream features without an upstream
    partner; disappear_fraction: share of live upstream features without a downstream partner.
    """
    flow = layer_flow(stats_list, config)
    records = []
    for (up, down), group in flow.groupby(["upstream_layer", "downstream_layer"], sort=True):
        fraction = group.set_index("category")["fraction"]
        records.append(
            {
                "upstream_layer": int(up),
                "downstream_layer": int(down),
                "pass_through_fraction": float(fraction["passes_through"]),
                "passed_through_fraction": float(fraction["passed_through"]),
                "appear_fraction": float(fraction["appears"]),
                "disappear_fraction": float(fraction["disappears"]),
                "n_alive_upstream": int(group[group.side == "upstream"]["n_alive"].iloc[0]),
                "n_alive_downstream": int(group[group.side == "downstream"]["n_alive"].iloc[0]),
            }
        )
    return pd.DataFrame.from_records(records)


def _as_list(stats_list: Sequence[PairStatistics] | PairStatistics) -> list[PairStatistics]:
    if isinstance(stats_list, PairStatistics):
        return [stats_list]
    stats_list = list(stats_list)
    if not stats_list:
        raise ParameterError("stats_list is empty: give the PairStatistics from layer_chain_statistics")
    for s in stats_list:
        if not isinstance(s, PairStatistics):
            raise ParameterError(
                f"stats_list must hold PairStatistics (from layer_chain_statistics), got {type(s).__name__}"
            )
    return stats_list


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def gate_candidates(
    stats_list: Sequence[PairStatistics] | PairStatistics, config: CrossLayerConfig | None = None
) -> pd.DataFrame:
    """Quasi-boolean gate candidates among downstream features.

    AND: a downstream feature B with exactly two upstream features A1, A2 whose necessity
    P(A active | B active) ≥ gate — B only fires when both fire. OR: exactly two upstream
    features with sufficiency P(B active | A active) ≥ gate — either one firing is enough.
    A conditional probability counts only when its condition was active on ≥ gate_min_active
    rows (B for necessity, A for sufficiency). These are candidates: pairwise statistics cannot
    check that B also fires whenever A1 ∧ A2 does (AND) or only when A1 ∨ A2 does (OR).

    Columns: upstream_layer, downstream_layer, gate ("AND"/"OR"), feature (downstream), input_a,
    input_b (upstream, ascending), score_a, score_b (their necessity or sufficiency),
    feature_active, input_a_active, input_b_active (row counts).
    """
    config = config or CrossLayerConfig()
    records = []
    for stats in _as_list(stats_list):
        enough_down = stats.active_count_downstream >= config.gate_min_active
        enough_up = stats.active_count_upstream >= config.gate_min_active
        for gate, matrix, valid in (
            ("AND", stats.necessity, enough_down[None, :]),
            ("OR", stats.sufficiency, enough_up[:, None]),
        ):
            passing = (matrix >= config.gate) & valid  # [feature_up, feature_down]
            for feature in np.flatnonzero(passing.sum(axis=0) == 2):
                a, b = np.flatnonzero(passing[:, feature])
                records.append(
                    {
                        "upstream_layer": stats.upstream_layer,
                        "downstream_layer": stats.downstream_layer,
                        "gate": gate,
                        "feature": int(feature),
                        "input_a": int(a),
                        "input_b": int(b),
                        "score_a": float(matrix[a, feature]),
                        "score_b": float(matrix[b, feature]),
                        "feature_active": int(stats.active_count_downstream[feature]),
                        "input_a_active": int(stats.active_count_upstream[a]),
                        "input_b_active": int(stats.active_count_upstream[b]),
                    }
                )
    columns = [
        "upstream_layer", "downstream_layer", "gate", "feature", "input_a", "input_b", "score_a", "score_b",
        "feature_active", "input_a_active", "input_b_active",
    ]
    return pd.DataFrame.from_records(records, columns=columns)


def _exactly_two_probability(pass_probability: Float[np.ndarray, "candidate target"]) -> Float[np.ndarray, "target"]:
    """P(exactly two of the independent candidates pass) per target (a Poisson-binomial count)."""
    counts = np.zeros((3, pass_probability.shape[1]))  # P(0), P(1), P(2) passing so far
    counts[0] = 1.0
    for p in pass_probability:
        counts = np.stack([counts[0] * (1 - p), counts[1] * (1 - p) + counts[0] * p, counts[2] * (1 - p) + counts[1] * p])
    return counts[2]


def gate_null_expectation(
    stats_list: Sequence[PairStatistics] | PairStatistics, config: CrossLayerConfig | None = None
) -> dict[str, float]:
    """Expected number of AND and OR gate candidates if the two layers' activity were unrelated.

    The null shuffles the rows of one layer against the other while keeping every feature's
    firing count. Then the co-active count of A and B is hypergeometric (n rows, |A| marked, |B|
    drawn), so the chance that necessity P(A|B) or sufficiency P(B|A) reaches config.gate is a
    hypergeometric tail; a downstream feature is a gate when exactly two upstream features pass,
    which for independent inputs is a Poisson-binomial count. Summed over the downstream
    features of every layer pair, this is the number of gate candidates `gate_candidates` would
    report by chance alone. Returns {"AND": …, "OR": …}.
    """
    config = config or CrossLayerConfig()
    expected = {"AND": 0.0, "OR": 0.0}
    for stats in _as_list(stats_list):
        up = stats.active_count_upstream.astype(np.int64)
        down = stats.active_count_downstream.astype(np.int64)
        n = int(stats.n_rows)
        for gate, conditioned_on_down in (("AND", True), ("OR", False)):
            condition = np.broadcast_to(down[None, :] if conditioned_on_down else up[:, None], (up.size, down.size))
            needed = np.ceil(config.gate * condition - 1e-9).astype(np.int64)
            probability = np.zeros(condition.shape)
            counted = (condition >= config.gate_min_active) & (up[:, None] > 0) & (down[None, :] > 0)
            # Co-activity can reach `needed` only when both features fire that often.
            feasible = counted & (np.minimum(up[:, None], down[None, :]) >= needed)
            if feasible.any():
                ups = np.broadcast_to(up[:, None], condition.shape)[feasible]
                downs = np.broadcast_to(down[None, :], condition.shape)[feasible]
                probability[feasible] = scipy.stats.hypergeom.sf(needed[feasible] - 1, n, ups, downs)
            expected[gate] += float(_exactly_two_probability(probability).sum())
    return expected


# --------------------------------------------------------------------------------------------
# Graph and communities
# --------------------------------------------------------------------------------------------


def node_name(layer: int, feature: int) -> str:
    """The graph's name for a feature: "L2:17" is feature 17 of layer 2's SAE."""
    return f"L{int(layer)}:{int(feature)}"


def layer_graph(
    stats_list: Sequence[PairStatistics] | PairStatistics,
    config: CrossLayerConfig | None = None,
    *,
    include_isolated: bool = False,
) -> nx.Graph:
    """An undirected graph over the features of all layers, edges between adjacent layers.

    Nodes are named by `node_name` ("L{layer}:{feature}") with attributes layer, feature and
    active_fraction (share of rows where the feature is active). There is an edge wherever
    config.edge_measure (pearson or jaccard) ≥ config.edge_threshold, with that value as
    `weight` and both pearson and jaccard as attributes. Dead features never get a node;
    live features without any edge are left out unless include_isolated=True (they would only
    add one-node communities).
    """
    config = config or CrossLayerConfig()
    stats_list = _as_list(stats_list)
    graph = nx.Graph()
    nodes: dict[str, dict[str, Any]] = {}
    edges: list[tuple[str, str, dict[str, float]]] = []

    def add_node(layer: int, feature: int, count: float, n_rows: int) -> str:
        name = node_name(layer, feature)
        nodes.setdefault(name, {"layer": int(layer), "feature": int(feature), "active_fraction": float(count / n_rows)})
        return name

    for stats in stats_list:
        weight = stats.measure(config.edge_measure)
        mask = (weight >= config.edge_threshold) & np.outer(stats.alive_upstream, stats.alive_downstream)
        if include_isolated:
            for f in np.flatnonzero(stats.alive_upstream):
                add_node(stats.upstream_layer, f, stats.active_count_upstream[f], stats.n_rows)
            for f in np.flatnonzero(stats.alive_downstream):
                add_node(stats.downstream_layer, f, stats.active_count_downstream[f], stats.n_rows)
        for a, b in zip(*np.nonzero(mask)):
            u = add_node(stats.upstream_layer, a, stats.active_count_upstream[a], stats.n_rows)
            v = add_node(stats.downstream_layer, b, stats.active_count_downstream[b], stats.n_rows)
            values = {"pearson": float(stats.pearson[a, b]), "jaccard": float(stats.jaccard[a, b])}
            edges.append((u, v, {"weight": float(weight[a, b]), **values}))
    # Insert nodes in (layer, feature) order: Louvain's result depends on node order as well as the seed.
    for name in sorted(nodes, key=lambda n: (nodes[n]["layer"], nodes[n]["feature"])):
        graph.add_node(name, **nodes[name])
    graph.add_edges_from(edges)
    return graph


def assign_communities(graph: nx.Graph, config: CrossLayerConfig | None = None) -> list[list[str]]:
    """Louvain communities of `graph` (seeded, so deterministic); sets node attribute `community`.

    Communities are numbered by size, largest first (ties: by their first node in (layer,
    feature) order), and each is returned as a list of node names in that order.
    """
    config = config or CrossLayerConfig()
    if graph.number_of_nodes() == 0:
        return []
    found = nx.community.louvain_communities(
        graph, weight="weight", resolution=config.louvain_resolution, seed=config.seed
    )

    def position(name: str) -> tuple[int, int, str]:
        return graph.nodes[name].get("layer", 0), graph.nodes[name].get("feature", 0), str(name)

    order = {name: i for i, name in enumerate(sorted(graph.nodes, key=position))}
    communities = [sorted(c, key=order.__getitem__) for c in found]
    communities.sort(key=lambda c: (-len(c), order[c[0]]))
    for index, members in enumerate(communities):
        for name in members:
            graph.nodes[name]["community"] = index
    return communities


# --------------------------------------------------------------------------------------------
# Summaries and the time axis
# --------------------------------------------------------------------------------------------


def summarise_cross_layer(
    stats_list: Sequence[PairStatistics] | PairStatistics,
    config: CrossLayerConfig | None = None,
    *,
    graph: nx.Graph | None = None,
) -> dict[str, float | int]:
    """Flat numbers ready to glue into the book.

    Keys: pass_through_fraction_L{l} (per upstream layer l), appear_fraction_L{l+1},
    disappear_fraction_L{l}, mean_pass_through_fraction, and_gates, or_gates, and — when a
    graph with communities (`assign_communities`) is given — graph_nodes, graph_edges,
    communities, largest_community, median_community_size, multi_layer_communities (those
    spanning ≥ 2 layers), communities_spanning_3_layers and widest_community_layers (the most
    layers one community spans).
    """
    config = config or CrossLayerConfig()
    stats_list = _as_list(stats_list)
    fractions = pass_through_fractions(stats_list, config)
    summary: dict[str, float | int] = {}
    for row in fractions.itertuples():
        summary[f"pass_through_fraction_L{row.upstream_layer}"] = float(row.pass_through_fraction)
        summary[f"disappear_fraction_L{row.upstream_layer}"] = float(row.disappear_fraction)
        summary[f"appear_fraction_L{row.downstream_layer}"] = float(row.appear_fraction)
    summary["mean_pass_through_fraction"] = float(fractions["pass_through_fraction"].mean())
    gates = gate_candidates(stats_list, config)
    summary["and_gates"] = int((gates["gate"] == "AND").sum())
    summary["or_gates"] = int((gates["gate"] == "OR").sum())
    if graph is not None:
        summary["graph_nodes"] = graph.number_of_nodes()
        summary["graph_edges"] = graph.number_of_edges()
        labels = [data.get("community") for _, data in graph.nodes(data=True)]
        if any(label is None for label in labels):
            raise ParameterError("graph has nodes without a community: call assign_communities(graph) first")
        members: dict[int, list[str]] = {}
        for name, data in graph.nodes(data=True):
            members.setdefault(data["community"], []).append(name)
        sizes = sorted((len(m) for m in members.values()), reverse=True)
        summary["communities"] = len(sizes)
        summary["largest_community"] = sizes[0] if sizes else 0
        summary["median_community_size"] = float(np.median(sizes)) if sizes else 0.0
        spans = [len({graph.nodes[n]["layer"] for n in m}) for m in members.values()]
        summary["multi_layer_communities"] = sum(span >= 2 for span in spans)
        # Edges only join adjacent layers, so spanning three layers takes at least two chained edges.
        summary["communities_spanning_3_layers"] = sum(span >= 3 for span in spans)
        summary["widest_community_layers"] = max(spans) if spans else 0
    return summary


def pass_through_over_time(
    stats_by_step: Mapping[int, Sequence[PairStatistics]], config: CrossLayerConfig | None = None
) -> pd.DataFrame:
    """Pass-through statistics at several training snapshots as one tidy table.

    stats_by_step maps a training step to that snapshot's `layer_chain_statistics` result.
    Returns the columns of `pass_through_fractions` plus `step`, one row per (step, layer pair),
    sorted by step then layer — e.g. pivot with
    `table.pivot(index="step", columns="upstream_layer", values="pass_through_fraction")`.
    """
    if not isinstance(stats_by_step, Mapping) or not stats_by_step:
        raise ParameterError("stats_by_step must be a non-empty mapping {training step: [PairStatistics, ...]}")
    frames = []
    for step in sorted(stats_by_step):
        require(_is_int(step) or isinstance(step, np.integer), "step", step, "an integer training step")
        frame = pass_through_fractions(stats_by_step[step], config)
        frame.insert(0, "step", int(step))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def chains_over_time(
    stats_by_step: Mapping[int, Sequence[PairStatistics]], config: CrossLayerConfig | None = None
) -> pd.DataFrame:
    """Do cross-layer chains exist at each compared snapshot? One row per training step.

    A *chain* is a connected component of the layer graph (`layer_graph`, edges between
    adjacent-layer features whose edge measure ≥ edge_threshold) that spans at least three
    layers, i.e. at least two chained edges. Columns: step, graph_edges, chains, chain_features
    (features inside a chain), live_features (features of any layer active at least once),
    chain_share (chain_features / live_features), mean_pass_through_fraction.
    """
    if not isinstance(stats_by_step, Mapping) or not stats_by_step:
        raise ParameterError("stats_by_step must be a non-empty mapping {training step: [PairStatistics, ...]}")
    config = config or CrossLayerConfig()
    records = []
    for step in sorted(stats_by_step):
        stats_list = _as_list(stats_by_step[step])
        graph = layer_graph(stats_list, config)
        chains = [c for c in nx.connected_components(graph) if len({graph.nodes[n]["layer"] for n in c}) >= 3]
        live = {(s.upstream_layer, f) for s in stats_list for f in np.flatnonzero(s.alive_upstream)}
        live |= {(s.downstream_layer, f) for s in stats_list for f in np.flatnonzero(s.alive_downstream)}
        chain_features = sum(len(c) for c in chains)
        records.append({
            "step": int(step),
            "graph_edges": graph.number_of_edges(),
            "chains": len(chains),
            "chain_features": chain_features,
            "live_features": len(live),
            "chain_share": chain_features / len(live) if live else math.nan,
            "mean_pass_through_fraction": float(pass_through_fractions(stats_list, config)["pass_through_fraction"].mean()),
        })
    return pd.DataFrame.from_records(records)


# --------------------------------------------------------------------------------------------
# Interactive graph page
# --------------------------------------------------------------------------------------------


def community_colours(n: int) -> list[str]:
    """n distinct hex colours (golden-angle hues), community 0 first."""
    colours = []
    for i in range(n):
        hue = (i * 0.381966) % 1.0
        r, g, b = colorsys.hls_to_rgb(hue, 0.45 + 0.1 * (i % 2), 0.65)
        colours.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return colours


def layered_layout(graph: nx.Graph) -> dict[str, tuple[float, float]]:
    """Positions for drawing: x = layer column (0, 1, ...), y in [0, 1] by (community, feature).

    Sorting each layer by community keeps a community at similar heights across layers, so
    chains of features read left to right.
    """
    layers = sorted({data["layer"] for _, data in graph.nodes(data=True)})
    column = {layer: i for i, layer in enumerate(layers)}
    positions: dict[str, tuple[float, float]] = {}
    for layer in layers:
        members = [n for n, d in graph.nodes(data=True) if d["layer"] == layer]
        members.sort(key=lambda n: (graph.nodes[n].get("community", 0), graph.nodes[n]["feature"]))
        for rank, name in enumerate(members):
            positions[name] = (float(column[layer]), (rank + 0.5) / len(members))
    return positions


def _script_json(obj: Any) -> str:
    """JSON safe inside a <script> element (no '</script>' or HTML-significant characters)."""
    text = json.dumps(obj, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def graph_page_html(
    graph: nx.Graph,
    details: Mapping[str, str | Sequence[str]] | None = None,
    *,
    title: str = "SAE features across layers",
    max_edges: int = 20_000,
) -> str:
    """A self-contained HTML page (inline CSS and JavaScript, no network) showing `graph`.

    Nodes are placed by layer (x) and community (y) and coloured by community (run
    `assign_communities` first; without it every node is community 0). Drag to pan, use the
    wheel to zoom, click a node to see its details and neighbours (click a neighbour to move
    to it), type a node name ("L2:17") to find it.

    details: node → what to show when it is clicked. Keys are node names ("L2:17") or
        (layer, feature) pairs; keys for features that are not in the graph are skipped (so a
        dict for every feature is fine), but at least one must match. A string value is inserted
        as an HTML snippet (e.g. a dashboard of top contexts; it must be self-contained too, and
        its <script> elements do not run); a list of strings is shown as escaped text, one
        context per line.
    max_edges: only the strongest edges are drawn beyond this many (keeps the page light).
    """
    require(_is_int(max_edges) and max_edges >= 0, "max_edges", max_edges, "an integer ≥ 0")
    details = {node_name(*key) if isinstance(key, tuple) else key: value for key, value in (details or {}).items()}
    if details and not any(name in graph for name in details):
        example = next(iter(details))
        raise ParameterError(
            f"details has no key naming a node of the graph (e.g. {example!r}): use node_name(layer, feature), "
            f"such as {next(iter(graph.nodes), 'L0:0')!r}"
        )
    details = {name: value for name, value in details.items() if name in graph}
    positions = layered_layout(graph) if graph.number_of_nodes() else {}
    names = sorted(graph.nodes, key=lambda n: (graph.nodes[n]["layer"], graph.nodes[n]["feature"]))
    index = {name: i for i, name in enumerate(names)}
    n_communities = 1 + max((graph.nodes[n].get("community", 0) for n in names), default=0)
    nodes = [
        {
            "id": name,
            "layer": graph.nodes[name]["layer"],
            "feature": graph.nodes[name]["feature"],
            "community": graph.nodes[name].get("community", 0),
            "active": round(float(graph.nodes[name].get("active_fraction", 0.0)), 6),
            "x": positions[name][0],
            "y": round(positions[name][1], 6),
        }
        for name in names
    ]
    edges = sorted(graph.edges(data=True), key=lambda e: -e[2].get("weight", 1.0))[:max_edges]
    edge_list = [[index[u], index[v], round(float(d.get("weight", 1.0)), 4)] for u, v, d in edges]
    detail_data = {}
    for name, value in details.items():
        if isinstance(value, str):
            detail_data[name] = {"html": value}
        else:
            detail_data[name] = {"items": [str(item) for item in value]}
    data = {
        "nodes": nodes,
        "edges": edge_list,
        "details": detail_data,
        "colours": community_colours(max(n_communities, 1)),
        "layers": sorted({n["layer"] for n in nodes}),
    }
    return (
        _PAGE_TEMPLATE.replace("__TITLE__", html.escape(title))
        .replace("__CSS__", _PAGE_CSS)
        .replace("__JS__", _PAGE_JS)
        .replace("__DATA__", _script_json(data))
    )


def write_graph_page(
    path: str | os.PathLike,
    graph: nx.Graph,
    details: Mapping[str, str | Sequence[str]] | None = None,
    *,
    title: str = "SAE features across layers",
    max_edges: int = 20_000,
) -> Path:
    """Write `graph_page_html(...)` to `path` atomically and return the path."""
    path = Path(path)
    atomic_write_text(path, graph_page_html(graph, details, title=title, max_edges=max_edges))
    return path


_PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<div id="app">
  <div id="stage">
    <div id="toolbar">
      <strong>__TITLE__</strong>
      <input id="find" type="search" placeholder="find node, e.g. L1:5" aria-label="find a node">
      <button id="reset" type="button">reset view</button>
      <span id="hint">drag to pan · wheel to zoom · click a node</span>
    </div>
    <svg id="graph" role="img" aria-label="graph of features across layers">
      <g id="viewport"><g id="edges"></g><g id="labels"></g><g id="nodes"></g></g>
    </svg>
  </div>
  <aside id="panel"><p class="muted">Click a node to see its feature.</p></aside>
</div>
<script type="application/json" id="graph-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

_PAGE_CSS = """
html, body { margin: 0; height: 100%; font: 14px/1.4 system-ui, sans-serif; color: #222; }
#app { display: flex; height: 100vh; }
#stage { flex: 1; position: relative; min-width: 0; }
#toolbar { position: absolute; top: 0; left: 0; right: 0; padding: 6px 10px; background: rgba(255,255,255,.9);
  border-bottom: 1px solid #ddd; display: flex; gap: 10px; align-items: center; z-index: 1; }
#hint { color: #777; font-size: 12px; }
#graph { width: 100%; height: 100%; display: block; cursor: grab; background: #fcfcfc; touch-action: none; }
#graph.dragging { cursor: grabbing; }
#edges line { stroke: #888; vector-effect: non-scaling-stroke; }
#nodes circle { stroke: #fff; stroke-width: 1; vector-effect: non-scaling-stroke; cursor: pointer; }
#nodes circle.selected { stroke: #000; stroke-width: 3; }
#graph.focus #nodes circle.near { stroke: #000; stroke-width: 1.5; }
#graph.focus #nodes circle:not(.near) { opacity: .15; }
#graph.focus #edges line:not(.near) { stroke-opacity: .03 !important; }
#graph.focus #edges line.near { stroke: #222; }
#labels text { font-size: 14px; fill: #555; text-anchor: middle; }
#panel { width: 340px; overflow: auto; border-left: 1px solid #ddd; padding: 10px 14px; background: #fff; }
#panel h2 { font-size: 16px; margin: 4px 0; }
#panel ul { padding-left: 18px; }
#panel li { margin: 2px 0; }
#panel .contexts li { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; }
#panel a { color: #0645ad; cursor: pointer; }
.muted { color: #777; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px; }
"""

# Plain JavaScript, no libraries. World coordinates: layer column i at x = i * COLUMN, features
# spread over y in [0, HEIGHT]; the <g id="viewport"> carries the pan/zoom transform.
_PAGE_JS = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("graph-data").textContent);
  const svg = document.getElementById("graph");
  const NS = svg.namespaceURI;  // the SVG namespace, taken from the inline element
  const viewport = document.getElementById("viewport");
  const panel = document.getElementById("panel");
  const COLUMN = 260, HEIGHT = 900;
  const nodes = data.nodes, edges = data.edges;
  const byId = new Map(nodes.map((n, i) => [n.id, i]));
  const neighbours = nodes.map(() => []);
  const edgeElements = [];
  let view = { x: 0, y: 0, k: 1 };
  let selected = -1;
  let drag = null, moved = false;  // pointer state: a drag that moved is a pan, not a click

  function colour(c) { return data.colours[c % data.colours.length]; }
  function make(tag, attrs, parent) {
    const el = document.createElementNS(NS, tag);
    for (const key in attrs) el.setAttribute(key, attrs[key]);
    parent.appendChild(el);
    return el;
  }
  const column = new Map(data.layers.map((layer, i) => [layer, i]));
  nodes.forEach((n) => { n.px = n.x * COLUMN; n.py = n.y * HEIGHT; });

  const edgeGroup = document.getElementById("edges");
  // Many overlapping lines add up to a grey wall: fade each line as the edge count grows.
  const fade = Math.min(1, Math.sqrt(300 / Math.max(edges.length, 1)));
  edges.forEach((e, i) => {
    const a = nodes[e[0]], b = nodes[e[1]];
    const line = make("line", { x1: a.px, y1: a.py, x2: b.px, y2: b.py,
      "stroke-width": 0.5 + 2 * e[2], "stroke-opacity": fade * (0.15 + 0.6 * e[2]) }, edgeGroup);
    edgeElements.push(line);
    neighbours[e[0]].push([e[1], e[2], i]);
    neighbours[e[1]].push([e[0], e[2], i]);
  });
  const labelGroup = document.getElementById("labels");
  data.layers.forEach((layer, i) => {
    make("text", { x: i * COLUMN, y: -14 }, labelGroup).textContent = "layer " + layer;
  });
  const perColumn = new Map();
  nodes.forEach((n) => perColumn.set(n.x, (perColumn.get(n.x) || 0) + 1));
  const nodeGroup = document.getElementById("nodes");
  const circles = nodes.map((n, i) => {
    const crowd = perColumn.get(n.x);
    const r = Math.max(2.5, Math.min(7, 0.4 * HEIGHT / crowd));
    const c = make("circle", { cx: n.px, cy: n.py, r: r, fill: colour(n.community), "data-id": n.id }, nodeGroup);
    make("title", {}, c).textContent = n.id + " (community " + n.community + ")";
    c.addEventListener("click", (event) => { if (!moved) select(i); event.stopPropagation(); });
    return c;
  });

  function apply() {
    viewport.setAttribute("transform", "translate(" + view.x + "," + view.y + ") scale(" + view.k + ")");
  }
  function fit() {
    const box = svg.getBoundingClientRect();
    const width = Math.max(1, (data.layers.length - 1) * COLUMN) + 120, height = HEIGHT + 80;
    view.k = Math.min(box.width / width, (box.height - 40) / height) || 1;
    view.x = (box.width - (width - 120) * view.k) / 2;
    view.y = 40 + 30 * view.k;
    apply();
  }

  // Pan with the pointer, zoom with the wheel around the cursor.
  svg.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX, y: event.clientY, vx: view.x, vy: view.y };
    moved = false;
  });
  window.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
    if (!moved && Math.abs(dx) + Math.abs(dy) > 3) { moved = true; svg.classList.add("dragging"); }
    if (moved) { view.x = drag.vx + dx; view.y = drag.vy + dy; apply(); }
  });
  window.addEventListener("pointerup", () => { drag = null; svg.classList.remove("dragging"); });
  svg.addEventListener("wheel", (event) => {
    event.preventDefault();
    const box = svg.getBoundingClientRect();
    const mx = event.clientX - box.left, my = event.clientY - box.top;
    const factor = Math.exp(-event.deltaY * 0.0015);
    const k = Math.min(80, Math.max(0.05, view.k * factor));
    view.x = mx - (mx - view.x) * (k / view.k);
    view.y = my - (my - view.y) * (k / view.k);
    view.k = k;
    apply();
  }, { passive: false });
  svg.addEventListener("click", () => { if (!moved) clear(); });

  function clear() {
    selected = -1;
    svg.classList.remove("focus");
    document.querySelectorAll(".near, .selected").forEach((el) => el.classList.remove("near", "selected"));
    panel.innerHTML = '<p class="muted">Click a node to see its feature.</p>';
  }

  function add(parent, tag, text, cls) {
    const el = document.createElement(tag);
    if (text !== undefined) el.textContent = text;
    if (cls) el.className = cls;
    parent.appendChild(el);
    return el;
  }

  function select(i) {
    clear();
    selected = i;
    const n = nodes[i];
    svg.classList.add("focus");
    circles[i].classList.add("selected", "near");
    neighbours[i].forEach(([j, , e]) => { circles[j].classList.add("near"); edgeElements[e].classList.add("near"); });
    panel.innerHTML = "";
    const heading = add(panel, "h2");
    const swatch = add(heading, "span", undefined, "swatch");
    swatch.style.background = colour(n.community);
    heading.appendChild(document.createTextNode("layer " + n.layer + ", feature " + n.feature));
    add(panel, "p", "node " + n.id + " · community " + n.community + " · active on " +
      (100 * n.active).toPrecision(3) + "% of rows", "muted");
    const detail = data.details[n.id];
    const box = add(panel, "div");
    box.id = "detail";
    if (detail && detail.html !== undefined) {
      box.innerHTML = detail.html;  // the caller's own snippet (e.g. a dashboard)
    } else if (detail && detail.items) {
      add(box, "h3", "Top contexts");
      const list = add(box, "ul", undefined, "contexts");
      detail.items.forEach((item) => add(list, "li", item));
    } else {
      add(box, "p", "No details for this feature.", "muted");
    }
    add(panel, "h3", "Neighbours (" + neighbours[i].length + ")");
    const list = add(panel, "ul");
    neighbours[i].slice().sort((a, b) => b[1] - a[1]).forEach(([j, w]) => {
      const li = add(list, "li");
      const link = add(li, "a", nodes[j].id);
      link.addEventListener("click", () => select(j));
      li.appendChild(document.createTextNode(" — " + w.toFixed(3)));
    });
  }

  document.getElementById("reset").addEventListener("click", () => { clear(); fit(); });
  document.getElementById("find").addEventListener("change", (event) => {
    const i = byId.get(event.target.value.trim());
    if (i === undefined) { event.target.setCustomValidity("no such node"); event.target.reportValidity(); return; }
    event.target.setCustomValidity("");
    select(i);
    const box = svg.getBoundingClientRect();
    view.x = box.width / 2 - nodes[i].px * view.k;
    view.y = box.height / 2 - nodes[i].py * view.k;
    apply();
  });
  window.addEventListener("resize", fit);
  fit();
  // A handle for tests and for curious readers in the browser console.
  window.crossLayerGraph = { data: data, select: (id) => select(byId.get(id)), view: () => Object.assign({}, view) };
})();
"""
