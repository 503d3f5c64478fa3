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
- `step_histogram`, `lifetime_histogram`, `summarise_emergence`: distributions and
  one-number summaries for the book's glue.

Whether a bigger decoder norm really means a more linearly readable feature is asked by the
probes of `crosslib.analyses.probes`, which read the same trajectories.

Every function works on plain arrays (numpy or torch), so it can be tested on synthetic
trajectories with known answers and used on any crosscoder. Shapes follow the crosscoder:
decoder weights are [snapshot, feature, d_model], decoder norms are [snapshot, feature].
Thresholds live in `EmergenceConfig`; bad values raise `ParameterError` naming the parameter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int

from crosslib.config import Config, ParameterError, choice, fraction, integer, require, require_choice

# Decoder weights / norms may come straight from the model (torch) or from disk (numpy).
Decoder = Float[torch.Tensor, "snapshot feature d_model"] | Float[np.ndarray, "snapshot feature d_model"]
Norms = Float[torch.Tensor, "snapshot feature"] | Float[np.ndarray, "snapshot feature"]
FeatureSelection = Bool[np.ndarray, "feature"] | Int[np.ndarray, "selected"] | Sequence[int] | None

CATEGORIES: tuple[str, ...] = ("initialisation", "emergent", "persistent", "transient", "dead")
TURNING_POINT_METHODS: tuple[str, ...] = ("direction_change", "strength_dip")
DIRECTION_WEIGHTINGS: tuple[str, ...] = ("strength", "uniform")
PROJECTION_NORMALISATIONS: tuple[str, ...] = ("peak", "cosine", "raw")


# --------------------------------------------------------------------------------------------
# Config
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


# --------------------------------------------------------------------------------------------
# Input checks and small helpers
# --------------------------------------------------------------------------------------------


def to_numpy(x: Any, name: str) -> np.ndarray:
    """`x` as a float64 numpy array; a ParameterError naming `name` when it is not numeric."""
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


def check_norms(decoder_norms: Norms) -> Float[np.ndarray, "snapshot feature"]:
    """Decoder norms as a float64 [snapshot, feature] array (≥ 2 snapshots, finite, ≥ 0), or a ParameterError."""
    norms = to_numpy(decoder_norms, "decoder_norms")
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
    norms = check_norms(decoder_norms)
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
    norms = check_norms(decoder_norms)
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
    alive = ~_dead_mask(check_norms(decoder_norms), dead)
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
    norms = check_norms(decoder_norms)
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
