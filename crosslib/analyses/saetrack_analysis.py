"""What an SAE-Track chain shows about its features (the book's Methods page, section SAE-Track).

`crosslib.dictionaries.saetrack` trains the chain: one SAE per snapshot, each warm-started from the previous
one, so feature i of every link is the same tracked feature. Everything here reads a trained chain
(an `SAETrackChain`, its SAEs or its decoders):

- `formation_scores` / `formation_table`: the formation-progress score of every final-SAE feature at
  every snapshot and the step at which it forms (`formation_progress`, `formed_mask` and
  `formation_long` summarise and reshape them).
- `drift_to_final` / `link_changes` / `pca_trajectories`: how each feature's decoder direction
  moves towards its final direction, how much one link moves it, and 2-D PCA paths of those
  directions (`trajectory_features` draws the formed features to show).
- `match_features_by_activation` (or `match_features`, by decoder direction) and
  `compare_formation_emergence`: the two lenses on one model, SAE-Track formation steps against
  crosscoder emergence steps for features that fire on the same tokens at the final snapshot;
  `compare_with_crosscoder` runs both steps as the chain's `SAETrackConfig.match_by` asks.
- `summarise`: the numbers the chapter glues.

Definitions chosen here (the paper gives no exact thresholds; all are `SAETrackConfig` fields):

- Formation score of feature i at snapshot k: take the `n_top` eval rows where the final SAE's
  feature i is largest (only rows where it fires); encode those rows' snapshot-k activations with
  SAE_k; mean pairwise cosine of the activation vectors (a zero vector's cosine counts as 0),
  minus the same mean over `n_random` random eval rows. About 0 when the positions share nothing at
  snapshot k, up to ~1 when SAE_k codes them alike.
- Formation step of feature i: the first snapshot whose score reaches `formation_fraction` of the
  feature's final score; only for features whose final score is at least `min_final_score`
  (the others never form in this sense and get NaN).
- Drift: cosine between feature i's decoder direction at snapshot k and at the final snapshot.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from einops import einsum, reduce
from jaxtyping import Bool, Float, Int
from torch import Tensor

from crosslib.activations.sources import ActivationSource
from crosslib.analyses.emergence import EmergenceConfig, emergence_table
from crosslib.config import is_int, require, require_choice
from crosslib.dictionaries.crosscoder import Crosscoder
from crosslib.dictionaries.saetrack import SAETrackChain, SAETrackConfig, check_config, check_source, warm_cold_gap
from crosslib.statistics import correlate

FEATURE_CHUNK = 256  # features per block in the formation score (bounds memory at [chunk, n_top, feature])


# --------------------------------------------------------------------------------------------
# Formation progress
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def unit_codes(sae: Crosscoder, x: Float[Tensor, "row d_model"]) -> Float[Tensor, "row feature"]:
    """The SAE's activation vector of every row, scaled to length 1 (all-zero rows stay zero)."""
    require(isinstance(sae, Crosscoder) and sae.config.n_snapshots == 1, "sae", type(sae).__name__,
            "a Crosscoder with n_snapshots=1")
    codes = sae.encode(x[:, None, :].to(sae.W_E.device, sae.W_E.dtype))[:, 0, :].float().cpu()
    lengths = torch.linalg.vector_norm(codes, dim=-1, keepdim=True)
    return torch.where(lengths > 0, codes / lengths.clamp_min(1e-30), 0.0)


def mean_pairwise_cosine(codes: Float[Tensor, "row feature"], groups: Int[Tensor, "group member"]
                         ) -> Float[Tensor, " group"]:
    """Mean cosine over all pairs of distinct rows in each group.

    `codes` are unit vectors (or zero: a zero vector's cosine with anything counts as 0); `groups`
    holds row indices, −1 for an empty slot. Uses Σ_{a≠b} u_a·u_b = ‖Σ u‖² − Σ‖u‖², so no pair is
    formed explicitly. Groups with fewer than two rows give NaN.
    """
    present = groups >= 0
    members = codes[groups.clamp_min(0)] * present[..., None]
    summed = reduce(members, "group member feature -> group feature", "sum")
    self_terms = reduce(members * members, "group member feature -> group", "sum")
    n = present.sum(dim=1).double()
    pair_sum = (summed.double() ** 2).sum(-1) - self_terms.double()
    return torch.where(n >= 2, pair_sum / (n * (n - 1)).clamp_min(1), torch.nan).float()


def top_rows(activations: Float[Tensor, "row feature"], n_top: int) -> Int[Tensor, "feature member"]:
    """For each feature, its `n_top` rows of largest activation; −1 where it fires on fewer rows."""
    n_top = min(n_top, activations.shape[0])
    values, rows = activations.topk(n_top, dim=0)  # [member, feature]
    rows = torch.where(values > 0, rows, -1)
    return rows.T.contiguous()


@dataclasses.dataclass
class FormationScores:
    """Formation-progress scores of the final SAE's features along the chain.

    scores[k, i] = raw[k, i] − baseline[k]: the mean pairwise cosine of SAE_k's activation vectors at
    feature i's top rows, minus the same at random rows. top_rows[i] lists those rows (eval-row
    indices, −1 for missing), n_top_active[i] how many there are (features firing on fewer than two
    rows have NaN scores).
    """

    steps: list[int]
    scores: Float[np.ndarray, "snapshot feature"]
    raw: Float[np.ndarray, "snapshot feature"]
    baseline: Float[np.ndarray, " snapshot"]
    top_rows: Int[np.ndarray, "feature member"]
    random_rows: Int[np.ndarray, " member"]
    n_top_active: Int[np.ndarray, " feature"]


def formation_scores_for_rows(
    saes: Sequence[Crosscoder],
    rows: Float[Tensor, "row snapshot d_model"],
    groups: Int[Tensor, "group member"],
    random_rows: Int[Tensor, " member"],
) -> tuple[Float[np.ndarray, "snapshot group"], Float[np.ndarray, "snapshot group"], Float[np.ndarray, " snapshot"]]:
    """(score, raw, baseline) of given row groups: SAE k encodes snapshot k of `rows` (the score's core).

    `groups` [group, member] are row indices (−1 for empty slots), e.g. one group per feature.
    """
    require(len(saes) == rows.shape[1], "saes", f"{len(saes)} SAEs", f"one per snapshot of rows ({rows.shape[1]})")
    raw, baseline = [], []
    for k, sae in enumerate(saes):
        codes = unit_codes(sae, rows[:, k])
        raw.append(torch.cat([mean_pairwise_cosine(codes, block) for block in groups.split(FEATURE_CHUNK)]))
        baseline.append(mean_pairwise_cosine(codes, random_rows[None])[0])
    raw_array = torch.stack(raw).numpy().astype(np.float64)
    baseline_array = torch.stack(baseline).numpy().astype(np.float64)
    return raw_array - baseline_array[:, None], raw_array, baseline_array


def _saes_of(chain: SAETrackChain | Sequence[Crosscoder]) -> list[Crosscoder]:
    saes = chain.saes if isinstance(chain, SAETrackChain) else list(chain)
    require(len(saes) > 0 and all(isinstance(s, Crosscoder) and s.config.n_snapshots == 1 for s in saes), "chain",
            type(chain).__name__, "an SAETrackChain or a list of n_snapshots=1 Crosscoders, one per snapshot")
    return saes


def formation_scores(
    chain: SAETrackChain | Sequence[Crosscoder],
    source: ActivationSource,
    config: SAETrackConfig | None = None,
) -> FormationScores:
    """Formation-progress score [snapshot, feature] of every final-SAE feature (module docstring).

    Reads the first `formation_rows` eval rows of `source` (normalised as in training). The top rows
    come from the final SAE on the final snapshot; the `n_random` baseline rows are drawn once
    (seeded by `seed`) and shared by all features.
    """
    saes = _saes_of(chain)
    config = check_config(config if config is not None else getattr(chain, "config", SAETrackConfig()))
    check_source(source)
    require(len(saes) == source.n_snapshots, "chain", f"{len(saes)} SAEs",
            f"one SAE per snapshot of the source ({source.n_snapshots})")
    rows = source.rows("eval", limit=config.formation_rows, normalise=True, device="cpu")
    n_rows = rows.shape[0]
    require(n_rows >= 2, "source", f"{n_rows} eval rows", "at least 2 eval rows (the formation score compares rows)")
    final = saes[-1]
    final_activations = final.encode(rows[:, -1:, :].to(final.W_E.device, final.W_E.dtype))[:, 0, :].float().cpu()
    groups = top_rows(final_activations, config.n_top)
    generator = torch.Generator().manual_seed(config.seed)
    random_rows = torch.randperm(n_rows, generator=generator)[: min(config.n_random, n_rows)]
    scores, raw, baseline = formation_scores_for_rows(saes, rows, groups, random_rows)
    return FormationScores(steps=list(source.steps), scores=scores, raw=raw, baseline=baseline,
                           top_rows=groups.numpy(), random_rows=random_rows.numpy(),
                           n_top_active=(groups >= 0).sum(dim=1).numpy())


def formation_table(formation: FormationScores, config: SAETrackConfig | None = None) -> pd.DataFrame:
    """One row per feature: final_score, formed (final score ≥ min_final_score), formation_snapshot
    (−1 if not formed), formation_step (NaN if not formed), n_top_active, peak_score (largest score
    over snapshots; NaN for features that fire on fewer than two eval rows).

    A formed feature's formation snapshot is the first whose score reaches formation_fraction × its
    final score.
    """
    config = check_config(config if config is not None else SAETrackConfig())
    scores = formation.scores
    final = scores[-1]
    formed = np.isfinite(final) & (final >= config.min_final_score)
    with np.errstate(invalid="ignore"):
        reached = scores >= config.formation_fraction * final[None, :]
    first = np.where(formed, reached.argmax(axis=0), -1)  # the last snapshot always reaches it, so argmax is valid
    step_array = np.asarray(formation.steps, dtype=np.float64)
    fires = np.isfinite(scores).any(axis=0)
    return pd.DataFrame({
        "feature": np.arange(scores.shape[1]),
        "final_score": final,
        "formed": formed,
        "formation_snapshot": first,
        "formation_step": np.where(formed, step_array[np.clip(first, 0, None)], np.nan),
        "n_top_active": formation.n_top_active,
        "peak_score": np.where(fires, np.where(np.isfinite(scores), scores, -np.inf).max(axis=0), np.nan),
    })


def formation_progress(formation: FormationScores, table: pd.DataFrame) -> Float[np.ndarray, " snapshot"]:
    """Per checkpoint, the median over formed features of score / final score (NaN with no formed
    feature): 1 at the last checkpoint; a steady rise means features form progressively, a step
    means they form at once."""
    formed = table["formed"].to_numpy(dtype=bool)
    if not formed.any():
        return np.full(formation.scores.shape[0], np.nan)
    relative = formation.scores[:, formed] / formation.scores[-1, formed][None, :]
    return np.nanmedian(relative, axis=1)


def formed_mask(table: pd.DataFrame, n_snapshots: int) -> Bool[np.ndarray, "snapshot feature"]:
    """formed[k, i]: feature i has formed by snapshot k (k ≥ its formation snapshot)."""
    first = table["formation_snapshot"].to_numpy()
    snapshot_index = np.arange(n_snapshots)[:, None]
    return (first[None, :] >= 0) & (snapshot_index >= first[None, :])


def formation_long(formation: FormationScores, features: Sequence[int] | None = None) -> pd.DataFrame:
    """Scores as a tidy table (feature, snapshot, step, score), e.g. for line plots of chosen features."""
    features = np.arange(formation.scores.shape[1]) if features is None else np.asarray(features, dtype=np.int64)
    records = [{"feature": int(i), "snapshot": k, "step": step, "score": float(formation.scores[k, i])}
               for i in features for k, step in enumerate(formation.steps)]
    return pd.DataFrame(records, columns=["feature", "snapshot", "step", "score"])


# --------------------------------------------------------------------------------------------
# Drift
# --------------------------------------------------------------------------------------------


def _unit(vectors: Tensor) -> Tensor:
    lengths = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    return torch.where(lengths > 0, vectors / lengths.clamp_min(1e-30), 0.0)


def _decoders_of(decoders: Any) -> Float[Tensor, "snapshot feature d_model"]:
    if isinstance(decoders, SAETrackChain):
        return decoders.decoders()
    tensor = torch.as_tensor(np.asarray(decoders.detach().cpu() if isinstance(decoders, Tensor) else decoders))
    require(tensor.ndim == 3, "decoders", tuple(tensor.shape),
            "an SAETrackChain or an array [snapshot, feature, d_model]")
    return tensor.double()


def drift_to_final(decoders: SAETrackChain | Float[Tensor, "snapshot feature d_model"]
                   ) -> Float[np.ndarray, "snapshot feature"]:
    """Cosine of each feature's decoder direction at every snapshot to its final direction (0 for zero rows)."""
    directions = _unit(_decoders_of(decoders).double())
    cosine = einsum(directions, directions[-1], "snapshot feature d_model, feature d_model -> snapshot feature")
    return cosine.numpy()


def link_changes(decoders: SAETrackChain | Float[Tensor, "snapshot feature d_model"]
                 ) -> Float[np.ndarray, "link feature"]:
    """1 − cosine of each feature's decoder direction between consecutive checkpoints k → k+1.

    The last links are the chain's noise floor: once a feature has settled, a link still moves
    it a little (a short training run on new data). Drift to the final direction only means
    something when it is much larger than that (see `crosslib.book.claims.decoder_drift`). NaN where a
    decoder row is zero at either checkpoint.
    """
    weights = _decoders_of(decoders).double()
    lengths = torch.linalg.vector_norm(weights, dim=-1)
    directions = _unit(weights)
    cosine = einsum(directions[:-1], directions[1:], "link feature d_model, link feature d_model -> link feature")
    valid = (lengths[:-1] > 0) & (lengths[1:] > 0)
    return torch.where(valid, 1.0 - cosine, torch.nan).numpy()


PCA_CENTRES = ("global", "feature")


def _top_two_axes(centred: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The first two principal axes [2, d_model] of centred rows (fixed signs) and their variance ratios."""
    _, singular_values, axes = np.linalg.svd(centred, full_matrices=False)
    axes = np.concatenate([axes[:2], np.zeros((max(0, 2 - axes.shape[0]), centred.shape[1]))])
    signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])
    axes *= np.where(signs == 0, 1.0, signs)[:, None]  # the largest loading of each axis is positive
    variance = np.concatenate([singular_values ** 2, np.zeros(2)])
    total = variance.sum()
    return axes, ([float(v / total) for v in variance[:2]] if total > 0 else [0.0, 0.0])


def pca_trajectories(
    decoders: SAETrackChain | Float[Tensor, "snapshot feature d_model"],
    steps: Sequence[int] | None = None,
    *,
    features: Sequence[int] | None = None,
    n_features: int = 24,
    formed: Bool[np.ndarray, "snapshot feature"] | None = None,
    centre: str = "global",
    seed: int = 0,
) -> pd.DataFrame:
    """2-D PCA paths of decoder directions: columns feature, snapshot, step, pc1, pc2, formed.

    `centre="global"` (the paper's picture): one PCA fitted on the unit decoder directions of the
    chosen features at every snapshot together, so all paths share one plane; when directions
    change a lot over training the paths travel across it, when they drift slowly the plane mostly
    separates the features and each path is short. `centre="feature"`: each feature's path is
    centred on its own mean direction and drawn in its own top-two plane, which shows the shape of
    even a small drift (paths of different features then share only the origin).
    `features` defaults to `n_features` features drawn at random (seeded) among those with a
    non-zero decoder at every snapshot. `formed` [snapshot, feature] (from `formed_mask`) fills the
    formed column (missing values when not given). `table.attrs["explained_variance_ratio"]` holds
    the two components' shares of variance: a list, or one list per feature for "feature".
    """
    require_choice("centre", centre, PCA_CENTRES)
    if isinstance(decoders, SAETrackChain):
        steps = decoders.steps if steps is None else steps
    tensor = _decoders_of(decoders)
    n_snapshots, n_all, _ = tensor.shape
    steps = list(range(n_snapshots)) if steps is None else [int(s) for s in steps]
    require(len(steps) == n_snapshots, "steps", steps, f"one step per snapshot ({n_snapshots})")
    if features is None:
        require(is_int(n_features) and n_features > 0, "n_features", n_features, "a positive integer")
        alive = np.flatnonzero((torch.linalg.vector_norm(tensor, dim=-1) > 0).all(dim=0).numpy())
        rng = np.random.default_rng(seed)
        features = np.sort(rng.choice(alive, size=min(n_features, alive.size), replace=False))
    features = np.asarray(features, dtype=np.int64)
    require(features.size > 0 and features.min() >= 0 and features.max() < n_all, "features", features.tolist(),
            f"a non-empty list of feature indices in 0..{n_all - 1}")
    if formed is not None:
        formed = np.asarray(formed, dtype=bool)
        require(formed.shape == (n_snapshots, n_all), "formed", formed.shape,
                f"a boolean array [snapshot, feature] = {(n_snapshots, n_all)}")
    directions = _unit(tensor[:, torch.as_tensor(features)]).numpy()  # [snapshot, chosen, d_model]
    projected = np.zeros((n_snapshots, features.size, 2))
    if centre == "global":
        flat = directions.reshape(-1, directions.shape[-1])
        centred = flat - flat.mean(axis=0, keepdims=True)
        axes, ratio = _top_two_axes(centred)
        projected = (centred @ axes.T).reshape(n_snapshots, features.size, 2)
    else:
        ratio = {}
        for j, i in enumerate(features):
            path = directions[:, j] - directions[:, j].mean(axis=0, keepdims=True)
            axes, ratio[int(i)] = _top_two_axes(path)
            projected[:, j] = path @ axes.T
    records = [{"feature": int(i), "snapshot": k, "step": steps[k], "pc1": float(projected[k, j, 0]),
                "pc2": float(projected[k, j, 1]), "formed": bool(formed[k, i]) if formed is not None else pd.NA}
               for j, i in enumerate(features) for k in range(n_snapshots)]
    table = pd.DataFrame(records)
    table["formed"] = table["formed"].astype("boolean")
    table.attrs["explained_variance_ratio"] = ratio
    return table


def trajectory_features(formation: pd.DataFrame, config: SAETrackConfig) -> Int[np.ndarray, " chosen"]:
    """The features whose PCA paths are drawn: `n_trajectory_features` of the formed features of a
    `formation_table`, drawn at random (seeded by `seed`), or of all features when none formed."""
    config = check_config(config)
    formed_features = np.flatnonzero(formation["formed"].to_numpy())
    rng = np.random.default_rng(config.seed)
    pool = formed_features if formed_features.size else np.arange(config.dict_size)
    return np.sort(rng.choice(pool, size=min(config.n_trajectory_features, pool.size), replace=False))


# --------------------------------------------------------------------------------------------
# Two lenses: SAE-Track features against crosscoder features
# --------------------------------------------------------------------------------------------


def _final_decoder(model: Any, name: str) -> Float[Tensor, "feature d_model"]:
    if isinstance(model, SAETrackChain):
        return model.decoders()[-1].double()
    if isinstance(model, Crosscoder):
        return model.W_D.detach()[-1].cpu().double()
    tensor = torch.as_tensor(np.asarray(model.detach().cpu() if isinstance(model, Tensor) else model)).double()
    require(tensor.ndim == 2, name, tuple(tensor.shape),
            "a Crosscoder, an SAETrackChain or a decoder [feature, d_model]")
    return tensor


def match_features(
    sae_decoder: SAETrackChain | Crosscoder | Float[Tensor, "feature d_model"],
    crosscoder_decoder: Crosscoder | Float[Tensor, "crosscoder_feature d_model"],
    *,
    min_cosine: float = 0.7,
) -> pd.DataFrame:
    """For every SAE-Track feature, the crosscoder feature with the most similar final decoder direction.

    A chain or Crosscoder is read at its last snapshot. Columns: sae_feature, crosscoder_feature,
    cosine, matched (cosine ≥ min_cosine). Several SAE features may pick the same crosscoder feature.
    """
    require(isinstance(min_cosine, (int, float)) and 0 <= min_cosine <= 1, "min_cosine", min_cosine,
            "a number in [0, 1]")
    sae = _unit(_final_decoder(sae_decoder, "sae_decoder"))
    crosscoder = _unit(_final_decoder(crosscoder_decoder, "crosscoder_decoder"))
    require(sae.shape[1] == crosscoder.shape[1], "crosscoder_decoder", tuple(crosscoder.shape),
            f"a decoder over the SAE's d_model={sae.shape[1]}")
    cosine = einsum(sae, crosscoder, "feature d_model, crosscoder_feature d_model -> feature crosscoder_feature")
    best_cosine, best = cosine.max(dim=1)
    return pd.DataFrame({"sae_feature": np.arange(sae.shape[0]), "crosscoder_feature": best.numpy(),
                         "cosine": best_cosine.numpy(), "matched": (best_cosine >= min_cosine).numpy()})


@torch.no_grad()
def match_features_by_activation(
    sae: SAETrackChain | Crosscoder,
    crosscoder: Crosscoder,
    rows: Float[Tensor, "row snapshot d_model"],
    *,
    min_correlation: float = 0.5,
) -> pd.DataFrame:
    """For every SAE-Track feature, the crosscoder feature whose final-snapshot activation correlates best with it.

    `rows` are normalised rows over all the crosscoder's snapshots (the crosscoder encodes every
    snapshot at once); the SAE (a chain's last link) reads the last snapshot. Two dictionaries
    trained apart rarely share a decoder direction to within a tight cosine when their sparsity
    differs, yet their features fire on the same tokens: the activation correlation asks that
    directly. Columns as `match_features`, with the Pearson correlation in `cosine`'s place under
    the name `score`, and `cosine` (of the decoders) kept for reference.
    """
    require(isinstance(min_correlation, (int, float)) and 0 <= min_correlation <= 1, "min_correlation",
            min_correlation, "a number in [0, 1]")
    final_sae = _saes_of(sae)[-1] if isinstance(sae, SAETrackChain) else sae
    require(isinstance(final_sae, Crosscoder) and final_sae.config.n_snapshots == 1, "sae", type(sae).__name__,
            "an SAETrackChain or an n_snapshots=1 Crosscoder")
    require(isinstance(crosscoder, Crosscoder), "crosscoder", type(crosscoder).__name__, "a Crosscoder")
    require(rows.ndim == 3 and rows.shape[1:] == (crosscoder.config.n_snapshots, crosscoder.config.d_model),
            "rows", tuple(rows.shape),
            f"[row, {crosscoder.config.n_snapshots}, {crosscoder.config.d_model}] (every snapshot of the crosscoder)")
    sae_codes = final_sae.encode(rows[:, -1:].to(final_sae.W_E.device, final_sae.W_E.dtype))[:, 0].double().cpu()
    crosscoder_codes = crosscoder.encode(rows.to(crosscoder.W_E.device, crosscoder.W_E.dtype))[:, -1].double().cpu()

    def standardised(codes: Tensor) -> Tensor:
        centred = codes - codes.mean(dim=0)
        return centred / torch.linalg.vector_norm(centred, dim=0).clamp_min(1e-30)  # dead features → 0

    correlation = einsum(standardised(sae_codes), standardised(crosscoder_codes),
                         "row feature, row crosscoder_feature -> feature crosscoder_feature")
    best_correlation, best = correlation.max(dim=1)
    cosine = einsum(_unit(_final_decoder(final_sae, "sae")), _unit(_final_decoder(crosscoder, "crosscoder")),
                    "feature d_model, crosscoder_feature d_model -> feature crosscoder_feature")
    return pd.DataFrame({"sae_feature": np.arange(sae_codes.shape[1]), "crosscoder_feature": best.numpy(),
                         "score": best_correlation.numpy(),
                         "cosine": cosine.gather(1, best[:, None])[:, 0].numpy(),
                         "matched": (best_correlation >= min_correlation).numpy()})


def compare_formation_emergence(
    formation: pd.DataFrame,
    emergence: pd.DataFrame,
    matches: pd.DataFrame,
    *,
    emergence_column: str = "emergence_step",
) -> tuple[pd.DataFrame, dict[str, float]]:
    """SAE-Track formation steps against crosscoder emergence steps of matched feature pairs.

    `formation` is a `formation_table`, `emergence` a `crosslib.analyses.emergence.emergence_table` of the
    crosscoder, `matches` from `match_features`. Pairs are the matched rows whose two steps are both
    known. Correlations are on log(1 + step), because snapshots are log-spaced.
    Returns (pairs: sae_feature, crosscoder_feature, cosine, formation_step, emergence_step;
    numbers: n_matched, n_compared, spearman_r, spearman_p, pearson_r, pearson_p).
    """
    for name, table, columns in (("formation", formation, ("feature", "formation_step")),
                                 ("emergence", emergence, ("feature", emergence_column)),
                                 ("matches", matches, ("sae_feature", "crosscoder_feature", "cosine", "matched"))):
        missing = [c for c in columns if not isinstance(table, pd.DataFrame) or c not in table.columns]
        require(not missing, name, type(table).__name__,
                f"a DataFrame with columns {list(columns)} (missing {missing})")
    matched = matches[matches["matched"]]
    formation_steps = formation[["feature", "formation_step"]].rename(columns={"feature": "sae_feature"})
    emergence_steps = emergence[["feature", emergence_column]].rename(
        columns={"feature": "crosscoder_feature", emergence_column: "emergence_step"})
    kept = [c for c in ("sae_feature", "crosscoder_feature", "score", "cosine") if c in matched.columns]
    pairs = (matched[kept]
             .merge(formation_steps, on="sae_feature").merge(emergence_steps, on="crosscoder_feature"))
    both_known = np.isfinite(pairs["formation_step"].astype(float)) & np.isfinite(pairs["emergence_step"].astype(float))
    pairs = pairs[both_known]
    pairs = pairs.reset_index(drop=True)
    x = np.log1p(pairs["formation_step"].to_numpy(dtype=np.float64))
    y = np.log1p(pairs["emergence_step"].to_numpy(dtype=np.float64))
    correlation = correlate(x, y)
    numbers = {"n_matched": int(len(matched)), "n_compared": int(len(pairs)), "spearman_r": correlation.spearman_rho,
               "spearman_p": correlation.spearman_p, "pearson_r": correlation.pearson_r,
               "pearson_p": correlation.pearson_p}
    return pairs, numbers


class LensComparison(NamedTuple):
    """The two lenses on one model, from `compare_with_crosscoder`."""

    matches: pd.DataFrame  # each SAE feature's best crosscoder partner (by activation or by decoder)
    pairs: pd.DataFrame  # the matched pairs whose two steps are both known (`compare_formation_emergence`)
    numbers: dict[str, float]  # n_matched, n_compared and the correlations of the two steps


def compare_with_crosscoder(
    chain: SAETrackChain,
    formation: pd.DataFrame,
    crosscoder: Crosscoder,
    source: ActivationSource,
    *,
    crosscoder_steps: Sequence[int] | None = None,
    emergence_config: EmergenceConfig | None = None,
) -> LensComparison:
    """SAE-Track formation steps (`formation`, a `formation_table` of the chain) against the crosscoder's
    emergence steps, its features matched as the chain's `match_by` asks.

    `crosscoder` must end at the same snapshot as the chain (its last entry of `crosscoder_steps`,
    which defaults to the source's steps when the snapshot counts agree). Its emergence table uses
    `emergence_config` (default thresholds when None). Matching by activation reads the first
    `formation_rows` eval rows of `source`, the activations the chain was trained on.
    """
    check_source(source)
    require(isinstance(chain, SAETrackChain) and chain.steps == list(source.steps), "chain", type(chain).__name__,
            f"an SAETrackChain trained on this source's steps {list(source.steps)}")
    config = chain.config
    require(isinstance(crosscoder, Crosscoder), "crosscoder", type(crosscoder).__name__, "a Crosscoder")
    if crosscoder_steps is None:
        require(crosscoder.config.n_snapshots == source.n_snapshots, "crosscoder_steps", None,
                f"the crosscoder's {crosscoder.config.n_snapshots} snapshot steps (it does not cover the "
                f"source's {source.n_snapshots} snapshots, so they cannot be assumed)")
        crosscoder_steps = list(source.steps)
    crosscoder_steps = [int(s) for s in crosscoder_steps]
    require(len(crosscoder_steps) == crosscoder.config.n_snapshots and crosscoder_steps[-1] == chain.steps[-1],
            "crosscoder_steps", crosscoder_steps,
            f"{crosscoder.config.n_snapshots} steps ending at the chain's final step {chain.steps[-1]} "
            "(both lenses are matched at the same final snapshot)")
    emergence = emergence_table(crosscoder.decoder_norms().detach().cpu(), crosscoder_steps,
                                emergence_config or EmergenceConfig())
    if config.match_by == "activation":
        rows = source.rows("eval", limit=config.formation_rows, normalise=True, device="cpu")
        matches = match_features_by_activation(chain, crosscoder, rows, min_correlation=config.min_match_correlation)
    else:
        matches = match_features(chain, crosscoder, min_cosine=config.min_match_cosine)
    pairs, numbers = compare_formation_emergence(formation, emergence, matches)
    return LensComparison(matches, pairs, numbers)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def summarise(
    warm_cold: pd.DataFrame | None = None,
    formation: pd.DataFrame | None = None,
    lens: dict[str, float] | None = None,
) -> dict[str, float]:
    """The chapter's glued numbers (NaN where an input is missing).

    warm_cold_ev_gap: mean over snapshots of warm − cold explained variance at equal tokens;
    warm_cold_l0_gap: the same for L0; median_formation_step and formed_fraction from the
    formation table; the formation/emergence correlations and n_matched from
    `compare_formation_emergence`.
    """
    out: dict[str, float] = {}
    if warm_cold is not None and len(warm_cold):
        gap = warm_cold_gap(warm_cold)
        out.update({"warm_cold_ev_gap": float(gap["explained_variance_gap"].mean()),
                    "warm_cold_l0_gap": float(gap["l0_gap"].mean()),
                    "warm_ev_mean": float(gap["warm_explained_variance"].mean()),
                    "cold_ev_mean": float(gap["cold_explained_variance"].mean()),
                    "warm_l0_mean": float(gap["warm_l0"].mean()), "cold_l0_mean": float(gap["cold_l0"].mean())})
    else:
        out.update(dict.fromkeys(("warm_cold_ev_gap", "warm_cold_l0_gap", "warm_ev_mean", "cold_ev_mean",
                                  "warm_l0_mean", "cold_l0_mean"), math.nan))
    if formation is not None and len(formation):
        formed = formation[formation["formed"]]
        out["median_formation_step"] = float(formed["formation_step"].median()) if len(formed) else math.nan
        out["formed_fraction"] = float(formation["formed"].mean())
        out["n_formed"] = float(len(formed))
    else:
        out.update(dict.fromkeys(("median_formation_step", "formed_fraction", "n_formed"), math.nan))
    keys = ("n_matched", "n_compared", "spearman_r", "spearman_p", "pearson_r", "pearson_p")
    out.update({f"lens_{key}": float(lens[key]) if lens is not None else math.nan for key in keys})
    return out
