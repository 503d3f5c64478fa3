"""An offline feature explorer: every feature of a crosscoder, browsable in a static page.

`prepare_explorer` turns a crosscoder and its activation store into small data files that the
page `crosslib/analyses/templates/explorer.html` reads, cached as an artifact
(`<data>/explorer/<key>/`, keyed by the model's weights, the store, the tokenizer, the settings
and the attributions given). Per live feature (not dead: some decoder norm is non-zero):

- its category, emergence step, peak step and lifetime (`crosslib.analyses.emergence.emergence_table`),
  and its decoder-norm trajectory ‖W_D,i^θ‖ over the snapshots;
- its complexity: the offline context-depth score, and the LLM rubric's score where an answer
  is already cached (never asked for here) — `crosslib.analyses.complexity`;
- its activation density: the share of held-out positions where it is active at some
  snapshot (and at the last one);
- its top-activating contexts (`crosslib.analyses.dashboards.top_contexts`) at the last snapshot and at
  the snapshot where it formed, with every token's activation for highlighting;
- the circuit tasks it matters for: those whose attribution at the last snapshot ranks it
  among the top `task_top_n` features (when attributions are given, e.g. chapter 5's).

The page must open from disk (`file://`), where a browser refuses `fetch()` of local files, so
every data file is a small JavaScript file that hands its object to `crosslibExplorer.receive`
and is loaded by inserting a `<script>` element. The files are sharded so that the page stays
fast at tens of thousands of features:

    explorer-data/index.js        one row per feature (columns), loaded at start
    explorer-data/detail-<k>.js   features k·S … (k+1)·S − 1 (S = features_per_shard): norms,
                                  contexts, attributions; loaded when a feature is opened
    explorer-data/vocab.js        token id → text for the tokens the contexts show
    explorer-data/search-vocab.js the searchable tokens (lower case, stripped) and which
                                  search shard holds each token's postings
    explorer-data/search-<k>.js   postings: for each token, the features whose contexts hold it,
                                  as feature·3 + c (c = 0 the strongest token of a top context,
                                  1 an active token, 2 merely shown)

`write_explorer_page(data, out_dir)` copies the page and the data next to each other;
`show(data)` records the data in an executed chapter and links to the page; `setup(app)` is a
Sphinx extension that then copies the page and the data into the built book.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import html
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Mapping, Sequence

import numpy as np

from crosslib.analyses.complexity import ContextDepthConfig, ContextDepthScorer, LLMRubricConfig, LLMRubricScorer, score_features
from crosslib.analyses.dashboards import ContextConfig, TokenDecoder, TopContext, feature_contexts, reduce_snapshots, top_contexts
from crosslib.analyses.emergence import MIN_FIRING_ROWS, EmergenceConfig, emergence_table, firing_norms
from crosslib.artifacts import (ArtifactError, atomic_write_bytes, atomic_write_json, build_artifact, display_path, read_json,
                                sha256_file)
from crosslib.config import (Config, ParameterError, content_hash, instance_of, integer, is_int, non_empty_str, optional,
                             require)
from crosslib.constants import data_dir

if TYPE_CHECKING:  # for annotations only: the model is imported where it is used
    from crosslib.activations.store import ActivationStore
    from crosslib.dictionaries.crosscoder import Crosscoder

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
PAGE_FILES = ("explorer.html", "explorer.js", "explorer.css")  # templates/ → the page's folder
ASSET_DIR = "explorer-assets"  # the page's script and style sheet, beside explorer.html
DATA_DIR = "explorer-data"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
GLUE_NAME = "crosslib_explorer_data"  # the hidden glue entry that tells the book build where the data are
# Where the book's chapters (chapters/NN_name.html) find the page (the book's root).
BOOK_PAGE_HREF = "../explorer.html"
SEARCH_CLASSES = {"focus": 0, "active": 1, "shown": 2}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExplorerConfig(Config):
    """What the explorer shows and how its files are cut.

    contexts: the top contexts shown per section (final snapshot; snapshot where it formed).
        Fewer and shorter than a dashboard's, since all features are stored.
    emergence: the thresholds that date features (as in chapter 3).
    complexity: the context-depth scorer's thresholds (as in chapter 4; scored on the chapter's
        7 contexts of ≤ 50 tokens, max over snapshots, so the scores are the same).
    llm_model: read the LLM rubric's cached answers for this model (None: do not); never calls.
    max_windows: use only the first this many held-out windows (None: all).
    features_per_shard: feature ids per detail file.
    postings_per_search_shard: about how many (token, feature) pairs per search file.
    task_top_n: a feature matters for a task when it is among the task's top this many
        features by |attribution| at the last snapshot.
    title: the page's heading.
    """

    contexts: Annotated[ContextConfig, instance_of(ContextConfig)] = (
        ContextConfig(n_examples=5, window_tokens=32, tokens_after=8))
    emergence: Annotated[EmergenceConfig, instance_of(EmergenceConfig)] = EmergenceConfig()
    complexity: Annotated[ContextDepthConfig, instance_of(ContextDepthConfig)] = ContextDepthConfig()
    llm_model: Annotated[str | None, optional(non_empty_str(allowed="a model id"))] = None
    max_windows: Annotated[int | None, optional(integer(1))] = None
    features_per_shard: Annotated[int, integer(1, 65_536)] = 64
    postings_per_search_shard: Annotated[int, integer(100)] = 20_000
    task_top_n: Annotated[int, integer(1)] = 10
    # with firing counts: chapter 3's rule for where a feature exists
    min_firing_rows: Annotated[int, integer(1, allowed="an integer >= 1 (held-out rows)")] = MIN_FIRING_ROWS
    title: Annotated[str, instance_of(str, allowed="a string")] = "Feature explorer"


@dataclasses.dataclass(frozen=True)
class ExplorerKey(Config):
    """Everything the explorer's bytes depend on."""

    config: dict
    model: str
    source: str
    steps: tuple
    tokenizer: str
    attributions: str
    llm_answers: str
    firing_counts: str | None = None
    version: int = FORMAT_VERSION


# --------------------------------------------------------------------------------------------
# Preparing the data
# --------------------------------------------------------------------------------------------


def _round(value: float, digits: int = 4) -> float | None:
    """A float with `digits` significant digits (None for NaN), to keep the JSON short."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _tokenizer_identity(tokenizer: Any) -> str:
    if tokenizer is None:
        return "none"
    vocab = getattr(tokenizer, "get_vocab", None)
    if callable(vocab):
        return content_hash(sorted(vocab().items()), length=32)
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, str):
        return content_hash(list(map(str, tokenizer)), length=32)
    raise ParameterError(
        f"tokenizer={type(tokenizer).__name__} is not allowed: pass a Hugging Face tokenizer, a list of "
        "vocabulary strings, or None (tokens shown as [id])"
    )


def final_attribution_scores(attributions: Mapping[str, Any] | None, n_features: int, by: str = "attribution"
                             ) -> dict[str, np.ndarray]:
    """Task → per-feature attribution at the last attributed snapshot.

    Values may be `crosslib.analyses.attribution.AttributionResult`s (their last snapshot is used, ranked
    `by` "attribution" or "integrated_gradients") or arrays [feature] / [snapshot, feature].
    """
    scores: dict[str, np.ndarray] = {}
    for task, value in (attributions or {}).items():
        require(isinstance(task, str) and task != "", "attributions", task, "a mapping from task names to attributions")
        if hasattr(value, "snapshots"):
            array = np.asarray(value.snapshots[-1].scores(by), dtype=np.float64)
        else:
            array = np.asarray(value, dtype=np.float64)
            if array.ndim == 2:
                array = array[-1]
        require(array.shape == (n_features,) and bool(np.isfinite(array).all()), f"attributions[{task!r}]",
                f"array of shape {array.shape}", f"finite scores, one per feature ({n_features}), or [snapshot, feature]")
        scores[task] = array
    return scores


def _llm_answers_identity(llm_model: str | None) -> str:
    """The cached LLM answers that exist now (their names), so new answers give a new artifact."""
    if llm_model is None:
        return "none"
    folder = LLMRubricScorer(LLMRubricConfig(model=llm_model), allow_calls=False).cache_dir
    names = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
    return content_hash(names, length=32)


def _context_record(context: TopContext) -> dict[str, Any]:
    """A context as compact JSON: token ids, and the active tokens' activations as [offset, value]."""
    return {
        "a": _round(context.activation),
        "w": context.window,
        "p": context.position,
        "f": context.focus,
        "t": list(context.token_ids),
        "v": [[k, _round(a, 3)] for k, a in enumerate(context.activations) if a > 0],
    }


def _script(name: str, data: Any) -> bytes:
    """A data file: JavaScript that hands `data` to the page (works under file://, unlike fetch)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"crosslibExplorer.receive({json.dumps(name)},{text});\n".encode()


def normalise_token(text: str) -> str:
    """The searchable form of a token: stripped, lower case ('' for whitespace)."""
    return text.strip().lower()


class _SearchIndex:
    """Token → {feature: best class}, built while the contexts are collected."""

    def __init__(self) -> None:
        self.postings: dict[str, dict[int, int]] = {}

    def add(self, feature: int, contexts: Sequence[TopContext]) -> None:
        for context in contexts:
            for k, (token, activation) in enumerate(zip(context.tokens, context.activations)):
                word = normalise_token(token)
                if not word:
                    continue
                kind = SEARCH_CLASSES["focus"] if k == context.focus else SEARCH_CLASSES["active"] if activation > 0 else SEARCH_CLASSES["shown"]
                entry = self.postings.setdefault(word, {})
                if kind < entry.get(feature, 3):
                    entry[feature] = kind

    def shards(self, postings_per_shard: int) -> tuple[dict[str, Any], list[list[list[int]]]]:
        words = sorted(self.postings)
        starts, shards, current, size = [], [], [], 0
        for i, word in enumerate(words):
            if not current or size >= postings_per_shard:
                if current:
                    shards.append(current)
                starts.append(i)
                current, size = [], 0
            entry = self.postings[word]
            current.append(sorted(feature * 3 + kind for feature, kind in entry.items()))
            size += len(entry)
        if current:
            shards.append(current)
        return {"tokens": words, "shard_starts": starts}, shards


def _feature_chunks(features: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(features), size):
        yield features[start : start + size]


def feature_subset(model: Any, features: Sequence[int]) -> Any:
    """The crosscoder restricted to `features` (same activations for them, fewer to compute).

    A JumpReLU or ReLU feature's activation depends only on its own encoder row, bias, threshold
    and decoder norms, so encoding a chunk of features costs chunk/F of encoding all of them.
    TopK couples the features (the k largest win), so it is refused.
    """
    import torch

    from crosslib.dictionaries.crosscoder import Crosscoder

    require(model.config.activation != "topk", "model", "a TopK crosscoder",
            "a JumpReLU or ReLU crosscoder (a TopK feature's activation depends on the other features)")
    index = torch.as_tensor(np.asarray(features, dtype=np.int64))
    part = Crosscoder(model.config.replace(dict_size=len(index)), initialise=False, kernels=model.kernels.eager())
    with torch.no_grad():
        part.W_E.copy_(model.W_E[:, :, index])
        part.b_E.copy_(model.b_E[..., index])
        part.W_D.copy_(model.W_D[:, index])
        part.b_D.copy_(model.b_D)
        part.log_threshold.copy_(model.log_threshold[..., index])
    return part.eval()


def prepare_explorer(
    model: Crosscoder,
    store: ActivationStore,
    tokenizer: Any = None,
    *,
    config: ExplorerConfig = ExplorerConfig(),
    attributions: Mapping[str, Any] | None = None,
    attribution_by: str = "attribution",
    firing_counts: Any = None,
    chunk_features: int = 64,
    root: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Build (or find in the cache) the explorer's data for crosscoder `model` over `store`.

    model: a `crosslib.dictionaries.crosscoder.Crosscoder` over the store's snapshots; store: its
    `ActivationStore` (top contexts come from the held-out windows); tokenizer: what turns
    token ids into text (see `crosslib.analyses.dashboards.TokenDecoder`); attributions: task →
    attribution (see `final_attribution_scores`). firing_counts: the dictionary's held-out firing
    counts [snapshot, feature] (`TrainResult.firing_counts`): a feature then exists only where it
    fires (`emergence.firing_norms`); without them, only features with a zero decoder are dead. chunk_features: features encoded at a time
    (memory: held-out positions × snapshots × chunk_features × 4 bytes; TopK models are refused).
    Returns the artifact folder, holding `explorer-data/` and `manifest.json`.
    """
    from crosslib.activations.sources import source_fingerprint
    from crosslib.dictionaries.crosscoder import model_fingerprint

    require(is_int(chunk_features) and chunk_features >= 1, "chunk_features", chunk_features, "an integer ≥ 1")
    require(model.config.activation != "topk", "model", "a TopK crosscoder",
            "a JumpReLU or ReLU crosscoder (a TopK feature's activation depends on the other features)")
    n_snapshots = int(model.config.n_snapshots)
    require(n_snapshots == store.n_snapshots, "model", f"a crosscoder over {n_snapshots} snapshots",
            f"a crosscoder over the store's {store.n_snapshots} snapshots (steps {store.steps})")
    n_features = int(model.config.dict_size)
    task_scores = final_attribution_scores(attributions, n_features, attribution_by)
    key = ExplorerKey(
        config=config.to_dict(),
        model=model_fingerprint(model),
        source=source_fingerprint(store),
        steps=tuple(int(s) for s in store.steps),
        tokenizer=_tokenizer_identity(tokenizer),
        attributions=content_hash({t: hashlib.sha256(s.astype(np.float64).tobytes()).hexdigest() for t, s in task_scores.items()}),
        llm_answers=_llm_answers_identity(config.llm_model),
        firing_counts=None if firing_counts is None else hashlib.sha256(
            np.ascontiguousarray(np.asarray(firing_counts, dtype=np.int64)).tobytes()).hexdigest(),
    )

    def build(folder: Path) -> None:
        _build(folder, model, store, tokenizer, config, task_scores, firing_counts, chunk_features, progress)

    folder = build_artifact("explorer", key, build, root)
    verify_explorer(folder)
    return folder


def _build(folder: Path, model: Any, store: Any, tokenizer: Any, config: ExplorerConfig,
           task_scores: dict[str, np.ndarray], firing_counts: Any, chunk_features: int, progress: bool) -> None:
    from crosslib.progress import progress as tqdm

    from crosslib.book.pipeline import feature_activations

    steps = [int(s) for s in store.steps]
    n_snapshots = len(steps)
    norms = model.decoder_norms().detach().float().cpu().numpy()  # [snapshot, feature]
    dead = norms.max(axis=0) <= 0
    if firing_counts is not None:
        norms, dead, _ = firing_norms(norms, np.asarray(firing_counts), config.min_firing_rows)
    table = emergence_table(norms, steps, config.emergence, dead=dead).set_index("feature")
    live = np.flatnonzero(~dead)
    decoder = TokenDecoder(tokenizer)
    scorer = ContextDepthScorer(config.complexity)
    llm = LLMRubricScorer(LLMRubricConfig(model=config.llm_model), allow_calls=False) if config.llm_model else None
    tasks = sorted(task_scores)
    top_by_task = {t: np.argsort(-np.abs(task_scores[t]), kind="stable")[: config.task_top_n] for t in tasks}
    rank_by_task = {t: {int(f): r for r, f in enumerate(top)} for t, top in top_by_task.items()}

    columns: dict[str, list[Any]] = {name: [] for name in (
        "feature", "category", "emergence_step", "formed_step", "peak_step", "lifetime", "complexity",
        "llm_complexity", "density", "final_density", "peak_norm", "tasks", "rho", "summary")}
    categories = [str(c) for c in table["category"].cat.categories]
    details: dict[int, dict[str, Any]] = {}
    search = _SearchIndex()
    used_tokens: set[int] = set()

    for chunk in tqdm(list(_feature_chunks(live, chunk_features)), desc="explorer", disable=not progress):
        tokens, acts = feature_activations(feature_subset(model, chunk), store, range(len(chunk)), max_windows=config.max_windows)
        scored = [feature_contexts(tokens, acts[..., j], decoder, feature=int(f)) for j, f in enumerate(chunk)]
        depth = score_features(scorer, scored, progress=False).set_index("feature")
        llm_scores = score_features(llm, scored, on_llm_error="skip", progress=False).set_index("feature") if llm else None
        for j, feature in enumerate(int(f) for f in chunk):
            row = table.loc[feature]
            feature_acts = acts[..., j]
            reduced, _ = reduce_snapshots(feature_acts, None)
            formed_step = next((row[c] for c in ("emergence_step", "strong_from_step", "peak_step") if np.isfinite(row[c])), steps[-1])
            formed_index = steps.index(int(formed_step))
            final_top = top_contexts(tokens, feature_acts, decoder, snapshot=n_snapshots - 1, config=config.contexts)
            formed_top = top_contexts(tokens, feature_acts, decoder, snapshot=formed_index, config=config.contexts)
            search.add(feature, final_top)
            search.add(feature, formed_top)
            for context in final_top + formed_top:
                used_tokens.update(context.token_ids)
            rho = norms[:, feature] / max(float(norms[:, feature].max()), 1e-30)
            task_mask = sum(1 << i for i, t in enumerate(tasks) if feature in rank_by_task[t])
            focus_tokens: list[str] = []
            for context in final_top or formed_top:
                token = normalise_token(context.tokens[context.focus]) or repr(context.tokens[context.focus])
                if token not in focus_tokens:
                    focus_tokens.append(token)
            complexity = depth.loc[feature, "complexity"]
            llm_complexity = llm_scores.loc[feature, "complexity"] if llm_scores is not None else None
            values = {
                "feature": feature,
                "category": categories.index(str(row["category"])),
                "emergence_step": _round(row["emergence_step"]),
                "formed_step": int(formed_step),
                "peak_step": _round(row["peak_step"]),
                "lifetime": int(row["lifetime_snapshots"]),
                "complexity": None if _isna(complexity) else int(complexity),
                "llm_complexity": None if _isna(llm_complexity) else int(llm_complexity),
                "density": _round(float((reduced > 0).mean()), 3),
                "final_density": _round(float((feature_acts[..., -1] > 0).mean()), 3),
                "peak_norm": _round(row["peak_norm"]),
                "tasks": task_mask,
                "rho": "".join(str(min(9, int(r * 10))) for r in rho),
                "summary": " · ".join(focus_tokens[:3]),
            }
            for name, value in values.items():
                columns[name].append(value)
            details[feature] = {
                "norms": [_round(v) for v in norms[:, feature]],
                "formed_index": formed_index,
                "final": [_context_record(c) for c in final_top],
                "formed": [_context_record(c) for c in formed_top],
                "complexity_explanation": str(depth.loc[feature, "explanation"]),
                "llm_explanation": str(llm_scores.loc[feature, "explanation"]) if llm_scores is not None and values["llm_complexity"] is not None else None,
                "attribution": {t: [_round(task_scores[t][feature]), rank_by_task[t].get(feature)] for t in tasks},
            }

    data = folder / DATA_DIR
    vocabulary, search_shards = search.shards(config.postings_per_search_shard)
    files: dict[str, bytes] = {
        "index": _script("index", {
            "version": FORMAT_VERSION,
            "title": config.title,
            "steps": steps,
            "n_features_total": int(norms.shape[1]),
            "n_dead": int(dead.sum()),
            "categories": categories,
            "tasks": tasks,
            "task_top_n": config.task_top_n,
            "features_per_shard": config.features_per_shard,
            "n_search_shards": len(search_shards),
            "emergence": config.emergence.to_dict(),
            "columns": columns,
        }),
        "vocab": _script("vocab", {str(i): decoder(i) for i in sorted(used_tokens)}),
        "search-vocab": _script("search-vocab", vocabulary),
    }
    for k, shard in enumerate(search_shards):
        files[f"search-{k}"] = _script(f"search-{k}", shard)
    by_shard: dict[int, dict[str, Any]] = {}
    for feature, detail in details.items():
        by_shard.setdefault(feature // config.features_per_shard, {})[str(feature)] = detail
    for k, shard in sorted(by_shard.items()):
        files[f"detail-{k}"] = _script(f"detail-{k}", shard)
    for name, payload in files.items():
        atomic_write_bytes(data / f"{name}.js", payload)
    atomic_write_json(folder / MANIFEST_FILE, {
        "version": FORMAT_VERSION,
        "n_features": len(live),
        "files": {f"{DATA_DIR}/{name}.js": {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
                  for name, payload in sorted(files.items())},
    })


def _isna(value: Any) -> bool:
    try:
        return bool(value is None or value != value)  # NaN and pandas' NA
    except TypeError:  # pandas.NA refuses comparison to bool
        return True


def verify_explorer(folder: str | os.PathLike) -> dict[str, Any]:
    """Check every data file against the manifest (size and sha256); return the manifest."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST_FILE)
    for rel, info in manifest["files"].items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            raise ArtifactError(f"explorer data {path} is missing or does not match its checksum: delete {folder} to rebuild it")
    return manifest


def read_data_file(path: str | os.PathLike) -> tuple[str, Any]:
    """(name, object) of one data file (for tests and tools: the page runs it as a script)."""
    text = Path(path).read_text()
    prefix = "crosslibExplorer.receive("
    require(text.startswith(prefix) and text.rstrip().endswith(");"), "path", str(path), "an explorer data file")
    body = text.strip()[len(prefix) : -2]
    name, _, payload = body.partition(",")
    return json.loads(name), json.loads(payload)


def explorer_table(data: str | os.PathLike) -> "pd.DataFrame":
    """The explorer's index as a table: one row per live feature, category names, task lists."""
    import pandas as pd

    index = read_data_file(Path(data) / DATA_DIR / "index.js")[1]
    table = pd.DataFrame(index["columns"]).drop(columns=["rho"])
    table["category"] = [index["categories"][c] for c in table["category"]]
    table["tasks"] = [[t for i, t in enumerate(index["tasks"]) if mask & (1 << i)] for mask in table["tasks"]]
    return table.astype({c: float for c in ("emergence_step", "peak_step", "complexity", "llm_complexity")})


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def write_explorer_page(data: str | os.PathLike, out_dir: str | os.PathLike, page_name: str = "explorer.html") -> Path:
    """Put the page (`out_dir/<page_name>`, its script and style) and the data beside each other.

    `data` is a folder from `prepare_explorer`. Files are copied over older copies one at a
    time (atomically); nothing else in `out_dir` is touched. Returns the page's path.
    """
    data, out = Path(data), Path(out_dir)
    manifest = verify_explorer(data)
    for rel in manifest["files"]:
        atomic_write_bytes(out / rel, (data / rel).read_bytes())
    for name in PAGE_FILES[1:]:
        atomic_write_bytes(out / ASSET_DIR / name, (TEMPLATE_DIR / name).read_bytes())
    page = out / page_name
    atomic_write_bytes(page, (TEMPLATE_DIR / PAGE_FILES[0]).read_bytes())
    return page


def page_weight(data: str | os.PathLike) -> dict[str, int]:
    """Bytes of the page: what opening it loads (page, script, style, index) and all data files."""
    manifest = verify_explorer(data)
    sizes = {rel: info["bytes"] for rel, info in manifest["files"].items()}
    page = sum((TEMPLATE_DIR / name).stat().st_size for name in PAGE_FILES)
    details = [v for k, v in sizes.items() if "/detail-" in k]
    return {
        "at_open": page + sizes[f"{DATA_DIR}/index.js"],
        "index": sizes[f"{DATA_DIR}/index.js"],
        "page_and_code": page,
        "largest_detail_shard": max(details, default=0),
        "search_vocabulary": sizes[f"{DATA_DIR}/search-vocab.js"],
        "vocab": sizes[f"{DATA_DIR}/vocab.js"],
        "total": page + sum(sizes.values()),
        "files": len(sizes) + len(PAGE_FILES),
    }


def feature_href(feature: int, page: str = BOOK_PAGE_HREF) -> str:
    """The deep link to one feature: `explorer.html#feature-<id>`."""
    require(is_int(feature) and feature >= 0, "feature", feature, "a feature id (an integer ≥ 0)")
    return f"{page}#feature-{int(feature)}"


def feature_link(feature: int, text: str | None = None, page: str = BOOK_PAGE_HREF) -> str:
    """An HTML link that opens `feature` in the explorer (for tables and glued text in chapters)."""
    label = html.escape(text if text is not None else str(int(feature)))
    return f'<a class="cl-explorer-link" href="{html.escape(feature_href(feature, page))}">{label}</a>'


def feature_links(features: Sequence[int], page: str = BOOK_PAGE_HREF, label: str = "Open in the feature explorer: ") -> str:
    """One line of links, one per feature, as an HTML paragraph."""
    links = ", ".join(feature_link(int(f), f"feature {int(f)}", page) for f in features)
    return f"<p>{html.escape(label)}{links}</p>"


class ExplorerLink:
    """A link to the explorer page, shown in the notebook and in the book (see `show`)."""

    def __init__(self, data: str | os.PathLike, text: str = "Open the feature explorer", page: str = BOOK_PAGE_HREF):
        self.data = Path(data).resolve()
        verify_explorer(self.data)
        self.text, self.page = text, page

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        link = f'<p><a class="cl-explorer-open" href="{html.escape(self.page)}"><b>{html.escape(self.text)}</b></a></p>'
        return {"text/html": link, "text/plain": f"{self.text}: {self.page}"}


def show(data: str | os.PathLike, text: str = "Open the feature explorer", page: str = BOOK_PAGE_HREF) -> ExplorerLink:
    """Put the explorer of `data` into the book: record the data folder in the executed notebook
    (a hidden myst-nb glue entry, which the Sphinx extension `setup` reads to copy the page and
    its data beside the book's pages) and return a link to the page for the cell to display."""
    from myst_nb import glue

    link = ExplorerLink(data, text, page)
    glue(GLUE_NAME, display_path(link.data), display=False)  # `<data>/...`: no builder's path in the chapter
    return link


def explorer_data_in_notebook(path: str | os.PathLike) -> list[Path]:
    """The explorer data folders that an executed notebook recorded with `show`."""
    try:
        nb = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    found = []
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) or []:
            record = (output.get("metadata") or {}).get("scrapbook") or {}
            if record.get("name") != GLUE_NAME:
                continue
            for mime, value in (output.get("data") or {}).items():
                if mime.endswith("text/plain"):
                    text = "".join(value) if isinstance(value, list) else value
                    with contextlib.suppress(ValueError, SyntaxError):
                        recorded = str(ast.literal_eval(text))
                        found.append(data_dir() / recorded[len("<data>/"):] if recorded.startswith("<data>/") else Path(recorded))
    return found


def _copy_into_build(app: Any, exception: Exception | None) -> None:
    if exception is not None or getattr(app.builder, "format", None) != "html":
        return
    folders: list[Path] = []
    for docname in sorted(app.env.found_docs):
        source = Path(app.env.doc2path(docname))
        if source.suffix == ".ipynb":
            folders += explorer_data_in_notebook(source)
    if len(set(folders)) > 1:
        raise ArtifactError(f"more than one chapter shows a feature explorer ({sorted(map(str, set(folders)))}); the book has one page")
    for folder in folders[:1]:
        if not (folder / MANIFEST_FILE).is_file():
            raise ArtifactError(f"the feature explorer's data {folder} is gone: re-run its chapter (crosslib book --force)")
        write_explorer_page(folder, app.outdir)


def setup(app: Any) -> dict[str, Any]:
    """Sphinx extension: after an HTML build, copy the explorer page and the data that an
    executed chapter recorded with `show` into the book's root (`explorer.html`)."""
    app.connect("build-finished", _copy_into_build)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
