"""The book's "Does it reproduce?" verdicts: one function per claim of the papers.

Each function takes a run's summary numbers (plain floats and arrays, so it is tested without
training anything) and returns a `ClaimResult`: the claim, what the paper found, what this run
measured, a verdict ("yes", "partly" or "no") and the reason for it. Every verdict can come out
"no": the thresholds below are named, and each comment says why that value. `table` turns a list
of results into the table a chapter shows.

Chapters: 1 the snapshot suite's learning dynamics; 2 crosscoders versus per-snapshot SAEs;
3 feature emergence; 4 complexity; 5 circuits; 6 SAE-Track; 7 features across layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from crosslib.statistics import monotone_trend

Verdict = Literal["yes", "partly", "no"]
VERDICTS: tuple[str, ...] = ("yes", "partly", "no")

# Significance level of every test below: the conventional 5%, the level the paper's own p ≈ 0.002
# clears by a wide margin.
ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class ClaimResult:
    """One row of a "Does it reproduce?" table."""

    claim: str
    paper: str
    measured: str
    verdict: Verdict
    reason: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict={self.verdict!r}: expected one of {VERDICTS}")


def table(results: Sequence[ClaimResult], claim_header: str = "claim (paper)") -> pd.DataFrame:
    """The chapter's table: claim, what the paper found, this run, the verdict and why."""
    return pd.DataFrame(
        [(r.claim, r.paper, r.measured, r.verdict, r.reason) for r in results],
        columns=[claim_header, "the paper", "this run", "reproduces?", "why"],
    )


def tier(value: float, *, yes_from: float, partly_from: float) -> Verdict:
    """"yes" from `yes_from` up, "partly" from `partly_from`, "no" below (and for NaN)."""
    return "yes" if value >= yes_from else "partly" if value >= partly_from else "no"


def tier_share(share: float, *, yes_from: float, partly_from: float, of: str) -> tuple[Verdict, str]:
    """`tier` of a share of `of` (e.g. "the live features"), with the reason that states the same
    thresholds: "yes from 5% of the live features, partly from 1%"."""
    verdict = tier(share, yes_from=yes_from, partly_from=partly_from)
    return verdict, f"yes from {yes_from:.0%} of {of}, partly from {partly_from:.0%}"


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(float(v)) for v in values)


def _log2_step(step: float) -> float:
    return math.log2(1.0 + float(step))


# ============================================================================================
# Chapter 1: the snapshot suite and its learning dynamics
# ============================================================================================

# "Well below" the bigram model: 0.2 nats per token is ~18% lower perplexity, far above the
# run-to-run noise of a held-out loss over 200 windows (~0.01 nats).
LOSS_BELOW_BIGRAM_NATS = 0.2
# The unigram KL must lose at least 80% of its initial value: a model that has learnt the token
# frequencies removes most of the initial mismatch (Pythia's falls by well over 90%).
UNIGRAM_KL_FINAL_SHARE = 0.2
# "Early" = the 95% fall is complete within the first quarter of training; Pythia's unigram stage
# is over within its first few hundred of 143,000 steps.
EARLY_SHARE_OF_TRAINING = 0.25
# A curve is "nearly flat" after a step when it moves by at most 10% of its whole range there.
FLAT_SHARE_OF_RANGE = 0.1


def unigram_then_bigram(unigram_fit_step: int, bigram_fit_step: int) -> ClaimResult:
    """The model's predictions are closest to the corpus unigram model before the bigram model."""
    verdict: Verdict = "yes" if unigram_fit_step < bigram_fit_step else "no"
    return ClaimResult(
        "Predictions first approach the unigram model, then the bigram model",
        "a statistical-learning phase: unigram statistics, then bigram statistics",
        f"unigram stage at step {unigram_fit_step}, bigram stage at step {bigram_fit_step}",
        verdict,
        "the unigram minimum comes first" if verdict == "yes" else "the bigram minimum does not come after the unigram one",
    )


def loss_below_bigram(final_loss: float, bigram_ce: float) -> ClaimResult:
    """The final held-out loss is well below the corpus bigram model's cross-entropy."""
    gap = bigram_ce - final_loss
    verdict: Verdict = "yes" if gap >= LOSS_BELOW_BIGRAM_NATS else ("partly" if gap > 0 else "no")
    return ClaimResult(
        "The final loss is well below the corpus bigram model's cross-entropy",
        "after the statistical phase the model uses more context than one token",
        f"{final_loss:.2f} vs {bigram_ce:.2f} nats",
        verdict,
        f"{gap:+.2f} nats below the bigram model (needs ≥ {LOSS_BELOW_BIGRAM_NATS} for yes, > 0 for partly)",
    )


def unigram_kl_falls_early(kl_step0: float, kl_final: float, saturation_step: int, final_step: int) -> ClaimResult:
    """The token-frequency mismatch falls by most of its value, and does so early in training."""
    falls = kl_final <= UNIGRAM_KL_FINAL_SHARE * kl_step0
    early = saturation_step <= EARLY_SHARE_OF_TRAINING * final_step
    verdict: Verdict = "yes" if falls and early else ("partly" if falls else "no")
    return ClaimResult(
        "Token-frequency mismatch (unigram KL) falls early",
        "unigram statistics are learnt first, within the first few hundred steps",
        f"{kl_step0:.2f} → {kl_final:.3f} nats; 95% of the fall by step {saturation_step} of {final_step}",
        verdict,
        ("falls to ≤ {:.0%} of its start".format(UNIGRAM_KL_FINAL_SHARE) if falls else
         "ends above {:.0%} of its start".format(UNIGRAM_KL_FINAL_SHARE))
        + (f", within the first {EARLY_SHARE_OF_TRAINING:.0%} of training" if early else
           f", but only after the first {EARLY_SHARE_OF_TRAINING:.0%} of training"),
    )


def induction_turns_on(induction_step: int | None, final_score: float) -> ClaimResult:
    """An induction head turns on at an identifiable snapshot (`crosslib.analyses.dynamics.phase_summary`)."""
    from crosslib.analyses.dynamics import INDUCTION_ON_NATS  # (torch-free callers need not import it)

    verdict: Verdict = "yes" if induction_step is not None else "no"
    return ClaimResult(
        "An induction head turns on at an identifiable step",
        "induction heads form abruptly, in the feature-learning phase",
        f"step {induction_step} (final score {final_score:.2f} nats)" if induction_step is not None else
        f"not found (final score {final_score:.2f} nats)",
        verdict,
        f"a snapshot's score exceeds {INDUCTION_ON_NATS:g} nat" if verdict == "yes" else
        f"no snapshot's score exceeds {INDUCTION_ON_NATS:g} nat",
    )


def induction_is_robust(on_steps: Sequence[int | None], interval: int) -> ClaimResult:
    """Induction turns on in every run of a grid (seeds × precisions × CPU kernels), at steps that
    differ by at most one checkpoint interval. `on_steps`: each run's first snapshot whose induction
    score exceeds `crosslib.analyses.dynamics.INDUCTION_ON_NATS` (None: never). "partly": every run turns it
    on, but the step varies more than that; "no": some run never does."""
    runs = len(on_steps)
    found = [int(s) for s in on_steps if s is not None]
    spread = max(found) - min(found) if found else 0
    verdict: Verdict = ("no" if not runs or len(found) < runs else "yes" if spread <= interval else "partly")
    measured = f"{len(found)} of {runs} runs" + (f", steps {min(found)}–{max(found)}" if found else "")
    return ClaimResult(
        "Induction turns on whatever the seed, precision or CPU",
        "one training run; a reproduction should not hinge on its seed or its CPU's rounding",
        measured,
        verdict,
        f"every run, within one checkpoint interval ({interval} steps)" if verdict == "yes" else
        f"every run, but the steps spread over {spread} > {interval} steps" if verdict == "partly" else
        f"{runs - len(found)} run(s) never reach the induction threshold",
    )


def flat_after(values: Sequence[float] | np.ndarray, steps: Sequence[int], from_step: int) -> tuple[bool, float]:
    """Is a curve nearly flat from `from_step` on? Returns (flat, share) where share is the range of
    the values from that step on divided by the curve's whole range (flat: share ≤ FLAT_SHARE_OF_RANGE)."""
    values = np.asarray(values, dtype=np.float64)
    steps = np.asarray(steps)
    whole = float(np.nanmax(values) - np.nanmin(values))
    late = values[steps >= from_step]
    if whole <= 0 or late.size == 0:
        return True, 0.0
    share = float(np.nanmax(late) - np.nanmin(late)) / whole
    return share <= FLAT_SHARE_OF_RANGE, share


# ============================================================================================
# Chapter 2: crosscoders versus per-snapshot SAEs
# ============================================================================================

# Explained variance within 0.01 is a tie: the spread between seeds of one dictionary on the tiny
# suite is of that order.
EV_TIE = 0.01
# Below 0.03 EV the crosscoder is clearly worse (three times the tie band).
EV_CLEARLY_WORSE = 0.03
# The frontiers must overlap over at least a factor 4 in L0 for an equal-L0 comparison to mean
# something (two or three nearby points are not a frontier).
MIN_L0_OVERLAP_FACTOR = 4.0
# At equal λ the two L0s are "comparable" within a factor 2, and loosely so within a factor 4.
L0_RATIO_BAND = (0.5, 2.0)
L0_RATIO_LOOSE_BAND = (0.25, 4.0)


@dataclasses.dataclass(frozen=True)
class FrontierGap:
    """Explained-variance gap of frontier A over frontier B at equal L0.

    mean_gap: mean over A's points inside B's L0 range of EV_A − EV_B(L0), B interpolated on a
        log-L0 axis; n_points: how many of A's points were inside; overlap_factor: the largest over
        the smallest L0 of those points (1 for one point, NaN for none).
    """

    mean_gap: float
    n_points: int
    overlap_factor: float

    def sentence(self) -> str:
        """Chapter 2's sentence on the final snapshot's frontiers, or why they cannot be compared."""
        if self.n_points == 0 or not math.isfinite(self.mean_gap):
            return ("The two frontiers cover no common range of L0 on the final snapshot, so they cannot be "
                    "compared at equal L0 (a wider λ sweep would make them overlap).")
        return (f"Where both frontiers cover the same L0 range ({self.n_points} crosscoder points), the crosscoder's "
                f"explained variance on the final snapshot is {self.mean_gap:+.3f} above the per-snapshot SAE frontier "
                f"at the same L0 (interpolated on a log-L0 axis); those points span a factor "
                f"{self.overlap_factor:.1f} in L0.")


def equal_l0_gap(l0_a: Sequence[float], ev_a: Sequence[float], l0_b: Sequence[float], ev_b: Sequence[float]) -> FrontierGap:
    """`FrontierGap` of A (e.g. the crosscoder) over B (the SAEs), each given as its λ sweep's points."""
    l0_a, ev_a, l0_b, ev_b = (np.asarray(v, dtype=np.float64) for v in (l0_a, ev_a, l0_b, ev_b))
    order = np.argsort(l0_b)
    l0_b, ev_b = l0_b[order], ev_b[order]
    keep = (l0_b > 0) & np.isfinite(ev_b)
    l0_b, ev_b = l0_b[keep], ev_b[keep]
    if l0_b.size == 0:
        return FrontierGap(math.nan, 0, math.nan)
    inside = (l0_a >= l0_b.min()) & (l0_a <= l0_b.max()) & np.isfinite(ev_a)
    if not inside.any():
        return FrontierGap(math.nan, 0, math.nan)
    gap = ev_a[inside] - np.interp(np.log(l0_a[inside]), np.log(l0_b), ev_b)
    return FrontierGap(float(gap.mean()), int(inside.sum()), float(l0_a[inside].max() / l0_a[inside].min()))


def crosscoder_frontier(final: FrontierGap) -> ClaimResult:
    """Headline of chapter 2: on the final snapshot, the crosscoder's frontier is as good as the SAEs'
    at equal L0 (paper Fig. 3)."""
    if final.n_points == 0:
        verdict: Verdict = "no"
        reason = "the frontiers do not overlap in L0, so they cannot be compared"
        measured = "frontiers do not overlap"
    else:
        measured = (f"{final.mean_gap:+.3f} EV at equal L0 ({final.n_points} points over a factor "
                    f"{final.overlap_factor:.1f} in L0)")
        wide = final.overlap_factor >= MIN_L0_OVERLAP_FACTOR
        if final.mean_gap >= -EV_TIE and wide:
            verdict, reason = "yes", f"within {EV_TIE} EV or better, over ≥ {MIN_L0_OVERLAP_FACTOR:g}× in L0"
        elif final.mean_gap >= -EV_TIE:
            verdict, reason = "partly", f"a tie, but the overlap is narrower than {MIN_L0_OVERLAP_FACTOR:g}× in L0"
        elif final.mean_gap >= -EV_CLEARLY_WORSE:
            verdict, reason = "partly", f"slightly worse (within {EV_CLEARLY_WORSE} EV)"
        else:
            verdict, reason = "no", f"worse by more than {EV_CLEARLY_WORSE} EV at equal L0"
    return ClaimResult(
        "On the final snapshot the crosscoder frontier is as good or slightly better (Fig. 3)",
        "as good or slightly better at equal L0",
        measured, verdict, reason,
    )


def crosscoder_matches_each_snapshot(gaps: Sequence[float] | np.ndarray, steps: Sequence[int]) -> ClaimResult:
    """Paper Fig. 2: at equal L0 the crosscoder explains as much variance as the SAE of every snapshot.
    `gaps` are the per-snapshot equal-L0 gaps (`equal_l0_gap(...).mean_gap`, NaN without overlap)."""
    gaps = np.asarray(gaps, dtype=np.float64)
    measurable = np.isfinite(gaps)
    if not measurable.any():
        return ClaimResult("Crosscoders match per-snapshot SAEs in explained variance at equal L0 (Fig. 2)",
                           "matching explained variance and L0 at every snapshot", "no snapshot's frontiers overlap",
                           "no", "the frontiers never overlap in L0")
    mean, worst = float(gaps[measurable].mean()), float(gaps[measurable].min())
    worst_step = int(np.asarray(steps)[measurable][np.argmin(gaps[measurable])])
    if mean >= -EV_TIE and worst >= -EV_CLEARLY_WORSE:
        verdict: Verdict = "yes"
        reason = f"mean within {EV_TIE} EV and no snapshot worse by more than {EV_CLEARLY_WORSE}"
    elif mean >= -EV_CLEARLY_WORSE:
        verdict, reason = "partly", f"mean within {EV_CLEARLY_WORSE} EV, but some snapshots are clearly worse"
    else:
        verdict, reason = "no", f"worse by more than {EV_CLEARLY_WORSE} EV on average"
    return ClaimResult(
        "Crosscoders match per-snapshot SAEs in explained variance at equal L0 (Fig. 2)",
        "matching explained variance and L0 at every snapshot",
        f"mean gap {mean:+.3f} over {int(measurable.sum())} of {gaps.size} snapshots; worst {worst:+.3f} "
        f"(step {worst_step})",
        verdict, reason,
    )


def equal_lambda_l0_ratio(l0_ratio: float, sparsity_coefficient: float) -> ClaimResult:
    """Secondary: at the same λ the crosscoder's L0 is comparable to the SAEs' (the same loss per snapshot
    puts the same sparsity pressure on both)."""
    low, high = L0_RATIO_BAND
    loose_low, loose_high = L0_RATIO_LOOSE_BAND
    if not _finite(l0_ratio):
        verdict: Verdict = "no"
    else:
        verdict = "yes" if low <= l0_ratio <= high else ("partly" if loose_low <= l0_ratio <= loose_high else "no")
    return ClaimResult(
        "… and at the same λ the two have a comparable L0 (secondary)",
        "comparable L0",
        f"crosscoder L0 / SAE L0 = {l0_ratio:.2f} at λ = {sparsity_coefficient:g}",
        verdict,
        f"yes within {low:g}–{high:g}×, partly within {loose_low:g}–{loose_high:g}×",
    )


# ============================================================================================
# Chapter 3: how features emerge
# ============================================================================================

# Initialisation features must be a visible band of the Fig. 4 heatmap: 5% of the live features
# (≈ 25 of 512); 1% (≈ 5 features) is within what noise around the thresholds produces.
INIT_FEATURES_YES = 0.05
INIT_FEATURES_PARTLY = 0.01
# "Most" = more than half of the live features; a quarter still makes the turning point the
# main event of the dictionary.
MOST = 0.5
SOME_SHARE = 0.25
# Directions are "nearly orthogonal" across the turning point when the mean projection is below
# 0.3 (cos 73°), and "rotate slowly" after it when above 0.5; a partial result needs the two to
# differ by at least 0.2.
ORTHOGONAL_MAX = 0.3
ALIGNED_MIN = 0.5
CONTRAST_MIN = 0.2
# A within-feature rank correlation of 0.5 is a strong monotone association (the paper calls the
# relation strong).
STRONG_CORRELATION = 0.5
# The strong-feature fraction "recovers" after its dip when it regains at least 0.1 (10 points).
RECOVERY_MIN = 0.1


def initialisation_features(initialisation_fraction: float, n_live: int) -> ClaimResult:
    """Some features are strong at initialisation and then fade (share of the live features)."""
    f = initialisation_fraction
    verdict, reason = tier_share(f, yes_from=INIT_FEATURES_YES, partly_from=INIT_FEATURES_PARTLY, of="the live features")
    return ClaimResult(
        "Some features are strong at initialisation and then fade",
        "a band of initialisation features that fade early (Fig. 4)",
        f"{100 * f:.1f}% of {n_live} live features",
        verdict, reason,
    )


def most_form_after_turning_point(emergence_steps: Sequence[float] | np.ndarray, turning_step: int) -> ClaimResult:
    """Most features form after the turning point. `emergence_steps` has one entry per *live* (non-dead)
    feature: its emergence step, NaN for features that never emerge (initialisation, persistent,
    transient), so the share is over all live features, not only the emergent ones."""
    steps = np.asarray(emergence_steps, dtype=np.float64)
    n_live = steps.size
    after = float(np.sum(np.isfinite(steps) & (steps >= turning_step)) / n_live) if n_live else math.nan
    if not _finite(after):
        verdict: Verdict = "no"
    else:
        verdict = "yes" if after > MOST else ("partly" if after >= SOME_SHARE else "no")
    return ClaimResult(
        "Most features form after a turning point",
        "most features form after a turning point (≈ step 1000 for Pythia)",
        f"turning point at step {turning_step}; {after:.0%} of {n_live} live features form at or after it",
        verdict,
        f"yes above {MOST:.0%} of the live features, partly from {SOME_SHARE:.0%}",
    )


def turning_point_ends_statistical_phase(turning_step: int, unigram_saturation_step: int,
                                         bigram_saturation_step: int) -> ClaimResult:
    """The turning point comes at the end of the statistical-learning phase (after the n-gram fits saturate)."""
    verdict: Verdict = ("yes" if turning_step >= bigram_saturation_step else
                        "partly" if turning_step >= unigram_saturation_step else "no")
    return ClaimResult(
        "The turning point comes at the end of the statistical-learning phase",
        "feature learning starts when unigram and bigram learning are done",
        f"turning point {turning_step}; unigram fit saturated at step {unigram_saturation_step}, "
        f"bigram fit at step {bigram_saturation_step}",
        verdict,
        {"yes": "after both fits saturate", "partly": "after the unigram fit, before the bigram fit saturates",
         "no": "before the unigram fit saturates"}[verdict],
    )


def directions_reorganise(across: float, after: float) -> ClaimResult:
    """Decoder directions before and after the turning point are nearly orthogonal, and rotate slowly
    after it. `across`/`after`: mean norm-weighted projections (`crosslib.analyses.emergence.projection_matrix`,
    "peak") between a snapshot before and one after the turning point, and between two after it."""
    if not _finite(across, after):
        verdict: Verdict = "no"
        reason = "not measurable: no snapshot on one side of the turning point"
    elif across < ORTHOGONAL_MAX and after > ALIGNED_MIN:
        verdict, reason = "yes", f"across < {ORTHOGONAL_MAX} and after > {ALIGNED_MIN}"
    elif after - across >= CONTRAST_MIN:
        verdict, reason = "partly", f"after exceeds across by ≥ {CONTRAST_MIN}, short of the yes thresholds"
    else:
        verdict, reason = "no", f"after − across < {CONTRAST_MIN}: no reorganisation at the turning point"
    return ClaimResult(
        "Directions before and after the turning point are nearly orthogonal; after it they rotate slowly",
        "nearly orthogonal across the turning point, slowly rotating after it (Fig. 5c)",
        f"mean projection across {across:.2f}, after {after:.2f}",
        verdict, reason,
    )


def decoder_norm_tracks_separability(within_statistic: float, null_mean: float, p_value: float, n_features: int,
                                     pooled_pearson: float) -> ClaimResult:
    """The decoder norm measures feature strength: within a feature, snapshots with a larger decoder norm
    make it more linearly separable, beyond the shared trend over training
    (`crosslib.analyses.probes.within_feature_rank_correlation`)."""
    if not _finite(within_statistic, p_value):
        verdict: Verdict = "no"
        reason = "not measurable: too few probed features"
    elif within_statistic >= STRONG_CORRELATION and p_value < ALPHA:
        verdict, reason = "yes", f"strong (≥ {STRONG_CORRELATION}) and above the shuffled-feature null (p < {ALPHA})"
    elif p_value < ALPHA:
        verdict, reason = "partly", f"above the shuffled-feature null (p < {ALPHA}) but weaker than {STRONG_CORRELATION}"
    else:
        verdict, reason = "no", "not above the shuffled-feature null: the shared trend over training explains it"
    return ClaimResult(
        "Decoder norm correlates strongly with linear separability",
        "a larger decoder norm means a more linearly separable feature",
        f"within-feature Spearman {within_statistic:.2f} vs {null_mean:.2f} for shuffled features "
        f"(p = {p_value:.2g}, {n_features} features); pooled Pearson {pooled_pearson:.2f}",
        verdict, reason,
    )


def strong_fraction_recovers(step0_fraction: float, dip_fraction: float, final_fraction: float) -> bool:
    """Does the fraction of strong features recover after its dip (by at least RECOVERY_MIN)?"""
    return final_fraction - dip_fraction >= RECOVERY_MIN and dip_fraction < step0_fraction


# ============================================================================================
# Chapter 4: complexity
# ============================================================================================

PAPER_COMPLEXITY = "Pearson r ≈ 0.31, p ≈ 0.002 (LLM scores)"


def complexity_rises_with_emergence(*, raw_step_r: float, raw_step_p: float, log_step_r: float, log_step_p: float,
                                    n: int, scorer: Literal["llm", "context depth"]) -> ClaimResult:
    """Complexity correlates positively with emergence step.

    The paper correlates LLM complexity scores with the emergence step (its axis: the step); we
    also report log(1 + step). "yes" needs the paper's method (LLM scores) and a positive
    correlation with p < ALPHA on the paper's axis. A positive, significant correlation only on
    log(step), or only with the offline context-depth proxy, is "partly". A positive r that is not
    significant is "no".
    """
    label = "LLM rubric" if scorer == "llm" else "context depth (offline proxy)"
    if not _finite(raw_step_r, raw_step_p, log_step_r, log_step_p):
        return ClaimResult("Complexity correlates positively with emergence step", PAPER_COMPLEXITY,
                           f"{label}: not measurable, {n} scored feature(s) that emerged", "no",
                           "too few emerging features to correlate")
    paper_axis = raw_step_r > 0 and raw_step_p < ALPHA
    log_axis = log_step_r > 0 and log_step_p < ALPHA
    if paper_axis and scorer == "llm":
        verdict: Verdict = "yes"
        reason = f"positive with p < {ALPHA} on the step axis, with LLM scores"
    elif paper_axis or log_axis:
        verdict = "partly"
        reason = ("positive and significant, but scored with the offline proxy" if scorer != "llm" else
                  "significant on log(1 + step) only")
    else:
        verdict, reason = "no", f"no positive correlation with p < {ALPHA}"
    return ClaimResult(
        "Complexity correlates positively with emergence step",
        PAPER_COMPLEXITY,
        f"{label}: r = {raw_step_r:.2f} (p = {raw_step_p:.2g}) on the step, r = {log_step_r:.2f} "
        f"(p = {log_step_p:.2g}) on log(1 + step), n = {n}",
        verdict, reason,
    )


def complexity_scored_by_llm(llm_used: bool) -> ClaimResult:
    """The paper's method: an LLM scores each feature from its top contexts."""
    return ClaimResult(
        "Scored with an LLM (Claude) from 7 top contexts",
        "Claude Sonnet 4, 7 contexts of ≤ 50 tokens",
        "LLM rubric used" if llm_used else "no API key and no cached answers: offline proxy only",
        "yes" if llm_used else "no",
        "the paper's scorer was used" if llm_used else "the offline context-depth score is a proxy, not the paper's method",
    )


# ============================================================================================
# Chapter 5: circuits
# ============================================================================================

# "Break the behaviour": the top features remove at least half of the metric, while as many random
# active features remove under 10%.
BREAK_SHARE = 0.5
RANDOM_SHARE_MAX = 0.1
# A partial result still needs the top features to do at least twice what random ones do.
TOP_OVER_RANDOM = 2.0
# "Restore": patching the top features brings back at least half of the clean behaviour; a fifth is partial.
RESTORE_SHARE = 0.5
RESTORE_PARTLY = 0.2
# "Tens of features": the comparison must use at most 100 features.
MAX_FEW_FEATURES = 100
# "Lines up": within one doubling of the step (snapshots are log-spaced), partly within two.
MAX_DOUBLINGS = 1.0
MAX_DOUBLINGS_PARTLY = 2.0


def _not_performed(claim: str, paper: str, metric: float) -> ClaimResult:
    return ClaimResult(claim, paper, f"not measurable: the task is not performed (metric {metric:.3f})", "no",
                       "fractions of a metric near zero are ratios of noise")


def few_features_break(lost_top: float, lost_random: float, k: int, *, task_performed: bool, metric: float) -> ClaimResult:
    """Tens of features suffice to break the behaviour (zero-ablation of the top k)."""
    claim, paper = "Tens of features suffice to break the behaviour", "ablating a few tens of features breaks the task"
    if not task_performed:
        return _not_performed(claim, paper, metric)
    few = k <= MAX_FEW_FEATURES
    if few and lost_top >= BREAK_SHARE and lost_random < RANDOM_SHARE_MAX:
        verdict: Verdict = "yes"
        reason = f"top {k} remove ≥ {BREAK_SHARE:.0%}, random ones < {RANDOM_SHARE_MAX:.0%}"
    elif few and lost_top > TOP_OVER_RANDOM * max(lost_random, 0.01):
        verdict, reason = "partly", f"top features do more than {TOP_OVER_RANDOM:g}× random ones, short of yes"
    else:
        verdict, reason = "no", "top features are not clearly more important than random ones"
    return ClaimResult(claim, paper, f"top {k}: {lost_top:.0%} lost, random {k}: {lost_random:.0%}", verdict, reason)


def few_features_restore(recovery_top: float, recovery_random: float, k: int, *, task_performed: bool,
                         metric: float) -> ClaimResult:
    """… and patching them from clean into corrupted prompts restores it."""
    claim, paper = "… and to restore it by patching", "patching a few tens of features restores the task"
    if not task_performed:
        return _not_performed(claim, paper, metric)
    better = recovery_top > TOP_OVER_RANDOM * max(recovery_random, 0.01)
    if k <= MAX_FEW_FEATURES and recovery_top >= RESTORE_SHARE and better:
        verdict: Verdict = "yes"
        reason = f"≥ {RESTORE_SHARE:.0%} recovered, > {TOP_OVER_RANDOM:g}× random features"
    elif k <= MAX_FEW_FEATURES and recovery_top >= RESTORE_PARTLY and better:
        verdict, reason = "partly", f"≥ {RESTORE_PARTLY:.0%} recovered"
    else:
        verdict, reason = "no", f"under {RESTORE_PARTLY:.0%} recovered, or no better than random features"
    return ClaimResult(claim, paper, f"top {k} recover {recovery_top:.0%}, random {k} {recovery_random:.0%}",
                       verdict, reason)


def emergence_lines_up_with_task(median_top_emergence: float | None, task_turn_on: int | None, *,
                                 task_performed: bool) -> ClaimResult:
    """The dominant features emerge when the task turns on (compared on log2(1 + step))."""
    claim, paper = "Feature emergence lines up with task performance", "dominant features form when the task is learnt"
    if not task_performed or task_turn_on is None or not _finite(median_top_emergence):
        return ClaimResult(claim, paper, "not measurable", "no",
                           "the task is not performed, or no top feature has an emergence step")
    doublings = abs(_log2_step(median_top_emergence) - _log2_step(task_turn_on))
    verdict: Verdict = ("yes" if doublings <= MAX_DOUBLINGS else "partly" if doublings <= MAX_DOUBLINGS_PARTLY else "no")
    return ClaimResult(
        claim, paper,
        f"median top-feature emergence {median_top_emergence:.0f} vs task turn-on {task_turn_on} "
        f"({doublings:.1f} doublings apart)",
        verdict, f"yes within {MAX_DOUBLINGS:g} doubling of the step, partly within {MAX_DOUBLINGS_PARTLY:g}",
    )


# ============================================================================================
# Chapter 6: SAE-Track
# ============================================================================================

# Formation: at least 10% of the final features must form (reach half their final score) for a
# statement about "features" at all.
MIN_FORMED_FRACTION = 0.1
# "Progressively": the median formation progress rises steadily over checkpoints (Spearman with the
# checkpoint index ≥ 0.8), and no single checkpoint holds more than half of the formations, which
# would be one jump rather than a progression; at least 3 checkpoints must see formations.
PROGRESS_TREND_MIN = 0.8
PROGRESS_TREND_PARTLY = 0.5
MAX_SHARE_ONE_CHECKPOINT = 0.5
MIN_FORMATION_CHECKPOINTS = 3
# Drift is real when the first checkpoint is at least 3× further from the final direction than
# one late link moves a settled feature (the chain's noise floor) ...
DRIFT_OVER_NOISE = 3.0
# ... and it is a real turn at all: 1 − cosine ≥ 0.05 (cos 0.95, about 18°); below that the direction
# has barely moved, whatever the noise floor ...
MIN_DRIFT = 0.05
# ... and it settles: the early links move directions at least twice as much as the late ones.
# Pure link noise accumulates like a random walk (also far from the final direction after many
# links) but moves every link by the same amount.
SETTLE_RATIO = 2.0


def warm_start_efficient(ev_gaps: Sequence[float] | np.ndarray) -> ClaimResult:
    """A warm-started chain follows the snapshots at least as well as SAEs trained from scratch on the
    same token budget. `ev_gaps`: warm − cold explained variance per checkpoint."""
    gaps = np.asarray(ev_gaps, dtype=np.float64)
    gaps = gaps[np.isfinite(gaps)]
    claim = "A warm-started chain of SAEs is an efficient way to follow features (shown qualitatively)"
    if gaps.size == 0:
        return ClaimResult(claim, "warm starts beat training from scratch", "no warm/cold pair", "no", "not measurable")
    mean, wins = float(gaps.mean()), float(np.mean(gaps >= -EV_TIE))
    if mean >= -EV_TIE:
        verdict: Verdict = "yes"
        reason = f"warm is within {EV_TIE} EV of cold or better on average"
    elif mean >= -EV_CLEARLY_WORSE:
        verdict, reason = "partly", f"warm is slightly worse (within {EV_CLEARLY_WORSE} EV)"
    else:
        verdict, reason = "no", f"warm is worse than cold by more than {EV_CLEARLY_WORSE} EV at equal tokens"
    return ClaimResult(claim, "warm starts beat training from scratch",
                       f"warm − cold EV at equal tokens: {mean:+.3f} on average; warm ties or wins at {wins:.0%} "
                       f"of {gaps.size} checkpoints", verdict, reason)


def features_form_progressively(formed_fraction: float, formation_steps: Sequence[float] | np.ndarray,
                                median_progress: Sequence[float] | np.ndarray) -> ClaimResult:
    """Features form progressively during training.

    formation_steps: the formation step of every formed feature; median_progress: per checkpoint,
    the median over formed features of formation score / final score
    (`crosslib.analyses.saetrack_analysis.formation_progress`).
    """
    steps = np.asarray(formation_steps, dtype=np.float64)
    steps = steps[np.isfinite(steps)]
    claim, paper = "Features form progressively during training", "features form gradually, at different times"
    if formed_fraction < MIN_FORMED_FRACTION or steps.size == 0:
        return ClaimResult(claim, paper, f"{formed_fraction:.0%} of the features formed", "no",
                           f"fewer than {MIN_FORMED_FRACTION:.0%} of the final features form")
    trend = monotone_trend(median_progress)
    _, counts = np.unique(steps, return_counts=True)
    largest_share = float(counts.max() / counts.sum())
    spread = largest_share <= MAX_SHARE_ONE_CHECKPOINT and counts.size >= MIN_FORMATION_CHECKPOINTS
    measured = (f"{formed_fraction:.0%} formed, median step {np.median(steps):.0f}; progress trend ρ = {trend:.2f}; "
                f"{counts.size} formation checkpoints, the largest holding {largest_share:.0%}")
    if _finite(trend) and trend >= PROGRESS_TREND_MIN and spread:
        verdict: Verdict = "yes"
        reason = f"progress rises steadily (ρ ≥ {PROGRESS_TREND_MIN}) and formations spread over checkpoints"
    elif (_finite(trend) and trend >= PROGRESS_TREND_PARTLY) or spread:
        verdict, reason = "partly", "either the rise is unsteady or formations bunch at one checkpoint"
    else:
        verdict, reason = "no", "formation progress does not rise steadily and formations bunch together"
    return ClaimResult(claim, paper, measured, verdict, reason)


def decoder_drift(median_cosine_to_final: Sequence[float] | np.ndarray,
                  median_link_change: Sequence[float] | np.ndarray) -> ClaimResult:
    """Decoder directions drift, then settle on their final direction.

    median_cosine_to_final: per checkpoint, the median over features of the cosine to the final
    direction (`crosslib.analyses.saetrack_analysis.drift_to_final`); median_link_change: per link k → k+1, the median
    of 1 − cosine (`crosslib.analyses.saetrack_analysis.link_changes`). The noise floor is the mean change over the
    last third of the links (at least one).
    """
    cosine = np.asarray(median_cosine_to_final, dtype=np.float64)
    change = np.asarray(median_link_change, dtype=np.float64)
    claim, paper = "Decoder directions drift towards their final direction", "directions drift early, then settle"
    if cosine.size < 3 or change.size < 2 or not np.isfinite(change).all():
        return ClaimResult(claim, paper, "too few checkpoints", "no", "not measurable")
    third = max(1, change.size // 3)
    floor, early = float(change[-third:].mean()), float(change[:third].mean())
    total = 1.0 - float(cosine[0])
    beyond_noise = total >= MIN_DRIFT and total >= DRIFT_OVER_NOISE * floor
    settles = early > 0 and early >= SETTLE_RATIO * floor
    measured = (f"median cosine to final {cosine[0]:.2f} at the first checkpoint; a late link moves "
                f"{floor:.3f}, an early one {early:.3f} (1 − cosine)")
    if beyond_noise and settles:
        verdict: Verdict = "yes"
        reason = f"drift ≥ {DRIFT_OVER_NOISE:g}× a late link's change, and early links move ≥ {SETTLE_RATIO:g}× late ones"
    elif beyond_noise:
        verdict, reason = "partly", "far from the final direction, but every link moves about as much: may be link noise"
    else:
        verdict, reason = "no", (f"the drift is below {MIN_DRIFT} (1 − cosine) or within {DRIFT_OVER_NOISE:g}× what "
                                 "one late link moves a settled feature")
    return ClaimResult(claim, paper, measured, verdict, reason)


# ============================================================================================
# Chapter 7: features across layers
# ============================================================================================

# "Many" features pass through: a fifth of a layer's live features; one in twenty is still a real
# phenomenon (partly), below that it is not "many".
PASS_THROUGH_MANY = 0.2
PASS_THROUGH_SOME = 0.05
# Gates: at least 3 candidates ("some"), and more than a row-shuffled null gives (Poisson tail < 1%,
# stricter than ALPHA because the null is an expectation over many feature pairs).
MIN_GATES = 3
GATE_NULL_P = 0.01
# Communities must span at least three layers (two chained edges: edges only join adjacent layers);
# two such communities make "communities", one is partial.
COMMUNITY_MIN_LAYERS = 3
MIN_SPANNING_COMMUNITIES = 2


def features_pass_through(mean_pass_through_fraction: float, pass_through: float) -> ClaimResult:
    """Many features pass through to the next layer (best next-layer correlation ≥ pass_through)."""
    f = mean_pass_through_fraction
    verdict, reason = tier_share(f, yes_from=PASS_THROUGH_MANY, partly_from=PASS_THROUGH_SOME,
                                 of="a layer's live features")
    return ClaimResult(
        f"Many features pass through to the next layer (best correlation ≥ {pass_through:g})",
        "many residual-stream features pass through unchanged",
        f"mean pass-through fraction {f:.0%}",
        verdict, reason,
    )


def gates_exceed_null(and_gates: int, or_gates: int, null_and: float, null_or: float) -> ClaimResult:
    """Some downstream features act as AND/OR gates of two upstream features, more than chance gives
    (`crosslib.analyses.crosslayer.gate_null_expectation`)."""
    observed, expected = int(and_gates) + int(or_gates), float(null_and) + float(null_or)
    p_value = float(stats.poisson.sf(observed - 1, expected)) if expected > 0 else (0.0 if observed > 0 else 1.0)
    significant = p_value < GATE_NULL_P
    if observed >= MIN_GATES and significant:
        verdict: Verdict = "yes"
        reason = f"≥ {MIN_GATES} candidates, more than the shuffled null (p < {GATE_NULL_P})"
    elif observed >= 1 and significant:
        verdict, reason = "partly", f"above the shuffled null but fewer than {MIN_GATES} candidates"
    else:
        verdict, reason = "no", "no more candidates than shuffling the rows gives"
    return ClaimResult(
        "Some downstream features act as AND/OR gates of two upstream features",
        "quasi-boolean AND and OR gates exist",
        f"{int(and_gates)} AND, {int(or_gates)} OR candidates; {expected:.2g} expected with shuffled rows "
        f"(p = {p_value:.2g})",
        verdict, reason,
    )


def communities_span_layers(communities_spanning_3_layers: int, widest_community_layers: int,
                            n_communities: int) -> ClaimResult:
    """Features form communities spanning layers: communities that reach over ≥ COMMUNITY_MIN_LAYERS layers."""
    n = int(communities_spanning_3_layers)
    verdict = tier(n, yes_from=MIN_SPANNING_COMMUNITIES, partly_from=1)
    return ClaimResult(
        "Features form communities spanning layers",
        "communities of features spanning several layers",
        f"{n} of {n_communities} communities span ≥ {COMMUNITY_MIN_LAYERS} layers (widest: {widest_community_layers})",
        verdict,
        f"yes from {MIN_SPANNING_COMMUNITIES} communities over ≥ {COMMUNITY_MIN_LAYERS} layers, partly from one",
    )
