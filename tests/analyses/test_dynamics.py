"""Learning-dynamics metrics: n-gram models, KLs and the induction score on real tiny models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from crosslib.analyses.dynamics import DynamicsConfig, NgramModel, learning_dynamics, phase_summary, snapshot_metrics


def test_ngram_model_matches_direct_counts():
    tokens = np.array([0, 1, 2, 0, 1, 3, 0, 1, 2, 2])
    ngrams = NgramModel.fit(tokens, vocab_size=5, smoothing=2.0)
    unigram = (np.bincount(tokens, minlength=5) + 1) / (len(tokens) + 5)
    np.testing.assert_allclose(ngrams.unigram, unigram)
    rows = ngrams.bigram(np.array([0, 4]))
    np.testing.assert_allclose(rows.sum(1), 1.0)
    # After 0 the corpus always has 1 (3 times): (3 + 2 * p(1)) / (3 + 2)
    assert rows[0, 1] == pytest.approx((3 + 2 * unigram[1]) / 5)
    np.testing.assert_allclose(rows[1], unigram)  # an unseen context falls back on the unigram
    unigram_ce, bigram_ce = ngrams.cross_entropy(tokens)
    assert unigram_ce == pytest.approx(-np.log(unigram[tokens[1:]]).mean())
    assert bigram_ce < unigram_ce


class BigramLookup(torch.nn.Module):
    """A 'language model' whose logits are log p_bigram(· | current token): the ideal bigram model."""

    def __init__(self, ngrams: NgramModel):
        super().__init__()
        self.table = torch.from_numpy(ngrams.bigram(np.arange(len(ngrams.unigram)))).float().log()

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids]})


def test_metrics_of_an_exact_bigram_model():
    rng = np.random.default_rng(0)
    successors = rng.integers(0, 20, size=(20, 2))  # a Markov chain: each token has 2 possible successors
    tokens = [0]
    for _ in range(4999):
        tokens.append(successors[tokens[-1], rng.integers(2)])
    tokens = np.array(tokens)
    ngrams = NgramModel.fit(tokens, 20, smoothing=1.0)
    windows = torch.from_numpy(tokens[:2000].reshape(50, 40)).long()
    repeats = torch.from_numpy(np.tile(rng.integers(0, 20, size=(10, 8)), 2)).long()
    text_repeats = torch.cat([windows[:10, :8]] * 2, dim=1)
    metrics = snapshot_metrics(BigramLookup(ngrams), windows, ngrams, repeats, batch_size=16, text_repeats=text_repeats)
    assert metrics["bigram_kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["unigram_kl_position"] > 1.0
    assert abs(metrics["induction_score"]) < 0.3  # a bigram model cannot copy
    assert abs(metrics["induction_text_score"]) < 0.3
    # A model that copies the token `half` places back scores the whole first-copy loss on both
    copier = CopyBack(half=8, vocab=20)
    copied = snapshot_metrics(copier, windows, ngrams, repeats, batch_size=16, text_repeats=text_repeats)
    assert copied["induction_second_copy_loss"] == pytest.approx(0.0, abs=1e-3)
    assert copied["induction_score"] == pytest.approx(copied["induction_first_copy_loss"], abs=1e-3)
    assert copied["induction_text_score"] == pytest.approx(np.log(20), abs=1e-3)  # uniform on the first copy


class CopyBack(torch.nn.Module):
    """Predicts, from position `half` on, the token that followed `half` positions earlier (with
    certainty); uniform before that."""

    def __init__(self, half: int, vocab: int):
        super().__init__()
        self.half, self.vocab = half, vocab

    def forward(self, input_ids):
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab)
        for position in range(self.half - 1, length - 1):
            logits[:, position] = torch.nn.functional.one_hot(input_ids[:, position + 1 - self.half], self.vocab) * 50.0
        return type("Out", (), {"logits": logits})


def test_learning_dynamics_on_micro_suite(micro_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSLIB_DATA", str(tmp_path))
    config = DynamicsConfig(n_windows=20, context_length=16, induction_sequences=8, induction_half_length=6,
                            batch_size=10)
    metrics = learning_dynamics(micro_suite, config=config, progress=False)
    assert list(metrics["step"]) == [0, 1, 2, 4, 8, 12]
    vocab = 300
    assert metrics["loss"].iloc[0] == pytest.approx(np.log(vocab), abs=0.3)  # random init ≈ uniform
    assert metrics["loss"].iloc[-1] < metrics["loss"].iloc[0] - 0.5
    assert metrics["unigram_kl"].iloc[-1] < metrics["unigram_kl"].iloc[0]
    assert (metrics["bigram_ce"] < metrics["unigram_ce"]).all()
    again = learning_dynamics(micro_suite, config=config, progress=False)  # cached, identical
    pd.testing.assert_frame_equal(metrics, again)


def test_phase_summary_landmarks():
    table = pd.DataFrame({
        "step": [0, 16, 64, 256, 1000],
        "loss": [8.3, 6.0, 5.0, 4.5, 4.0],
        "unigram_kl": [3.0, 0.5, 0.2, 0.1, 0.1],
        "unigram_kl_position": [3.0, 1.0, 0.9, 1.5, 2.0],
        "bigram_kl": [4.0, 2.0, 1.0, 0.8, 1.2],
        "induction_score": [0.0, 0.0, 0.1, 1.5, 2.0],
        "bigram_ce": [4.8] * 5,
        "unigram_ce": [6.5] * 5,
    })
    summary = phase_summary(table)
    assert summary["unigram_fit_step"] == 64 and summary["bigram_fit_step"] == 256
    # 95% of the fall: unigram KL 3.0 → 0.1 reaches 0.245 at step 64; bigram KL 4.0 → 0.8 reaches 0.96 at 256
    assert summary["unigram_saturation_step"] == 64 and summary["bigram_saturation_step"] == 256
    assert phase_summary(table, saturation=0.5)["unigram_saturation_step"] == 16
    assert summary["loss_below_bigram_step"] == 256
    assert summary["induction_step"] == 256  # the first score above INDUCTION_ON_NATS (1 nat)
    table["induction_score"] = [0.0, 0.0, 0.1, 0.9, 2.0]  # 0.9 at step 256 is not yet on
    assert phase_summary(table)["induction_step"] == 1000
    table["induction_score"] = [0.0, 0.0, 1.0, 0.2, 0.1]  # exactly 1 nat is not above it
    assert phase_summary(table)["induction_step"] is None


def dense_reference_metrics(model, windows, ngrams, repeats) -> dict[str, float]:
    """The metrics computed the direct way: full [window, position, vocab] logits and dense bigram rows."""
    with torch.no_grad():
        log_q = model(input_ids=windows).logits[:, :-1].double().log_softmax(-1)
        u = torch.from_numpy(ngrams.unigram)
        bigram = torch.from_numpy(ngrams.bigram(windows[:, :-1].reshape(-1).numpy())).reshape(log_q.shape)
        mean_q = log_q.exp().mean((0, 1))
        half = repeats.shape[1] // 2
        copy_losses = -model(input_ids=repeats).logits[:, :-1].double().log_softmax(-1).gather(
            -1, repeats[:, 1:, None])[..., 0]
    return {
        "loss": -log_q.gather(-1, windows[:, 1:, None]).mean().item(),
        "unigram_kl": (u * (u.log() - mean_q.log())).sum().item(),
        "unigram_kl_position": (u * (u.log() - log_q)).sum(-1).mean().item(),
        "bigram_kl": (bigram * (bigram.log() - log_q)).sum(-1).mean().item(),
        "induction_first_copy_loss": copy_losses[:, : half - 1].mean().item(),
        "induction_second_copy_loss": copy_losses[:, half:].mean().item(),
    }


@pytest.mark.parametrize("block_elements", [1, 97, 1 << 23])
def test_streamed_metrics_equal_dense_ones_on_a_small_vocabulary(block_elements):
    """Blocks of rows (down to one position at a time) and sparse bigram counts give the dense result."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    vocab = 37
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=32,
                                             max_position_embeddings=32)).eval()
    rng = np.random.default_rng(0)
    train = rng.integers(0, vocab, size=3000) % rng.integers(5, vocab, size=3000)  # skewed, with unseen pairs
    ngrams = NgramModel.fit(train, vocab, smoothing=3.0)
    assert ngrams.bigram_counts.nnz < vocab * vocab  # some pairs are never seen: the smoothing matters
    windows = torch.from_numpy(rng.integers(0, vocab, size=(7, 12))).long()
    repeats = torch.from_numpy(np.tile(rng.integers(0, vocab, size=(5, 4)), 2)).long()
    streamed = snapshot_metrics(model, windows, ngrams, repeats, batch_size=3, block_elements=block_elements)
    dense = dense_reference_metrics(model, windows, ngrams, repeats)
    for name, value in dense.items():
        assert streamed[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_bigram_entropy_and_cross_entropy_from_sparse_counts():
    tokens = np.array([0, 1, 2, 0, 1, 3, 0, 1, 2, 2])
    ngrams = NgramModel.fit(tokens, vocab_size=5, smoothing=2.0)
    dense = ngrams.bigram(np.arange(5))
    np.testing.assert_allclose(ngrams.bigram_neg_entropy, (dense * np.log(dense)).sum(1), rtol=1e-12)
    direct = -np.log(dense[tokens[:-1], tokens[1:]]).mean()
    assert ngrams.cross_entropy(tokens)[1] == pytest.approx(direct, rel=1e-12)


def test_progress_bars_redraw_rarely_off_a_terminal():
    """A kernel's stderr is not a terminal: 2000 updates must not become 2000 stored redraws."""
    import io

    from crosslib.progress import progress

    stream = io.StringIO()
    for _ in progress(range(2000), file=stream, desc="work", mininterval=0):
        pass
    redraws = [part for part in stream.getvalue().split("\r") if part.strip()]
    assert 1 <= len(redraws) <= 3, redraws
    assert "2000/2000" in redraws[-1]
