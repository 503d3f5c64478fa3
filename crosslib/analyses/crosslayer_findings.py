"""Findings from the cross-layer statistics (Lerner et al., arXiv 2410.08869; the book's Methods
page, section Features across layers).

Everything here reads the `PairStatistics` of `crosslib.analyses.crosslayer_statistics` (one per pair of
adjacent layers) and the thresholds of `CrossLayerConfig`, in four groups: partners and
pass-through (which features reach the next layer almost unchanged, which appear or disappear),
quasi-boolean gates and their chance level, the layer graph and its Louvain communities, and
summaries — flat numbers to glue into the book and tidy tables over training snapshots.
`crosslib.analyses.crosslayer` lists every function with a line on what it does.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import networkx as nx
import numpy as np
import pandas as pd
import scipy.stats
from jaxtyping import Float

from crosslib.analyses.crosslayer_statistics import MEASURES, CrossLayerConfig, PairStatistics
from crosslib.config import ParameterError, is_int, require, require_choice

DIRECTIONS: tuple[str, ...] = ("downstream", "upstream")
UPSTREAM_CATEGORIES: tuple[str, ...] = ("passes_through", "transformed", "disappears")
DOWNSTREAM_CATEGORIES: tuple[str, ...] = ("passed_through", "transformed", "appears")


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
    require(is_int(k) and k >= 1, "k", k, "an integer ≥ 1")
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
        require(is_int(step), "step", step, "an integer training step")
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

