"""Every verdict of the book can say "yes" and "no" (and "partly" where it exists)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from crosslib.book import claims
from crosslib.statistics import correlate, monotone_trend, row_spearman

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1500, 2000]


def verdict(result: claims.ClaimResult) -> str:
    assert result.claim and result.measured and result.reason
    return result.verdict


# ---- chapter 1 --------------------------------------------------------------------------------


def test_unigram_then_bigram():
    assert verdict(claims.unigram_then_bigram(64, 256)) == "yes"
    assert verdict(claims.unigram_then_bigram(256, 64)) == "no"
    assert verdict(claims.unigram_then_bigram(64, 64)) == "no"


def test_loss_below_bigram():
    assert verdict(claims.loss_below_bigram(4.7, 5.4)) == "yes"
    assert verdict(claims.loss_below_bigram(5.3, 5.4)) == "partly"
    assert verdict(claims.loss_below_bigram(5.6, 5.4)) == "no"


def test_unigram_kl_falls_early():
    assert verdict(claims.unigram_kl_falls_early(1.45, 0.10, 64, 2000)) == "yes"
    assert verdict(claims.unigram_kl_falls_early(1.45, 0.10, 1500, 2000)) == "partly"
    assert verdict(claims.unigram_kl_falls_early(1.45, 0.9, 64, 2000)) == "no"


def test_induction_is_robust():
    assert verdict(claims.induction_is_robust([500, 750, 500], interval=250)) == "yes"
    assert verdict(claims.induction_is_robust([500, 1250, 500], interval=250)) == "partly"
    assert verdict(claims.induction_is_robust([500, None, 500], interval=250)) == "no"
    assert verdict(claims.induction_is_robust([], interval=250)) == "no"
    assert "2 of 3 runs" in claims.induction_is_robust([500, None, 750], interval=250).measured


def test_induction_turns_on():
    assert verdict(claims.induction_turns_on(1250, 6.3)) == "yes"
    assert verdict(claims.induction_turns_on(None, 0.1)) == "no"


def test_flat_after():
    falling_then_flat = [5.0, 3.0, 1.0, 0.5, 0.49, 0.5, 0.48]
    assert claims.flat_after(falling_then_flat, range(7), 3) == (True, pytest.approx(0.02 / 4.52))
    rising_again = [5.0, 3.0, 1.0, 0.5, 1.5, 2.5, 3.0]
    flat, share = claims.flat_after(rising_again, range(7), 3)
    assert not flat and share == pytest.approx(2.5 / 4.5)


# ---- chapter 2 --------------------------------------------------------------------------------


def test_equal_l0_gap_interpolates_on_log_l0():
    # B: EV 0.8 at L0 10 and 0.9 at L0 1000; A's point at L0 100 sits halfway on log L0.
    gap = claims.equal_l0_gap([100, 5000], [0.9, 0.99], [10, 1000], [0.8, 0.9])
    assert gap.n_points == 1 and gap.mean_gap == pytest.approx(0.05) and gap.overlap_factor == 1
    none = claims.equal_l0_gap([1, 2], [0.5, 0.6], [10, 1000], [0.8, 0.9])
    assert none.n_points == 0 and math.isnan(none.mean_gap)


def test_crosscoder_frontier():
    assert verdict(claims.crosscoder_frontier(claims.FrontierGap(0.005, 4, 8.0))) == "yes"
    assert verdict(claims.crosscoder_frontier(claims.FrontierGap(0.005, 2, 1.5))) == "partly"  # too narrow
    assert verdict(claims.crosscoder_frontier(claims.FrontierGap(-0.02, 4, 8.0))) == "partly"
    assert verdict(claims.crosscoder_frontier(claims.FrontierGap(-0.08, 4, 8.0))) == "no"
    assert verdict(claims.crosscoder_frontier(claims.FrontierGap(math.nan, 0, math.nan))) == "no"


def test_crosscoder_matches_each_snapshot():
    steps = [0, 64, 2000]
    assert verdict(claims.crosscoder_matches_each_snapshot([0.0, -0.005, 0.01], steps)) == "yes"
    assert verdict(claims.crosscoder_matches_each_snapshot([0.0, -0.06, 0.01], steps)) == "partly"
    assert verdict(claims.crosscoder_matches_each_snapshot([-0.1, -0.06, -0.05], steps)) == "no"
    assert verdict(claims.crosscoder_matches_each_snapshot([math.nan] * 3, steps)) == "no"


def test_equal_lambda_l0_ratio():
    assert verdict(claims.equal_lambda_l0_ratio(1.2, 0.3)) == "yes"
    assert verdict(claims.equal_lambda_l0_ratio(3.4, 0.3)) == "partly"
    assert verdict(claims.equal_lambda_l0_ratio(10.0, 0.3)) == "no"


# ---- chapter 3 --------------------------------------------------------------------------------


def test_initialisation_features():
    assert verdict(claims.initialisation_features(0.12, 500)) == "yes"
    assert verdict(claims.initialisation_features(0.02, 500)) == "partly"
    assert verdict(claims.initialisation_features(0.002, 500)) == "no"


def test_most_form_after_turning_point_counts_all_live_features():
    turning = 64
    mostly_after = [128.0] * 6 + [math.nan] * 4
    assert verdict(claims.most_form_after_turning_point(mostly_after, turning)) == "yes"
    # Every emergent feature forms after the turning point, but they are a minority of the live
    # features: the old rule (share of emergent features) said "yes" here.
    few_emergent = [128.0] * 3 + [math.nan] * 7
    assert verdict(claims.most_form_after_turning_point(few_emergent, turning)) == "partly"
    before = [2.0] * 8 + [128.0] * 2
    assert verdict(claims.most_form_after_turning_point(before, turning)) == "no"


def test_turning_point_ends_statistical_phase():
    assert verdict(claims.turning_point_ends_statistical_phase(512, 64, 256)) == "yes"
    assert verdict(claims.turning_point_ends_statistical_phase(128, 64, 256)) == "partly"
    assert verdict(claims.turning_point_ends_statistical_phase(16, 64, 256)) == "no"


def test_directions_reorganise():
    assert verdict(claims.directions_reorganise(0.1, 0.8)) == "yes"
    assert verdict(claims.directions_reorganise(0.4, 0.7)) == "partly"
    assert verdict(claims.directions_reorganise(0.6, 0.65)) == "no"
    assert verdict(claims.directions_reorganise(math.nan, 0.65)) == "no"


def test_decoder_norm_tracks_separability():
    assert verdict(claims.decoder_norm_tracks_separability(0.7, 0.1, 0.001, 32, 0.6)) == "yes"
    assert verdict(claims.decoder_norm_tracks_separability(0.3, 0.1, 0.01, 32, 0.6)) == "partly"
    # A strong pooled correlation that the shuffled-feature null matches is "no".
    assert verdict(claims.decoder_norm_tracks_separability(0.7, 0.68, 0.4, 32, 0.9)) == "no"


def test_strong_fraction_recovers():
    assert claims.strong_fraction_recovers(0.7, 0.2, 0.6)
    assert not claims.strong_fraction_recovers(0.7, 0.2, 0.25)


# ---- chapter 4 --------------------------------------------------------------------------------


def test_complexity_rises_with_emergence():
    yes = claims.complexity_rises_with_emergence(raw_step_r=0.31, raw_step_p=0.002, log_step_r=0.35,
                                                 log_step_p=0.001, n=100, scorer="llm")
    assert verdict(yes) == "yes"
    proxy = claims.complexity_rises_with_emergence(raw_step_r=0.31, raw_step_p=0.002, log_step_r=0.35,
                                                   log_step_p=0.001, n=100, scorer="context depth")
    assert verdict(proxy) == "partly" and "proxy" in proxy.measured
    log_only = claims.complexity_rises_with_emergence(raw_step_r=0.1, raw_step_p=0.3, log_step_r=0.3,
                                                      log_step_p=0.01, n=100, scorer="llm")
    assert verdict(log_only) == "partly"
    # A positive r that is not significant is no longer "partly".
    weak = claims.complexity_rises_with_emergence(raw_step_r=0.1, raw_step_p=0.4, log_step_r=0.12,
                                                  log_step_p=0.3, n=40, scorer="llm")
    assert verdict(weak) == "no"
    nan = float("nan")  # no emerging feature was scored: said in words, no "nan" in the table
    none = claims.complexity_rises_with_emergence(raw_step_r=nan, raw_step_p=nan, log_step_r=nan, log_step_p=nan,
                                                  n=0, scorer="context depth")
    assert verdict(none) == "no" and "not measurable" in none.measured and "nan" not in none.measured


def test_complexity_scored_by_llm():
    assert verdict(claims.complexity_scored_by_llm(True)) == "yes"
    assert verdict(claims.complexity_scored_by_llm(False)) == "no"


# ---- chapter 5 --------------------------------------------------------------------------------


def test_few_features_break():
    assert verdict(claims.few_features_break(0.8, 0.02, 20, task_performed=True, metric=3.0)) == "yes"
    assert verdict(claims.few_features_break(0.3, 0.05, 20, task_performed=True, metric=3.0)) == "partly"
    assert verdict(claims.few_features_break(0.1, 0.08, 20, task_performed=True, metric=3.0)) == "no"
    assert verdict(claims.few_features_break(0.9, 0.0, 20, task_performed=False, metric=0.01)) == "no"


def test_few_features_restore():
    assert verdict(claims.few_features_restore(0.7, 0.05, 20, task_performed=True, metric=3.0)) == "yes"
    assert verdict(claims.few_features_restore(0.3, 0.05, 20, task_performed=True, metric=3.0)) == "partly"
    assert verdict(claims.few_features_restore(0.6, 0.5, 20, task_performed=True, metric=3.0)) == "no"
    assert verdict(claims.few_features_restore(0.9, 0.0, 20, task_performed=False, metric=0.0)) == "no"


def test_emergence_lines_up_with_task():
    assert verdict(claims.emergence_lines_up_with_task(1000, 1250, task_performed=True)) == "yes"
    assert verdict(claims.emergence_lines_up_with_task(400, 1250, task_performed=True)) == "partly"
    assert verdict(claims.emergence_lines_up_with_task(16, 1250, task_performed=True)) == "no"
    assert verdict(claims.emergence_lines_up_with_task(None, 1250, task_performed=True)) == "no"


# ---- chapter 6 --------------------------------------------------------------------------------


def test_warm_start_efficient_can_say_no():
    assert verdict(claims.warm_start_efficient([0.01, 0.0, -0.005])) == "yes"
    assert verdict(claims.warm_start_efficient([-0.02, -0.02, -0.01])) == "partly"
    assert verdict(claims.warm_start_efficient([-0.1, -0.05, -0.08])) == "no"


def test_features_form_progressively():
    rising = np.linspace(0.0, 1.0, 10)
    spread_steps = [64, 128, 256, 512, 1000, 1500, 2000, 256, 512, 1000]
    assert verdict(claims.features_form_progressively(0.6, spread_steps, rising)) == "yes"
    one_jump = [2000] * 9 + [1500]
    assert verdict(claims.features_form_progressively(0.6, one_jump, rising)) == "partly"
    flat_then_jump = np.r_[np.full(9, 0.1), 1.0][::-1]  # falls: no steady rise
    assert verdict(claims.features_form_progressively(0.6, one_jump, flat_then_jump)) == "no"
    # More than 20% formed, the old rule's "yes", is not enough when almost nothing forms.
    assert verdict(claims.features_form_progressively(0.05, spread_steps, rising)) == "no"


def test_decoder_drift_needs_more_than_a_low_first_cosine():
    cosine = np.linspace(0.2, 1.0, 10)
    settling = np.r_[np.full(3, 0.2), np.full(3, 0.05), np.full(3, 0.01)]
    assert verdict(claims.decoder_drift(cosine, settling)) == "yes"
    # Every link moves the same: a random walk of link noise, also far from the final direction.
    constant = np.full(9, 0.08)
    assert verdict(claims.decoder_drift(cosine, constant)) == "partly"
    # A first cosine well below 0.9 (the old rule's "yes"), but no more than late links move.
    noisy = np.full(9, 0.4)
    assert verdict(claims.decoder_drift(np.full(10, 0.5), noisy)) == "no"
    # No drift at all: the directions never move (every change is zero).
    assert verdict(claims.decoder_drift(np.ones(10), np.zeros(9))) == "no"


# ---- chapter 7 --------------------------------------------------------------------------------


def test_features_pass_through():
    assert verdict(claims.features_pass_through(0.3, 0.95)) == "yes"
    assert verdict(claims.features_pass_through(0.08, 0.95)) == "partly"
    assert verdict(claims.features_pass_through(0.01, 0.95)) == "no"


def test_gates_exceed_null():
    assert verdict(claims.gates_exceed_null(4, 2, 0.1, 0.1)) == "yes"
    assert verdict(claims.gates_exceed_null(1, 0, 0.001, 0.0)) == "partly"
    # Eight candidates where shuffling gives seven is no evidence of gates.
    assert verdict(claims.gates_exceed_null(5, 3, 4.0, 3.0)) == "no"
    assert verdict(claims.gates_exceed_null(0, 0, 0.0, 0.0)) == "no"


def test_communities_span_layers():
    assert verdict(claims.communities_span_layers(4, 4, 30)) == "yes"
    assert verdict(claims.communities_span_layers(1, 3, 30)) == "partly"
    # Many two-layer communities (one edge each) are not enough any more.
    assert verdict(claims.communities_span_layers(0, 2, 30)) == "no"


# ---- the table and the shared statistics ------------------------------------------------------


def test_table_and_verdict_check():
    frame = claims.table([claims.unigram_then_bigram(1, 2), claims.induction_turns_on(None, 0.0)])
    assert list(frame["reproduces?"]) == ["yes", "no"]
    assert list(frame.columns) == ["claim (paper)", "the paper", "this run", "reproduces?", "why"]
    with pytest.raises(ValueError):
        claims.ClaimResult("c", "p", "m", "maybe", "r")


def test_correlate_matches_scipy_and_drops_non_finite():
    x = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 6.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 5.0, np.inf])
    result = correlate(x, y)
    assert result.n == 4
    assert result.pearson_r == pytest.approx(0.6)
    assert result.spearman_rho == pytest.approx(0.6)
    assert math.isnan(correlate([1, 1, 1], [1, 2, 3]).pearson_r)


def test_row_spearman_and_monotone_trend():
    x = np.array([[1.0, 2, 3, 4], [1, 2, 3, 4]])
    y = np.array([[1.0, 4, 9, 16], [4, 3, 2, 1]])
    assert row_spearman(x, y) == pytest.approx([1.0, -1.0])
    assert monotone_trend([0.1, 0.2, 0.5, 0.9]) == pytest.approx(1.0)
    assert monotone_trend([0.9, 0.5, 0.2, 0.1]) == pytest.approx(-1.0)


def test_frontier_sentence_says_why_when_the_frontiers_do_not_overlap():
    none = claims.equal_l0_gap([1.0, 2.0], [0.5, 0.6], [10.0, 20.0], [0.7, 0.8])
    assert none.n_points == 0 and "cover no common range" in none.sentence() and "nan" not in none.sentence()
    some = claims.equal_l0_gap([2.0, 8.0], [0.6, 0.8], [1.0, 10.0], [0.5, 0.8])
    assert some.n_points == 2 and "span a factor 4.0" in some.sentence()
