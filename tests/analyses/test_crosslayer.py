"""Cross-layer statistics and findings on small synthetic activations with planted answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import torch

from crosslib.analyses.crosslayer import (
    CrossLayerConfig,
    PairStatistics,
    assign_communities,
    feature_maxima,
    gate_candidates,
    graph_page_html,
    layer_chain_statistics,
    layer_flow,
    layer_graph,
    node_name,
    pair_statistics,
    pass_through_fractions,
    plot_layer_flow,
    pass_through_over_time,
    pass_through_table,
    summarise_cross_layer,
    top_partners,
    write_graph_page,
)
from crosslib.analyses.crosslayer_statistics import _to_table
from crosslib.config import ParameterError


def sparse_features(rng: np.random.Generator, rows: int, features: int, p_active: float = 0.3) -> np.ndarray:
    """Non-negative SAE-like activations: each feature fires with probability p_active, size 1–2."""
    fires = rng.random((rows, features)) < p_active
    return fires * rng.uniform(1.0, 2.0, (rows, features))


def batched(arrays: list[np.ndarray], sizes: list[int]):
    """A factory over uneven batches; alternates torch and numpy so both inputs are exercised."""
    edges = np.cumsum([0] + sizes)
    assert edges[-1] == len(arrays[0])

    def make():
        for i, (start, stop) in enumerate(zip(edges[:-1], edges[1:])):
            chunk = [a[start:stop] for a in arrays]
            yield tuple(torch.from_numpy(c) if i % 2 else c for c in chunk)

    return make


def dense_reference(up: np.ndarray, down: np.ndarray, fraction: float) -> dict[str, np.ndarray]:
    """The same statistics computed directly from the full tables (independent of the library)."""
    n_up = up.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        pearson = np.nan_to_num(np.corrcoef(up.T, down.T)[:n_up, n_up:], nan=0.0)
        max_up, max_down = up.max(axis=0), down.max(axis=0)
        on_up = (up > fraction * max_up) & (max_up > 0)
        on_down = (down > fraction * max_down) & (max_down > 0)
        both = on_up.T.astype(float) @ on_down.astype(float)
        count_up, count_down = on_up.sum(axis=0), on_down.sum(axis=0)
        jaccard = np.nan_to_num(both / (count_up[:, None] + count_down[None, :] - both))
        sufficiency = np.nan_to_num(both / count_up[:, None])  # P(B | A)
        necessity = np.nan_to_num(both / count_down[None, :])  # P(A | B)
    return dict(pearson=pearson, jaccard=jaccard, sufficiency=sufficiency, necessity=necessity, co_active=both)


@pytest.fixture(scope="module")
def four_layers():
    """Dense-ish, sparse, sparse, dense layers: every dense/sparse cross-product path; one dead feature."""
    rng = np.random.default_rng(0)
    rows = 900
    layer0 = np.maximum(rng.normal(size=(rows, 7)), 0)  # ~50% non-zero: dense path
    layer1 = sparse_features(rng, rows, 9, p_active=0.04)
    layer1[:, 4] = 0.0  # dead feature
    layer1[:, 2] += 0.8 * layer0[:, 1] * (rng.random(rows) < 0.2)  # related, with a spread of values
    layer2 = sparse_features(rng, rows, 5, p_active=0.04)
    layer2[:, 0] = layer1[:, 2] * rng.uniform(0.5, 1.5, rows)
    layer3 = np.maximum(rng.normal(size=(rows, 4)) + layer2[:, :4], 0).astype(np.float32)  # float32 input
    layers = [layer0, layer1, layer2, layer3]
    kinds = ["sparse" if scipy.sparse.issparse(_to_table(layer)) else "dense" for layer in layers]
    assert kinds == ["dense", "sparse", "sparse", "dense"]
    return layers


def test_streaming_statistics_equal_a_dense_computation(four_layers):
    config = CrossLayerConfig(binarise_fraction=0.2)
    factory = batched(four_layers, [128, 300, 1, 0, 471])
    chain = layer_chain_statistics(factory, config, layers=[3, 4, 5, 6], progress=False)
    assert [(s.upstream_layer, s.downstream_layer) for s in chain] == [(3, 4), (4, 5), (5, 6)]
    # Also dense × dense: layers 0 and 3 as one pair.
    skip = pair_statistics(lambda: ((b[0], b[3]) for b in factory()), config, progress=False)
    pairs = [(four_layers[i], four_layers[i + 1]) for i in range(3)] + [(four_layers[0], four_layers[3])]
    for stats, (up, down) in zip(chain + [skip], pairs):
        reference = dense_reference(up.astype(np.float64), down.astype(np.float64), 0.2)
        assert stats.n_rows == 900
        assert stats.pearson.shape == (up.shape[1], down.shape[1])
        for name in ("pearson", "jaccard", "sufficiency", "necessity"):
            np.testing.assert_allclose(stats.measure(name), reference[name], atol=1e-10, err_msg=name)
        np.testing.assert_array_equal(stats.co_active_count, reference["co_active"])
        np.testing.assert_allclose(stats.max_upstream, up.max(axis=0))
    # The planted correlations are really there (so the comparison is not between two zero matrices).
    assert chain[0].pearson[1, 2] > 0.2 and chain[1].pearson[2, 0] > 0.7 and chain[1].jaccard[2, 0] > 0.5
    # The dead feature: never active, zero correlation, excluded from the live masks.
    assert chain[0].active_count_downstream[4] == 0 and not chain[0].alive_downstream[4]
    assert np.all(chain[0].pearson[:, 4] == 0) and np.all(chain[1].pearson[4, :] == 0)
    # Sufficiency is conditioned on the upstream feature: P(B | A) = co / |A|; necessity on B.
    stats, a, b = chain[0], 1, 2
    assert 0 < stats.sufficiency[a, b] < 1 and 0 < stats.necessity[a, b] < 1
    assert stats.sufficiency[a, b] == pytest.approx(stats.co_active_count[a, b] / stats.active_count_upstream[a])
    assert stats.necessity[a, b] == pytest.approx(stats.co_active_count[a, b] / stats.active_count_downstream[b])


def test_one_pass_with_exact_maxima_matches_two_passes(four_layers):
    factory = batched(four_layers[:2], [500, 400])
    two_pass = pair_statistics(factory, progress=False)
    maxima = feature_maxima(factory())
    one_pass = pair_statistics(factory(), maxima=maxima, progress=False)  # a plain iterator is enough
    for name in ("pearson", "jaccard", "sufficiency", "necessity"):
        np.testing.assert_allclose(one_pass.measure(name), two_pass.measure(name), atol=1e-12)
    # A [batch, 1, feature] encoder output (an SAE = crosscoder with one snapshot) is accepted too.
    snapshot_axis = lambda: ((u[:, None, :], d[:, None, :]) for u, d in factory())  # noqa: E731
    np.testing.assert_allclose(pair_statistics(snapshot_axis, progress=False).pearson, two_pass.pearson, atol=1e-12)


def test_streaming_rejects_bad_input(four_layers):
    up, down = four_layers[0], four_layers[1]
    with pytest.raises(ParameterError, match="fresh iterator"):
        pair_statistics(iter([(up, down)]), progress=False)
    with pytest.raises(ParameterError, match="row counts"):
        pair_statistics(lambda: [(up, down[:-1])], progress=False)
    with pytest.raises(ParameterError, match="NaN"):
        bad = down.copy()
        bad[0, 0] = np.nan
        pair_statistics(lambda: [(up, bad)], progress=False)
    with pytest.raises(ParameterError, match="empty"):
        pair_statistics(lambda: [], progress=False)
    calls = []

    def shrinking():  # yields fewer rows on the second call: the two passes would disagree
        calls.append(1)
        return [(up[: 100 * (3 - len(calls))], down[: 100 * (3 - len(calls))])]

    with pytest.raises(ParameterError, match="same rows"):
        pair_statistics(shrinking, progress=False)
    with pytest.raises(ParameterError, match="maxima"):
        pair_statistics(lambda: [(up, down)], maxima=(up.max(0)[:3], down.max(0)), progress=False)


def test_planted_pass_through_feature_is_found():
    rng = np.random.default_rng(1)
    rows, n_up, n_down = 3000, 12, 10
    up = sparse_features(rng, rows, n_up)
    down = sparse_features(rng, rows, n_down)  # independent of upstream
    down[:, 3] = up[:, 7] + 1e-3 * rng.normal(size=rows)  # a copy with tiny noise: passes through
    down[:, 5] = 0.6 * up[:, 2] + 0.8 * sparse_features(rng, rows, 1)[:, 0]  # related, not a copy
    stats = pair_statistics(batched([up, down], [1000, 1000, 1000]), progress=False)
    table = pass_through_table(stats)
    passing = table[table.category == "passes_through"]
    assert passing.feature.tolist() == [7] and passing.best_partner.tolist() == [3]
    assert passing.best_pearson.iloc[0] > 0.999
    assert table.set_index("feature").loc[2, "category"] == "transformed"  # r ≈ 0.6: a partner, not a copy
    assert (table.category == "disappears").sum() == n_up - 2
    fractions = pass_through_fractions([stats]).iloc[0]
    assert fractions.pass_through_fraction == pytest.approx(1 / n_up)
    assert fractions.disappear_fraction == pytest.approx((n_up - 2) / n_up)
    assert fractions.appear_fraction == pytest.approx((n_down - 2) / n_down)
    figure = plot_layer_flow(layer_flow([stats]))
    heights = [bar.get_height() for bar in figure.axes[0].patches]  # downstream: passed, transformed, appears
    assert heights == pytest.approx([1 / n_down, 1 / n_down, (n_down - 2) / n_down])
    flow = layer_flow([stats]).set_index(["side", "category"])
    assert flow.loc[("downstream", "passed_through"), "count"] == 1
    assert flow.loc[("downstream", "appears"), "count"] == n_down - 2
    assert flow.groupby("side")["fraction"].sum().tolist() == pytest.approx([1.0, 1.0])
    partners = top_partners(stats, "pearson", k=2)
    best = partners[(partners.feature == 7) & (partners["rank"] == 0)].iloc[0]
    assert best.partner == 3 and best.pearson > 0.999 and len(partners) == 2 * n_up
    # A stricter threshold than the planted copy's correlation finds nothing.
    assert pass_through_fractions([stats], CrossLayerConfig(pass_through=1.0)).pass_through_fraction.iloc[0] == 0.0


def planted_gates(rows: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """8 upstream and 6 downstream features; downstream 0 = AND(up 1, up 2), downstream 4 = OR(up 3, up 5)."""
    rng = np.random.default_rng(2)
    up = sparse_features(rng, rows, 8)
    down = sparse_features(rng, rows, 6)
    size = rng.uniform(1.0, 2.0, rows)
    down[:, 0] = ((up[:, 1] > 0) & (up[:, 2] > 0)) * size
    down[:, 4] = ((up[:, 3] > 0) | (up[:, 5] > 0)) * size
    return up, down


def test_planted_and_and_or_gates_are_found():
    up, down = planted_gates()
    stats = pair_statistics(batched([up, down], [1500, 1500]), progress=False)
    assert stats.necessity[1, 0] == 1.0 and stats.necessity[2, 0] == 1.0  # P(A | B) for the AND
    assert stats.sufficiency[3, 4] == 1.0 and stats.sufficiency[5, 4] == 1.0  # P(B | A) for the OR
    gates = gate_candidates([stats])
    assert gates[["gate", "feature", "input_a", "input_b"]].values.tolist() == [["AND", 0, 1, 2], ["OR", 4, 3, 5]]
    assert gates.score_a.tolist() == [1.0, 1.0]
    summary = summarise_cross_layer([stats])
    assert summary["and_gates"] == 1 and summary["or_gates"] == 1
    # Requiring more active rows than the AND feature has removes it.
    rare = CrossLayerConfig(gate_min_active=int(stats.active_count_downstream[0]) + 1)
    assert "AND" not in gate_candidates(stats, rare).gate.tolist()


def two_cluster_layers(seed: int = 3, rows: int = 2000, per_cluster: int = 3, n_layers: int = 3) -> list[np.ndarray]:
    """Every feature is a noisy copy of one of two independent sources: two obvious clusters."""
    rng = np.random.default_rng(seed)
    sources = sparse_features(rng, rows, 2)
    layers = []
    for _ in range(n_layers):
        columns = [sources[:, c] * rng.uniform(0.8, 1.2, rows) for c in (0, 1) for _ in range(per_cluster)]
        layers.append(np.stack(columns, axis=1))
    return layers


def test_louvain_communities_are_two_clusters_and_deterministic():
    chain = layer_chain_statistics(batched(two_cluster_layers(), [2000]), progress=False)
    config = CrossLayerConfig(edge_threshold=0.5, seed=7)
    results = []
    for _ in range(2):
        graph = layer_graph(chain, config)
        communities = assign_communities(graph, config)
        results.append((communities, [graph.nodes[n]["community"] for n in graph]))
    assert results[0] == results[1]
    communities = results[0][0]
    assert [len(c) for c in communities] == [9, 9]
    expected = {frozenset(node_name(layer, f) for layer in range(3) for f in block) for block in ((0, 1, 2), (3, 4, 5))}
    assert {frozenset(c) for c in communities} == expected
    assert graph.number_of_nodes() == 18 and graph.number_of_edges() == 2 * 2 * 9  # all within-cluster pairs
    summary = summarise_cross_layer(chain, config, graph=graph)
    assert summary["communities"] == 2 and summary["largest_community"] == 9
    assert summary["multi_layer_communities"] == 2 and summary["graph_edges"] == 36
    # A Jaccard graph gives the same clusters here (activity sets coincide within a cluster).
    jaccard = layer_graph(chain, config.replace(edge_measure="jaccard", edge_threshold=0.9))
    assert jaccard.number_of_edges() == 36


def embedded_data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.S).group(1))


def test_graph_page_is_offline_and_embeds_nodes_and_details(tmp_path):
    chain = layer_chain_statistics(batched(two_cluster_layers(), [2000]), progress=False)
    graph = layer_graph(chain)
    assign_communities(graph)
    details = {
        node_name(0, 0): ["the cat </script><b>sat</b>", "a dog ran"],
        node_name(2, 5): "<p class='dash'>top contexts</p>",
    }
    page = write_graph_page(tmp_path / "graph.html", graph, details, title="Two clusters")
    text = page.read_text()
    assert not re.search(r"https?://", text), "the page must not reference anything on the network"
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=", text)
    assert text.count("</script>") == 2  # the data cannot close its own script element
    payload = embedded_data(text)
    assert sorted(n["id"] for n in payload["nodes"]) == sorted(graph.nodes)
    assert len(payload["edges"]) == graph.number_of_edges()
    assert payload["details"][node_name(0, 0)]["items"][0] == "the cat </script><b>sat</b>"
    assert payload["details"][node_name(2, 5)]["html"].startswith("<p class='dash'>")
    assert {n["community"] for n in payload["nodes"]} == {0, 1} and len(payload["colours"]) == 2
    xs = {n["id"]: n["x"] for n in payload["nodes"]}
    assert xs[node_name(0, 0)] == 0 and xs[node_name(2, 0)] == 2  # one column per layer
    # Keys may be (layer, feature) pairs; keys for features outside the graph are skipped.
    both = embedded_data(graph_page_html(graph, {(1, 3): ["x"], (9, 9): ["y"]}))
    assert list(both["details"]) == [node_name(1, 3)]
    with pytest.raises(ParameterError, match="details"):
        graph_page_html(graph, {"L9:9": ["nowhere"]})


def test_graph_page_template_ships_in_the_package_and_is_filled_with_the_data():
    """The page is package data (found through importlib.resources, as an installed wheel finds it);
    graph_page_html changes nothing in it but the title and the data."""
    import fnmatch
    import html
    import tomllib
    from importlib import resources

    from crosslib.analyses.crosslayer_page import GRAPH_PAGE_TEMPLATE

    template = resources.files("crosslib.analyses").joinpath("templates", GRAPH_PAGE_TEMPLATE)
    assert template.is_file()
    text = template.read_text(encoding="utf-8")
    assert text.count("__TITLE__") == 2 and text.count("__DATA__") == 1
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["crosslib"]
    assert any(fnmatch.fnmatch(f"analyses/templates/{GRAPH_PAGE_TEMPLATE}", pattern) for pattern in shipped)

    chain = layer_chain_statistics(batched(two_cluster_layers(), [2000]), progress=False)
    graph = layer_graph(chain)
    assign_communities(graph)
    title = "Planted <clusters> & more"
    page = graph_page_html(graph, {node_name(1, 4): ["planted context", "__TITLE__ stays text"]}, title=title)
    payload = embedded_data(page)
    assert sorted(n["id"] for n in payload["nodes"]) == sorted(graph.nodes)
    assert len(payload["edges"]) == graph.number_of_edges()
    assert payload["details"] == {node_name(1, 4): {"items": ["planted context", "__TITLE__ stays text"]}}
    data = re.search(r'id="graph-data">(.*?)</script>', page, re.S).group(1)
    assert page == text.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)


def test_pass_through_over_time_is_a_tidy_table():
    rng = np.random.default_rng(5)
    early = layer_chain_statistics(batched([sparse_features(rng, 500, 6) for _ in range(3)], [500]), progress=False)
    late = layer_chain_statistics(batched(two_cluster_layers(seed=4), [2000]), progress=False)
    table = pass_through_over_time({512: late, 64: early})
    assert table[["step", "upstream_layer"]].values.tolist() == [[64, 0], [64, 1], [512, 0], [512, 1]]
    # Early: independent features, no chains. Late: copies of two sources (r ≈ 0.98) pass through.
    assert table.pass_through_fraction.tolist() == [0.0, 0.0, 1.0, 1.0]
    wide = table.pivot(index="step", columns="upstream_layer", values="pass_through_fraction")
    assert wide.loc[512].tolist() == [1.0, 1.0]
    strict = pass_through_over_time({64: early, 512: late}, CrossLayerConfig(pass_through=0.99))
    assert strict.pass_through_fraction.tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ParameterError):
        pass_through_over_time({})


def test_save_and_load_round_trip(tmp_path, four_layers):
    stats = pair_statistics(batched(four_layers[:2], [900]), upstream_layer=2, progress=False)
    loaded = PairStatistics.load(stats.save(tmp_path / "pair.safetensors"))
    assert (loaded.upstream_layer, loaded.downstream_layer, loaded.n_rows) == (2, 3, 900)
    np.testing.assert_array_equal(loaded.pearson, stats.pearson)
    np.testing.assert_array_equal(loaded.jaccard, stats.jaccard)


@pytest.mark.parametrize(
    "changes, name",
    [
        (dict(binarise_fraction=1.0), "binarise_fraction"),
        (dict(binarise_fraction=-0.1), "binarise_fraction"),
        (dict(pass_through=1.5), "pass_through"),
        (dict(partner_threshold=0.97), "partner_threshold"),
        (dict(gate=0.0), "gate"),
        (dict(gate_min_active=0), "gate_min_active"),
        (dict(edge_measure="cosine"), "edge_measure"),
        (dict(edge_threshold=float("nan")), "edge_threshold"),
        (dict(top_k=0), "top_k"),
        (dict(louvain_resolution=0), "louvain_resolution"),
        (dict(seed="zero"), "seed"),
    ],
)
def test_bad_thresholds_raise_parameter_error(changes, name):
    with pytest.raises(ParameterError, match=name):
        CrossLayerConfig(**changes)


def test_config_round_trips_through_json():
    config = CrossLayerConfig(pass_through=0.9, edge_measure="jaccard", seed=3)
    assert CrossLayerConfig.from_dict(json.loads(config.to_json())) == config
    assert config.key() != CrossLayerConfig().key()


@pytest.mark.slow
def test_graph_page_works_in_headless_chromium(tmp_path):
    """Open the page offline in headless Chromium: nodes drawn, click shows details, pan and zoom."""
    from screenshots import CHROMEDRIVER, CHROMIUM, chromium  # the browser test's driver (tests/screenshots.py)

    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.fail("headless Chromium is needed: apt-get install -y chromium chromium-driver (.ci/run does this)")
    from selenium.webdriver.common.action_chains import ActionChains

    chain = layer_chain_statistics(batched(two_cluster_layers(), [2000]), progress=False)
    graph = layer_graph(chain)
    assign_communities(graph)
    page = write_graph_page(tmp_path / "graph.html", graph, {node_name(1, 4): ["planted context one", "two"]})
    driver = chromium(tmp_path / "profile", height=800)
    try:
        driver.get(page.as_uri())
        assert driver.execute_script("return document.querySelectorAll('#nodes circle').length") == 18
        assert driver.execute_script("return document.querySelectorAll('#edges line').length") == 36
        errors = driver.execute_script("return window.crossLayerGraph === undefined")
        assert errors is False, "the page script did not run"
        driver.find_element("css selector", f"circle[data-id='{node_name(1, 4)}']").click()
        panel = driver.find_element("id", "panel").text
        assert "layer 1, feature 4" in panel and "planted context one" in panel
        before = driver.execute_script("return window.crossLayerGraph.view()")
        svg = driver.find_element("id", "graph")
        ActionChains(driver).move_to_element(svg).click_and_hold().move_by_offset(120, 40).release().perform()
        after = driver.execute_script("return window.crossLayerGraph.view()")
        assert after["x"] == pytest.approx(before["x"] + 120, abs=2) and after["k"] == before["k"]
        driver.execute_script(
            "document.getElementById('graph').dispatchEvent(new WheelEvent('wheel', "
            "{deltaY: -300, clientX: 300, clientY: 300, bubbles: true, cancelable: true}))"
        )
        assert driver.execute_script("return window.crossLayerGraph.view().k") > after["k"] * 1.3
        driver.save_screenshot(str(tmp_path / "graph.png"))  # left in pytest's tmp dir for a look
        remote = driver.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
        assert remote == []
    finally:
        driver.quit()


def test_gate_null_expectation_is_small_for_planted_gates_and_matches_shuffled_rows():
    from crosslib.analyses.crosslayer import gate_null_expectation

    up, down = planted_gates()
    rows = len(up)
    stats = pair_statistics(batched([up, down], [3000]), progress=False)
    null = gate_null_expectation(stats)
    assert null["AND"] < 1e-6 and null["OR"] < 1e-6  # a gate at 0.999 is far beyond chance here
    # With a loose gate threshold chance gates appear; the expectation agrees with shuffling rows.
    loose = CrossLayerConfig(gate=0.3, gate_min_active=10)
    expected = gate_null_expectation(stats, loose)
    counts = []
    for seed in range(40):
        shuffled = down[np.random.default_rng(seed).permutation(rows)]
        shuffled_stats = pair_statistics(batched([up, shuffled], [3000]), progress=False)
        gates = gate_candidates(shuffled_stats, loose)
        counts.append([(gates.gate == "AND").sum(), (gates.gate == "OR").sum()])
    observed = np.mean(counts, axis=0)
    assert expected["AND"] + expected["OR"] > 0.5
    assert observed == pytest.approx([expected["AND"], expected["OR"]], abs=0.6)


def test_communities_spanning_three_layers_and_chains_over_time():
    from crosslib.analyses.crosslayer import chains_over_time

    chain = layer_chain_statistics(batched(two_cluster_layers(), [2000]), progress=False)
    config = CrossLayerConfig(edge_threshold=0.5, seed=7)
    graph = layer_graph(chain, config)
    assign_communities(graph, config)
    summary = summarise_cross_layer(chain, config, graph=graph)
    assert summary["communities_spanning_3_layers"] == 2 and summary["widest_community_layers"] == 3
    # A snapshot whose layers are unrelated has no chain; the planted one has two spanning all three.
    rng = np.random.default_rng(9)
    unrelated = layer_chain_statistics(batched([sparse_features(rng, 2000, 6) for _ in range(3)], [2000]),
                                       progress=False)
    table = chains_over_time({10: unrelated, 100: chain}, config)
    assert table["step"].tolist() == [10, 100]
    assert table["chains"].tolist() == [0, 2] and table["chain_features"].tolist() == [0, 18]
    assert table["chain_share"].tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(ParameterError):
        chains_over_time({}, config)


def test_an_encoders_feature_major_output_is_read_as_rows_once():
    """SAE outputs are views of feature-major memory; the statistics make them row-major once (each later
    reshape or nonzero on the view made a strided copy), with the same values."""
    from crosslib.analyses.crosslayer_statistics import _as_rows

    feature_major = torch.randn(16, 40).relu().t()  # [batch 40, feature 16], feature-major memory
    rows = _as_rows(feature_major, "batch")
    assert rows.flags.c_contiguous and np.array_equal(rows, feature_major.numpy())
    rows = _as_rows(feature_major.numpy(), "batch")
    assert rows.flags.c_contiguous and np.array_equal(rows, feature_major.numpy())
