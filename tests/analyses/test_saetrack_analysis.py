"""What an SAE-Track chain shows: drift follows a planted rotation, the formation score separates
shared from random positions and dates late features, PCA paths, the two lenses (matching SAE and
crosscoder features, formation against emergence), the chapter's steps end to end, bad inputs.
Tiny models, on the planted data of tests/saetrack_planted.py; ~15 s."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from crosslib.analyses.saetrack_analysis import (FormationScores, compare_formation_emergence, compare_with_crosscoder,
                                                 drift_to_final, formation_progress, formation_scores,
                                                 formation_scores_for_rows, formation_table, formed_mask, link_changes,
                                                 match_features, match_features_by_activation, mean_pairwise_cosine,
                                                 pca_trajectories, summarise, trajectory_features)
from crosslib.config import ParameterError
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from crosslib.dictionaries.saetrack import SAETrackConfig, warm_versus_cold
from crosslib.dictionaries.train import TrainConfig, train_crosscoder
from saetrack_planted import (CONFIG, D_MODEL, LATE_CONFIG, LATE_FIRST, N_PLANTED, STEPS, drift_chain, late_chain,
                              planted_cosines, unit)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def drift():
    return drift_chain()


@pytest.fixture(scope="module")
def late():
    return late_chain()


# ------------------------------------------------------------------------------------ drift

def test_drift_to_final_follows_the_planted_rotation(drift):
    source, directions, chain = drift
    drift_matrix = drift_to_final(chain)
    assert drift_matrix.shape == (5, 24)
    np.testing.assert_allclose(drift_matrix[-1][np.linalg.norm(chain.decoders()[-1].numpy(), axis=-1) > 0], 1.0,
                               atol=1e-6)
    cos = planted_cosines(chain.decoders(), directions)
    final_index = cos[-1].argmax(dim=0).numpy()
    planted_drift = torch.einsum("jkd,jd->kj", directions, directions[:, -1]).numpy()  # [snapshot, planted]
    good = cos[:, final_index, torch.arange(N_PLANTED)].min(dim=0).values.numpy() > 0.9
    # The SAE features' drift reproduces the planted features' drift (cos(first, last) ≈ 0.86).
    difference = drift_matrix[:, final_index[good]] - planted_drift[:, good]
    assert np.abs(difference).max() < 0.1 and np.abs(difference).mean() < 0.04, difference
    assert drift_matrix[0, final_index[good]].mean() < 0.92


def test_drift_to_final_exact_numbers():
    decoders = torch.zeros(2, 3, 2)
    decoders[1] = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    decoders[0] = torch.tensor([[1.0, 1.0], [0.0, -3.0], [1.0, 0.0]])
    np.testing.assert_allclose(drift_to_final(decoders), [[1 / math.sqrt(2), -1.0, 0.0], [1.0, 1.0, 0.0]], atol=1e-12)


# ------------------------------------------------------------------------------------ formation

def test_mean_pairwise_cosine_exact():
    codes = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.6, 0.8]])
    groups = torch.tensor([[0, 1, 2, 3], [0, 1, -1, -1], [0, 4, -1, -1], [2, -1, -1, -1]])
    result = mean_pairwise_cosine(codes, groups)
    # group 0: only the pair (0, 1) has cosine 1; 2 of 12 ordered pairs → 1/6 (the zero row counts as 0)
    np.testing.assert_allclose(result[:3].numpy(), [1 / 6, 1.0, 0.6], atol=1e-6)
    assert math.isnan(float(result[3]))  # one row has no pair


def test_formation_score_subtracts_the_random_baseline():
    """Codes that share an always-on feature: random rows already have cosine ≈ 0.63 with each other,
    so only the baseline subtraction makes the score ≈ 0 for them (and 0.35 for rows sharing feature 2)."""
    sae = Crosscoder(CrosscoderConfig(n_snapshots=1, d_model=4, dict_size=4, activation="relu", decoder_init_norm=1.0))
    with torch.no_grad():  # the identity code: feature i is coordinate i
        sae.W_E.copy_(torch.eye(4)[None])
        sae.W_D.copy_(torch.eye(4)[None])
    g = torch.Generator().manual_seed(0)
    n = 2000
    x = torch.zeros(n, 1, 4)
    x[:, 0, 0] = 1 + 0.1 * torch.randn(n, generator=g)  # on in every row
    x[:, 0, 1:] = (torch.rand(n, 3, generator=g) < 0.2) * (0.5 + torch.rand(n, 3, generator=g)) * 2
    random_groups = torch.stack([torch.randperm(n, generator=g)[:8] for _ in range(100)])
    only_feature_2 = torch.nonzero((x[:, 0, 2] > 0) & (x[:, 0, 1] == 0) & (x[:, 0, 3] == 0)).flatten()
    shared_groups = only_feature_2[:64].view(8, 8)
    baseline_rows = torch.randperm(n, generator=g)[:256]
    score, raw, baseline = formation_scores_for_rows([sae], x, random_groups, baseline_rows)
    assert 0.55 < float(baseline[0]) < 0.7 and 0.55 < raw.mean() < 0.7
    assert abs(score.mean()) < 0.02
    np.testing.assert_allclose(score, raw - baseline[:, None])
    score, raw, _ = formation_scores_for_rows([sae], x, shared_groups, baseline_rows)
    assert (raw > 0.95).all() and 0.3 < score.mean() < 0.4


def test_formation_score_is_zero_for_random_and_high_for_shared_positions(late):
    source, directions, magnitudes, chain = late
    rows = source.rows("eval", limit=600)
    eval_magnitudes = magnitudes[source.n_train:source.n_train + rows.shape[0]]
    # groups of 8 eval rows where planted feature j fires strongly (ground truth, not the SAE)
    shared = torch.stack([eval_magnitudes[:, j].topk(8).indices for j in range(N_PLANTED)])
    g = torch.Generator().manual_seed(3)
    random_groups = torch.stack([torch.randperm(rows.shape[0], generator=g)[:8] for _ in range(200)])
    baseline_rows = torch.randperm(rows.shape[0], generator=g)[:64]

    random_scores, _, baseline = formation_scores_for_rows(chain.saes, rows, random_groups, baseline_rows)
    assert np.abs(random_scores.mean(axis=1)).max() < 0.03  # ≈ 0 on average at every snapshot
    assert np.abs(random_scores).mean() < 0.1
    assert (np.abs(baseline) < 0.15).all()

    shared_scores, raw, _ = formation_scores_for_rows(chain.saes, rows, shared, baseline_rows)
    first = np.array(LATE_FIRST)
    for j in range(N_PLANTED):
        before, after = shared_scores[: first[j], j], shared_scores[first[j]:, j]
        # ≥ 10x the random groups' bound above; measured minimum 0.57 on AVX-512 and AVX2, 0.48 on an AMX CPU
        # (training rounds differently there), so 0.5 was a knife edge
        assert (after > 0.3).all(), (j, shared_scores[:, j])
        assert (np.abs(before) < 0.1).all(), (j, shared_scores[:, j])  # the feature is absent: nothing shared


def test_formation_table_dates_late_features(late):
    source, directions, magnitudes, chain = late
    scores = formation_scores(chain, source, LATE_CONFIG)
    assert scores.scores.shape == (5, 24) and scores.top_rows.shape == (24, 8)
    assert scores.baseline.shape == (5,) and scores.random_rows.shape == (64,)
    table = formation_table(scores, LATE_CONFIG)
    assert list(table.columns) == ["feature", "final_score", "formed", "formation_snapshot", "formation_step",
                                   "n_top_active", "peak_score"]
    cos = planted_cosines(chain.decoders(), directions)[-1]  # [sae_feature, planted]
    final_index = cos.argmax(dim=0).numpy()
    recovered = cos.max(dim=0).values.numpy() > 0.8
    assert recovered.sum() >= 9
    expected = np.array(STEPS)[LATE_FIRST]
    found = table["formation_step"].to_numpy()[final_index]
    assert table["formed"].to_numpy()[final_index[recovered]].all()
    # planted features present from the start form at step 0, late ones at their first step
    assert (found[recovered] == expected[recovered]).mean() >= 0.8, (found, expected)
    late_recovered = recovered & (np.array(LATE_FIRST) > 0)
    assert (found[late_recovered] == expected[late_recovered]).sum() >= 2, (found, expected)
    assert (found[late_recovered] > 0).all()  # never dated before the feature existed

    mask = formed_mask(table, 5)
    assert mask.shape == (5, 24)
    for i in final_index[late_recovered]:
        k = int(table.loc[i, "formation_snapshot"])
        assert not mask[:k, i].any() and mask[k:, i].all()
    summary = summarise(formation=table)
    formed = table[table["formed"]]
    assert summary["median_formation_step"] == float(formed["formation_step"].median())
    assert summary["formed_fraction"] == pytest.approx(table["formed"].mean())


def test_formation_table_rule_on_given_scores():
    scores = np.array([[0.0, 0.5, 0.01, np.nan],
                       [0.3, 0.6, 0.02, np.nan],
                       [0.8, 0.4, 0.05, np.nan]])
    formation = FormationScores(steps=[0, 10, 100], scores=scores, raw=scores, baseline=np.zeros(3),
                                top_rows=np.zeros((4, 2), dtype=np.int64), random_rows=np.arange(2),
                                n_top_active=np.array([2, 2, 2, 0]))
    table = formation_table(formation, SAETrackConfig(formation_fraction=0.5, min_final_score=0.1))
    # feature 0 reaches 0.4 = 0.5 × 0.8 first at step 100 (0.3 < 0.4); feature 1 already at step 0;
    # feature 2's final score is below the minimum; feature 3 never fires
    assert table["formation_step"].tolist()[:2] == [100.0, 0.0]
    assert table["formed"].tolist() == [True, True, False, False]
    assert np.isnan(table["formation_step"].to_numpy()[2:]).all()
    assert table["formation_snapshot"].tolist() == [2, 0, -1, -1]


# ------------------------------------------------------------------------------------ PCA paths

def test_pca_trajectories(drift):
    source, directions, chain = drift
    chosen = sorted(planted_cosines(chain.decoders(), directions)[-1].argmax(dim=0)[:3].tolist())  # live features
    mask = np.zeros((5, 24), dtype=bool)
    mask[3:] = True
    table = pca_trajectories(chain, features=chosen, formed=mask)
    assert list(table.columns) == ["feature", "snapshot", "step", "pc1", "pc2", "formed"]
    assert len(table) == 15 and table["feature"].tolist() == [chosen[0]] * 5 + [chosen[1]] * 5 + [chosen[2]] * 5
    assert table["step"].tolist() == STEPS * 3
    assert table["formed"].tolist() == [False, False, False, True, True] * 3
    ratio = table.attrs["explained_variance_ratio"]
    assert len(ratio) == 2 and 0 < ratio[1] <= ratio[0] and sum(ratio) <= 1 + 1e-9
    assert abs(table["pc1"].mean()) < 1e-6 and abs(table["pc2"].mean()) < 1e-6  # centred on all points

    # Each feature in its own plane: the path is centred on its mean and its first-to-last distance
    # is at most the chord between the two unit directions (a projection), and most of it.
    own = pca_trajectories(chain, features=chosen, centre="feature")
    directions_now = unit(chain.decoders()[:, chosen].float())
    chord = (directions_now[0] - directions_now[-1]).norm(dim=-1).numpy()
    for j, (feature, path) in enumerate(own.groupby("feature")):
        points = path[["pc1", "pc2"]].to_numpy()
        np.testing.assert_allclose(points.mean(axis=0), 0, atol=1e-6)
        distance = np.linalg.norm(points[0] - points[-1])
        assert 0.7 * chord[j] <= distance <= chord[j] + 1e-6
        assert chord[j] > 0.2  # the directions really moved
        assert sum(own.attrs["explained_variance_ratio"][feature]) > 0.8
    again = pca_trajectories(chain.decoders(), STEPS, n_features=4, seed=2)
    assert again["feature"].nunique() == 4 and again["formed"].isna().all()
    pd.testing.assert_frame_equal(again, pca_trajectories(chain.decoders(), STEPS, n_features=4, seed=2))


# ------------------------------------------------------------------------------------ two lenses

def test_match_features_and_correlation():
    g = torch.Generator().manual_seed(0)
    crosscoder_decoder = torch.randn(10, 8, generator=g)
    permutation = torch.randperm(10, generator=g)
    sae_decoder = crosscoder_decoder[permutation] * 3 + 0.01 * torch.randn(10, 8, generator=g)
    sae_decoder[9] = torch.randn(8, generator=g)  # a feature the crosscoder lacks
    matches = match_features(sae_decoder, crosscoder_decoder, min_cosine=0.9)
    assert matches["crosscoder_feature"].tolist()[:9] == permutation.tolist()[:9]
    assert (matches["cosine"][:9] > 0.99).all() and matches["matched"].tolist() == [True] * 9 + [False]

    formation = pd.DataFrame({"feature": range(10), "formation_step": [0, 1, 2, 4, 8, 16, 32, 64, np.nan, 128]})
    emergence_steps = np.full(10, np.nan)
    emergence_steps[permutation.numpy()] = [0, 2, 4, 8, 16, 32, 64, 128, 256, 512]  # monotone in formation step
    emergence_steps[permutation[0]] = np.nan  # a persistent crosscoder feature (no emergence step)
    emergence = pd.DataFrame({"feature": range(10), "emergence_step": emergence_steps})
    pairs, numbers = compare_formation_emergence(formation, emergence, matches)
    # 9 matched; SAE feature 0's partner has no emergence step and feature 8 never formed → 7 pairs
    assert numbers["n_matched"] == 9 and numbers["n_compared"] == 7 and len(pairs) == 7
    assert numbers["spearman_r"] == pytest.approx(1.0) and numbers["spearman_p"] < 1e-3
    assert numbers["pearson_r"] > 0.99 and numbers["pearson_p"] < 1e-3
    assert list(pairs.columns) == ["sae_feature", "crosscoder_feature", "cosine", "formation_step", "emergence_step"]
    summary = summarise(lens=numbers)
    assert summary["lens_n_matched"] == 9 and summary["lens_spearman_r"] == pytest.approx(1.0)


def test_match_features_by_activation_finds_the_same_feature_under_other_decoders():
    """A crosscoder whose final-snapshot features fire exactly where a permutation of the SAE's do is
    matched feature by feature (correlation 1) although its decoder directions are unrelated."""
    g = torch.Generator().manual_seed(3)
    n_features, d = 10, 8
    encoder = torch.randn(d, n_features, generator=g)
    permutation = torch.randperm(n_features, generator=g)
    sae = Crosscoder(CrosscoderConfig(n_snapshots=1, d_model=d, dict_size=n_features, threshold_init=0.5))
    crosscoder = Crosscoder(CrosscoderConfig(n_snapshots=2, d_model=d, dict_size=n_features, threshold_init=0.5))
    with torch.no_grad():
        sae.W_E.copy_(encoder[None])
        crosscoder.W_E.zero_()
        crosscoder.W_E[1].copy_(encoder[:, permutation])  # h reads only the final snapshot
        crosscoder.W_D.copy_(torch.randn(2, n_features, d, generator=g))
        crosscoder.W_D.div_(crosscoder.W_D.norm(dim=-1, keepdim=True))  # unit norms: the same gate as the SAE's
        sae.W_D.div_(sae.W_D.norm(dim=-1, keepdim=True))
    rows = torch.randn(500, 2, d, generator=g)
    matches = match_features_by_activation(sae, crosscoder, rows, min_correlation=0.9)
    assert matches["crosscoder_feature"].tolist() == torch.argsort(permutation).tolist()
    np.testing.assert_allclose(matches["score"], 1.0, atol=1e-6)
    assert matches["matched"].all() and matches["cosine"].abs().max() < 0.99  # decoders would not have matched
    # the same rows with the SAE feature silenced on every row: no partner
    with torch.no_grad():
        sae.b_E[0] = -1e6
    assert not match_features_by_activation(sae, crosscoder, rows, min_correlation=0.9)["matched"][0]
    with pytest.raises(ParameterError, match="rows"):
        match_features_by_activation(sae, crosscoder, rows[:, :1])


def test_the_chapter_steps_end_to_end(late):
    """Chapter 6's steps in its order: warm versus cold, formation, drift, PCA paths, the two lenses, summary."""
    source, directions, magnitudes, chain = late
    crosscoder = train_crosscoder(source, CrosscoderConfig(n_snapshots=5, d_model=D_MODEL, dict_size=24),
                                  TrainConfig(n_steps=150, batch_size=64, lr=3e-2, sparsity_coefficient=1.0,
                                              eval_rows=0), progress=False).model
    config = chain.config
    warm_cold = warm_versus_cold(source, chain, cache=False, progress=False)
    formation = formation_scores(chain, source, config)
    table = formation_table(formation, config)
    drift = drift_to_final(chain)
    trajectories = pca_trajectories(chain, features=trajectory_features(table, config),
                                    formed=formed_mask(table, source.n_snapshots))
    lenses = compare_with_crosscoder(chain, table, crosscoder, source)
    assert len(warm_cold) == 8
    assert formation.scores.shape == (5, 24) and drift.shape == (5, 24)
    assert trajectories["feature"].nunique() == 6 and trajectories["formed"].notna().all()
    assert len(lenses.matches) == 24 and lenses.numbers["n_matched"] >= 8
    summary = summarise(warm_cold, table, lenses.numbers)
    for key in ("warm_cold_ev_gap", "median_formation_step", "formed_fraction", "lens_n_matched"):
        assert math.isfinite(summary[key]), key
    # 8 of 12 planted features exist from the start; the median also counts the SAE's spare features, and
    # which of those pass the formation test varies with rounding (bf16, dense or sparse products): 0 or 1
    assert summary["median_formation_step"] <= 1.0
    with pytest.raises(ParameterError, match="crosscoder_steps"):
        compare_with_crosscoder(chain, table, crosscoder, source, crosscoder_steps=[0, 1, 2, 4, 16])


def test_trajectory_features_draws_formed_features_or_any():
    table = pd.DataFrame({"formed": [False, True, True, False, True]})
    chosen = trajectory_features(table, SAETrackConfig(dict_size=5, n_trajectory_features=2))
    assert len(chosen) == 2 and set(chosen) <= {1, 2, 4} and list(chosen) == sorted(chosen)
    assert list(trajectory_features(table, SAETrackConfig(dict_size=5, n_trajectory_features=9))) == [1, 2, 4]
    nothing = table.assign(formed=False)
    assert list(trajectory_features(nothing, SAETrackConfig(dict_size=5, n_trajectory_features=9))) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------ bad inputs and exact numbers

def test_bad_inputs_name_the_parameter(drift):
    source, directions, chain = drift
    with pytest.raises(ParameterError, match="crosscoder_decoder"):
        match_features(chain, torch.zeros(5, D_MODEL + 1))
    with pytest.raises(ParameterError, match="min_cosine"):
        match_features(chain, torch.zeros(5, D_MODEL), min_cosine=2)
    with pytest.raises(ParameterError, match="features"):
        pca_trajectories(chain, features=[0, 99])
    with pytest.raises(ParameterError, match="formed"):
        pca_trajectories(chain, features=[0], formed=np.zeros((2, 2), dtype=bool))
    with pytest.raises(ParameterError, match="chain"):
        formation_scores(chain.saes[:3], source, CONFIG)
    with pytest.raises(ParameterError, match="emergence"):
        compare_formation_emergence(pd.DataFrame({"feature": [0], "formation_step": [0.0]}), pd.DataFrame(),
                                    match_features(chain, chain))
    crosscoder = Crosscoder(CrosscoderConfig(n_snapshots=2, d_model=D_MODEL, dict_size=8))
    table = pd.DataFrame({"feature": [0], "formation_step": [0.0]})
    with pytest.raises(ParameterError, match="chain"):
        compare_with_crosscoder(chain, table, crosscoder, source.select(indices=[0, 1]))
    with pytest.raises(ParameterError, match="crosscoder"):
        compare_with_crosscoder(chain, table, chain.saes[-1].W_D, source)
    with pytest.raises(ParameterError, match="crosscoder_steps"):
        compare_with_crosscoder(chain, table, crosscoder, source)  # 2 snapshots do not cover the source's 5


def test_link_changes_exact_numbers():
    decoders = torch.zeros(3, 2, 2)
    decoders[0] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    decoders[1] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    decoders[2] = torch.tensor([[0.0, 3.0], [0.0, 1.0]])
    changes = link_changes(decoders)
    assert changes.shape == (2, 2)
    np.testing.assert_allclose(changes[:, 0], [1 - 1 / math.sqrt(2), 1 - 1 / math.sqrt(2)], atol=1e-12)
    assert np.isnan(changes[:, 1]).all()  # feature 1's decoder is zero at checkpoint 1


def test_formation_progress_is_the_median_share_of_the_final_score():
    scores = np.array([[0.0, 0.1, 0.0],
                       [0.4, 0.3, 0.0],
                       [0.8, 0.4, 0.01]])
    formation = FormationScores(steps=[0, 10, 100], scores=scores, raw=scores, baseline=np.zeros(3),
                                top_rows=np.zeros((3, 2), dtype=np.int64), random_rows=np.arange(2),
                                n_top_active=np.array([2, 2, 2]))
    table = formation_table(formation, SAETrackConfig(formation_fraction=0.5, min_final_score=0.1))
    # features 0 and 1 formed (feature 2's final score is too small): shares 0/0.25, 0.5/0.75, 1/1
    np.testing.assert_allclose(formation_progress(formation, table), [0.125, 0.625, 1.0])
    none = formation_table(formation, SAETrackConfig(formation_fraction=0.5, min_final_score=0.9))
    assert np.isnan(formation_progress(formation, none)).all()
