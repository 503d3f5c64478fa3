"""Learning-dynamics metrics per snapshot: the statistical-learning phase and induction.

For each snapshot we measure, on held-out text:

* ``loss`` — next-token cross-entropy (nats);
* ``unigram_kl`` — KL(corpus unigram ‖ the model's next-token distribution averaged over
  positions): how well the model has learnt token frequencies;
* ``unigram_kl_position`` and ``bigram_kl`` — the mean over positions of KL(unigram ‖ model) and
  KL(corpus bigram(· | previous token) ‖ model): how closely the model's predictions *are* a
  unigram or a bigram model. Each has a minimum when the model passes through that stage;
* ``induction_score`` — loss on the first copy minus loss on the second copy of sequences of
  random (frequent) tokens repeated twice, in nats: large only once an induction head exists;
* ``induction_text_score`` — the same for held-out text repeated twice: whether the copying
  carries over to natural text (the first copy is then predictable from n-grams too, so this
  gain is smaller).

The corpus n-gram models are estimated on the training split, with the bigram interpolated with
the unigram (Dirichlet smoothing) so that unseen pairs keep probability.

Memory is bounded by design: the model's hidden states (small) are projected onto the vocabulary in
blocks of at most `BLOCK_ELEMENTS` (position × vocabulary) numbers, and the bigram KL is computed from
the sparse bigram counts, never from dense [position, vocabulary] bigram rows. With smoothed bigram
p(v | a) = (c(a, v) + s u(v)) / (n(a) + s), its KL to the model's q splits into

    Σ_v p log p  (one number per previous token a, from the nonzero counts and Σ_v u log u)
  − (Σ_{v: c(a,v)>0} c(a, v) log q(v) + s Σ_v u(v) log q(v)) / (n(a) + s),

so each position costs a gather over its context's nonzero counts and one product with u.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Annotated, Any, Iterator

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from crosslib.progress import progress as tqdm

from crosslib.artifacts import atomic_write_text, build_artifact, sha256_bytes
from crosslib.config import Config, fraction, optional, positive, require
from crosslib.models.snapshots import load_config, load_snapshot, suite_fingerprint
from crosslib.models.suite import iter_steps, suite_token_streams, token_windows
from crosslib.text.corpus import CorpusConfig

# Largest [position, vocabulary] block of log-probabilities held at once (32 MiB in float32): peak
# memory does not grow with vocabulary × batch (at Pythia's 50k vocabulary, 166 positions per block).
BLOCK_ELEMENTS = 1 << 23
# Token pairs counted per sparse block when fitting the bigram model.
PAIRS_PER_BLOCK = 1 << 22


@dataclasses.dataclass(frozen=True)
class DynamicsConfig(Config):
    n_windows: Annotated[int, positive()] = 200  # held-out windows for loss and KLs
    context_length: Annotated[int | None, optional(positive())] = None  # None: the model's context, at most 128
    induction_sequences: Annotated[int, positive()] = 100
    # random tokens, then the same again; None: context // 4
    induction_half_length: Annotated[int | None, optional(positive())] = None
    # Random tokens are drawn from this most frequent share of the vocabulary: the 256 most frequent of
    # the tiny suite's 4096, the pool its training mix repeats (SuiteConfig.repeat_vocab).
    frequent_fraction: Annotated[float, fraction()] = 0.0625
    bigram_smoothing: Annotated[float, positive()] = 10.0
    batch_size: Annotated[int, positive()] = 50
    seed: int = 0


@dataclasses.dataclass
class NgramModel:
    """Unigram and smoothed bigram distributions of a token stream."""

    unigram: Float[np.ndarray, " vocab"]
    bigram_counts: Any  # scipy.sparse CSR [previous, next]
    smoothing: float

    @classmethod
    def fit(cls, tokens: np.ndarray, vocab_size: int, smoothing: float) -> "NgramModel":
        import scipy.sparse as sp

        tokens = np.asarray(tokens)
        counts = np.bincount(tokens.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0  # add-one: no zero
        pairs = sp.csr_matrix((vocab_size, vocab_size), dtype=np.float64)
        for start in range(0, max(0, len(tokens) - 1), PAIRS_PER_BLOCK):  # bounded memory on long streams
            block = tokens[start : start + PAIRS_PER_BLOCK + 1].astype(np.int64)
            pairs = pairs + sp.csr_matrix((np.ones(len(block) - 1), (block[:-1], block[1:])),
                                          shape=(vocab_size, vocab_size))
        pairs.sum_duplicates()
        return cls(counts / counts.sum(), pairs.tocsr(), smoothing)

    @functools.cached_property
    def context_totals(self) -> Float[np.ndarray, " vocab"]:
        """n(a): how often each token is followed by another in the training stream."""
        return np.asarray(self.bigram_counts.sum(axis=1)).ravel()

    @functools.cached_property
    def bigram_neg_entropy(self) -> Float[np.ndarray, " vocab"]:
        """Σ_v p(v | a) log p(v | a) for every previous token a, from the nonzero counts only."""
        u, s, counts = self.unigram, self.smoothing, self.bigram_counts
        alpha = s / (self.context_totals + s)  # weight of the unigram in p(· | a)
        beta = 1.0 / (self.context_totals + s)  # weight of the counts
        rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
        cols = counts.indices
        p_nonzero = beta[rows] * counts.data + alpha[rows] * u[cols]
        vocab = len(u)
        nonzero_term = np.bincount(rows, p_nonzero * np.log(p_nonzero), minlength=vocab)
        u_nonzero = np.bincount(rows, u[cols], minlength=vocab)
        u_log_u_nonzero = np.bincount(rows, u[cols] * np.log(u[cols]), minlength=vocab)
        u_log_u = float((u * np.log(u)).sum())
        # the zero-count entries are alpha·u(v): Σ alpha u (log alpha + log u) over them
        return nonzero_term + alpha * ((1.0 - u_nonzero) * np.log(alpha) + (u_log_u - u_log_u_nonzero))

    def bigram(self, previous: Int[np.ndarray, " position"]) -> Float[np.ndarray, "position vocab"]:
        """Dense rows p(· | previous) (for small vocabularies and tests; the metrics never build them)."""
        rows = np.asarray(self.bigram_counts[previous].todense())
        return (rows + self.smoothing * self.unigram) / (rows.sum(axis=1, keepdims=True) + self.smoothing)

    def bigram_probability(self, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        """p(following | previous), elementwise, from the sparse counts."""
        pair_counts = np.asarray(self.bigram_counts[previous, following]).ravel()
        return (pair_counts + self.smoothing * self.unigram[following]) / (self.context_totals[previous] + self.smoothing)

    def cross_entropy(self, tokens: np.ndarray) -> tuple[float, float]:
        """(unigram, bigram) cross-entropy in nats per token on `tokens`."""
        tokens = np.asarray(tokens, dtype=np.int64)
        unigram_ce = float(-np.log(self.unigram[tokens[1:]]).mean())
        total = 0.0
        for start in range(0, len(tokens) - 1, PAIRS_PER_BLOCK):
            block = tokens[start : start + PAIRS_PER_BLOCK + 1]
            total += float(np.log(self.bigram_probability(block[:-1], block[1:])).sum())
        return unigram_ce, -total / max(1, len(tokens) - 1)


def induction_sequences(unigram: np.ndarray, config: DynamicsConfig) -> Int[Tensor, "sequence position"]:
    """Random sequences of frequent tokens, each followed by an exact repeat of itself."""
    rng = np.random.default_rng(config.seed)
    frequent = np.argsort(-unigram)[: max(2, int(config.frequent_fraction * len(unigram)))]
    first = rng.choice(frequent, size=(config.induction_sequences, config.induction_half_length))
    return torch.from_numpy(np.concatenate([first, first], axis=1)).long()


def _kl(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    return (p * (log_p - log_q)).sum(-1)


def next_token_log_probs(model, input_ids: Int[Tensor, "window position"], block_elements: int = BLOCK_ELEMENTS
                         ) -> Iterator[tuple[int, Float[Tensor, "row vocab"]]]:
    """log q(next token) at every position but the last, in blocks of rows (window, position) order.

    Yields (first row, log-probabilities [rows, vocab]) with rows × vocab ≤ `block_elements`: the
    hidden states are projected onto the vocabulary one block at a time, so no [window, position,
    vocab] tensor is ever built. A module without an output embedding (a bare function of the ids
    returning `.logits`) has its logits cut into the same blocks.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        hidden = model.base_model(input_ids=input_ids).last_hidden_state[:, :-1]
        rows = rearrange(hidden, "window position d -> (window position) d")
        vocab = int(head.weight.shape[0])
    else:
        logits = model(input_ids=input_ids).logits[:, :-1]
        rows = rearrange(logits, "window position vocab -> (window position) vocab")
        vocab = int(rows.shape[-1])
    per_block = max(1, block_elements // vocab)
    for start in range(0, rows.shape[0], per_block):
        block = rows[start : start + per_block]
        yield start, (head(block) if head is not None else block).float().log_softmax(-1)


@torch.no_grad()
def snapshot_metrics(model, windows: Tensor, ngrams: NgramModel, repeats: Tensor, batch_size: int,
                     text_repeats: Tensor | None = None, *, block_elements: int = BLOCK_ELEMENTS) -> dict[str, float]:
    """The metrics above for one model on held-out `windows` and induction `repeats`.

    Peak memory is one batch's hidden states plus one [rows, vocab] block (`block_elements`).
    """
    unigram = torch.from_numpy(ngrams.unigram).float()
    u_log_u = float((ngrams.unigram * np.log(ngrams.unigram)).sum())
    neg_entropy = torch.from_numpy(ngrams.bigram_neg_entropy)
    totals = torch.from_numpy(ngrams.context_totals)
    counts, smoothing = ngrams.bigram_counts, ngrams.smoothing
    total_loss = total_kl_uni = total_kl_bi = 0.0
    n_positions = 0
    mean_probs = torch.zeros_like(unigram, dtype=torch.float64)
    for batch in windows.split(batch_size):
        previous_all = batch[:, :-1].reshape(-1).cpu()
        targets_all = batch[:, 1:].reshape(-1)
        for start, log_q in next_token_log_probs(model, batch, block_elements):
            rows = log_q.shape[0]
            targets, previous = targets_all[start : start + rows], previous_all[start : start + rows]
            total_loss -= log_q.gather(-1, targets[:, None]).sum().item()
            mean_probs += log_q.exp().sum(0).double().cpu()
            u_log_q = (log_q @ unigram.to(log_q.device)).double().cpu()  # Σ_v u(v) log q(v), per row
            total_kl_uni += (u_log_u - u_log_q).sum().item()
            context = counts[previous.numpy()]  # sparse [rows, vocab] counts c(a, ·)
            row_of = torch.from_numpy(np.repeat(np.arange(rows), np.diff(context.indptr)))
            col_of = torch.from_numpy(context.indices.astype(np.int64))
            log_q_nonzero = log_q.cpu()[row_of, col_of].double()
            count_log_q = torch.zeros(rows, dtype=torch.float64).index_add_(
                0, row_of, torch.from_numpy(context.data) * log_q_nonzero)
            cross = (count_log_q + smoothing * u_log_q) / (totals[previous] + smoothing)
            total_kl_bi += (neg_entropy[previous] - cross).sum().item()
        n_positions += targets_all.numel()
    mean_probs /= n_positions
    first_copy, second_copy = _copy_losses(model, repeats, batch_size, block_elements)
    text_first, text_second = (_copy_losses(model, text_repeats, batch_size, block_elements)
                               if text_repeats is not None else (float("nan"), float("nan")))
    return {
        "loss": total_loss / n_positions,
        "unigram_kl": _kl(unigram.double(), unigram.double().log(), mean_probs.clamp_min(1e-12).log()).item(),
        "unigram_kl_position": total_kl_uni / n_positions,
        "bigram_kl": total_kl_bi / n_positions,
        "induction_first_copy_loss": first_copy,
        "induction_second_copy_loss": second_copy,
        "induction_score": first_copy - second_copy,
        "induction_text_score": text_first - text_second,
    }


def _copy_losses(model, repeats: Tensor, batch_size: int, block_elements: int = BLOCK_ELEMENTS) -> tuple[float, float]:
    """Mean loss on the first and on the second copy of sequences [sequence, 2 × half] that repeat once."""
    half = repeats.shape[1] // 2
    token_losses = []
    for batch in repeats.split(batch_size):
        targets = batch[:, 1:].reshape(-1)
        losses = torch.empty(targets.numel())
        for start, log_q in next_token_log_probs(model, batch, block_elements):
            rows = log_q.shape[0]
            losses[start : start + rows] = -log_q.gather(-1, targets[start : start + rows, None])[:, 0].cpu()
        token_losses.append(rearrange(losses, "(sequence position) -> sequence position", sequence=batch.shape[0]))
    token_losses = torch.cat(token_losses)  # [sequence, position]; position p predicts token p+1
    # the first token of the second copy is not predictable from the first copy: skip it
    return token_losses[:, : half - 1].mean().item(), token_losses[:, half:].mean().item()


@dataclasses.dataclass(frozen=True)
class DynamicsKey(Config):
    """What determines a dynamics table: the weights, the metric settings and the token streams."""

    suite: str
    dynamics: DynamicsConfig
    heldout: str
    train: str


def learning_dynamics(
    suite: str | os.PathLike,
    steps: list[int] | None = None,
    config: DynamicsConfig = DynamicsConfig(),
    *,
    corpus: CorpusConfig | str | dict[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """One row of metrics per snapshot (cached by content), plus corpus n-gram cross-entropies.

    The corpus defaults to the crosslib suite's own (for a hub suite: Brown, tokenized with the
    suite's tokenizer); the n-gram models are fitted on its train split.
    """
    steps = list(iter_steps(suite, steps))
    streams = suite_token_streams(suite, corpus)
    heldout, train = streams["heldout"], streams["train"]
    require(len(steps) > 0, "steps", steps, "at least one step of the suite")

    key = DynamicsKey(suite_fingerprint(suite, steps), config,
                      sha256_bytes(np.ascontiguousarray(heldout).tobytes()),
                      sha256_bytes(np.ascontiguousarray(train).tobytes()))

    def build(folder):
        model_config = load_config(suite, steps[0])  # shapes only: no weights loaded
        vocab = int(model_config.vocab_size)
        context = config.context_length or min(128, int(model_config.max_position_embeddings))
        half = config.induction_half_length or context // 4
        require(2 * half <= context, "induction_half_length", half, f"at most half the context ({context // 2})")
        ngrams = NgramModel.fit(train, vocab, config.bigram_smoothing)
        unigram_ce, bigram_ce = ngrams.cross_entropy(heldout)
        windows = torch.from_numpy(token_windows(heldout, config.n_windows, context, config.seed))
        repeats = induction_sequences(ngrams.unigram, config.replace(induction_half_length=half))
        text = torch.from_numpy(token_windows(heldout, config.induction_sequences, half, config.seed + 1))
        text_repeats = torch.cat([text, text], dim=1).to(device)
        rows = []
        for step in tqdm(steps, desc="learning dynamics", disable=not progress):
            model, _ = load_snapshot(suite, step, device=device, with_tokenizer=False)
            rows.append({"step": step, **snapshot_metrics(model, windows.to(device), ngrams, repeats.to(device),
                                                         config.batch_size, text_repeats),
                         "unigram_ce": unigram_ce, "bigram_ce": bigram_ce})
        atomic_write_text(folder / "metrics.csv", pd.DataFrame(rows).to_csv(index=False))

    folder = build_artifact("dynamics", key, build)
    return pd.read_csv(folder / "metrics.csv")


def _saturation_step(m: pd.DataFrame, column: str, share: float) -> int:
    """The first snapshot at which `column` has made `share` of its whole fall (max to min)."""
    values = m[column].to_numpy()
    target = values.max() - share * (values.max() - values.min())
    return int(m["step"].iloc[int(np.flatnonzero(values <= target)[0])])


# A snapshot "has" induction when the second copy of a random sequence costs this many nats less than
# the first: about a fifth of the ~5.5 nats a random token of the 256-token pool costs, far above the
# ±0.3 nats a model without induction shows (chapter 1's robustness grid).
INDUCTION_ON_NATS = 1.0


def phase_summary(metrics: pd.DataFrame, saturation: float = 0.95) -> dict[str, Any]:
    """Landmarks of the learning curves: when each n-gram fit is best and when it saturates, when
    induction turns on.

    A fit "saturates" at the first snapshot where its KL has made `saturation` of its whole fall.
    Induction "turns on" at the first snapshot whose score exceeds `INDUCTION_ON_NATS` (None: never);
    chapter 1's robustness grid uses the same landmark.
    """
    m = metrics.sort_values("step").reset_index(drop=True)
    final = m.iloc[-1]
    below_bigram = m[m["loss"] < m["bigram_ce"]]
    return {
        "unigram_fit_step": int(m.loc[m["unigram_kl_position"].idxmin(), "step"]),
        "bigram_fit_step": int(m.loc[m["bigram_kl"].idxmin(), "step"]),
        "unigram_saturation_step": _saturation_step(m, "unigram_kl", saturation),
        "bigram_saturation_step": _saturation_step(m, "bigram_kl", saturation),
        "loss_below_bigram_step": int(below_bigram["step"].iloc[0]) if len(below_bigram) else None,
        "induction_step": next((int(step) for step, score in zip(m["step"], m["induction_score"])
                                if score > INDUCTION_ON_NATS), None),
        "final_loss": float(final["loss"]),
        "bigram_ce": float(final["bigram_ce"]),
        "unigram_ce": float(final["unigram_ce"]),
        "final_induction_score": float(final["induction_score"]),
        "unigram_kl_step0": float(m["unigram_kl"].iloc[0]),
        "unigram_kl_final": float(final["unigram_kl"]),
    }
