"""Feature dashboards: top contexts as data, token strings, and self-contained HTML."""

from __future__ import annotations

import re

import numpy as np
import pytest

from crosslib.analyses.dashboards import (
    ContextConfig,
    DashboardConfig,
    TokenDecoder,
    build_dashboard,
    byte_level_to_text,
    feature_contexts,
    index_html,
    top_contexts,
    write_dashboards,
)
from crosslib.config import ParameterError

# A byte-level BPE style vocabulary with characters that must be escaped in HTML.
VOCAB = ["Ġthe", "Ġcat", "Ġ<script>", "Ġ&amp", 'Ġsay"hi"', "Ċ", "Ġ'", "cafÃ©", "Ġdog", "Ġran"] + [f"Ġw{i}" for i in range(10, 40)]


def planted(n_windows: int = 20, context: int = 32):
    rng = np.random.default_rng(0)
    tokens = rng.integers(8, len(VOCAB), size=(n_windows, context))
    acts = np.zeros((n_windows, context), dtype=np.float32)
    acts[3, 20], acts[3, 21] = 5.0, 4.0  # two strong positions in one window
    acts[7, 2] = 3.0
    acts[11, 31] = 2.0
    acts[5, 10] = 0.5
    tokens[3, 20] = 2  # "<script>" is the strongest token
    tokens[3, 19] = 3  # "&amp" just before it
    tokens[3, 18] = 4  # 'say"hi"'
    tokens[3, 17] = 7  # "café" in byte-level form
    tokens[7, 2] = 5  # a line break
    return tokens, acts


def test_top_contexts_find_planted_positions():
    tokens, acts = planted()
    config = ContextConfig(n_examples=3, window_tokens=10, tokens_after=3)
    found = top_contexts(tokens, acts, VOCAB, config=config)
    assert [(c.window, c.position, c.activation) for c in found] == [(3, 20, 5.0), (7, 2, 3.0), (11, 31, 2.0)]
    first = found[0]
    assert (first.start, first.focus, len(first.tokens)) == (14, 6, 10)  # 6 before, 3 after
    assert first.tokens[first.focus] == " <script>"
    assert first.token_ids == tuple(tokens[3, 14:24])
    assert first.activations[first.focus] == 5.0 and first.activations[first.focus + 1] == 4.0
    assert found[1].start == 0 and found[1].tokens[found[1].focus] == "\n"
    assert found[2].start == 22 and found[2].focus == 9  # slides to stay 10 tokens long at the end
    # Without one-per-window the second-strongest position of window 3 comes next.
    every = top_contexts(tokens, acts, VOCAB, config=config.replace(one_per_window=False))
    assert [(c.window, c.position) for c in every] == [(3, 20), (3, 21), (7, 2)]
    # Only active positions count: asking for 10 gives the 4 active windows.
    assert len(top_contexts(tokens, acts, VOCAB, config=ContextConfig(n_examples=10))) == 4


def test_top_contexts_over_snapshots_and_at_one_snapshot():
    tokens, acts = planted()
    by_snapshot = np.stack([acts * 0.1, acts[::-1] * 0, acts], axis=2)  # strongest at snapshot 2
    by_snapshot[9, 9, 1] = 7.0  # snapshot 1 has its own strongest position
    config = ContextConfig(n_examples=2)
    best = top_contexts(tokens, by_snapshot, VOCAB, config=config)
    assert [(c.window, c.position, c.snapshot) for c in best] == [(9, 9, 1), (3, 20, 2)]
    at_zero = top_contexts(tokens, by_snapshot, VOCAB, snapshot=0, config=config)
    assert [(c.window, c.activation, c.snapshot) for c in at_zero] == [(3, pytest.approx(0.5), 0), (7, pytest.approx(0.3), 0)]
    bundle = feature_contexts(tokens, by_snapshot, VOCAB, feature=4, config=config)
    assert bundle.activations.shape == tokens.shape and bundle.activations[9, 9] == 7.0
    with pytest.raises(ParameterError, match="snapshot"):
        top_contexts(tokens, by_snapshot, VOCAB, snapshot=3)


def test_bad_inputs_name_the_parameter():
    tokens, acts = planted()
    with pytest.raises(ParameterError, match="feature_acts"):
        top_contexts(tokens, acts[:, :5], VOCAB)
    bad = acts.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ParameterError, match="feature_acts"):
        top_contexts(tokens, bad, VOCAB)
    with pytest.raises(ParameterError, match="tokens_after"):
        ContextConfig(window_tokens=5, tokens_after=5)


def test_token_strings_from_byte_level_and_real_tokenizer():
    assert byte_level_to_text("Ġthe") == " the"
    assert byte_level_to_text("Ċ") == "\n"
    assert byte_level_to_text("cafÃ©") == "café"
    assert byte_level_to_text("▁word") == " word"
    assert TokenDecoder(None)(7) == "[7]"

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["a <b> & c\nthe cat sat"] * 20, trainer=trainer)
    ids = tokenizer.encode("the <b> & cat\n").ids + [tokenizer.token_to_id("<|endoftext|>")]
    pieces = TokenDecoder(tokenizer).many(ids)
    assert "".join(pieces) == "the <b> & cat\n<|endoftext|>"  # special tokens kept, Ġ → space


def test_dashboard_html_is_escaped_highlighted_and_offline(tmp_path):
    tokens, acts = planted()
    by_snapshot = np.stack([acts * 0.5, acts], axis=2)
    dashboard = build_dashboard(
        12, tokens, by_snapshot, VOCAB,
        snapshots=[0], steps=[0, 64], decoder_norms=[0.2, 1.3], highlight_step=64,
        facts={"category": "emergent", "explanation": "fires on <script> & co"},
        config=DashboardConfig(contexts=ContextConfig(n_examples=4)),
    )
    card = dashboard.to_html()
    # Escaped tokens: the text never becomes markup.
    assert "&lt;script&gt;" in card and "<script" not in card
    assert "&amp;amp" in card and "say&quot;hi&quot;" in card
    assert "café" in card and "⏎" in card
    assert "fires on &lt;script&gt; &amp; co" in card
    # The strongest token is outlined and fully coloured; weaker ones are lighter.
    max_spans = re.findall(r'<span class="cl-tok cl-max" style="background:rgba\(255,140,0,([0-9.]+)\)"[^>]*>([^<]*)</span>', card)
    assert max_spans[0] == ("1.00", " &lt;script&gt;")
    assert 'style="background:rgba(255,140,0,0.80)"' in card  # 4.0 / 5.0 next to it
    assert "Top contexts — max over snapshots" in card and "Top contexts — at step 0" in card
    assert card.count("<svg") == 2 and "<polyline" in card and "stroke-dasharray" in card
    assert dashboard._repr_html_() == card

    other = build_dashboard(3, tokens, acts * 2, VOCAB, facts={"category": "initialisation"})
    page = index_html([dashboard, other], "Demo <features>", full_page=True)
    assert page.startswith("<!DOCTYPE html>") and "Demo &lt;features&gt;" in page
    assert 'class="cl-search"' in page and '<option value="emergent">' in page
    assert page.count('class="cl-dash cl-card"') == 2
    for html_text in (card, page, dashboard.page_html(), index_html([dashboard])):
        assert not re.search(r"https?://", html_text)  # nothing to fetch: renders offline
        assert "<link" not in html_text and "src=" not in html_text

    index = write_dashboards([dashboard, other], tmp_path / "site", title="Demo <features>")
    assert index.read_text() == page
    assert (tmp_path / "site" / "feature_12.html").read_text() == dashboard.page_html()


def test_never_active_feature_renders():
    tokens, acts = planted()
    dashboard = build_dashboard(0, tokens, np.zeros_like(acts), VOCAB)
    assert dashboard.sections[0][1] == [] and "(never active)" in dashboard.to_html()
    assert dashboard.active_fraction == 0.0
