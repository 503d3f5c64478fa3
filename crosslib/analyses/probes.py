"""Is a bigger decoder norm a more linearly readable feature? (paper Fig. 5a; the book's Methods
page, section Emergence, "Decoder norm and separability").

`crosslib.analyses.emergence` reads a feature's strength at snapshot θ from its decoder norm ‖W_D,i^θ‖.
This module checks that reading against the model's raw activations: for a sample of features it
fits a logistic-regression probe per feature and snapshot on the positions where the feature is
active or not, and correlates the probes' held-out AUC with the decoder norms.

- `separability`: the probes and their AUC table, with pooled and within-feature correlations
  against the decoder norm (`SeparabilityResult`);
- `fit_logistic_probes`: the probe itself, an L2-regularised logistic regression fitted by L-BFGS
  with a hand-written gradient, all snapshots of a feature in one run; `auc_per_row` scores it;
- `within_feature_rank_correlation` / `separability_test`: does a feature's AUC rise where its own
  decoder norm rises, with a permutation p-value that keeps the shared trend over training.

Sample sizes and probe settings live in `SeparabilityConfig`; bad values raise `ParameterError`
naming the parameter. benchmarks/bench_probe.py measures the probe against scikit-learn's
`LogisticRegression` on the chapter's sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Annotated, Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float
from scipy import stats

from crosslib.analyses.emergence import Norms, check_norms, relative_strength, to_numpy, validate_steps
from crosslib.config import Config, ParameterError, finite, fraction, integer, positive, require
from crosslib.progress import progress as tqdm
from crosslib.statistics import correlate


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SeparabilityConfig(Config):
    """Sample sizes and probe settings for `separability`.

    n_features: how many features to probe (drawn at random among those active often enough).
    samples_per_class: up to this many active and as many inactive positions per feature
        (balanced classes, so AUC and the probe are not dominated by the inactive majority).
    min_active: a feature needs at least this many active (and inactive) positions to be probed.
    activation_threshold: a position is "active" for a feature when its activation > this.
    train_fraction: share of each feature's positions used to fit the probe; AUC is measured
        on the rest.
    l2: L2 penalty on the probe weights (inputs are standardised, the loss is a mean).
    max_iter: L-BFGS iterations per probe fit.
    seed: seeds the feature sample and the position sample.
    """

    n_features: Annotated[int, integer(1)] = 32
    samples_per_class: Annotated[int, integer(1)] = 200
    min_active: Annotated[int, integer(2, allowed="an integer >= 2 (one per split)")] = 20
    activation_threshold: Annotated[float, finite()] = 0.0
    train_fraction: Annotated[float, fraction()] = 0.5
    l2: Annotated[float, positive()] = 1e-2
    max_iter: Annotated[int, integer(1)] = 100
    seed: Annotated[int, integer()] = 0



# --------------------------------------------------------------------------------------------
# Decoder norm as feature strength: linear separability of a feature's positions
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SeparabilityResult:
    """Probe AUCs per (feature, snapshot) and how they correlate with the decoder norm.

    table: columns feature, snapshot (index), step, auc (held-out), decoder_norm,
        strength (ρ), n_train, n_test.
    pearson_r/p, spearman_r/p: correlation of auc with decoder_norm pooled over all rows
        (features × snapshots), as in the paper's claim "decoder norm measures strength".
    strength_spearman_r: the same pooled Spearman with ρ instead of the raw norm (removes the
        features' different overall scales).
    within_feature_spearman: mean over features of the Spearman correlation across snapshots
        (does a feature become more separable where its own decoder grows?); NaN-skipping.
    """

    table: pd.DataFrame
    pearson_r: float
    pearson_p: float
    spearman_r: float
    spearman_p: float
    strength_spearman_r: float
    within_feature_spearman: float

    def summary(self) -> dict[str, float]:
        return {
            "n_features": float(self.table["feature"].nunique()),
            "mean_auc": float(self.table["auc"].mean()),
            "pearson_r": self.pearson_r,
            "pearson_p": self.pearson_p,
            "spearman_r": self.spearman_r,
            "spearman_p": self.spearman_p,
            "strength_spearman_r": self.strength_spearman_r,
            "within_feature_spearman": self.within_feature_spearman,
        }


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread for a while: the probes are tiny, and on a busy CPU thread
    hand-offs made each L-BFGS step ~100× slower than the arithmetic itself."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _take_rows(activations: Any, rows: np.ndarray) -> Float[torch.Tensor, "sample snapshot d_model"]:
    """Gather rows from a tensor or (memory-mapped) array without loading the rest."""
    order = np.argsort(rows)
    if isinstance(activations, torch.Tensor):
        taken = activations[torch.as_tensor(rows[order])]
    else:
        taken = torch.as_tensor(np.asarray(activations[rows[order]]))
    restored = torch.empty_like(taken)
    restored[torch.as_tensor(order)] = taken
    return restored.to(torch.float32)


def fit_logistic_probes(
    train_inputs: Float[torch.Tensor, "probe sample d_model"],
    train_labels: Float[torch.Tensor, "probe sample"],
    l2: float = 1e-2,
    max_iter: int = 100,
) -> tuple[Float[torch.Tensor, "probe d_model"], Float[torch.Tensor, "probe"], torch.Tensor, torch.Tensor]:
    """Fit one L2-regularised logistic regression per probe, all probes in one L-BFGS run.

    Inputs are standardised per probe and dimension with the training statistics (so one l2
    suits every snapshot's scale). The probes' losses are summed; they share no parameters,
    so the joint minimum is each probe's own minimum. Returns weights, biases and the
    standardisation (mean, std) to apply to held-out inputs.
    """
    mean = train_inputs.mean(dim=1, keepdim=True)
    std = train_inputs.std(dim=1, keepdim=True) + 1e-6
    standardised = (train_inputs - mean) / std
    n_probes, n_samples, d_model = train_inputs.shape
    weight = torch.zeros(n_probes, d_model)
    bias = torch.zeros(n_probes)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        # The logistic loss has a closed-form gradient; writing it out is ~2× faster than autograd.
        with torch.no_grad():
            logits = einsum(standardised, weight, "probe sample d_model, probe d_model -> probe sample") + bias[:, None]
            loss_per_probe = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, train_labels, reduction="none"
            ).mean(dim=1)
            residual = (torch.sigmoid(logits) - train_labels) / n_samples
            weight.grad = einsum(standardised, residual, "probe sample d_model, probe sample -> probe d_model") + l2 * weight
            bias.grad = residual.sum(dim=1)
            return loss_per_probe.sum() + 0.5 * l2 * weight.pow(2).sum()

    optimiser.step(closure)
    return weight.detach(), bias.detach(), mean, std


def auc_per_row(
    scores: Float[np.ndarray, "probe sample"], labels: Bool[np.ndarray, "probe sample"]
) -> Float[np.ndarray, "probe"]:
    """Area under the ROC curve for each row (Mann–Whitney U / (n_pos · n_neg), ties count half)."""
    ranks = stats.rankdata(scores, axis=1)
    n_pos = labels.sum(axis=1)
    n_neg = labels.shape[1] - n_pos
    rank_sum = np.where(labels, ranks, 0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def separability(
    activations: Float[torch.Tensor, "row snapshot d_model"] | Float[np.ndarray, "row snapshot d_model"],
    feature_activations: Float[torch.Tensor, "row feature"] | Float[np.ndarray, "row feature"],
    decoder_norms: Norms,
    steps: Sequence[int],
    config: SeparabilityConfig = SeparabilityConfig(),
    feature_ids: Sequence[int] | np.ndarray | None = None,
    progress: bool = False,
) -> SeparabilityResult:
    """Is a feature's decoder norm at θ a measure of how linearly readable it is at θ?

    For a sample of features: label each position active when the crosscoder's activation of
    the feature is > activation_threshold. `feature_activations` is [row, feature], one value
    per position for every snapshot, because the question is "how well can snapshot θ's raw
    activations pick out the positions where this concept is present" and the concept's
    positions are fixed once. Pass the max over snapshots of the per-snapshot activations
    f_i^θ (or the shared pre-activation h_i): a [row, snapshot, feature] array is reduced by
    max over snapshots here. Columns of `feature_activations` are the features `feature_ids`
    (default 0, 1, …); `decoder_norms` [snapshot, feature] covers the whole dictionary.

    For each sampled feature, up to samples_per_class active and as many inactive positions
    are drawn and split into a training and a held-out part (stratified). In every snapshot a
    logistic-regression probe on the raw activations [row, snapshot, d_model] of that
    snapshot is fitted on the training part, and its AUC is measured on the held-out part
    (0.5 = chance, 1 = perfectly separable). The table is then correlated with the decoder
    norms (see `SeparabilityResult`). `progress=True` shows a progress bar over features.
    """
    norms = check_norms(decoder_norms)
    rho = relative_strength(norms)
    step_array = validate_steps(steps, norms.shape[0])
    acts_shape = tuple(activations.shape)
    if len(acts_shape) != 3 or acts_shape[1] != norms.shape[0]:
        raise ParameterError(
            f"activations has shape {acts_shape}: expected [row, snapshot={norms.shape[0]}, d_model]"
        )
    labels_source = to_numpy(feature_activations, "feature_activations")
    if labels_source.ndim == 3:
        labels_source = labels_source.max(axis=1)  # [row, snapshot, feature] → active in any snapshot
    if labels_source.ndim != 2 or labels_source.shape[0] != acts_shape[0]:
        raise ParameterError(
            f"feature_activations has shape {labels_source.shape}: expected [row={acts_shape[0]}, feature]"
        )
    if not np.all(np.isfinite(labels_source)):
        raise ParameterError("feature_activations contains NaN or infinite values")
    ids = np.arange(labels_source.shape[1]) if feature_ids is None else np.asarray(feature_ids, dtype=np.int64)
    if ids.shape != (labels_source.shape[1],):
        raise ParameterError(
            f"feature_ids has {ids.size} entries: expected one per column of feature_activations ({labels_source.shape[1]})"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= norms.shape[1]):
        raise ParameterError(f"feature_ids contains ids outside the dictionary [0, {norms.shape[1]})")

    active = labels_source > config.activation_threshold
    n_active = active.sum(axis=0)
    n_inactive = active.shape[0] - n_active
    eligible = np.flatnonzero((n_active >= config.min_active) & (n_inactive >= config.min_active))
    if eligible.size == 0:
        raise ParameterError(
            f"no feature has ≥ min_active={config.min_active} active and inactive positions: "
            "lower min_active or give more rows"
        )
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(eligible, size=min(config.n_features, eligible.size), replace=False))

    records = []
    for column in tqdm(chosen, desc="separability probes", unit="feature", disable=not progress):
        per_class = int(min(config.samples_per_class, n_active[column], n_inactive[column]))
        n_train = max(1, min(per_class - 1, round(per_class * config.train_fraction)))
        positives = rng.choice(np.flatnonzero(active[:, column]), size=per_class, replace=False)
        negatives = rng.choice(np.flatnonzero(~active[:, column]), size=per_class, replace=False)
        train_rows = np.concatenate([positives[:n_train], negatives[:n_train]])
        test_rows = np.concatenate([positives[n_train:], negatives[n_train:]])
        n_test_per_class = per_class - n_train
        train_labels = np.concatenate([np.ones(n_train), np.zeros(n_train)])
        test_labels = np.concatenate([np.ones(n_test_per_class, bool), np.zeros(n_test_per_class, bool)])

        # One probe per snapshot, fitted together.
        train_x = rearrange(_take_rows(activations, train_rows), "sample snapshot d_model -> snapshot sample d_model")
        test_x = rearrange(_take_rows(activations, test_rows), "sample snapshot d_model -> snapshot sample d_model")
        n_snapshots = train_x.shape[0]
        with _single_thread():
            weight, bias, mean, std = fit_logistic_probes(
                train_x,
                torch.as_tensor(train_labels, dtype=torch.float32).expand(n_snapshots, -1),
                l2=config.l2,
                max_iter=config.max_iter,
            )
        scores = einsum((test_x - mean) / std, weight, "snapshot sample d_model, snapshot d_model -> snapshot sample")
        scores = (scores + bias[:, None]).numpy()
        aucs = auc_per_row(scores, np.broadcast_to(test_labels, scores.shape))
        feature = int(ids[column])
        for snapshot in range(n_snapshots):
            records.append(
                {
                    "feature": feature,
                    "snapshot": snapshot,
                    "step": int(step_array[snapshot]),
                    "auc": float(aucs[snapshot]),
                    "decoder_norm": float(norms[snapshot, feature]),
                    "strength": float(rho[snapshot, feature]),
                    "n_train": 2 * n_train,
                    "n_test": 2 * n_test_per_class,
                }
            )
    table = pd.DataFrame.from_records(records)
    auc = table["auc"].to_numpy()
    pooled = correlate(table["decoder_norm"].to_numpy(), auc)
    within = [
        correlate(group["decoder_norm"].to_numpy(), group["auc"].to_numpy()).spearman_rho
        for _, group in table.groupby("feature")
    ]
    within_feature = float(np.nanmean(within)) if np.isfinite(within).any() else math.nan
    return SeparabilityResult(
        table=table,
        pearson_r=pooled.pearson_r,
        pearson_p=pooled.pearson_p,
        spearman_r=pooled.spearman_rho,
        spearman_p=pooled.spearman_p,
        strength_spearman_r=correlate(table["strength"].to_numpy(), auc).spearman_rho,
        within_feature_spearman=within_feature,
    )


# --------------------------------------------------------------------------------------------
# Within-feature association, free of the shared trend over training
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WithinFeatureCorrelation:
    """Does a feature's y rise where its *own* x rises, beyond what the shared trend over training gives?

    statistic: mean over features of the Spearman correlation across snapshots of x_i and y_i.
    null_mean: the same statistic averaged over permutations that pair feature i's x with another
        feature's y. Both keep every feature's trend over training, so a correlation that only
        comes from "everything grows with training time" is as large under the null.
    p_value: one-sided permutation p-value, (1 + #{null ≥ statistic}) / (1 + n_permutations).
    n_features: features with a finite, non-constant x and y across snapshots.
    """

    statistic: float
    null_mean: float
    p_value: float
    n_features: int
    n_permutations: int


def _standardised_ranks(values: np.ndarray) -> np.ndarray:
    ranks = stats.rankdata(values, axis=1)
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(axis=1, keepdims=True))


def within_feature_rank_correlation(
    x: Float[np.ndarray, "feature snapshot"],
    y: Float[np.ndarray, "feature snapshot"],
    *,
    n_permutations: int = 2000,
    seed: int = 0,
) -> WithinFeatureCorrelation:
    """Mean within-feature Spearman correlation of x and y across snapshots, with a permutation
    p-value over features (see `WithinFeatureCorrelation`).

    The pooled feature × snapshot correlation is confounded by training time: decoder norms and
    probe AUCs both grow as the model trains. Pairing each feature's x with a randomly chosen
    other feature's y keeps that confound and breaks only the feature's identity, so the test
    asks whether *this* feature's strength tracks *its own* separability. Features whose row has
    a non-finite value or is constant are left out.
    """
    x = to_numpy(x, "x")
    y = to_numpy(y, "y")
    if x.shape != y.shape or x.ndim != 2:
        raise ParameterError(f"x and y must be equal [feature, snapshot] arrays, got {x.shape} and {y.shape}")
    require(isinstance(n_permutations, int) and n_permutations >= 1, "n_permutations", n_permutations,
            "an integer ≥ 1")
    usable = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1) & (np.ptp(x, axis=1) > 0) & (np.ptp(y, axis=1) > 0)
    n_features = int(usable.sum())
    if n_features < 2 or x.shape[1] < 3:
        return WithinFeatureCorrelation(math.nan, math.nan, math.nan, n_features, n_permutations)
    # pair_correlation[i, j] = Spearman(x_i, y_j): a Pearson correlation of standardised ranks.
    pair_correlation = _standardised_ranks(x[usable]) @ _standardised_ranks(y[usable]).T / x.shape[1]
    statistic = float(np.mean(np.diag(pair_correlation)))
    rng = np.random.default_rng(seed)
    rows = np.arange(n_features)
    null = np.array([pair_correlation[rows, rng.permutation(n_features)].mean() for _ in range(n_permutations)])
    p_value = float((1 + np.sum(null >= statistic - 1e-12)) / (1 + n_permutations))
    return WithinFeatureCorrelation(statistic, float(null.mean()), p_value, n_features, n_permutations)


def separability_test(result: SeparabilityResult, *, n_permutations: int = 2000, seed: int = 0
                      ) -> WithinFeatureCorrelation:
    """`within_feature_rank_correlation` of the decoder norm and the probe AUC of a `separability` run."""
    norm = result.table.pivot(index="feature", columns="snapshot", values="decoder_norm").to_numpy()
    auc = result.table.pivot(index="feature", columns="snapshot", values="auc").to_numpy()
    return within_feature_rank_correlation(norm, auc, n_permutations=n_permutations, seed=seed)
