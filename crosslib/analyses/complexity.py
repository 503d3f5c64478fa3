"""How complex is a feature, and do complex features form later in training? (the book's Methods page,
section Complexity scorers)

The paper gives every crosscoder feature a complexity score from 1 to 5 and finds that the
score correlates positively with the step at which the feature emerges. This module has

- the scorer interface `ComplexityScorer`: `score(contexts) -> ComplexityScore`, where
  `contexts` is a `crosslib.analyses.dashboards.FeatureContexts` (a feature's activations and its
  top-activating contexts);
- `ContextDepthScorer` (offline, the default): how much preceding text the feature's
  activation needs, measured with lookup tables on held-out positions; no model, no key;
- `LLMRubricScorer`: the paper's method, an LLM (Claude, through the `anthropic` SDK) reads
  the feature's 7 top contexts and rates it on the paper's rubric; every answer is cached on
  disk so a book re-renders without calls;
- statistics: `complexity_vs_emergence` (per-score means, Pearson and Spearman correlations)
  and `scorer_agreement` (how well two scorers agree).

The paper's scale (both scorers report on it):
  1  a single specific token
  2  one word across its forms or spellings
  3  a phrase, a category of words, or a local structure
  4  a higher-level semantic or syntactic structure
  5  a rich theme across diverse contexts
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd

from crosslib.analyses.dashboards import FeatureContexts, TopContext
from crosslib.artifacts import atomic_write_json, display_path, sha256_bytes
from crosslib.config import (Check, Config, ParameterError, canonical_json, fraction, instance_of, integer, non_empty_str,
                             optional, positive, require)
from crosslib.constants import data_dir
from crosslib.statistics import Correlation, correlate

SCALE: dict[int, str] = {
    1: "a single specific token",
    2: "one word across its forms or spellings",
    3: "a phrase, a category of words, or a local structure",
    4: "a higher-level semantic or syntactic structure",
    5: "a rich theme across diverse contexts",
}

# Reported by the paper as quoted by a secondary summary (not yet checked against the paper): Pearson r
# between LLM complexity and emergence step, and its p-value. Quoted beside our numbers, not used.
PAPER_PEARSON_R = 0.31
PAPER_PEARSON_P = 0.002


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ComplexityScore:
    """A feature's complexity on the paper's 1–5 scale.

    consistency: how well the top contexts share one pattern (1–5), from the LLM scorer; None
        for scorers that do not judge it.
    explanation: one sentence saying why (the LLM's reading, or the context-depth numbers).
    scorer: which scorer produced it ("context_depth", "llm:<model>").
    details: extra numbers (the context-depth scorer's explained-variance shares).
    """

    complexity: int
    consistency: int | None
    explanation: str
    scorer: str
    details: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _require_score("complexity", self.complexity)
        if self.consistency is not None:
            _require_score("consistency", self.consistency)

    def to_dict(self) -> dict[str, Any]:
        return {
            "complexity": self.complexity,
            "consistency": self.consistency,
            "explanation": self.explanation,
            "scorer": self.scorer,
            **{k: float(v) for k, v in self.details.items()},
        }


def _require_score(name: str, value: Any) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 1 <= value <= 5
    require(ok, name, value, "an integer from 1 to 5")


@runtime_checkable
class ComplexityScorer(Protocol):
    """Anything with a `name` and `score(contexts) -> ComplexityScore`."""

    name: str

    def score(self, contexts: FeatureContexts) -> ComplexityScore: ...


class InsufficientData(ValueError):
    """The feature is too rarely active (or never varies) to be scored; the message says why."""


API_KEY_PATTERN = re.compile(r"sk-ant-[A-Za-z0-9_\-]{6,}")  # Anthropic keys, wherever they come from
REDACTED = "[redacted API key]"


def redact(text: str, *keys: str | None) -> str:
    """`text` with the API key (the environment's, any of `keys`, anything shaped like an
    Anthropic key) replaced: an endpoint may echo the key in an error body, a model in its answer."""
    text = str(text)
    for key in (os.environ.get(API_KEY_ENV, "").strip(), *keys):
        if key and len(key) >= 6:
            text = text.replace(key, REDACTED)
    return API_KEY_PATTERN.sub(REDACTED, text)


class LLMError(RuntimeError):
    """The LLM scorer could not produce a score (base class of the two below). Its message never
    holds the API key."""

    def __init__(self, message: str = ""):
        super().__init__(redact(message))


class LLMUnavailable(LLMError):
    """No API key and no cached answer, or the API refused or could not be reached.

    Its message is one line, suitable for a notebook to print before falling back to the
    offline `ContextDepthScorer`.
    """


class MalformedAnswer(LLMError):
    """The LLM kept answering something that is not the requested JSON."""


# --------------------------------------------------------------------------------------------
# Context depth (offline)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContextDepthConfig(Config):
    """Thresholds of the context-depth score (see `ContextDepthScorer` for the definition).

    enough: τ, the share of held-out activation variance that counts as "explained" (0.5).
    some: φ, the share below which a context "explains almost nothing" (0.1); φ < τ.
    min_count: a lookup-table entry (a token, a pair, a triple) is used only when it was seen
        at least this many times in the fitting half; rarer keys fall back to the shorter
        context's table, then to the mean (a key seen once is mostly noise).
    min_active: the feature must be active (> 0) at least this many times in each half,
        else it is not scored (`InsufficientData`).
    """

    enough: Annotated[float, fraction()] = 0.5
    some: Annotated[float, fraction()] = 0.1
    min_count: Annotated[int, integer(1)] = 2
    min_active: Annotated[int, integer(1)] = 10

    def validate(self) -> None:
        require(self.some < self.enough, "some", self.some, f"a number below enough={self.enough}")


DEPTHS = (1, 2, 3)


@dataclasses.dataclass
class _DepthTable:
    """Lookup-table layout for one context depth and one fold (depends only on the tokens)."""

    fit_inverse: np.ndarray  # fitting position → row of the table
    counts: np.ndarray  # table row → how many fitting positions share that key
    eval_row: np.ndarray  # held-out position → table row, or -1 when unseen / too rare


@dataclasses.dataclass
class _Layout:
    fit_mask: list[np.ndarray]  # per fold: [window, position] positions used for fitting
    eval_mask: list[np.ndarray]
    tables: list[dict[int, _DepthTable]]  # per fold: depth → table


def _context_keys(tokens: np.ndarray, depth: int) -> np.ndarray:
    """One integer per position naming its last `depth` tokens (positions < 2 are unused)."""
    t = tokens.astype(np.int64)
    vocab = int(t.max()) + 1
    keys = t.copy()
    for back in range(1, depth):
        shifted = np.zeros_like(t)
        shifted[:, back:] = t[:, :-back]
        keys = keys + shifted * vocab**back
    return keys


def _build_layout(tokens: np.ndarray, min_count: int) -> _Layout:
    n_windows, context = tokens.shape
    usable = np.zeros(tokens.shape, dtype=bool)
    usable[:, max(DEPTHS) - 1 :] = True  # every depth is measured on the same positions
    even = (np.arange(n_windows) % 2 == 0)[:, None]
    folds = [(usable & even, usable & ~even), (usable & ~even, usable & even)]
    keys = {d: _context_keys(tokens, d) for d in DEPTHS}
    tables = []
    for fit, held in folds:
        per_depth = {}
        for d in DEPTHS:
            unique, inverse, counts = np.unique(keys[d][fit], return_inverse=True, return_counts=True)
            query = keys[d][held]
            row = np.searchsorted(unique, query)
            row_clipped = np.minimum(row, max(len(unique) - 1, 0))
            found = (row < len(unique)) & (unique[row_clipped] == query) if len(unique) else np.zeros(len(query), bool)
            found &= counts[row_clipped] >= min_count if len(unique) else found
            per_depth[d] = _DepthTable(inverse.ravel(), counts, np.where(found, row_clipped, -1))
        tables.append(per_depth)
    return _Layout([f for f, _ in folds], [h for _, h in folds], tables)


class ContextDepthScorer:
    """Offline complexity: how much preceding context the feature's activation needs.

    Definition. Take the feature's activation a at every cached position (from the third
    position of each window on). Split the cached windows in two halves, even-numbered and
    odd-numbered. On one half, build three lookup tables: the mean activation for each current
    token (depth 1), for each pair (previous token, current token) (depth 2), and for each
    triple of the last three tokens (depth 3). Predict the activation on the *other* half by
    looking up its last d tokens; a key seen fewer than `min_count` times in the fitting half
    falls back to the table of depth d−1, then to the fitting half's mean. Do this both ways
    round (fit on even / predict odd, and the reverse) and pool the predictions. The share of
    variance explained by depth d is

        R_d = 1 − Σ (a − â_d)² / Σ (a − ā)²        (sums over all held-out positions)

    With τ = `enough` (default 0.5) and φ = `some` (default 0.1), the score is

        1  if R_1 ≥ τ             the current token alone predicts the activation
        2  elif R_2 ≥ τ           the last two tokens do
        3  elif R_3 ≥ τ           the last three tokens do
        4  elif max(R_1, R_2, R_3) ≥ φ   short context explains some, but not most
        5  otherwise              even three tokens explain almost nothing: the feature
                                  needs longer-range context

    The score is deterministic (no random split, no sampling). It mirrors the paper's scale in
    spirit — a token feature is simple, a theme needs context — but it measures a different,
    objective quantity: a feature for "one word across its spellings" scores 1 or 2 here
    depending on how it is tokenised, and a feature can need long context without being a
    "rich theme". Features active fewer than `min_active` times in either half, or with no
    variance, raise `InsufficientData`.
    """

    name = "context_depth"

    def __init__(self, config: ContextDepthConfig = ContextDepthConfig()):
        self.config = config
        self._layout_for: tuple[Any, tuple[int, ...], int] | None = None
        self._layout: _Layout | None = None

    def __repr__(self) -> str:
        return f"ContextDepthScorer({self.config!r})"

    def _layout_of(self, tokens: np.ndarray) -> _Layout:
        # Tables depend only on the tokens, which all features share: build them once.
        if self._layout_for is None or self._layout_for[0] is not tokens or self._layout_for[1] != tokens.shape:
            self._layout = _build_layout(tokens, self.config.min_count)
            self._layout_for = (tokens, tokens.shape, self.config.min_count)
        assert self._layout is not None
        return self._layout

    def explained_variance(self, tokens: np.ndarray, activations: np.ndarray) -> dict[int, float]:
        """R_d for d = 1, 2, 3 (see the class docstring); raises `InsufficientData`."""
        tokens = np.asarray(tokens)
        acts = np.asarray(activations, dtype=np.float64)
        require(tokens.ndim == 2 and tokens.shape == acts.shape, "activations", f"shape {acts.shape}", f"the tokens' shape {tokens.shape}")
        require(tokens.shape[0] >= 2 and tokens.shape[1] >= max(DEPTHS), "tokens", f"shape {tokens.shape}", "≥ 2 windows of ≥ 3 positions")
        layout = self._layout_of(tokens)
        held_out, predictions = [], {d: [] for d in DEPTHS}
        for fold in range(2):
            fit_acts = acts[layout.fit_mask[fold]]
            eval_acts = acts[layout.eval_mask[fold]]
            for name, part in (("fitting", fit_acts), ("held-out", eval_acts)):
                if int((part > 0).sum()) < self.config.min_active:
                    raise InsufficientData(
                        f"active at {int((part > 0).sum())} positions of a {name} half; "
                        f"min_active={self.config.min_active} are needed to score context depth"
                    )
            prediction = np.full(len(eval_acts), fit_acts.mean())
            for d in DEPTHS:
                table = layout.tables[fold][d]
                means = np.bincount(table.fit_inverse, weights=fit_acts, minlength=len(table.counts)) / table.counts
                known = table.eval_row >= 0
                prediction = np.where(known, means[np.maximum(table.eval_row, 0)], prediction)
                predictions[d].append(prediction)
            held_out.append(eval_acts)
        a = np.concatenate(held_out)
        total = float(((a - a.mean()) ** 2).sum())
        if total <= 0:
            raise InsufficientData("the activation does not vary on held-out positions")
        return {d: 1.0 - float(((a - np.concatenate(predictions[d])) ** 2).sum()) / total for d in DEPTHS}

    def complexity_from_explained(self, explained: Mapping[int, float]) -> int:
        """The 1–5 rule of the class docstring applied to R_1, R_2, R_3."""
        tau, phi = self.config.enough, self.config.some
        for d in DEPTHS:
            if explained[d] >= tau:
                return d
        return 4 if max(explained.values()) >= phi else 5

    def score(self, contexts: FeatureContexts) -> ComplexityScore:
        explained = self.explained_variance(contexts.tokens, contexts.activations)
        complexity = self.complexity_from_explained(explained)
        reason = {
            1: "the current token suffices",
            2: "the last two tokens suffice",
            3: "the last three tokens suffice",
            4: "short context explains some of it, not most",
            5: "short context explains almost nothing",
        }[complexity]
        shares = ", ".join(f"{d} token{'s' if d > 1 else ''} {100 * max(explained[d], 0):.0f}%" for d in DEPTHS)
        return ComplexityScore(
            complexity=complexity,
            consistency=None,
            explanation=f"held-out variance explained by the last {shares}: {reason}",
            scorer=self.name,
            details={f"explained_depth{d}": explained[d] for d in DEPTHS},
        )


# --------------------------------------------------------------------------------------------
# LLM rubric (the paper's method)
# --------------------------------------------------------------------------------------------

DEFAULT_MODEL = "claude-sonnet-5-5"
API_KEY_ENV = "ANTHROPIC_API_KEY"

SYSTEM_PROMPT = """\
You help interpret the features of a sparse dictionary (a crosscoder) trained on the internal \
activations of a language model. A feature is a direction in the model's activations that \
switches on for some tokens. You will see up to seven short text excerpts where one feature \
activates most strongly. In each excerpt the tokens where the feature is strongest are marked \
like <<this>>; the symbol ⏎ stands for a line break.

Work out what the feature responds to, then rate it.

complexity, from 1 to 5:
1 = a single specific token (for example the token " the")
2 = one word across its forms or spellings (for example "run", "runs", "running", "Run")
3 = a phrase, a category of words, or a local structure (for example numbers, names of \
places, the word after "of the")
4 = a higher-level semantic or syntactic structure (for example the subject of a clause, \
a sentence about to end, text inside quotation marks)
5 = a rich theme across diverse contexts (for example religion, conflict, food)

consistency, from 1 to 5: how well all the excerpts fit your explanation (1 = no common \
pattern, 5 = every excerpt fits).

Reply with only this JSON object and nothing else:
{"explanation": "<one sentence>", "consistency": <integer 1-5>, "complexity": <integer 1-5>}"""


@dataclasses.dataclass(frozen=True)
class LLMRubricConfig(Config):
    """Settings of the LLM scorer.

    model: the Claude model id (the paper used Claude Sonnet 4; default: a current Sonnet).
    n_examples: how many top contexts go into the prompt (paper: 7); window_tokens: the most
        tokens shown per context (paper: ≤ 50), centred as in `crosslib.analyses.dashboards`.
    mark_fraction: tokens whose activation is at least this share of the context's strongest
        activation are marked <<like this>> (the strongest one always is).
    max_tokens: the answer's token limit (includes any thinking the model does).
    effort: optional `output_config.effort` ("low", "medium", "high"…) for models that take it.
    max_attempts: answers requested per feature before giving up on malformed JSON; after a
        malformed answer the model is told what was wrong and asked again.
    max_retries: HTTP retries done by the SDK (rate limits, overload, network), with its
        back-off that honours the server's retry-after header.
    timeout_s: per-request timeout. base_url: another Messages API endpoint (a proxy, a test
        server); None uses the SDK's default.
    """

    model: Annotated[str, non_empty_str(allowed="a non-empty model id")] = DEFAULT_MODEL
    n_examples: Annotated[int, integer(1)] = 7
    window_tokens: Annotated[int, integer(1)] = 50
    mark_fraction: Annotated[float, fraction("[0, 1]")] = 0.5
    max_tokens: Annotated[int, integer(1)] = 2048
    effort: Annotated[str | None, optional(instance_of(str, allowed="an effort level string"))] = None
    max_attempts: Annotated[int, integer(1)] = 3
    max_retries: Annotated[int, integer(0)] = 4
    timeout_s: Annotated[float, positive()] = 120.0
    base_url: Annotated[str | None, optional(Check(lambda url: isinstance(url, str) and "://" in url, "a URL"))] = None


def _excerpt(context: TopContext, window_tokens: int, mark_fraction: float) -> str:
    """One context as text, cut to ≤ window_tokens around its strongest token, strongest tokens marked."""
    n = len(context.tokens)
    span = min(window_tokens, n)
    # Keep the strongest token inside the cut with most of the text before it (a causal
    # model's activation depends only on what came before) and up to 10 tokens after.
    after = min(10, span - 1)
    start = max(0, min(context.focus - (span - 1 - after), n - span))
    tokens = context.tokens[start : start + span]
    acts = context.activations[start : start + span]
    focus = context.focus - start
    peak = acts[focus]
    pieces = []
    for k, (token, act) in enumerate(zip(tokens, acts)):
        text = token.replace("\r", "").replace("\n", "⏎")
        if k == focus or (peak > 0 and act >= mark_fraction * peak):
            # Keep a leading space outside the marks so "<<word>>" reads as a word.
            stripped = text.lstrip(" ") or text  # a token of spaces only stays visible
            text = text[: len(text) - len(stripped)] + f"<<{stripped}>>"
        pieces.append(text)
    return "".join(pieces)


def build_prompt(top: Sequence[TopContext], config: LLMRubricConfig = LLMRubricConfig()) -> tuple[str, str]:
    """(system, user) prompt texts for a feature's top contexts. Only text goes in, no ids or
    numbers, so the same contexts always give the same prompt (and the same cache entry)."""
    examples = [_excerpt(c, config.window_tokens, config.mark_fraction) for c in top[: config.n_examples]]
    user = "Excerpts where the feature activates most strongly:\n\n" + "\n\n".join(
        f"Excerpt {k + 1}:\n{text}" for k, text in enumerate(examples)
    )
    return SYSTEM_PROMPT, user


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_answer(text: str) -> dict[str, Any]:
    """Read and check the model's JSON answer; raises `MalformedAnswer` saying what is wrong."""
    match = _JSON_OBJECT.search(text or "")
    if match is None:
        raise MalformedAnswer("the reply contains no JSON object")
    try:
        answer = json.loads(match.group(0))
    except json.JSONDecodeError as e:
        raise MalformedAnswer(f"the reply is not valid JSON ({e.msg})") from None
    if not isinstance(answer, dict):
        raise MalformedAnswer("the reply is not a JSON object")
    missing = [k for k in ("explanation", "consistency", "complexity") if k not in answer]
    if missing:
        raise MalformedAnswer(f"the JSON object lacks {', '.join(missing)}")
    explanation = answer["explanation"]
    if not isinstance(explanation, str) or not explanation.strip():
        raise MalformedAnswer("explanation must be a non-empty string")
    checked = {"explanation": " ".join(explanation.split())}
    for key in ("consistency", "complexity"):
        value = answer[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 5:
            raise MalformedAnswer(f"{key} must be an integer from 1 to 5, got {value!r}")
        checked[key] = value
    return checked


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LLMRubricScorer:
    """The paper's scorer: Claude reads a feature's top contexts and rates it on the 1–5 scale.

    The prompt (`build_prompt`) shows `n_examples` contexts of ≤ `window_tokens` tokens with
    the strongest tokens marked <<like this>>, explains the rubric, and asks for
    {"explanation", "consistency", "complexity"} as JSON. A malformed or out-of-range answer is
    sent back with what was wrong, up to `max_attempts` answers; HTTP rate limits and
    overloads are retried by the SDK with back-off.

    Caching: every valid answer is stored as JSON under `cache_dir` (default
    `data_dir()/llm_cache/<model>/`), named by the SHA-256 of the model and prompt. The cache is
    read first, so a book re-renders without calls and without a key. The files hold the
    prompt, the answer and token usage — never the API key.

    The key is read only from the environment variable ANTHROPIC_API_KEY, when a call is
    needed. With no key and no cached answer, `score` raises `LLMUnavailable` (one line);
    so do API errors that survive the retries. Set `allow_calls=False` to use the cache only.
    """

    def __init__(
        self,
        config: LLMRubricConfig = LLMRubricConfig(),
        *,
        cache_dir: str | os.PathLike | None = None,
        allow_calls: bool = True,
        client: Any = None,
    ):
        self.config = config
        self.name = f"llm:{config.model}"
        self._cache_root = Path(cache_dir) if cache_dir is not None else None
        self.allow_calls = allow_calls
        self._client = client  # any object with .messages.create (e.g. a preconfigured SDK client)
        self.calls_made = 0  # HTTP answers received (for reporting cache hit rates)

    def __repr__(self) -> str:  # never shows the client (which holds the key)
        return f"LLMRubricScorer({self.config!r}, cache_dir={str(self.cache_dir)!r}, allow_calls={self.allow_calls})"

    @property
    def cache_dir(self) -> Path:
        root = self._cache_root if self._cache_root is not None else data_dir() / "llm_cache"
        return root / re.sub(r"[^A-Za-z0-9._-]", "_", self.config.model)

    @staticmethod
    def key_available() -> bool:
        """Whether ANTHROPIC_API_KEY is set (calls are possible)."""
        return bool(os.environ.get(API_KEY_ENV, "").strip())

    def prompt_hash(self, system: str, user: str) -> str:
        return sha256_bytes(canonical_json({"model": self.config.model, "system": system, "user": user}).encode())

    def cache_path(self, contexts: FeatureContexts | Sequence[TopContext]) -> Path:
        top = contexts.top if isinstance(contexts, FeatureContexts) else contexts
        return self.cache_dir / f"{self.prompt_hash(*build_prompt(top, self.config))}.json"

    def cached(self, contexts: FeatureContexts | Sequence[TopContext]) -> bool:
        return self._read_cache(self.cache_path(contexts)) is not None

    def _read_cache(self, path: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(path.read_text())
            return parse_answer(json.dumps(record["answer"]))
        except (OSError, ValueError, KeyError, TypeError, MalformedAnswer):
            return None  # absent or damaged: ask again

    def _make_client(self) -> Any:
        if self._client is not None:
            return self._client
        key = os.environ.get(API_KEY_ENV, "").strip()
        if not key:
            raise LLMUnavailable(
                f"{API_KEY_ENV} is not set and no cached LLM answer exists under {display_path(self.cache_dir)}; "
                "use the offline ContextDepthScorer"
            )
        import anthropic

        options: dict[str, Any] = {"api_key": key, "max_retries": self.config.max_retries, "timeout": self.config.timeout_s}
        if self.config.base_url is not None:
            options["base_url"] = self.config.base_url
        # The key lives only in this client's memory: never logged, printed or written to disk.
        self._client = anthropic.Anthropic(**options)
        return self._client

    def _ask(self, client: Any, messages: list[dict[str, str]], system: str) -> tuple[str, dict[str, Any]]:
        import anthropic

        request: dict[str, Any] = {
            "model": self.config.model,
            "max_tokens": self.config.max_tokens,
            "system": system,
            "messages": messages,
        }
        if self.config.effort is not None:
            request["output_config"] = {"effort": self.config.effort}
        try:
            message = client.messages.create(**request)
        except anthropic.APIStatusError as e:
            raise LLMUnavailable(_one_line(redact(f"the Messages API answered HTTP {e.status_code}: {e.message}",
                                                  getattr(client, "api_key", None)))) from None
        except anthropic.APIConnectionError as e:
            raise LLMUnavailable(_one_line(redact(f"could not reach the Messages API ({type(e).__name__}: {e})",
                                                  getattr(client, "api_key", None)))) from None
        self.calls_made += 1
        # Thinking models may put thinking blocks first: read the text blocks only.
        text = "".join(block.text for block in message.content if getattr(block, "type", None) == "text")
        usage = getattr(message, "usage", None)
        meta = {
            "response_model": getattr(message, "model", None),
            "stop_reason": getattr(message, "stop_reason", None),
            "input_tokens": getattr(usage, "input_tokens", None),
            "output_tokens": getattr(usage, "output_tokens", None),
        }
        return text, meta

    def score(self, contexts: FeatureContexts | Sequence[TopContext]) -> ComplexityScore:
        top = list(contexts.top if isinstance(contexts, FeatureContexts) else contexts)
        if not top:
            raise InsufficientData("the feature is never active, so there are no contexts to show the LLM")
        system, user = build_prompt(top, self.config)
        digest = self.prompt_hash(system, user)
        path = self.cache_dir / f"{digest}.json"
        answer = self._read_cache(path)
        if answer is None:
            if not self.allow_calls:
                raise LLMUnavailable(f"no cached LLM answer under {display_path(self.cache_dir)} and calls are switched off (allow_calls=False)")
            answer = self._ask_until_valid(system, user, digest, path)
        return ComplexityScore(
            complexity=answer["complexity"],
            consistency=answer["consistency"],
            explanation=answer["explanation"],
            scorer=self.name,
        )

    def _ask_until_valid(self, system: str, user: str, digest: str, path: Path) -> dict[str, Any]:
        client = self._make_client()
        messages = [{"role": "user", "content": user}]
        problems = []
        for attempt in range(1, self.config.max_attempts + 1):
            text, meta = self._ask(client, messages, system)
            try:
                answer = parse_answer(text)
            except MalformedAnswer as e:
                problems.append(str(e))
                if text.strip():
                    # Show the model its answer and what was wrong with it, then ask again.
                    messages = [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": text},
                        {
                            "role": "user",
                            "content": f"That reply could not be used: {e}. Reply with only the JSON object "
                            '{"explanation": "<one sentence>", "consistency": <integer 1-5>, "complexity": <integer 1-5>}.',
                        },
                    ]
                else:
                    messages = [{"role": "user", "content": user}]
                continue
            key = getattr(client, "api_key", None)
            answer = {k: redact(v, key) if isinstance(v, str) else v for k, v in answer.items()}
            atomic_write_json(
                path,
                {
                    "model": self.config.model,
                    "prompt_sha256": digest,
                    "system": system,
                    "user": user,
                    "answer": answer,
                    "response_text": redact(text, key),
                    "attempts": attempt,
                    "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **meta,
                },
            )
            return answer
        raise MalformedAnswer(
            _one_line(f"no valid answer after {self.config.max_attempts} attempts: {'; '.join(problems)}")
        )


# --------------------------------------------------------------------------------------------
# Scoring many features
# --------------------------------------------------------------------------------------------


def score_features(
    scorer: ComplexityScorer,
    contexts: Iterable[FeatureContexts],
    *,
    on_llm_error: str = "raise",
    progress: bool = True,
) -> pd.DataFrame:
    """Score many features; one row each: feature, complexity, consistency, explanation, scorer,
    plus any `details` columns.

    Features that cannot be scored (`InsufficientData`: too rarely active) get complexity NaN
    and the reason in `explanation`. LLM failures (`LLMError`) are raised by default
    (`on_llm_error="raise"`), so a notebook can catch `LLMUnavailable` once and fall back;
    `on_llm_error="skip"` records them like unscorable features instead.
    """
    if on_llm_error not in ("raise", "skip"):
        raise ParameterError(f"on_llm_error={on_llm_error!r} is not allowed: choose one of ['raise', 'skip']")
    from crosslib.progress import progress as tqdm

    rows = []
    # Iterate lazily: each item holds a feature's activations, so a generator keeps memory flat.
    total = len(contexts) if hasattr(contexts, "__len__") else None
    for item in tqdm(contexts, total=total, desc=f"scoring ({scorer.name})", disable=not progress):
        try:
            row = scorer.score(item).to_dict()
        except InsufficientData as e:
            row = {"complexity": np.nan, "consistency": None, "explanation": f"not scored: {e}", "scorer": scorer.name}
        except LLMError as e:
            if on_llm_error == "raise":
                raise
            row = {"complexity": np.nan, "consistency": None, "explanation": f"not scored: {e}", "scorer": scorer.name}
        rows.append({"feature": item.feature, **row})
    # (no features, e.g. a run where none emerges: the same columns, no rows)
    table = pd.DataFrame(rows, columns=None if rows else ["feature", "complexity", "consistency", "explanation", "scorer"])
    if len(table):
        table["complexity"] = table["complexity"].astype("Int64" if table["complexity"].isna().any() else "int64")
        table["consistency"] = pd.array(table["consistency"].tolist(), dtype="Int64")
    return table


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def log_step(step: np.ndarray | pd.Series | float) -> np.ndarray:
    """log10(1 + step): the axis on which snapshot schedules (Pythia's) are roughly even."""
    return np.log10(1.0 + np.asarray(step, dtype=float))


@dataclasses.dataclass(frozen=True)
class ComplexityEmergence:
    """Complexity versus emergence step.

    primary: correlations with log10(1 + emergence step) — the primary result, because
        snapshot schedules are log-spaced early (Pythia: 0, 1, 2, 4, …, 512, then every 1000
        steps), so on the raw step axis a few late features dominate Pearson's r;
    raw_step: the same with the raw step (Spearman is the same on both, being rank-based).
    per_score: one row per complexity score: n_features, mean/median step, mean log step and
        its standard error.
    """

    n: int
    primary: Correlation
    raw_step: Correlation
    per_score: pd.DataFrame

    def glue_numbers(self, prefix: str = "") -> dict[str, float]:
        """Flat name → number dict for myst-nb `glue` (prefix each name with `prefix`)."""
        numbers: dict[str, float] = {
            "n_features": float(self.n),
            "pearson_r_log_step": self.primary.pearson_r,
            "pearson_p_log_step": self.primary.pearson_p,
            "spearman_rho": self.primary.spearman_rho,
            "spearman_p": self.primary.spearman_p,
            "pearson_r_step": self.raw_step.pearson_r,
            "pearson_p_step": self.raw_step.pearson_p,
            "paper_pearson_r": PAPER_PEARSON_R,
            "paper_pearson_p": PAPER_PEARSON_P,
        }
        for row in self.per_score.itertuples():
            numbers[f"n_complexity{row.complexity}"] = float(row.n_features)
            numbers[f"median_step_complexity{row.complexity}"] = float(row.median_step)
            numbers[f"mean_log_step_complexity{row.complexity}"] = float(row.mean_log_step)
        return {prefix + k: float(v) for k, v in numbers.items()}


def _paired(a: Any, b: Any, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    x = pd.to_numeric(pd.Series(np.asarray(a, dtype=object)), errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(pd.Series(np.asarray(b, dtype=object)), errors="coerce").to_numpy(dtype=float)
    require(x.shape == y.shape and x.ndim == 1, names[1], f"{len(y)} values", f"one per {names[0]} value ({len(x)})")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def complexity_vs_emergence(complexity: Sequence[float] | pd.Series, emergence_step: Sequence[float] | pd.Series) -> ComplexityEmergence:
    """Correlate complexity scores with emergence steps (pairs with a missing value are dropped,
    e.g. unscored features and features that never emerge)."""
    c, s = _paired(complexity, emergence_step, ("complexity", "emergence_step"))
    require(bool((c >= 1).all() and (c <= 5).all() and (c == np.round(c)).all()), "complexity", "values outside 1–5", "integers from 1 to 5")
    frame = pd.DataFrame({"complexity": c.astype(int), "step": s, "log_step": log_step(s)})
    per_score = (
        frame.groupby("complexity")
        .agg(
            n_features=("step", "size"),
            mean_step=("step", "mean"),
            median_step=("step", "median"),
            mean_log_step=("log_step", "mean"),
            sem_log_step=("log_step", "sem"),
        )
        .reset_index()
    )
    return ComplexityEmergence(
        n=len(frame),
        primary=correlate(frame["complexity"].to_numpy(float), frame["log_step"].to_numpy()),
        raw_step=correlate(frame["complexity"].to_numpy(float), frame["step"].to_numpy()),
        per_score=per_score,
    )


MIN_CORRELATED_FEATURES = 3  # fewer scored, emergent features than this: no correlation is computed or stated


def correlation_sentence(result: ComplexityEmergence, scorer: str) -> str:
    """The chapter's sentence on complexity versus emergence step, or why there is none (no `nan` in prose)."""
    if result.n < MIN_CORRELATED_FEATURES or not math.isfinite(result.primary.pearson_r):
        return (f"Only {result.n} scored feature(s) emerged during training in this run, too few to correlate "
                "complexity with the emergence step.")
    return (f"With the {scorer} scorer, complexity and log(1 + emergence step) correlate with Pearson "
            f"r = {result.primary.pearson_r:.2f} (p = {result.primary.pearson_p:.2g}) and Spearman "
            f"ρ = {result.primary.spearman_rho:.2f} (p = {result.primary.spearman_p:.2g}) over {result.n} features; "
            f"with the raw step, r = {result.raw_step.pearson_r:.2f} (p = {result.raw_step.pearson_p:.2g}).")


def merge_with_emergence(scores: pd.DataFrame, emergence: pd.DataFrame, step_column: str = "emergence_step") -> pd.DataFrame:
    """Join a `score_features` table with an `emergence_table` on `feature`."""
    for name, table, column in (("scores", scores, "complexity"), ("emergence", emergence, step_column)):
        require("feature" in table.columns and column in table.columns, name, f"columns {list(table.columns)}", f"'feature' and '{column}'")
    return scores.merge(emergence, on="feature", how="inner", suffixes=("", "_emergence"))


def weighted_kappa(a: Sequence[int], b: Sequence[int], categories: Sequence[int] = (1, 2, 3, 4, 5)) -> float:
    """Cohen's kappa with quadratic weights: 1 = perfect agreement, 0 = chance level.

    Disagreeing by two points costs four times as much as by one point.
    """
    a, b = np.asarray(a, dtype=int), np.asarray(b, dtype=int)
    k = len(categories)
    index = {c: i for i, c in enumerate(categories)}
    observed = np.zeros((k, k))
    for x, y in zip(a, b):
        observed[index[x], index[y]] += 1
    if observed.sum() == 0:
        return math.nan
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    i, j = np.indices((k, k))
    weights = (i - j) ** 2 / (k - 1) ** 2
    chance = float((weights * expected).sum())
    return 1.0 - float((weights * observed).sum()) / chance if chance > 0 else math.nan


def scorer_agreement(a: Sequence[float] | pd.Series, b: Sequence[float] | pd.Series) -> dict[str, float]:
    """How well two scorers agree on the same features (pairs with a missing score dropped).

    Returns n, spearman_rho and spearman_p, weighted_kappa (quadratic), exact_agreement (share
    of identical scores) and within_one (share differing by at most one point).
    """
    x, y = _paired(a, b, ("a", "b"))
    corr = correlate(x, y)
    return {
        "n": float(len(x)),
        "spearman_rho": corr.spearman_rho,
        "spearman_p": corr.spearman_p,
        "weighted_kappa": weighted_kappa(x.astype(int), y.astype(int)) if len(x) else math.nan,
        "exact_agreement": float((x == y).mean()) if len(x) else math.nan,
        "within_one": float((np.abs(x - y) <= 1).mean()) if len(x) else math.nan,
    }


def jitter(values: Sequence[float] | pd.Series, amount: float = 0.15, seed: int = 0) -> np.ndarray:
    """Values plus uniform noise in ±amount (fixed seed), to spread integer scores in a scatter."""
    values = np.asarray(values, dtype=float)
    return values + np.random.default_rng(seed).uniform(-amount, amount, size=values.shape)
