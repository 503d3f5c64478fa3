"""The feature explorer's data: a tiny synthetic crosscoder with planted features.

Feature j reads token j (one-hot activations, d_model = vocabulary size) and is written with a
planted decoder-norm trajectory, so its emergence step, its contexts and its search postings are
known in advance. Everything is fp32 and exact on any CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crosslib.analyses import explorer
from crosslib.analyses.emergence import EmergenceConfig, emergence_table
from crosslib.artifacts import ArtifactError
from crosslib.config import ParameterError, content_hash
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig

WORDS = ["apple", "river", "house", "moon", "garden", "letter", "road", "bird", "cat", "dog", "tree", "stone"]
VOCAB = len(WORDS)
STEPS = [0, 1, 2, 4, 8, 16]
CONTEXT = 16
N_WINDOWS = 80
DEAD = VOCAB - 1  # the last feature has a zero decoder everywhere


class SyntheticStore:
    """The parts of an ActivationStore that `feature_activations` reads; every window is held out."""

    def __init__(self, tokens: np.ndarray, activations: torch.Tensor, steps: list[int]):
        self.tokens = tokens
        self._activations = activations
        self.context_length = tokens.shape[1]
        self.n_snapshots, self.d_model = activations.shape[1], activations.shape[2]
        self.steps = steps
        self.fingerprint = content_hash([tokens.tolist(), steps])

    def split_rows(self, split: str = "eval") -> range:
        return range(0, self.tokens.size)

    def rows(self, split: str = "eval", *, start: int = 0, limit: int | None = None, **_) -> torch.Tensor:
        return self._activations[start : start + (limit or len(self._activations))]


def emergence_index(feature: int) -> int:
    """The planted snapshot where feature j forms: features spread over snapshots 1..S−1."""
    return 1 + feature % (len(STEPS) - 1)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(N_WINDOWS, CONTEXT)).astype(np.int64)
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(tokens.reshape(-1)), VOCAB).float()
    activations = one_hot[:, None, :].expand(-1, len(STEPS), -1).contiguous()  # [row, snapshot, d_model]
    store = SyntheticStore(tokens, activations, STEPS)
    model = Crosscoder(CrosscoderConfig(n_snapshots=len(STEPS), d_model=VOCAB, dict_size=VOCAB), initialise=False)
    with torch.no_grad():
        model.W_E.copy_(torch.eye(VOCAB)[None].expand(len(STEPS), -1, -1) / len(STEPS))
        model.b_E.zero_()
        model.b_D.zero_()
        model.log_threshold.fill_(np.log(0.1))
        norms = torch.zeros(len(STEPS), VOCAB)
        for j in range(VOCAB - 1):
            norms[emergence_index(j):, j] = torch.linspace(0.6, 1.0, len(STEPS) - emergence_index(j))
        model.W_D.copy_(torch.eye(VOCAB)[None] * norms[:, :, None])
    return model, store


def test_index_holds_the_planted_features(planted, tmp_path):
    model, store = planted
    data = explorer.prepare_explorer(model, store, WORDS, root=tmp_path, progress=False)
    name, index = explorer.read_data_file(data / "explorer-data" / "index.js")
    assert name == "index"
    columns = index["columns"]
    assert columns["feature"] == list(range(VOCAB - 1)) and index["n_dead"] == 1  # the dead feature is left out
    assert index["steps"] == STEPS
    # Emergence comes from crosslib.analyses.emergence, unchanged.
    norms = model.decoder_norms().detach().numpy()
    table = emergence_table(norms, STEPS, EmergenceConfig(), dead=norms.max(axis=0) == 0).set_index("feature")
    for j, step in zip(columns["feature"], columns["emergence_step"]):
        assert step == STEPS[emergence_index(j)] == table.loc[j, "emergence_step"]
        assert columns["lifetime"][j] == table.loc[j, "lifetime_snapshots"] == len(STEPS) - emergence_index(j)
    # Sorting by an index field gives the planted order (what the page's sort does).
    order = sorted(columns["feature"], key=lambda j: (columns["emergence_step"][j], j))
    assert [emergence_index(j) for j in order] == sorted(emergence_index(j) for j in order)
    # Feature j is active exactly on token j: complexity 1 (the current token explains it), density = its share.
    shares = np.bincount(store.tokens.reshape(-1), minlength=VOCAB) / store.tokens.size
    for j in columns["feature"]:
        assert columns["complexity"][j] == 1
        assert columns["density"][j] == pytest.approx(shares[j], abs=1e-3)
        assert columns["summary"][j] == WORDS[j]
        assert len(columns["rho"][j]) == len(STEPS) and columns["rho"][j][-1] == "9"
    assert all(isinstance(columns[c][0], (int, float)) for c in ("emergence_step", "lifetime", "complexity", "density", "peak_norm"))


def test_details_and_search(planted, tmp_path):
    model, store = planted
    config = explorer.ExplorerConfig(features_per_shard=4, postings_per_search_shard=100)
    data = explorer.prepare_explorer(model, store, WORDS, config=config, root=tmp_path, progress=False)
    files = data / "explorer-data"
    _, vocab = explorer.read_data_file(files / "vocab.js")
    for j in (0, 5, 10):
        _, shard = explorer.read_data_file(files / f"detail-{j // 4}.js")
        detail = shard[str(j)]
        assert detail["norms"] == pytest.approx(model.decoder_norms()[:, j].tolist(), rel=1e-3)
        assert detail["formed_index"] == emergence_index(j)
        for section in ("final", "formed"):
            assert detail[section], f"feature {j} has no {section} contexts"
            for context in detail[section]:
                assert context["t"][context["f"]] == j and vocab[str(j)] == WORDS[j]
                # the highlighted tokens are exactly the occurrences of token j
                assert [k for k, _ in context["v"]] == [k for k, t in enumerate(context["t"]) if t == j]
    _, search_vocab = explorer.read_data_file(files / "search-vocab.js")
    assert search_vocab["tokens"] == sorted(WORDS[:-1]) or set(WORDS[:-1]) <= set(search_vocab["tokens"])
    starts = search_vocab["shard_starts"]
    assert len(starts) == explorer.read_data_file(files / "index.js")[1]["n_search_shards"] > 1
    for j in (0, 7):
        t = search_vocab["tokens"].index(WORDS[j])
        shard = max(k for k, s in enumerate(starts) if s <= t)
        _, postings = explorer.read_data_file(files / f"search-{shard}.js")
        assert j * 3 + explorer.SEARCH_CLASSES["focus"] in postings[t - starts[shard]]


def test_cache_is_reused_keyed_and_verified(planted, tmp_path, monkeypatch):
    model, store = planted
    first = explorer.prepare_explorer(model, store, WORDS, root=tmp_path, progress=False)
    monkeypatch.setattr(explorer, "_build", lambda *a, **k: pytest.fail("rebuilt a cached explorer"))
    assert explorer.prepare_explorer(model, store, WORDS, root=tmp_path, progress=False) == first
    monkeypatch.undo()
    other = explorer.prepare_explorer(model, store, WORDS, config=explorer.ExplorerConfig(task_top_n=3),
                                      root=tmp_path, progress=False)
    assert other != first and other.parent == first.parent
    with_tasks = explorer.prepare_explorer(model, store, WORDS, root=tmp_path, progress=False,
                                           attributions={"copy": np.arange(VOCAB, dtype=float)})
    assert with_tasks not in (first, other)
    index = explorer.read_data_file(with_tasks / "explorer-data" / "index.js")[1]
    assert index["tasks"] == ["copy"]
    top = set(range(VOCAB - 10, VOCAB))  # the 10 largest |scores|
    assert [bool(m & 1) for m in index["columns"]["tasks"]] == [j in top for j in index["columns"]["feature"]]
    # A damaged file is found, not served.
    (first / "explorer-data" / "index.js").write_text("crosslibExplorer.receive(\"index\",{});\n")
    with pytest.raises(ArtifactError, match="checksum|corrupted"):
        explorer.prepare_explorer(model, store, WORDS, root=tmp_path, progress=False)


def test_bad_input_is_refused_before_work(planted, tmp_path, monkeypatch):
    model, store = planted
    monkeypatch.setattr(explorer, "_build", lambda *a, **k: pytest.fail("started work on bad input"))
    with pytest.raises(ParameterError, match="features_per_shard"):
        explorer.ExplorerConfig(features_per_shard=0)
    with pytest.raises(ParameterError, match="attributions"):
        explorer.prepare_explorer(model, store, WORDS, attributions={"copy": np.ones(3)}, root=tmp_path)
    with pytest.raises(ParameterError, match="model"):
        explorer.prepare_explorer(model, SyntheticStore(store.tokens, store._activations[:, :2], STEPS[:2]), WORDS, root=tmp_path)
    with pytest.raises(ParameterError, match="tokenizer"):
        explorer.prepare_explorer(model, store, object(), root=tmp_path)
    with pytest.raises(ParameterError, match="feature"):
        explorer.feature_href(-1)


def test_page_is_written_beside_its_data_and_found_from_a_notebook(planted, tmp_path, monkeypatch):
    model, store = planted
    data = explorer.prepare_explorer(model, store, WORDS, root=tmp_path / "cache", progress=False)
    page = explorer.write_explorer_page(data, tmp_path / "html")
    assert page.name == "explorer.html"
    assert (tmp_path / "html" / "explorer-assets" / "explorer.js").is_file()
    assert (tmp_path / "html" / "explorer-data" / "index.js").read_bytes() == (data / "explorer-data" / "index.js").read_bytes()
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing from the network
    weight = explorer.page_weight(data)
    assert weight["total"] > weight["at_open"] > weight["index"] > 0
    bundle = explorer.ExplorerLink(data)._repr_mimebundle_()
    assert 'href="../explorer.html"' in bundle["text/html"]
    # `show` records the folder as a hidden glue entry, which the book build finds in the executed notebook.
    glued = {"output_type": "display_data", "metadata": {"scrapbook": {"name": explorer.GLUE_NAME, "mime_prefix": ""}},
             "data": {"application/papermill.record/text/plain": repr(str(data.resolve()))}}
    other = {"output_type": "display_data", "metadata": {"scrapbook": {"name": "n_live"}},
             "data": {"application/papermill.record/text/plain": "'/elsewhere'"}}
    notebook = {"cells": [{"cell_type": "code", "outputs": [other, glued, {"output_type": "display_data", "data": bundle}]}]}
    (tmp_path / "nb.ipynb").write_text(json.dumps(notebook))
    assert explorer.explorer_data_in_notebook(tmp_path / "nb.ipynb") == [data.resolve()]
    # inside the data directory the entry is written as `<data>/...` (no builder's path in a chapter)
    monkeypatch.setenv("CROSSLIB_DATA", str(tmp_path / "cache"))
    glued["data"] = {"application/papermill.record/text/plain": repr(explorer.display_path(data))}
    assert glued["data"]["application/papermill.record/text/plain"].startswith("'<data>/explorer/")
    (tmp_path / "nb.ipynb").write_text(json.dumps(notebook))
    assert [p.resolve() for p in explorer.explorer_data_in_notebook(tmp_path / "nb.ipynb")] == [data.resolve()]
    assert explorer.feature_href(12) == "../explorer.html#feature-12"
    assert 'href="../explorer.html#feature-3"' in explorer.feature_links([3, 4])
