"""How crosscoder features emerge over pre-training (paper Fig. 4–5; the book's Methods page,
sections The firing rule and Emergence).

A crosscoder has one decoder vector per feature *per snapshot*, W_D[θ, i, :]. Its length
‖W_D,i^θ‖ says how strongly feature i is written into the residual stream at snapshot θ, so
the per-feature trajectory of decoder norms over snapshots tells when a feature forms, peaks
and fades. This module turns those trajectories (and the decoder directions) into numbers a
notebook can plot and quote:

- `relative_strength`: ρ_i(θ) = ‖W_D,i^θ‖ / max_θ′ ‖W_D,i^θ′‖, each feature on its own 0–1 scale;
- `emergence_table`: one row per feature with its category (initialisation / emergent /
  persistent / transient / dead), emergence step, peak step and lifetime;
- `strong_fraction_curve`, `direction_change_curve`, `turning_point`: when the dictionary
  reorganises;
- `projection_matrix`: the mean cross-snapshot decoder projection P[θ, θ′];
- `separability`: whether a bigger decoder norm really means a more linearly readable
  feature (a logistic probe per feature and snapshot, AUC against the decoder norm);
  `within_feature_rank_correlation` / `separability_test`: the same question within each
  feature, with a permutation p-value that keeps the shared trend over training;
- `step_histogram`, `lifetime_histogram`, `summarise_emergence`: distributions and
  one-number summaries for the book's glue.

Every function works on plain arrays (numpy or torch), so it can be tested on synthetic
trajectories with known answers and used on any crosscoder. Shapes follow the crosscoder:
decoder weights are [snapshot, feature, d_model], decoder norms are [snapshot, feature].
Thresholds live in `EmergenceConfig` and `SeparabilityConfig`; bad values raise
`ParameterError` naming the parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Annotated, Any, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from scipy import stats
from crosslib.progress import progress as tqdm

from crosslib.config import (
    Config,
    ParameterError,
    choice,
    finite,
    fraction,
    integer,
    positive,
    require,
    require_choice,
)
from crosslib.statistics import correlate

# Decoder weights / norms may come straight from the model (torch) or from disk (numpy).
Decoder = Float[torch.Tensor, "snapshot feature d_model"] | Float[np.ndarray, "snapshot feature d_model"]
Norms = Float[torch.Tensor, "snapshot feature"] | Float[np.ndarray, "snapshot feature"]
FeatureSelection = Bool[np.ndarray, "feature"] | Int[np.ndarray, "selected"] | Sequence[int] | None

CATEGORIES: tuple[str, ...] = ("initialisation", "emergent", "persistent", "transient", "dead")
TURNING_POINT_METHODS: tuple[str, ...] = ("direction_change", "strength_dip")
DIRECTION_WEIGHTINGS: tuple[str, ...] = ("strength", "uniform")
PROJECTION_NORMALISATIONS: tuple[str, ...] = ("peak", "cosine", "raw")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EmergenceConfig(Config):
    """Thresholds that turn decoder-norm trajectories into feature categories and steps.

    strong_fraction: a feature is *strong* at snapshot θ when ρ_i(θ) ≥ strong_fraction, where
        ρ_i(θ) is its decoder norm divided by its own largest decoder norm (the paper's Fig. 4
        colour scale). Default 0.5: "at least half its peak strength".
    fade_fraction: a feature is *faded* (absent) at θ when ρ_i(θ) < fade_fraction. A feature
        that is strong at initialisation must fall below this before it can count as
        initialisation feature or re-form as an emergent one. Keeping it below
        strong_fraction gives hysteresis, so noise around one threshold is not read as a
        feature fading and re-forming. Must be ≤ strong_fraction.
    min_lifetime: a formation only counts when the feature then stays strong for at least
        this many consecutive snapshots (or until the last snapshot), which ignores one-
        snapshot blips.
    turning_point_method: "direction_change" (largest strength-weighted change of decoder
        directions between consecutive snapshots) or "strength_dip" (the snapshot where the
        fraction of strong features is lowest).
    direction_weighting: how features are weighted in the direction change: "strength"
        (by min(ρ(θ), ρ(θ+1)), so a feature only counts as much as it is present on both
        sides) or "uniform".
    projection: normalisation of the projection matrix P, see `projection_matrix`.
    """

    strong_fraction: Annotated[float, fraction()] = 0.5
    fade_fraction: Annotated[float, fraction()] = 0.25
    min_lifetime: Annotated[int, integer(1, allowed="an integer >= 1 (snapshots)")] = 1
    turning_point_method: Annotated[str, choice(*TURNING_POINT_METHODS)] = "direction_change"
    direction_weighting: Annotated[str, choice(*DIRECTION_WEIGHTINGS)] = "strength"
    projection: Annotated[str, choice(*PROJECTION_NORMALISATIONS)] = "peak"

    def validate(self) -> None:
        require(
            self.fade_fraction <= self.strong_fraction,
            "fade_fraction",
            self.fade_fraction,
            f"a number in (0, strong_fraction={self.strong_fraction}]",
        )


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
# Input checks and small helpers
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ParameterError(f"{name} must be a numeric array, got {type(x).__name__}") from error


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as error:
        raise ParameterError(f"{name} must be a numeric array, got {type(x).__name__}") from error


def validate_steps(steps: Sequence[int] | np.ndarray, n_snapshots: int) -> Int[np.ndarray, "snapshot"]:
    """Check the training step of each snapshot: integers ≥ 0, strictly increasing, one per snapshot."""
    array = np.asarray(steps)
    if array.ndim != 1 or array.size == 0:
        raise ParameterError(f"steps={steps!r} is not allowed: a non-empty 1-D list of training steps")
    if not (np.issubdtype(array.dtype, np.integer) or np.all(np.mod(array, 1) == 0)):
        raise ParameterError(f"steps={list(steps)!r} is not allowed: whole training steps")
    array = array.astype(np.int64)
    if array.size != n_snapshots:
        raise ParameterError(
            f"steps has {array.size} entries but the data has {n_snapshots} snapshots: give one step per snapshot"
        )
    if np.any(array < 0) or np.any(np.diff(array) <= 0):
        raise ParameterError(f"steps={array.tolist()} is not allowed: non-negative and strictly increasing")
    return array


def _check_norms(decoder_norms: Norms) -> Float[np.ndarray, "snapshot feature"]:
    norms = _to_numpy(decoder_norms, "decoder_norms")
    if norms.ndim != 2 or norms.shape[0] < 2 or norms.shape[1] < 1:
        raise ParameterError(
            f"decoder_norms has shape {tuple(norms.shape)}: expected [snapshot, feature] with ≥ 2 snapshots"
        )
    if not np.all(np.isfinite(norms)):
        raise ParameterError("decoder_norms contains NaN or infinite values: expected finite norms")
    if np.any(norms < 0):
        raise ParameterError("decoder_norms contains negative values: norms are ≥ 0")
    return norms


def _check_decoder(decoder: Decoder) -> torch.Tensor:
    weights = _to_tensor(decoder, "decoder")
    if weights.ndim != 3 or weights.shape[0] < 2:
        raise ParameterError(
            f"decoder has shape {tuple(weights.shape)}: expected [snapshot, feature, d_model] with ≥ 2 snapshots"
        )
    if not torch.isfinite(weights).all():
        raise ParameterError("decoder contains NaN or infinite values")
    return weights


def _feature_indices(selection: FeatureSelection, n_features: int, name: str = "features") -> np.ndarray:
    """Turn None / a boolean mask / a list of ids into sorted feature indices."""
    if selection is None:
        return np.arange(n_features)
    array = np.asarray(selection.cpu() if isinstance(selection, torch.Tensor) else selection)
    if array.dtype == bool:
        if array.shape != (n_features,):
            raise ParameterError(f"{name} mask has shape {array.shape}: expected ({n_features},)")
        return np.flatnonzero(array)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ParameterError(f"{name} must be a boolean mask or a list of feature ids")
    if array.size and (array.min() < 0 or array.max() >= n_features):
        raise ParameterError(f"{name} contains ids outside [0, {n_features})")
    return np.unique(array)


def decoder_norms(decoder: Decoder) -> Float[np.ndarray, "snapshot feature"]:
    """‖W_D,i^θ‖ for every snapshot θ and feature i, from decoder weights [snapshot, feature, d_model]."""
    weights = _check_decoder(decoder)
    return torch.linalg.vector_norm(weights.to(torch.float64), dim=-1).numpy()


def relative_strength(decoder_norms: Norms) -> Float[np.ndarray, "snapshot feature"]:
    """ρ_i(θ) = ‖W_D,i^θ‖ / max_θ′ ‖W_D,i^θ′‖: each feature's strength on its own 0–1 scale.

    Features whose decoder is zero everywhere get ρ = 0 (they never form).
    """
    norms = _check_norms(decoder_norms)
    peak = norms.max(axis=0, keepdims=True)
    return np.divide(norms, peak, out=np.zeros_like(norms), where=peak > 0)


MIN_FIRING_ROWS = 5  # default: a feature must fire on this many held-out rows at a snapshot to exist there


class LiveNorms(NamedTuple):
    norms: Float[np.ndarray, "snapshot feature"]  # decoder norms, 0 where the feature does not fire
    dead: Bool[np.ndarray, " feature"]  # never fires on min_rows rows at any snapshot
    firing: Bool[np.ndarray, "snapshot feature"]  # fires on at least min_rows rows there


def firing_norms(decoder_norms: Norms, firing_counts: Any, min_rows: int = MIN_FIRING_ROWS) -> LiveNorms:
    """The one dead-feature rule: a feature exists at a snapshot only where it fires.

    A feature that never fires gets no decoder gradient, so its decoder keeps its initial direction and
    norm and would look "persistent" by its norm alone. Here a feature that fires on fewer than `min_rows`
    held-out rows at snapshot θ (`firing_counts[θ, i]`, from training's evaluation) counts as decoder norm 0
    there (ρ = 0), and one that reaches `min_rows` at no snapshot is dead: leave it out of the emergence
    statistics (pass `dead=` to them) and report how many there are.
    """
    norms = _check_norms(decoder_norms)
    counts = np.asarray(firing_counts.detach().cpu().numpy() if isinstance(firing_counts, torch.Tensor) else firing_counts)
    require(counts.shape == norms.shape, "firing_counts", f"shape {counts.shape}",
            f"one count per (snapshot, feature): shape {norms.shape}")
    require(isinstance(min_rows, (int, np.integer)) and not isinstance(min_rows, bool) and min_rows >= 1,
            "min_firing_rows", min_rows, "an integer >= 1 (held-out rows)")
    firing = counts >= min_rows
    return LiveNorms(np.where(firing, norms, 0.0), ~firing.any(axis=0), firing)


def _dead_mask(norms: np.ndarray, dead: FeatureSelection) -> np.ndarray:
    """Dead = given by the caller (e.g. never fired on the cache) or a decoder that is zero everywhere."""
    mask = norms.max(axis=0) <= 0
    if dead is not None:
        given = np.zeros(norms.shape[1], dtype=bool)
        given[_feature_indices(dead, norms.shape[1], "dead")] = True
        mask |= given
    return mask


def _strong_run_lengths(strong: Bool[np.ndarray, "snapshot feature"]) -> Int[np.ndarray, "snapshot feature"]:
    """For each snapshot, how many consecutive snapshots from there on the feature stays strong."""
    runs = np.zeros(strong.shape, dtype=np.int64)
    runs[-1] = strong[-1]
    for k in range(strong.shape[0] - 2, -1, -1):
        runs[k] = np.where(strong[k], runs[k + 1] + 1, 0)
    return runs


# --------------------------------------------------------------------------------------------
# Trajectories: categories, emergence, peak, lifetime
# --------------------------------------------------------------------------------------------


def strong_fraction_curve(
    decoder_norms: Norms,
    steps: Sequence[int],
    config: EmergenceConfig = EmergenceConfig(),
    dead: FeatureSelection = None,
) -> pd.DataFrame:
    """Fraction of (non-dead) features that are strong (ρ ≥ strong_fraction) at each snapshot.

    In the feasibility prototype this curve dipped at the turning point (0.72 at step 0 →
    0.18 at step 32 → recovered): initialisation features had faded and new ones had not yet
    formed. Columns: step, fraction_strong, n_features.
    """
    rho = relative_strength(decoder_norms)
    step_array = validate_steps(steps, rho.shape[0])
    alive = ~_dead_mask(_check_norms(decoder_norms), dead)
    strong = rho[:, alive] >= config.strong_fraction
    fraction = strong.mean(axis=1) if alive.any() else np.full(rho.shape[0], np.nan)
    return pd.DataFrame({"step": step_array, "fraction_strong": fraction, "n_features": int(alive.sum())})


def emergence_table(
    decoder_norms: Norms,
    steps: Sequence[int],
    config: EmergenceConfig = EmergenceConfig(),
    dead: FeatureSelection = None,
) -> pd.DataFrame:
    """One row per feature: its category, emergence step, peak step and lifetime.

    Strength is ρ_i(θ) (see `relative_strength`); "strong" means ρ ≥ strong_fraction, "faded"
    means ρ < fade_fraction; the first snapshot plays the role of initialisation (step 0).

    Why not simply "the first snapshot where ρ ≥ 0.5"? At initialisation the residual stream
    is the random token embedding, and many later features stay linearly aligned with it: the
    naive rule put ~75% of features at step 0 in our feasibility prototype. So a feature
    *forms* (emerges) at the first snapshot where it becomes strong

    - after not being strong at initialisation (absent at step 0), or
    - after having faded below fade_fraction, if it was strong at initialisation
      ("re-formed": its initialisation direction was lost, then learnt again),

    and it must then stay strong for min_lifetime snapshots (or until the last snapshot).
    The naive statistic is kept as `first_strong_step` for comparison.

    Categories (exactly one per feature):
      emergent        forms at some snapshot after initialisation (see above);
      initialisation  strong at initialisation, fades below fade_fraction, never re-forms;
      persistent      strong at initialisation and never fades below fade_fraction;
      transient       not strong at initialisation, strong only in blips shorter than
                      min_lifetime;
      dead            marked dead by the caller (`dead`: mask or ids, e.g. features that never
                      fire) or with a zero decoder at every snapshot.

    Columns:
      feature, category, strong_at_init (ρ ≥ strong_fraction at the first snapshot),
      reformed (emergent and strong at initialisation),
      emergence_step (NaN unless emergent), first_strong_step (naive), peak_step (snapshot of
      the largest decoder norm, first one on ties), fade_step (first faded snapshot after
      initialisation for features strong at initialisation, else NaN),
      lifetime_snapshots (length of the run of consecutive strong snapshots that starts at
      formation: the emergence snapshot, step 0 for initialisation/persistent features, the
      peak for transient ones; 0 for dead), strong_from_step / strong_until_step (first and
      last step of that run), lifetime_steps (strong_until_step − strong_from_step),
      survives_to_end (the run reaches the last snapshot), initial_strength (ρ at step 0),
      peak_norm (largest decoder norm).
    """
    norms = _check_norms(decoder_norms)
    rho = relative_strength(norms)
    step_array = validate_steps(steps, rho.shape[0])
    n_snapshots, n_features = rho.shape
    is_dead = _dead_mask(norms, dead)

    strong = rho >= config.strong_fraction
    faded = rho < config.fade_fraction
    runs = _strong_run_lengths(strong)
    snapshot_index = np.arange(n_snapshots)[:, None]
    lasts_long_enough = (runs >= config.min_lifetime) | (snapshot_index + runs == n_snapshots)

    strong_at_init = strong[0] & ~is_dead
    # Walk the snapshots once, all features at a time: "present" features were strong at
    # initialisation and have not faded yet; the others are waiting to form.
    present = strong_at_init.copy()
    fade_index = np.full(n_features, -1)
    emergence_index = np.full(n_features, -1)
    for k in range(1, n_snapshots):
        newly_faded = present & faded[k]
        fade_index[newly_faded] = k
        present &= ~newly_faded
        forms = ~present & ~is_dead & (emergence_index < 0) & strong[k] & lasts_long_enough[k]
        emergence_index[forms] = k

    emergent = emergence_index >= 0
    category = np.full(n_features, "transient", dtype=object)
    category[strong_at_init & (fade_index < 0)] = "persistent"
    category[strong_at_init & (fade_index >= 0)] = "initialisation"
    category[emergent] = "emergent"
    category[is_dead] = "dead"

    peak_index = rho.argmax(axis=0)
    run_start = np.where(emergent, emergence_index, np.where(strong_at_init, 0, peak_index))
    features = np.arange(n_features)
    lifetime = np.where(is_dead, 0, runs[run_start, features])
    run_end = run_start + np.maximum(lifetime, 1) - 1
    first_strong = strong.argmax(axis=0)

    def steps_or_nan(index: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return np.where(valid, step_array[np.clip(index, 0, n_snapshots - 1)], np.nan)

    alive = ~is_dead
    has_run = alive & (lifetime > 0)
    return pd.DataFrame(
        {
            "feature": features,
            "category": pd.Categorical(category, categories=list(CATEGORIES)),
            "strong_at_init": strong_at_init,
            "reformed": emergent & strong_at_init,
            "emergence_step": steps_or_nan(emergence_index, emergent),
            "first_strong_step": steps_or_nan(first_strong, alive),
            "peak_step": steps_or_nan(peak_index, alive),
            "fade_step": steps_or_nan(fade_index, strong_at_init & (fade_index >= 0)),
            "lifetime_snapshots": lifetime,
            "strong_from_step": steps_or_nan(run_start, has_run),
            "strong_until_step": steps_or_nan(run_end, has_run),
            "lifetime_steps": steps_or_nan(run_end, has_run) - steps_or_nan(run_start, has_run),
            "survives_to_end": has_run & (run_end == n_snapshots - 1),
            "initial_strength": rho[0],
            "peak_norm": norms.max(axis=0),
        }
    )


def summarise_emergence(table: pd.DataFrame) -> dict[str, float]:
    """One-number summaries of an `emergence_table`, ready for myst-nb glue.

    Fractions are over non-dead features. `naive_step0_fraction` is the share of features the
    naive rule (first snapshot with ρ ≥ strong_fraction) would date at initialisation.
    """
    alive = table[table["category"] != "dead"]
    emergent = alive[alive["category"] == "emergent"]
    n_alive = len(alive)

    def fraction(mask: pd.Series) -> float:
        return float(mask.sum() / n_alive) if n_alive else math.nan

    summary = {
        "n_features": float(len(table)),
        "n_alive": float(n_alive),
        **{f"{name}_fraction": fraction(alive["category"] == name) for name in CATEGORIES if name != "dead"},
        "dead_fraction": float((table["category"] == "dead").mean()) if len(table) else math.nan,
        "reformed_fraction_of_emergent": float(emergent["reformed"].mean()) if len(emergent) else math.nan,
        "median_emergence_step": float(emergent["emergence_step"].median()) if len(emergent) else math.nan,
        "median_peak_step": float(alive["peak_step"].median()) if n_alive else math.nan,
        "median_lifetime_snapshots": float(emergent["lifetime_snapshots"].median()) if len(emergent) else math.nan,
        "emergent_survive_fraction": float(emergent["survives_to_end"].mean()) if len(emergent) else math.nan,
        "naive_step0_fraction": fraction(alive["strong_at_init"]),
    }
    return summary


def peak_order(decoder_norms: Norms) -> Int[np.ndarray, "feature"]:
    """Feature order for the Fig. 4 heatmap: by peak snapshot, then by strength at the peak snapshot's
    predecessor (features that rose more sharply first), so waves of formation form diagonal bands."""
    rho = relative_strength(decoder_norms)
    peak = rho.argmax(axis=0)
    before_peak = rho[np.maximum(peak - 1, 0), np.arange(rho.shape[1])]
    return np.lexsort((before_peak, peak))


def _log_axis_positions(step_array: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where to draw each snapshot on a log-step axis, with bar edges that tile the axis.

    Step 0 cannot sit on a log axis; it is drawn at half the first positive step.
    """
    positions = step_array.astype(np.float64)
    if positions[0] == 0:
        positions[0] = positions[1] / 2 if positions.size > 1 else 1.0
    if positions.size == 1:
        return positions, positions / math.sqrt(2), positions * math.sqrt(2)
    inner = np.sqrt(positions[:-1] * positions[1:])
    left = np.concatenate([[positions[0] ** 2 / inner[0]], inner])
    right = np.concatenate([inner, [positions[-1] ** 2 / inner[-1]]])
    return positions, left, right


def step_histogram(values: Sequence[float] | np.ndarray | pd.Series, steps: Sequence[int]) -> pd.DataFrame:
    """Count how many values (emergence or peak steps) fall on each snapshot step.

    Emergence and peak steps are always snapshot steps, so the natural histogram has one bar
    per snapshot. NaN values (e.g. features that never emerge) are skipped. For a log-step
    axis use `plot_position` and the bar edges `bin_left`/`bin_right` (geometric midpoints
    between snapshots; step 0 is drawn at half the first positive step).
    Columns: step, count, fraction, plot_position, bin_left, bin_right.
    """
    step_array = validate_steps(steps, np.asarray(steps).size)
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    unknown = np.setdiff1d(array, step_array)
    if unknown.size:
        raise ParameterError(f"values contain {unknown[:5].tolist()}, which are not in steps={step_array.tolist()}")
    counts = np.array([(array == s).sum() for s in step_array], dtype=np.int64)
    positions, left, right = _log_axis_positions(step_array)
    total = counts.sum()
    return pd.DataFrame(
        {
            "step": step_array,
            "count": counts,
            "fraction": counts / total if total else np.zeros(counts.size),
            "plot_position": positions,
            "bin_left": left,
            "bin_right": right,
        }
    )


def lifetime_histogram(lifetime_snapshots: Sequence[int] | np.ndarray | pd.Series, n_snapshots: int) -> pd.DataFrame:
    """How many features stay strong for 1, 2, …, n_snapshots consecutive snapshots (paper Fig. 5b).

    Zeros (dead features) are left out. Columns: lifetime_snapshots, count, fraction.
    """
    require(isinstance(n_snapshots, int) and n_snapshots >= 1, "n_snapshots", n_snapshots, "an integer ≥ 1")
    array = np.asarray(lifetime_snapshots, dtype=np.int64)
    array = array[array > 0]
    if array.size and array.max() > n_snapshots:
        raise ParameterError(f"lifetime_snapshots has values up to {array.max()} > n_snapshots={n_snapshots}")
    counts = np.bincount(array, minlength=n_snapshots + 1)[1:]
    total = counts.sum()
    return pd.DataFrame(
        {
            "lifetime_snapshots": np.arange(1, n_snapshots + 1),
            "count": counts,
            "fraction": counts / total if total else np.zeros(n_snapshots),
        }
    )


# --------------------------------------------------------------------------------------------
# Directions: Gram matrices per feature, direction change, turning point, projection matrix
# --------------------------------------------------------------------------------------------


def _feature_grams(
    weights: torch.Tensor, feature_ids: np.ndarray, chunk_size: int = 1024
) -> Iterator[Float[np.ndarray, "feature snapshot other"]]:
    """Per-feature Gram matrices G_i[θ, θ′] = ⟨W_i^θ, W_i^θ′⟩, a chunk of features at a time.

    Everything about a feature's directions (norms, cosines, projections) follows from G_i,
    and chunking keeps memory small for dictionaries with ~10⁵ features.
    """
    for start in range(0, feature_ids.size, chunk_size):
        chunk = torch.as_tensor(feature_ids[start : start + chunk_size])
        w = weights[:, chunk, :].to(torch.float32)
        gram = einsum(w, w, "snapshot feature d_model, other feature d_model -> feature snapshot other")
        yield gram.to(torch.float64).numpy()


def _norms_from_gram(gram: np.ndarray) -> Float[np.ndarray, "feature snapshot"]:
    return np.sqrt(np.clip(np.diagonal(gram, axis1=1, axis2=2), 0, None))


def direction_change_curve(
    decoder: Decoder,
    steps: Sequence[int],
    weighting: str = "strength",
    features: FeatureSelection = None,
) -> pd.DataFrame:
    """How much decoder directions change between consecutive snapshots, averaged over features.

    change(θ_k → θ_k+1) = 1 − Σ_i w_i cos(W_i^θk, W_i^θk+1) / Σ_i w_i, with
    w_i = min(ρ_i(θ_k), ρ_i(θ_k+1)) for weighting="strength" (a feature's direction only counts
    as much as the feature is present on both sides; a faded feature's direction is leftover
    and says nothing) or w_i = 1 for "uniform". 0 means no feature turned, 1 means directions
    became orthogonal on average. Features with a zero decoder at either snapshot are skipped.
    Columns: step_from, step_to, change, weight (Σ w_i).
    """
    require_choice("weighting", weighting, DIRECTION_WEIGHTINGS)
    weights = _check_decoder(decoder)
    step_array = validate_steps(steps, weights.shape[0])
    feature_ids = _feature_indices(features, weights.shape[1])
    n_transitions = weights.shape[0] - 1
    weighted_cosine = np.zeros(n_transitions)
    total_weight = np.zeros(n_transitions)
    for gram in _feature_grams(weights, feature_ids):
        norms = _norms_from_gram(gram)  # feature snapshot
        peak = norms.max(axis=1, keepdims=True)
        rho = np.divide(norms, peak, out=np.zeros_like(norms), where=peak > 0)
        inner = np.diagonal(gram, offset=1, axis1=1, axis2=2)  # feature transition
        both_norms = norms[:, :-1] * norms[:, 1:]
        valid = both_norms > 0
        cosine = np.divide(inner, both_norms, out=np.zeros_like(inner), where=valid)
        w = np.minimum(rho[:, :-1], rho[:, 1:]) if weighting == "strength" else np.ones_like(cosine)
        w = np.where(valid, w, 0.0)
        weighted_cosine += (w * cosine).sum(axis=0)
        total_weight += w.sum(axis=0)
    mean_cosine = np.divide(weighted_cosine, total_weight, out=np.full(n_transitions, np.nan), where=total_weight > 0)
    return pd.DataFrame(
        {"step_from": step_array[:-1], "step_to": step_array[1:], "change": 1.0 - mean_cosine, "weight": total_weight}
    )


@dataclasses.dataclass(frozen=True)
class TurningPoint:
    """Where the dictionary reorganises.

    step/index: the snapshot of the turning point. For method "direction_change" it is the
    first snapshot *after* the largest change of directions (the first snapshot of the new
    regime); for "strength_dip" it is the snapshot with the fewest strong features.
    curve: the curve the point was read from (`direction_change_curve` or
    `strong_fraction_curve`), for plotting.
    """

    step: int
    index: int
    method: str
    curve: pd.DataFrame


def turning_point(
    decoder: Decoder,
    steps: Sequence[int],
    config: EmergenceConfig = EmergenceConfig(),
    dead: FeatureSelection = None,
) -> TurningPoint:
    """Find the turning point of training from the crosscoder's decoder (see `TurningPoint`).

    method "direction_change" (default): the transition θ_k → θ_k+1 with the largest
    strength-weighted direction change across (non-dead) features, reported as step θ_k+1.
    The paper sees decoder directions before and after the turning point nearly orthogonal,
    while they rotate slowly afterwards. method "strength_dip": the snapshot where the fraction
    of strong features is smallest (initialisation features gone, new ones not yet formed).
    """
    weights = _check_decoder(decoder)
    norms = decoder_norms(weights)
    step_array = validate_steps(steps, weights.shape[0])
    alive = ~_dead_mask(norms, dead)
    if not alive.any():
        raise ParameterError("every feature is dead: no turning point can be read from the decoder")
    if config.turning_point_method == "strength_dip":
        curve = strong_fraction_curve(norms, step_array, config, dead=~alive)
        index = int(np.argmin(curve["fraction_strong"].to_numpy()))
    else:
        curve = direction_change_curve(weights, step_array, config.direction_weighting, features=alive)
        change = curve["change"].to_numpy()
        if np.all(np.isnan(change)):
            raise ParameterError("decoder has no non-zero directions on consecutive snapshots: no turning point")
        index = int(np.nanargmax(change)) + 1
    return TurningPoint(step=int(step_array[index]), index=index, method=config.turning_point_method, curve=curve)


def projection_matrix(
    decoder: Decoder,
    normalisation: str = "peak",
    features: FeatureSelection = None,
) -> Float[np.ndarray, "snapshot other"]:
    """Mean cross-snapshot decoder projection P[θ, θ′] over features (paper Fig. 5c).

    The paper's quantity for one feature i is ⟨W_i^θ, W_i^θ′⟩ / ‖W_i^θ‖: the length of W_i^θ′
    along the unit direction of W_i^θ. Averaged over features as is ("raw"), it mixes features
    of very different sizes and its diagonal is just the mean decoder norm, so we offer:

      "peak"   (default) ⟨W^θ, W^θ′⟩ / (‖W^θ‖ · max_θ″‖W^θ″‖) = ρ(θ′) · cos(W^θ, W^θ′):
               the paper's projection in units of the feature's own peak norm. The diagonal
               is the mean strength ρ(θ); off the diagonal it is large only when the feature
               is strong at θ′ *and* points the same way as at θ. Not symmetric.
      "cosine" cos(W^θ, W^θ′): pure direction similarity, diagonal 1, symmetric. Blocks of
               ≈ 1 mean "same directions", ≈ 0 "orthogonal".
      "raw"    ⟨W^θ, W^θ′⟩ / ‖W^θ‖, as in the paper.

    Each entry is the mean over the selected features (e.g. the emergent ones) whose decoder
    is non-zero at θ (and at θ′ for "cosine").
    """
    require_choice("normalisation", normalisation, PROJECTION_NORMALISATIONS)
    weights = _check_decoder(decoder)
    feature_ids = _feature_indices(features, weights.shape[1])
    if feature_ids.size == 0:
        raise ParameterError("features selects no feature: the projection matrix needs at least one")
    n_snapshots = weights.shape[0]
    total = np.zeros((n_snapshots, n_snapshots))
    count = np.zeros((n_snapshots, n_snapshots))
    for gram in _feature_grams(weights, feature_ids):
        norms = _norms_from_gram(gram)  # feature snapshot
        row_norm = rearrange(norms, "feature snapshot -> feature snapshot 1")
        col_norm = rearrange(norms, "feature other -> feature 1 other")
        if normalisation == "cosine":
            denominator = row_norm * col_norm
        elif normalisation == "peak":
            denominator = row_norm * rearrange(norms.max(axis=1), "feature -> feature 1 1")
        else:
            denominator = np.broadcast_to(row_norm, gram.shape)
        valid = np.broadcast_to(denominator > 0, gram.shape)
        value = np.divide(gram, denominator, out=np.zeros_like(gram), where=valid)
        total += value.sum(axis=0)
        count += valid.sum(axis=0)
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)


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
    norms = _check_norms(decoder_norms)
    rho = relative_strength(norms)
    step_array = validate_steps(steps, norms.shape[0])
    acts_shape = tuple(activations.shape)
    if len(acts_shape) != 3 or acts_shape[1] != norms.shape[0]:
        raise ParameterError(
            f"activations has shape {acts_shape}: expected [row, snapshot={norms.shape[0]}, d_model]"
        )
    labels_source = _to_numpy(feature_activations, "feature_activations")
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
    x = _to_numpy(x, "x")
    y = _to_numpy(y, "y")
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
