"""Feature dashboards: what a crosscoder feature responds to, as self-contained static HTML.

A *dashboard* shows, for one feature,

- its top-activating contexts: short stretches of text (at most 50 tokens by default) around
  the positions where the feature fires hardest, each token shaded in proportion to the
  feature's activation on it, the strongest token outlined; once with the activation taken as
  the maximum over all snapshots, and optionally at chosen snapshots;
- a histogram of its non-zero activations (how often and how strongly it fires);
- its decoder-norm trajectory ‖W_D,i^θ‖ over training steps (when the feature is written into
  the residual stream, see `crosslib.analyses.emergence`).

Everything is plain HTML with inline CSS and inline SVG: no JavaScript library, no web font,
no network address, so a page renders offline in a browser, in Jupyter
(`IPython.display.HTML(dashboard.to_html())` or just `dashboard` as a cell's last line) and in
the built Jupyter Book. `index_html` puts many feature cards on one page with a search box
and a category filter written in a few lines of plain inline JavaScript; without JavaScript
the page still shows every card.

The top contexts come from one function, `top_contexts`, which the LLM complexity scorer in
`crosslib.analyses.complexity` uses too, so the dashboard shows exactly what the scorer read.

Inputs are plain arrays, so nothing here depends on how activations were computed:
`tokens` is an integer array [window, position] (the token ids of the cached text windows) and
`feature_acts` the feature's activation at each of those positions, [window, position] or
[window, position, snapshot].
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from jaxtyping import Float, Int

from crosslib.artifacts import atomic_write_text
from crosslib.config import Config, ParameterError, content_hash, require

TokenGrid = Int[np.ndarray, "window position"]
Activations = Float[np.ndarray, "window position"] | Float[np.ndarray, "window position snapshot"]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContextConfig(Config):
    """How top-activating contexts are chosen and cut.

    n_examples: how many contexts to return (the paper's LLM prompt uses 7).
    window_tokens: the longest stretch of text shown per context (the paper: ≤ 50 tokens).
    tokens_after: how many tokens after the strongest one to show at most; the rest of the
        stretch is the text before it (a causal model's activation depends only on what came
        before, so most of the shown context precedes the token). Near the edges of a cached
        window the stretch slides so that it stays `window_tokens` long where it can.
    one_per_window: take at most one context (its strongest position) per cached window, so
        the examples are not near-copies of the same passage.
    """

    n_examples: int = 7
    window_tokens: int = 50
    tokens_after: int = 10
    one_per_window: bool = True

    def validate(self) -> None:
        require(isinstance(self.n_examples, int) and self.n_examples >= 1, "n_examples", self.n_examples, "an integer ≥ 1")
        require(
            isinstance(self.window_tokens, int) and self.window_tokens >= 1,
            "window_tokens",
            self.window_tokens,
            "an integer ≥ 1",
        )
        require(
            isinstance(self.tokens_after, int) and 0 <= self.tokens_after < self.window_tokens,
            "tokens_after",
            self.tokens_after,
            f"an integer in [0, window_tokens={self.window_tokens})",
        )
        require(isinstance(self.one_per_window, bool), "one_per_window", self.one_per_window, "True or False")


@dataclasses.dataclass(frozen=True)
class DashboardConfig(Config):
    """What a dashboard shows.

    contexts: how top contexts are chosen (10 per section by default, more than the LLM sees).
    histogram_bins: number of bars in the activation histogram.
    """

    contexts: ContextConfig = ContextConfig(n_examples=10)
    histogram_bins: int = 30

    def validate(self) -> None:
        require(isinstance(self.contexts, ContextConfig), "contexts", self.contexts, "a ContextConfig")
        require(
            isinstance(self.histogram_bins, int) and 2 <= self.histogram_bins <= 200,
            "histogram_bins",
            self.histogram_bins,
            "an integer in [2, 200]",
        )


# --------------------------------------------------------------------------------------------
# Token strings
# --------------------------------------------------------------------------------------------


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, printable character → byte ('Ġ' → space, 'Ċ' → newline)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_table()


def byte_level_to_text(piece: str) -> str:
    """Turn a byte-level BPE vocabulary entry ('Ġthe', 'Ċ') into the text it stands for (' the', '\\n').

    Entries that are not byte-level (e.g. SentencePiece's '▁the') get '▁' turned into a space.
    """
    if piece and all(ch in _BYTE_LEVEL for ch in piece):
        return bytes(_BYTE_LEVEL[ch] for ch in piece).decode("utf-8", errors="replace")
    return piece.replace("▁", " ")


class TokenDecoder:
    """Maps token ids to the text each token stands for, one token at a time, with a memo.

    Accepts a Hugging Face tokenizer (anything with `decode`), a `tokenizers.Tokenizer`, a list
    of vocabulary strings, a function id → string, or None (ids are shown as `[id]`). Byte-level
    BPE symbols become real characters ('Ġ' → space). A character split across two tokens shows
    as '�' in each half (we decode tokens one by one so each gets its own highlight).
    """

    def __init__(self, tokenizer: Any):
        self._memo: dict[int, str] = {}
        self._decode_one = self._make(tokenizer)

    @staticmethod
    def _make(tokenizer: Any) -> Callable[[int], str]:
        if tokenizer is None:
            return lambda i: f"[{i}]"
        if isinstance(tokenizer, TokenDecoder):
            return tokenizer.__call__
        if hasattr(tokenizer, "decode"):
            # Keep special tokens (skip_special_tokens=False) and the text exactly as stored
            # (no "clean-up" that drops the space before punctuation); fall back for decoders
            # that do not take those keywords.
            for kwargs in (
                {"skip_special_tokens": False, "clean_up_tokenization_spaces": False},
                {"skip_special_tokens": False},
                {},
            ):
                try:
                    tokenizer.decode([0], **kwargs)
                except TypeError:
                    continue
                except Exception:  # id 0 may not exist; the keywords were accepted
                    pass
                return lambda i, kw=kwargs: tokenizer.decode([int(i)], **kw)
        if hasattr(tokenizer, "convert_ids_to_tokens"):
            return lambda i: byte_level_to_text(tokenizer.convert_ids_to_tokens(int(i)))
        if callable(tokenizer):
            return lambda i: str(tokenizer(int(i)))
        if isinstance(tokenizer, Sequence):
            return lambda i: byte_level_to_text(str(tokenizer[int(i)]))
        raise ParameterError(
            f"tokenizer={type(tokenizer).__name__} is not allowed: pass a Hugging Face tokenizer, a "
            "tokenizers.Tokenizer, a list of vocabulary strings, a function id → str, or None"
        )

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        text = self._memo.get(token_id)
        if text is None:
            text = self._memo[token_id] = self._decode_one(token_id)
        return text

    def many(self, token_ids: Iterable[int]) -> list[str]:
        return [self(i) for i in token_ids]


# --------------------------------------------------------------------------------------------
# Top-activating contexts (shared with the LLM scorer)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TopContext:
    """One top-activating context of a feature.

    window, position: where the strongest token sits in the cached token grid.
    activation: the feature's activation there (after the snapshot reduction, see
        `top_contexts`).
    snapshot: the snapshot index that gave that activation when it was the maximum over
        snapshots; the chosen snapshot when one was chosen; None for 2-D input.
    start: the position of the first shown token; `tokens[focus]` is the strongest token.
    token_ids, tokens, activations: the shown stretch (≤ window_tokens tokens) as ids, as text
        and as the feature's activation on each token.
    """

    rank: int
    window: int
    position: int
    activation: float
    snapshot: int | None
    start: int
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    activations: tuple[float, ...]

    @property
    def focus(self) -> int:
        """Index of the strongest token within `tokens`."""
        return self.position - self.start

    def text(self) -> str:
        return "".join(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_activations(tokens: Any, feature_acts: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate `tokens` [window, position] and `feature_acts` [window, position(, snapshot)]."""
    tokens = np.asarray(tokens)
    if hasattr(feature_acts, "detach"):  # a torch tensor
        feature_acts = feature_acts.detach().float().cpu().numpy()
    acts = np.asarray(feature_acts)
    require(tokens.ndim == 2, "tokens", f"array of shape {tokens.shape}", "a 2-D integer array [window, position]")
    require(np.issubdtype(tokens.dtype, np.integer), "tokens", f"array of dtype {tokens.dtype}", "integer token ids")
    require(
        acts.ndim in (2, 3) and acts.shape[:2] == tokens.shape,
        "feature_acts",
        f"array of shape {acts.shape}",
        f"shape {tokens.shape} or {tokens.shape + ('n_snapshots',)} (matching tokens)",
    )
    require(np.issubdtype(acts.dtype, np.number), "feature_acts", f"array of dtype {acts.dtype}", "numbers")
    acts = acts.astype(np.float32, copy=False)
    require(bool(np.isfinite(acts).all()), "feature_acts", "an array with NaN or inf", "finite numbers")
    return tokens, acts


def reduce_snapshots(feature_acts: np.ndarray, snapshot: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """[window, position(, snapshot)] → ([window, position], which snapshot gave each value or None).

    snapshot=None takes the maximum over snapshots (the feature at its strongest anywhere in
    training); an integer takes that snapshot.
    """
    if feature_acts.ndim == 2:
        require(snapshot is None, "snapshot", snapshot, "None (feature_acts has no snapshot axis)")
        return feature_acts, None
    n_snapshots = feature_acts.shape[2]
    if snapshot is None:
        which = feature_acts.argmax(axis=2)
        return np.take_along_axis(feature_acts, which[..., None], axis=2)[..., 0], which
    require(
        isinstance(snapshot, (int, np.integer)) and -n_snapshots <= snapshot < n_snapshots,
        "snapshot",
        snapshot,
        f"None (max over snapshots) or a snapshot index in [0, {n_snapshots})",
    )
    snapshot = int(snapshot) % n_snapshots
    return feature_acts[:, :, snapshot], np.full(feature_acts.shape[:2], snapshot)


def _strongest_positions(acts: np.ndarray, n: int, one_per_window: bool) -> list[tuple[int, int]]:
    """(window, position) of the n largest positive activations, ties to the earlier position."""
    n_windows, context = acts.shape
    if one_per_window:
        best_position = acts.argmax(axis=1)  # first maximum within each window
        best_value = acts[np.arange(n_windows), best_position]
        order = np.lexsort((np.arange(n_windows), -best_value))  # largest first, then lower window
        chosen = [(int(w), int(best_position[w])) for w in order[:n] if best_value[w] > 0]
        return chosen
    flat = acts.ravel()
    order = np.argsort(-flat, kind="stable")[:n]
    return [(int(i // context), int(i % context)) for i in order if flat[i] > 0]


def top_contexts(
    tokens: TokenGrid,
    feature_acts: Activations,
    tokenizer: Any = None,
    *,
    snapshot: int | None = None,
    config: ContextConfig = ContextConfig(),
) -> list[TopContext]:
    """The feature's top-activating contexts, strongest first, as data.

    tokens: [window, position] token ids; feature_acts: the feature's activations,
    [window, position] or [window, position, snapshot]. With a snapshot axis, `snapshot=None`
    ranks positions by their maximum over snapshots and an integer ranks them at that snapshot.
    Only positions where the feature is active (activation > 0) are returned, so a rarely
    active feature may give fewer than `config.n_examples` contexts.
    """
    tokens, acts = check_activations(tokens, feature_acts)
    reduced, which = reduce_snapshots(acts, snapshot)
    decoder = tokenizer if isinstance(tokenizer, TokenDecoder) else TokenDecoder(tokenizer)
    context = tokens.shape[1]
    span = min(config.window_tokens, context)
    before = config.window_tokens - 1 - config.tokens_after
    result = []
    for rank, (window, position) in enumerate(_strongest_positions(reduced, config.n_examples, config.one_per_window)):
        start = max(0, min(position - before, context - span))
        stop = start + span
        ids = tokens[window, start:stop]
        result.append(
            TopContext(
                rank=rank,
                window=window,
                position=position,
                activation=float(reduced[window, position]),
                snapshot=None if which is None else int(which[window, position]),
                start=start,
                token_ids=tuple(int(i) for i in ids),
                tokens=tuple(decoder.many(ids)),
                activations=tuple(float(a) for a in reduced[window, start:stop]),
            )
        )
    return result


@dataclasses.dataclass
class FeatureContexts:
    """Everything a complexity scorer may read about one feature.

    feature: the feature's index (for tables; scorers do not use it).
    tokens: [window, position] token ids (shared between features, not copied).
    activations: [window, position] the feature's activation (max over snapshots, or at the
        chosen `snapshot`).
    top: its top-activating contexts (`top_contexts`), strongest first.
    """

    feature: int | None
    tokens: np.ndarray
    activations: np.ndarray
    top: list[TopContext]
    snapshot: int | None = None


def feature_contexts(
    tokens: TokenGrid,
    feature_acts: Activations,
    tokenizer: Any = None,
    *,
    feature: int | None = None,
    snapshot: int | None = None,
    config: ContextConfig = ContextConfig(),
) -> FeatureContexts:
    """Bundle one feature's activations with its top contexts, ready for a `ComplexityScorer`."""
    tokens, acts = check_activations(tokens, feature_acts)
    reduced, _ = reduce_snapshots(acts, snapshot)
    top = top_contexts(tokens, acts, tokenizer, snapshot=snapshot, config=config)
    return FeatureContexts(feature=feature, tokens=tokens, activations=reduced, top=top, snapshot=snapshot)


# --------------------------------------------------------------------------------------------
# Dashboard data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FeatureDashboard:
    """The data of one feature's dashboard; `to_html()` renders it, `page_html()` as a full page.

    sections: (title, contexts) pairs: "max over snapshots" first, then one per chosen snapshot.
    histogram: (bin edges, counts) of the non-zero activations (max over snapshots);
    active_fraction: share of positions where the feature is active.
    steps, decoder_norms: the decoder-norm trajectory (None when not given).
    facts: extra lines shown under the title (category, emergence step, complexity scores…).
    """

    feature: int
    sections: list[tuple[str, list[TopContext]]]
    histogram: tuple[np.ndarray, np.ndarray]
    active_fraction: float
    max_activation: float
    steps: np.ndarray | None = None
    decoder_norms: np.ndarray | None = None
    highlight_step: float | None = None
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """A one-line description for the index: the feature's most common top tokens."""
        contexts = self.sections[0][1] if self.sections else []
        seen: list[str] = []
        for c in contexts:
            token = c.tokens[c.focus].strip() or repr(c.tokens[c.focus])
            if token not in seen:
                seen.append(token)
        return " · ".join(seen[:5])

    def to_html(self, include_style: bool = True) -> str:
        return feature_card_html(self, include_style=include_style)

    def page_html(self, title: str | None = None) -> str:
        return _page(title or f"Feature {self.feature}", self.to_html(include_style=False))

    def _repr_html_(self) -> str:  # Jupyter shows the card when the dashboard is a cell's value
        return self.to_html()


def activation_histogram(activations: np.ndarray, bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Histogram (edges, counts) of the positive activations, bins from 0 to the maximum."""
    active = activations[activations > 0]
    top = float(active.max()) if active.size else 1.0
    counts, edges = np.histogram(active, bins=bins, range=(0.0, top))
    return edges, counts


def build_dashboard(
    feature: int,
    tokens: TokenGrid,
    feature_acts: Activations,
    tokenizer: Any = None,
    *,
    snapshots: Sequence[int] = (),
    steps: Sequence[int] | None = None,
    decoder_norms: Sequence[float] | np.ndarray | None = None,
    highlight_step: float | None = None,
    facts: Mapping[str, Any] | None = None,
    config: DashboardConfig = DashboardConfig(),
) -> FeatureDashboard:
    """Collect one feature's dashboard.

    tokens [window, position] and feature_acts [window, position(, snapshot)] as in
    `top_contexts`. snapshots: snapshot indices for extra "at step N" sections (needs a
    snapshot axis). steps: the training step of each snapshot (labels and the trajectory's
    x axis). decoder_norms: the feature's ‖W_D^θ‖ per snapshot, drawn as a trajectory;
    highlight_step: a step marked on it (e.g. the emergence step). facts: name → value pairs
    shown under the title.
    """
    tokens, acts = check_activations(tokens, feature_acts)
    decoder = TokenDecoder(tokenizer)
    n_snapshots = acts.shape[2] if acts.ndim == 3 else None
    step_array = None
    if steps is not None:
        step_array = np.asarray(steps)
        expected = n_snapshots if n_snapshots is not None else (len(decoder_norms) if decoder_norms is not None else len(step_array))
        require(step_array.ndim == 1 and len(step_array) == expected, "steps", list(step_array), f"one step per snapshot ({expected})")
    if snapshots:
        require(n_snapshots is not None, "snapshots", list(snapshots), "empty when feature_acts has no snapshot axis")

    reduced, _ = reduce_snapshots(acts, None)
    sections = [("max over snapshots" if n_snapshots else "top activations", top_contexts(tokens, acts, decoder, config=config.contexts))]
    for s in snapshots:
        label = f"at step {step_array[s]}" if step_array is not None and -n_snapshots <= s < n_snapshots else f"at snapshot {s}"
        sections.append((label, top_contexts(tokens, acts, decoder, snapshot=s, config=config.contexts)))

    norms = None
    if decoder_norms is not None:
        norms = np.asarray(decoder_norms, dtype=float)
        require(norms.ndim == 1 and np.isfinite(norms).all(), "decoder_norms", f"array of shape {norms.shape}", "a finite 1-D array [snapshot]")
        if n_snapshots is not None:
            require(len(norms) == n_snapshots, "decoder_norms", f"{len(norms)} values", f"one per snapshot ({n_snapshots})")
        if step_array is None:
            step_array = np.arange(len(norms))
        require(len(step_array) == len(norms), "steps", list(step_array), f"one step per decoder norm ({len(norms)})")

    return FeatureDashboard(
        feature=int(feature),
        sections=sections,
        histogram=activation_histogram(reduced, config.histogram_bins),
        active_fraction=float((reduced > 0).mean()),
        max_activation=float(reduced.max()) if reduced.size else 0.0,
        steps=step_array,
        decoder_norms=norms,
        highlight_step=highlight_step,
        facts=dict(facts or {}),
    )


# --------------------------------------------------------------------------------------------
# HTML rendering
# --------------------------------------------------------------------------------------------

_STYLE = """
<style>
.cl-dash{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:14px;color:#1f2328;background:#fff;
  border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;margin:8px 0;max-width:980px}
.cl-dash h3{margin:0 0 4px 0;font-size:17px}
.cl-dash h4{margin:12px 0 4px 0;font-size:14px;color:#57606a}
.cl-facts{margin:2px 0 8px 0;color:#57606a}
.cl-facts span{margin-right:14px}
.cl-ctx{display:flex;gap:8px;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;
  line-height:1.9;border-bottom:1px solid #eaeef2;padding:2px 0}
.cl-act{flex:none;width:4.5em;text-align:right;color:#57606a;font-size:11px}
.cl-text{flex:1;min-width:0;white-space:pre-wrap;word-break:break-word}
.cl-tok{border-radius:2px;white-space:pre}
.cl-max{outline:2px solid #cf222e;outline-offset:0}
.cl-plots{display:flex;gap:24px;flex-wrap:wrap;margin-top:6px}
.cl-plots figure{margin:0}
.cl-plots figcaption{font-size:12px;color:#57606a}
.cl-plots svg text{font-size:10px;fill:#57606a}
.cl-index{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;background:#fff;display:flex;gap:16px}
.cl-side{width:280px;flex:none}
.cl-side input,.cl-side select{width:100%;box-sizing:border-box;margin-bottom:6px;padding:4px}
.cl-list{list-style:none;margin:0;padding:0;max-height:80vh;overflow:auto;border:1px solid #d0d7de;border-radius:6px}
.cl-list li{border-bottom:1px solid #eaeef2}
.cl-list a{display:block;padding:4px 8px;color:inherit;text-decoration:none;font-size:13px}
.cl-list li.cl-active a{background:#ddf4ff}
.cl-list small{color:#57606a}
.cl-main{flex:1;min-width:0}
.cl-count{font-size:12px;color:#57606a;margin-bottom:4px}
</style>
"""


def _escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _visible(token: str) -> str:
    """Make invisible characters in a token visible (a line break shows as ⏎, a tab as ⇥)."""
    return token.replace("\r", "").replace("\n", "⏎").replace("\t", "⇥")


def _format_number(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def context_html(context: TopContext, scale: float) -> str:
    """One context as a line of token spans; colour intensity = activation / scale."""
    spans = []
    for k, (token, act) in enumerate(zip(context.tokens, context.activations)):
        alpha = min(1.0, max(0.0, act / scale)) if scale > 0 else 0.0
        classes = "cl-tok cl-max" if k == context.focus else "cl-tok"
        style = f' style="background:rgba(255,140,0,{alpha:.2f})"' if alpha >= 0.005 else ""
        spans.append(f'<span class="{classes}"{style} title="{_escape(f"{act:.4g}")}">{_escape(_visible(token))}</span>')
    where = f"window {context.window}, position {context.position}"
    if context.snapshot is not None:
        where += f", snapshot {context.snapshot}"
    return (
        f'<div class="cl-ctx" title="{_escape(where)}"><span class="cl-act">{_escape(_format_number(context.activation))}</span>'
        + '<span class="cl-text">'
        + "".join(spans)
        + "</span></div>"
    )


def _svg(width: int, height: int, body: str, label: str) -> str:
    # Inline SVG inside HTML needs no namespace attribute: the HTML parser supplies it.
    return f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_escape(label)}">{body}</svg>'


def histogram_svg(edges: np.ndarray, counts: np.ndarray, width: int = 320, height: int = 140) -> str:
    """Bars of the activation histogram as inline SVG (log-free, counts on the y axis)."""
    left, bottom, top = 36, 18, 6
    plot_w, plot_h = width - left - 6, height - bottom - top
    peak = max(int(counts.max()) if counts.size else 0, 1)
    bar_w = plot_w / max(len(counts), 1)
    bars = []
    for k, count in enumerate(counts):
        h = plot_h * count / peak
        bars.append(
            f'<rect x="{left + k * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 1, 0.5):.1f}" '
            f'height="{h:.1f}" fill="#fb8500"><title>{_escape(f"{edges[k]:.3g}–{edges[k + 1]:.3g}: {int(count)}")}</title></rect>'
        )
    axes = (
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#8c959f"/>'
        f'<text x="{left}" y="{height - 4}">0</text>'
        f'<text x="{left + plot_w}" y="{height - 4}" text-anchor="end">{_escape(_format_number(float(edges[-1])))}</text>'
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>'
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>'
    )
    return _svg(width, height, axes + "".join(bars), "histogram of non-zero activations")


def trajectory_svg(
    steps: np.ndarray, norms: np.ndarray, highlight_step: float | None = None, width: int = 360, height: int = 140
) -> str:
    """Decoder norm per snapshot as an inline SVG line; snapshots evenly spaced (the schedule is log-like)."""
    left, bottom, top, right = 40, 18, 6, 8
    plot_w, plot_h = width - left - right, height - bottom - top
    n = len(norms)
    peak = float(norms.max()) if n and norms.max() > 0 else 1.0

    def x(k: float) -> float:
        return left + (plot_w * k / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h * (1 - v / peak)

    points = " ".join(f"{x(k):.1f},{y(v):.1f}" for k, v in enumerate(norms))
    dots = "".join(
        f'<circle cx="{x(k):.1f}" cy="{y(v):.1f}" r="2.2" fill="#0969da"><title>{_escape(f"step {s}: {v:.4g}")}</title></circle>'
        for k, (s, v) in enumerate(zip(steps, norms))
    )
    marker = ""
    if highlight_step is not None and n and np.isfinite(highlight_step):
        k = int(np.argmin(np.abs(np.asarray(steps, dtype=float) - float(highlight_step))))
        marker = (
            f'<line x1="{x(k):.1f}" y1="{top}" x2="{x(k):.1f}" y2="{top + plot_h}" stroke="#cf222e" stroke-dasharray="3,3">'
            f'<title>{_escape(f"step {highlight_step:g}")}</title></line>'
        )
    tick_ids = sorted({0, n // 2, n - 1}) if n else []
    ticks = "".join(
        f'<text x="{x(k):.1f}" y="{height - 4}" text-anchor="middle">{_escape(steps[k])}</text>' for k in tick_ids
    )
    axes = (
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#8c959f"/>'
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{_escape(_format_number(peak))}</text>'
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>'
    )
    line = f'<polyline points="{points}" fill="none" stroke="#0969da" stroke-width="1.5"/>' if n > 1 else ""
    return _svg(width, height, axes + marker + line + dots + ticks, "decoder norm over training steps")


def feature_card_html(dashboard: FeatureDashboard, include_style: bool = True, element_id: str | None = None) -> str:
    """One feature's dashboard as an HTML fragment (a <div>, with its <style> unless told not to)."""
    d = dashboard
    scale = d.max_activation
    facts = "".join(f"<span><b>{_escape(k)}</b>: {_escape(_fact(v))}</span>" for k, v in d.facts.items())
    facts += f"<span><b>active</b>: {_escape(f'{100 * d.active_fraction:.2g}%')} of positions</span>"
    facts += f"<span><b>max activation</b>: {_escape(_format_number(d.max_activation))}</span>"
    parts = [f'<h3>Feature {d.feature}</h3><div class="cl-facts">{facts}</div>']
    for title, contexts in d.sections:
        parts.append(f"<h4>Top contexts — {_escape(title)}</h4>")
        if contexts:
            parts.extend(context_html(c, scale) for c in contexts)
        else:
            parts.append('<div class="cl-ctx">(never active)</div>')
    plots = [
        "<figure>" + histogram_svg(*d.histogram) + "<figcaption>non-zero activations (count per bin)</figcaption></figure>"
    ]
    if d.decoder_norms is not None and d.steps is not None:
        plots.append(
            "<figure>"
            + trajectory_svg(d.steps, d.decoder_norms, d.highlight_step)
            + "<figcaption>decoder norm ‖W<sub>D</sub>‖ by training step"
            + (" (dashed: " + _escape(f"step {d.highlight_step:g}") + ")" if d.highlight_step is not None and np.isfinite(d.highlight_step) else "")
            + "</figcaption></figure>"
        )
    parts.append('<div class="cl-plots">' + "".join(plots) + "</div>")
    id_attr = f' id="{_escape(element_id)}"' if element_id else ""
    card = f'<div class="cl-dash cl-card"{id_attr} data-feature="{d.feature}">' + "".join(parts) + "</div>"
    return (_STYLE if include_style else "") + card


def _fact(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return _format_number(float(value))
    return str(value)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_escape(title)}</title>"
        f"{_STYLE}</head><body>\n{body}\n</body></html>\n"
    )


_INDEX_SCRIPT = """
<script>
(function () {
  var root = document.getElementById("%(id)s");
  if (!root) return;
  var search = root.querySelector(".cl-search"), filter = root.querySelector(".cl-filter");
  var count = root.querySelector(".cl-count");
  var items = Array.prototype.slice.call(root.querySelectorAll(".cl-item"));
  var cards = Array.prototype.slice.call(root.querySelectorAll(".cl-card"));
  function show(feature) {
    cards.forEach(function (c) { c.style.display = c.getAttribute("data-feature") === feature ? "" : "none"; });
    items.forEach(function (i) { i.classList.toggle("cl-active", i.getAttribute("data-feature") === feature); });
  }
  function apply() {
    var text = search.value.toLowerCase(), category = filter ? filter.value : "", shown = 0;
    items.forEach(function (i) {
      var ok = i.getAttribute("data-search").indexOf(text) >= 0 &&
               (!category || i.getAttribute("data-category") === category);
      i.style.display = ok ? "" : "none";
      if (ok) shown += 1;
    });
    count.textContent = shown + " of " + items.length + " features";
  }
  items.forEach(function (i) {
    i.addEventListener("click", function (event) { event.preventDefault(); show(i.getAttribute("data-feature")); });
  });
  search.addEventListener("input", apply);
  if (filter) filter.addEventListener("change", apply);
  if (items.length) show(items[0].getAttribute("data-feature"));
  apply();
})();
</script>
"""


def index_html(dashboards: Sequence[FeatureDashboard], title: str = "Feature dashboards", *, full_page: bool = False) -> str:
    """A browsable page of many feature cards: a searchable, filterable list; a click shows the card.

    The list matches the search text against the feature number, its facts and its top tokens;
    the filter uses each dashboard's `facts["category"]` when present. Without JavaScript every
    card is shown one after another and the list links jump to them. `full_page=True` returns a
    standalone HTML document; otherwise a fragment for `IPython.display.HTML`.
    """
    dashboards = list(dashboards)
    root_id = "cl-index-" + content_hash([title, [d.feature for d in dashboards]], length=10)
    categories = sorted({str(d.facts["category"]) for d in dashboards if "category" in d.facts})
    items, cards = [], []
    for d in dashboards:
        card_id = f"{root_id}-f{d.feature}"
        facts = " · ".join(f"{k} {_fact(v)}" for k, v in d.facts.items() if k != "explanation")
        summary = d.summary()
        search_text = f"feature {d.feature} {facts} {summary} {d.facts.get('explanation', '')}".lower()
        category = str(d.facts.get("category", ""))
        items.append(
            f'<li class="cl-item" data-feature="{d.feature}" data-category="{_escape(category)}" data-search="{_escape(search_text)}">'
            f'<a href="#{_escape(card_id)}"><b>#{d.feature}</b> {_escape(_visible(summary))}<br><small>{_escape(facts)}</small></a></li>'
        )
        cards.append(feature_card_html(d, include_style=False, element_id=card_id))
    filter_html = ""
    if categories:
        options = "".join(f'<option value="{_escape(c)}">{_escape(c)}</option>' for c in categories)
        filter_html = f'<select class="cl-filter" aria-label="category"><option value="">all categories</option>{options}</select>'
    body = (
        f'<div class="cl-index" id="{root_id}"><div class="cl-side">'
        f'<input class="cl-search" type="search" placeholder="search features, tokens…" aria-label="search">{filter_html}'
        f'<div class="cl-count">{len(dashboards)} features</div><ul class="cl-list">{"".join(items)}</ul></div>'
        f'<div class="cl-main">{"".join(cards)}</div></div>' + _INDEX_SCRIPT % {"id": root_id}
    )
    if full_page:
        return _page(title, f"<h2 style=\"font-family:system-ui,sans-serif\">{_escape(title)}</h2>\n" + body)
    return _STYLE + body


def write_dashboards(
    dashboards: Sequence[FeatureDashboard], out_dir: str | os.PathLike, title: str = "Feature dashboards"
) -> Path:
    """Write `index.html` (all cards, browsable) and one standalone `feature_<i>.html` per feature.

    Files are written atomically; returns the index path.
    """
    out = Path(out_dir)
    for d in dashboards:
        atomic_write_text(out / f"feature_{d.feature}.html", d.page_html())
    index = out / "index.html"
    atomic_write_text(index, index_html(dashboards, title, full_page=True))
    return index
