"""Complexity scoring: the offline context-depth score on features with known answers, the LLM
rubric scorer end to end through the real `anthropic` SDK against a local Messages API server,
and the complexity-versus-emergence statistics."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from crosslib.analyses.complexity import (
    ComplexityScore,
    ComplexityScorer,
    ContextDepthConfig,
    ContextDepthScorer,
    InsufficientData,
    LLMRubricConfig,
    LLMRubricScorer,
    LLMUnavailable,
    MalformedAnswer,
    build_prompt,
    complexity_vs_emergence,
    merge_with_emergence,
    parse_answer,
    score_features,
    scorer_agreement,
    weighted_kappa,
)
from crosslib.analyses.dashboards import ContextConfig, feature_contexts
from crosslib.config import ParameterError
from messages_api_server import MessagesAPIServer, Reply, rate_limit_reply, text_reply

# --------------------------------------------------------------------------------------------
# Context depth on synthetic features
# --------------------------------------------------------------------------------------------

V = 12  # token ids 1..11 are ordinary text; 0 is the rare marker token X


@pytest.fixture(scope="module")
def grid() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(1, V, size=(300, 64))


def depth_score(tokens: np.ndarray, acts: np.ndarray) -> ComplexityScore:
    return ContextDepthScorer().score(feature_contexts(tokens, acts))


def test_current_token_feature_scores_1(grid):
    rng = np.random.default_rng(1)
    weight = np.where(np.arange(V) % 3 == 0, rng.uniform(1, 3, V), 0.0)
    acts = weight[grid] + 0.05 * rng.random(grid.shape)
    score = depth_score(grid, acts)
    assert score.complexity == 1 and score.details["explained_depth1"] > 0.9
    assert score.scorer == "context_depth" and score.consistency is None
    assert "1 token" in score.explanation


def test_bigram_feature_scores_2(grid):
    previous = np.zeros_like(grid)
    previous[:, 1:] = grid[:, :-1]
    acts = (np.isin(previous, [1, 2, 3]) & np.isin(grid, [4, 5, 6])).astype(float)
    score = depth_score(grid, acts)
    assert score.complexity == 2
    assert score.details["explained_depth1"] < 0.5 < score.details["explained_depth2"]


def test_trigram_feature_scores_3(grid):
    shifted = [np.zeros_like(grid) for _ in range(2)]
    shifted[0][:, 1:], shifted[1][:, 2:] = grid[:, :-1], grid[:, :-2]
    acts = (np.isin(shifted[1], [1, 2, 3, 4]) & np.isin(shifted[0], [4, 5, 6, 7]) & np.isin(grid, [7, 8, 9, 10])).astype(float)
    assert depth_score(grid, acts).complexity == 3


def test_far_back_feature_scores_at_least_4(grid):
    rng = np.random.default_rng(2)
    tokens = grid.copy()
    acts = np.zeros(tokens.shape)
    for window in range(len(tokens)):
        if rng.random() < 0.6:
            where = int(rng.integers(0, 40))
            tokens[window, where] = 0  # the marker X
            acts[window, where + 10 :] = 1.0  # active once X is ≥ 10 positions back
    score = depth_score(tokens, acts)
    assert score.complexity >= 4
    assert max(score.details.values()) < 0.5


def test_context_depth_is_deterministic_and_rule_is_as_documented(grid):
    previous = np.zeros_like(grid)
    previous[:, 1:] = grid[:, :-1]
    acts = np.where(previous == 2, 1.0, 0.0) * grid
    first = depth_score(grid, acts)
    scorer = ContextDepthScorer()
    again = [scorer.score(feature_contexts(grid.copy(), acts.copy())) for _ in range(2)]
    assert first == again[0] == again[1]

    rule = ContextDepthScorer(ContextDepthConfig(enough=0.5, some=0.1)).complexity_from_explained
    assert rule({1: 0.6, 2: 0.7, 3: 0.8}) == 1
    assert rule({1: 0.2, 2: 0.5, 3: 0.8}) == 2
    assert rule({1: 0.2, 2: 0.3, 3: 0.55}) == 3
    assert rule({1: 0.15, 2: 0.05, 3: -0.2}) == 4
    assert rule({1: 0.01, 2: 0.05, 3: -0.3}) == 5


def test_rare_features_are_not_scored_and_bad_thresholds_are_named(grid):
    acts = np.zeros(grid.shape)
    acts[0, 5] = 1.0
    with pytest.raises(InsufficientData):
        depth_score(grid, acts)
    table = score_features(ContextDepthScorer(), [feature_contexts(grid, acts, feature=9)], progress=False)
    assert table.loc[0, "feature"] == 9 and pd.isna(table.loc[0, "complexity"])
    assert table.loc[0, "explanation"].startswith("not scored")
    with pytest.raises(ParameterError, match="some"):
        ContextDepthConfig(enough=0.3, some=0.4)
    with pytest.raises(ParameterError, match="complexity"):
        ComplexityScore(complexity=0, consistency=None, explanation="", scorer="x")
    assert isinstance(ContextDepthScorer(), ComplexityScorer) and isinstance(LLMRubricScorer(), ComplexityScorer)


# --------------------------------------------------------------------------------------------
# LLM rubric through the real SDK and a local server
# --------------------------------------------------------------------------------------------

DUMMY_KEY = "sk-ant-test-dummy-key-0123456789"
VOCAB = ["Ġthe", "Ġcat", "Ġ<b>", "Ġ&", "Ċ", "Ġsat"] + [f"Ġw{i}" for i in range(30)]
GOOD = '{"explanation": "fires on the token <b>", "consistency": 4, "complexity": 1}'


@pytest.fixture
def llm_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ANTHROPIC_API_KEY", DUMMY_KEY)
    monkeypatch.setenv("CROSSLIB_DATA", str(tmp_path / "data"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path / "data" / "llm_cache"


@pytest.fixture(scope="module")
def contexts():
    rng = np.random.default_rng(3)
    tokens = rng.integers(6, len(VOCAB), size=(40, 64))
    acts = np.zeros(tokens.shape)
    for window in range(12):  # a "<b>" feature, strongest at varied positions
        position = 20 + window
        tokens[window, position] = 2
        acts[window, position] = 3.0 - 0.1 * window
        acts[window, position - 1] = 0.5
    return feature_contexts(tokens, acts, VOCAB, feature=5, config=ContextConfig(n_examples=10, window_tokens=60, tokens_after=10))


def scorer_for(server: MessagesAPIServer, **changes) -> LLMRubricScorer:
    return LLMRubricScorer(LLMRubricConfig(model="claude-test", base_url=server.base_url, max_retries=2, timeout_s=10, **changes))


def cache_files(cache_root):
    return sorted(cache_root.rglob("*.json"))


def test_prompt_has_seven_marked_excerpts_of_at_most_50_tokens(contexts):
    system, user = build_prompt(contexts.top)
    assert "1 = a single specific token" in system and "JSON" in system
    assert user.count("Excerpt ") == 7 and "<< <b>>>" not in user and " <<<b>>>" in user
    assert all(text.count("<<") == 1 for text in user.split("Excerpt ")[1:])  # 0.5 < mark_fraction·peak
    assert build_prompt(contexts.top, LLMRubricConfig(mark_fraction=0.1))[1].count("<<") == 14
    lengths = [len(c.tokens) for c in contexts.top]
    assert min(lengths) == 60  # the contexts are longer than what the prompt may show...
    excerpt = build_prompt(contexts.top[:1], LLMRubricConfig(window_tokens=50))[1].split("Excerpt 1:\n")[1]
    assert excerpt.count(" ") == 50  # ...cut to 50 tokens, each starting with a space


def test_llm_score_success_and_disk_cache(llm_env, contexts, monkeypatch):
    with MessagesAPIServer([text_reply(GOOD)]) as server:
        score = scorer_for(server).score(contexts)
        assert (score.complexity, score.consistency, score.scorer) == (1, 4, "llm:claude-test")
        assert score.explanation == "fires on the token <b>"
        [request] = server.requests
        assert request.path == "/v1/messages"
        sent_key = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        assert sent_key == DUMMY_KEY  # the key came from the environment
        assert request.body["model"] == "claude-test" and request.body["system"].startswith("You help interpret")
        assert request.body["messages"][0]["content"].count("Excerpt ") == 7

        # A new scorer reads the cache first: no request, and no key needed.
        monkeypatch.delenv("ANTHROPIC_API_KEY")
        again = scorer_for(server).score(contexts)
        assert again == score and len(server.requests) == 1

    [path] = cache_files(llm_env)
    assert path.parent.name == "claude-test"
    record = json.loads(path.read_text())
    assert record["answer"] == {"explanation": "fires on the token <b>", "consistency": 4, "complexity": 1}
    assert record["input_tokens"] == 321
    for file in llm_env.rglob("*"):
        if file.is_file():
            assert DUMMY_KEY not in file.read_text()


def test_llm_retries_malformed_answers(llm_env, contexts):
    replies = [
        text_reply("The feature seems to fire on the bold tag."),
        text_reply('{"explanation": "bold tags", "consistency": 3, "complexity": 9}'),
        text_reply("```json\n" + GOOD + "\n```"),
    ]
    with MessagesAPIServer(replies) as server:
        score = scorer_for(server, max_attempts=3).score(contexts)
        assert score.complexity == 1 and len(server.requests) == 3
        second = server.requests[1].body["messages"]
        assert [m["role"] for m in second] == ["user", "assistant", "user"]
        assert second[1]["content"] == "The feature seems to fire on the bold tag."
        assert "no JSON object" in second[2]["content"]
        assert "complexity must be an integer from 1 to 5, got 9" in server.requests[2].body["messages"][2]["content"]
    assert json.loads(cache_files(llm_env)[0].read_text())["attempts"] == 3


def test_llm_gives_up_after_max_attempts_without_caching(llm_env, contexts):
    with MessagesAPIServer([text_reply("no idea"), text_reply('{"explanation": ""}')]) as server:
        with pytest.raises(MalformedAnswer, match="after 2 attempts"):
            scorer_for(server, max_attempts=2).score(contexts)
    assert cache_files(llm_env) == []


def test_llm_rate_limit_is_retried_with_back_off(llm_env, contexts):
    with MessagesAPIServer([rate_limit_reply(0.05), text_reply(GOOD)]) as server:
        started = time.perf_counter()
        score = scorer_for(server).score(contexts)
        assert score.complexity == 1 and len(server.requests) == 2
        assert time.perf_counter() - started >= 0.05  # the SDK waited as the server asked
        assert server.requests[1].headers.get("x-stainless-retry-count") == "1"


def test_llm_without_key_or_with_refused_key_is_unavailable(llm_env, contexts, monkeypatch):
    with MessagesAPIServer([Reply(status=401, error_type="authentication_error")]) as server:
        with pytest.raises(LLMUnavailable, match="HTTP 401") as refused:
            scorer_for(server).score(contexts)
        assert DUMMY_KEY not in str(refused.value)
        monkeypatch.delenv("ANTHROPIC_API_KEY")
        with pytest.raises(LLMUnavailable, match="ANTHROPIC_API_KEY is not set") as missing:
            scorer_for(server).score(contexts)
        assert "\n" not in str(missing.value) and len(server.requests) == 1
        with pytest.raises(LLMUnavailable):
            score_features(scorer_for(server), [contexts], progress=False)
        skipped = score_features(scorer_for(server), [contexts], on_llm_error="skip", progress=False)
        assert pd.isna(skipped.loc[0, "complexity"]) and "ANTHROPIC_API_KEY" in skipped.loc[0, "explanation"]
        assert LLMRubricScorer(LLMRubricConfig(base_url=server.base_url), allow_calls=False).cached(contexts) is False
    assert cache_files(llm_env) == []


def test_parse_answer_accepts_only_the_requested_json():
    assert parse_answer('Here: {"explanation": " a  b ", "consistency": 5.0, "complexity": 2}') == {
        "explanation": "a b", "consistency": 5, "complexity": 2,
    }
    for bad in ("", "{not json}", "[1, 2]", '{"explanation": "x", "consistency": true, "complexity": 2}',
                '{"explanation": "x", "consistency": 2, "complexity": 2.5}', '{"consistency": 2, "complexity": 2}'):
        with pytest.raises(MalformedAnswer):
            parse_answer(bad)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def test_complexity_vs_emergence_statistics():
    complexity = pd.Series([1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 3, np.nan])
    steps = pd.Series([2, 8, 16, 64, 32, 256, 512, 1000, 3000, 2000, np.nan, 50])
    result = complexity_vs_emergence(complexity, steps)
    assert result.n == 10  # pairs with a missing value are dropped
    c, s = complexity[:10].to_numpy(float), steps[:10].to_numpy(float)
    assert result.primary.pearson_r == pytest.approx(stats.pearsonr(c, np.log10(1 + s)).statistic)
    assert result.raw_step.pearson_r == pytest.approx(stats.pearsonr(c, s).statistic)
    assert result.primary.spearman_rho == pytest.approx(result.raw_step.spearman_rho) and result.primary.spearman_rho > 0.9
    assert result.per_score["n_features"].tolist() == [2, 2, 2, 2, 2]
    assert result.per_score.set_index("complexity").loc[5, "median_step"] == 2500
    glue = result.glue_numbers(prefix="llm_")
    assert glue["llm_n_features"] == 10 and glue["llm_paper_pearson_r"] == 0.31
    assert glue["llm_median_step_complexity1"] == 5
    with pytest.raises(ParameterError, match="complexity"):
        complexity_vs_emergence([0, 6, 2], [1, 2, 3])

    scores = pd.DataFrame({"feature": [0, 1, 2], "complexity": [1, 2, 3]})
    emergence = pd.DataFrame({"feature": [2, 1, 5], "emergence_step": [64.0, 8.0, 2.0], "category": ["emergent"] * 3})
    assert merge_with_emergence(scores, emergence)["emergence_step"].tolist() == [8.0, 64.0]


def test_scorer_agreement():
    a = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 2, 3]
    same = scorer_agreement(a, a)
    assert same["weighted_kappa"] == pytest.approx(1.0) and same["exact_agreement"] == 1.0
    b = [1, 3, 3, 5, 4, 2, 2, 1, 4, 5, 3, 2]
    from sklearn.metrics import cohen_kappa_score

    assert weighted_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b, weights="quadratic"))
    result = scorer_agreement(pd.Series(a + [np.nan]), pd.Series(b + [4]))
    assert result["n"] == 12 and result["within_one"] == pytest.approx(11 / 12)
    assert result["spearman_rho"] == pytest.approx(stats.spearmanr(a, b).statistic)


def test_api_key_echoed_by_the_endpoint_or_the_model_is_redacted(llm_env, contexts, capsys):
    echo = f"invalid x-api-key {DUMMY_KEY} (key {DUMMY_KEY[:-4]}...)"
    refusals = [Reply(status=401, error_type="authentication_error", message=echo) for _ in range(2)]
    with MessagesAPIServer(refusals) as server:
        with pytest.raises(LLMUnavailable, match="HTTP 401") as refused:
            scorer_for(server).score(contexts)
        skipped = score_features(scorer_for(server), [contexts], on_llm_error="skip", progress=False)
    shown = str(refused.value) + skipped.to_csv()
    assert "invalid x-api-key [redacted API key]" in str(refused.value)
    assert DUMMY_KEY not in shown and DUMMY_KEY[:-4] not in shown
    answer = json.dumps({"explanation": f"my key is {DUMMY_KEY}", "consistency": 3, "complexity": 2})
    with MessagesAPIServer([text_reply(answer)]) as server:
        score = scorer_for(server).score(contexts)
    assert DUMMY_KEY not in score.explanation
    [path] = cache_files(llm_env)
    assert DUMMY_KEY not in path.read_text() and "[redacted API key]" in path.read_text()
    captured = capsys.readouterr()
    assert DUMMY_KEY not in captured.out + captured.err


def test_no_emergent_features_gives_a_sentence_not_nan():
    from crosslib.analyses import complexity

    empty = complexity.score_features(complexity.ContextDepthScorer(complexity.ContextDepthConfig()), [], progress=False)
    emergence = pd.DataFrame({"feature": pd.Series([], dtype=int), "emergence_step": pd.Series([], dtype=float)})
    merged = complexity.merge_with_emergence(empty, emergence)
    result = complexity.complexity_vs_emergence(merged["complexity"], merged["emergence_step"])
    text = complexity.correlation_sentence(result, scorer="offline")
    assert "too few" in text and "nan" not in text
    full = complexity.complexity_vs_emergence([1, 2, 3, 4, 5, 2], [0, 10, 100, 1000, 2000, 50])
    text = complexity.correlation_sentence(full, scorer="offline")
    assert "Pearson r = 0." in text and "nan" not in text
