"""The separability probes on planted data with known answers: AUCs, a probe that sees a planted
direction grow, the within-feature test that sees through the shared trend over training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crosslib.analyses.probes import SeparabilityConfig, auc_per_row, separability, within_feature_rank_correlation
from crosslib.config import ParameterError


def test_auc_per_row_known_values():
    scores = np.array([[0.1, 0.2, 0.9, 0.8], [0.9, 0.8, 0.1, 0.2], [0.5, 0.5, 0.5, 0.5]])
    labels = np.array([[False, False, True, True]] * 3)
    np.testing.assert_allclose(auc_per_row(scores, labels), [1.0, 0.0, 0.5])


def test_separability_grows_with_planted_strength():
    rng = np.random.default_rng(0)
    n_rows, d_model, n_features = 1200, 8, 3
    strength = np.array([0.0, 0.5, 1.5, 4.0])  # planted per-snapshot signal strength
    labels = rng.random((n_rows, n_features)) < 0.25
    directions = rng.standard_normal((n_features, d_model))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    noise = rng.standard_normal((n_rows, len(strength), d_model))
    # Each feature's direction is added at its active positions, scaled by the snapshot's strength.
    activations = noise + np.einsum("rf,s,fd->rsd", labels.astype(float), strength, directions)
    feature_acts = labels * rng.uniform(0.5, 2.0, labels.shape)
    norms = np.tile(strength[:, None], (1, n_features)) + 0.01  # decoder norm tracks strength
    config = SeparabilityConfig(n_features=3, samples_per_class=150, min_active=20)
    result = separability(torch.as_tensor(activations, dtype=torch.float16), feature_acts, norms, [0, 1, 2, 4], config)

    table = result.table
    assert len(table) == 3 * 4 and set(table.columns) >= {"feature", "snapshot", "step", "auc", "decoder_norm"}
    mean_auc = table.groupby("snapshot")["auc"].mean().to_numpy()
    assert abs(mean_auc[0] - 0.5) < 0.12  # nothing planted at snapshot 0: chance
    assert mean_auc[-1] > 0.95
    assert np.all(np.diff(mean_auc) > 0)
    assert result.pearson_r > 0.8 and result.spearman_r > 0.8 and result.within_feature_spearman > 0.9
    assert result.summary()["n_features"] == 3

    # [row, snapshot, feature] activations are reduced by max over snapshots; ids map columns.
    per_snapshot = np.repeat(feature_acts[:, None, :1], 4, axis=1)
    one = separability(activations, per_snapshot, np.tile(norms[:, :1], (1, 10)), [0, 1, 2, 4], config, feature_ids=[7])
    assert set(one.table["feature"]) == {7} and one.table["auc"].iloc[-1] > 0.95


@pytest.mark.parametrize(
    "changes, name",
    [({"train_fraction": 1.0}, "train_fraction"), ({"n_features": 0}, "n_features"), ({"l2": -1.0}, "l2")],
)
def test_bad_separability_parameters_are_named(changes, name):
    with pytest.raises(ParameterError, match=name):
        SeparabilityConfig(**changes)


def test_within_feature_rank_correlation_sees_through_the_shared_trend():
    rng = np.random.default_rng(0)
    n_features, n_snapshots = 30, 12
    trend = np.linspace(0.0, 1.0, n_snapshots)
    # Confounded: every feature's norm and AUC rise with training time, unrelated otherwise.
    norm = trend + 0.3 * rng.standard_normal((n_features, n_snapshots))
    auc = trend + 0.3 * rng.standard_normal((n_features, n_snapshots))
    confounded = within_feature_rank_correlation(norm, auc, n_permutations=500, seed=1)
    assert confounded.statistic > 0.3  # the naive within-feature correlation is positive ...
    assert confounded.p_value > 0.05  # ... but no larger than with shuffled features
    assert abs(confounded.statistic - confounded.null_mean) < 0.1
    # Real: each feature's AUC follows its own norm, which has its own shape.
    own = rng.standard_normal((n_features, n_snapshots))
    real = within_feature_rank_correlation(own, own + 0.2 * rng.standard_normal(own.shape), n_permutations=500)
    assert real.statistic > 0.8 and real.p_value < 0.01 and abs(real.null_mean) < 0.1
    assert real.n_features == n_features
    # Constant rows are left out; too few features give NaN.
    tiny = within_feature_rank_correlation(np.ones((2, 5)), np.arange(10.0).reshape(2, 5))
    assert tiny.n_features == 0 and np.isnan(tiny.p_value)
