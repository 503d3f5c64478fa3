"""The interactive page of the cross-layer feature graph (the book's Methods page, section
Features across layers).

`graph_page_html` lays out a `layer_graph` (x = layer, y = community) and fills the page
`crosslib/analyses/templates/crosslayer_graph.html` with it: the template holds the markup, the style sheet
and the script inline, so the page is one self-contained file that needs no network (pan, zoom,
click a node to read its feature's top contexts). `write_graph_page` writes it to disk.
"""

from __future__ import annotations

import colorsys
import html
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import networkx as nx

from crosslib.analyses.crosslayer_findings import node_name
from crosslib.analyses.explorer import TEMPLATE_DIR
from crosslib.artifacts import atomic_write_text
from crosslib.config import ParameterError, is_int, require

# The page's template in the package's templates/ folder (shipped as package data). It holds two
# placeholders: __TITLE__ (the escaped title, twice) and __DATA__ (the graph as JSON).
GRAPH_PAGE_TEMPLATE = "crosslayer_graph.html"


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
    require(is_int(max_edges) and max_edges >= 0, "max_edges", max_edges, "an integer ≥ 0")
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
    template = (TEMPLATE_DIR / GRAPH_PAGE_TEMPLATE).read_text(encoding="utf-8")
    # The data go in last, so that details reading "__TITLE__" stay as they are.
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", _script_json(data))


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
