"""How SAE features of adjacent layers relate (Lerner et al., arXiv 2410.08869; the book's
Methods page, section Features across layers).

Each layer of the residual stream gets its own SAE. Encoding the *same* token positions with the
SAE of layer L and the SAE of layer L+1 gives two aligned activation tables,
acts_upstream [row, feature_up] and acts_downstream [row, feature_down]. The cross-layer code
compares every upstream feature A with every downstream feature B over many rows (≥ 1M tokens)
without holding the tables in memory, and turns the comparison into findings. `crosslib.analyses.crosslayer`
is its public API, re-exporting three modules:

- `crosslib.analyses.crosslayer_statistics`: `CrossLayerConfig` and the streaming statistics;
- `crosslib.analyses.crosslayer_findings`: partners, pass-through, gates, the graph and the summaries;
- `crosslib.analyses.crosslayer_page`: the interactive graph page, filled into the template
  `crosslib/analyses/templates/crosslayer_graph.html`.

What each name does:

- `pair_statistics` / `layer_chain_statistics`: streaming statistics for every (A, B) pair —
  the Pearson correlation of the activations, and on binarised activity (a feature is *active*
  on a row when its activation > binarise_fraction × its maximum over all rows) the Jaccard
  index, the sufficiency P(B active | A active) and the necessity P(A active | B active).
  Result: one `PairStatistics` per pair of adjacent layers.
- `top_partners`: the k best partners of every feature under one measure.
- `pass_through_table`, `layer_flow`, `pass_through_fractions`, `plot_layer_flow`: features
  that pass through to the next layer almost unchanged (best next-layer correlation ≥ 0.95),
  and the share of features that appear or disappear between layers (stacked-bar figure).
- `gate_candidates`, `gate_null_expectation`: quasi-boolean gates — a downstream feature with
  exactly two necessary upstream features (AND) or exactly two sufficient ones (OR) — and how
  many of them unrelated layers would give by chance.
- `layer_graph`, `assign_communities`: a networkx graph over all layers with an edge wherever
  the correlation (or Jaccard) is above a threshold, and its Louvain communities.
- `graph_page_html`, `write_graph_page`: a self-contained interactive HTML page of that graph
  (pan, zoom, click a node to read its feature's top contexts); no network needed.
- `pass_through_over_time`, `chains_over_time`, `summarise_cross_layer`: the same numbers at
  several training snapshots as tidy tables, and flat summary numbers ready to glue into the book.

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

Memory: two float64 matrices [F_L, F_L+1] per pair of adjacent layers, independent of the number
of rows (details in `crosslib.analyses.crosslayer_statistics`).
"""

from __future__ import annotations

from crosslib.analyses.crosslayer_findings import (
    DIRECTIONS,
    DOWNSTREAM_CATEGORIES,
    UPSTREAM_CATEGORIES,
    assign_communities,
    chains_over_time,
    gate_candidates,
    gate_null_expectation,
    layer_flow,
    layer_graph,
    node_name,
    pass_through_fractions,
    pass_through_over_time,
    pass_through_table,
    plot_layer_flow,
    summarise_cross_layer,
    top_partners,
)
from crosslib.analyses.crosslayer_page import community_colours, graph_page_html, layered_layout, write_graph_page
from crosslib.analyses.crosslayer_statistics import (
    EDGE_MEASURES,
    MEASURES,
    SPARSE_DENSITY,
    Activations,
    BatchFactory,
    CrossLayerConfig,
    PairStatistics,
    feature_maxima,
    layer_chain_statistics,
    pair_statistics,
)

__all__ = [
    "DIRECTIONS", "DOWNSTREAM_CATEGORIES", "EDGE_MEASURES", "MEASURES", "SPARSE_DENSITY", "UPSTREAM_CATEGORIES",
    "Activations", "BatchFactory", "CrossLayerConfig", "PairStatistics",
    "assign_communities", "chains_over_time", "community_colours", "feature_maxima", "gate_candidates",
    "gate_null_expectation", "graph_page_html", "layer_chain_statistics", "layer_flow", "layer_graph",
    "layered_layout", "node_name", "pair_statistics", "pass_through_fractions", "pass_through_over_time",
    "pass_through_table", "plot_layer_flow", "summarise_cross_layer", "top_partners", "write_graph_page",
]
