"""Circuit tracing through training: splice a dictionary into a snapshot, attribute a task to its features.

Splicing
--------
At the hook (e.g. ``blocks.2.hook_resid_post``) of snapshot θ's model we replace the activation
x^θ by

    x^θ  =  x̂^θ(f)  +  e,        x̂^θ(f) = (W_D^θ f + b_D^θ) / s^θ,    e = x^θ − x̂^θ(f)  (held fixed)

where s^θ = √d / mean‖x^θ‖ is the per-snapshot normalisation the dictionary was trained with
(`ActivationStore.norm_factors`). The forward pass is unchanged (up to float rounding), but the
feature activations f and the error e are now leaves of the graph: gradients of a task metric
with respect to them say how much each feature (and the part the dictionary misses) matters.

Which features? A crosscoder's encoder sums over snapshots, h = Σ_θ' W_E^θ' x̃^θ' + b_E, so the
features at θ depend on the activations of *every* snapshot on the same tokens. Encoding with
only x^θ (the others set to zero) would give other, wrong features. So we run all S snapshot
models on the prompts, normalise and encode (x^1..x^S) jointly, and splice the reconstruction
x̂^θ into snapshot θ's model. A per-snapshot SAE is the simple case S = 1.

Attribution (per feature i, at one snapshot)
--------------------------------------------
* activation × gradient:  A_i = Σ_{prompt, position} f_i · ∂m/∂f_i, with m the task metric (a
  mean over prompts). A_i is the first-order estimate of how much m drops when feature i is
  zeroed on every prompt and position. Positions after a prompt's read positions have zero
  gradient (the model is causal), so summing over all positions is the same as summing over the
  positions that can matter.
* integrated gradients:  IG_i = Σ_{prompt, position} f_i · mean_k ∂m/∂f_i(α_k f), α_k = (k + ½)/steps,
  all features scaled together from 0 to their value, the error (and b_D) held fixed. Completeness:
  Σ_i IG_i ≈ m(f) − m(0) (the metric lost by zeroing every feature), exactly as steps → ∞.
* the error term: A_error = Σ e · ∂m/∂e (over prompts, positions and d_model), reported beside the
  features: a large |A_error| means the dictionary misses part of the mechanism.

Interventions
-------------
* zero-ablation: set the top-k features (by attribution, among those active on the prompts) to
  zero everywhere, keep the error, and report the fraction of the metric lost,
  1 − m(ablated) / m(spliced); against k random active features (seeded, averaged over draws).
* patching: run the corrupted prompts and replace the top-k features' activations by their clean
  values (same positions; the corrupted run's error is kept); recovery =
  (m(patched) − m(corrupted)) / (m(clean) − m(corrupted)). Features are ranked by the
  attribution-patching estimate Σ (f_clean − f_corrupted) · ∂m/∂f at the corrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Annotated, Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from einops import rearrange, reduce
from jaxtyping import Bool, Float, Int
from torch import Tensor
from crosslib.progress import progress as tqdm

from crosslib.analyses.tasks import SnapshotModels, Task, check_task_fits, model_device, model_steps, task_metric, turn_on_step
from crosslib.config import (Check, Config, ParameterError, choice, integer, is_int, lists_as_tuples, positive_int,
                             require, require_choice)
from crosslib.dictionaries.crosscoder import Crosscoder
from crosslib.models.hooks import capture, parse_hook, replace_hook, validate_hook

SCORES: tuple[str, ...] = ("attribution", "integrated_gradients")
ENCODE_ROWS = 1024  # token rows per dictionary.encode call (bounds the [rows, snapshot, feature] buffer)

__all__ = [
    "AttributionConfig", "InterventionConfig", "Splice", "SpliceState", "SnapshotAttribution", "AttributionResult",
    "AblationResult", "PatchingResult", "SnapshotModels", "snapshot_activations", "spliced_metric",
    "attribute_snapshot", "attribute", "ablation_curve", "patching_curve", "evolution_table",
    "dominant_features", "attribution_onsets", "turn_on_step",
]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttributionConfig(Config):
    """ig_steps: integrated-gradients steps (0 skips IG); batch_size: prompts per forward pass."""

    ig_steps: Annotated[int, integer(0)] = 16
    batch_size: Annotated[int, integer(1)] = 32


_increasing_ks = Check(
    lambda ks: isinstance(ks, tuple) and len(ks) > 0 and all(is_int(k) and k >= 1 for k in ks)
    and all(a < b for a, b in zip(ks, ks[1:])),
    "a non-empty increasing tuple of integers >= 1, e.g. (1, 2, 5, 10, 20, 50, 100)",
)


@dataclasses.dataclass(frozen=True)
class InterventionConfig(Config):
    """ks: how many features to ablate/patch (each 1..100 by default); rank_by: which attribution ranks
    the features to patch ("attribution": activation difference × gradient at the corrupted run;
    "integrated_gradients": the gradient averaged along the straight path from corrupted to clean
    features, `ig_steps` midpoints); random_draws: random baselines averaged per k."""

    ks: Annotated[tuple[int, ...], lists_as_tuples(), _increasing_ks] = (1, 2, 5, 10, 20, 50, 100)
    rank_by: Annotated[str, choice(*SCORES)] = "attribution"
    ig_steps: Annotated[int, integer(1)] = 8
    random_draws: Annotated[int, integer(1)] = 5
    seed: Annotated[int, integer(0)] = 0
    batch_size: Annotated[int, integer(1)] = 32


# --------------------------------------------------------------------------------------------
# Splicing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SpliceState:
    """What the spliced hook outputs: x = x̂(features) + error, for every prompt and position."""

    features: Float[Tensor, "prompt position feature"]
    error: Float[Tensor, "prompt position d_model"]

    def with_features(self, features: Tensor) -> "SpliceState":
        return SpliceState(features, self.error)


class Splice:
    """A dictionary (crosscoder or S = 1 SAE) spliced into snapshot `snapshot`'s model at `hook`.

    `norm_factors[θ]` = √d / mean‖x^θ‖ for each of the dictionary's snapshots (the cache's
    `ActivationStore.norm_factors`); use ones for a dictionary trained on raw activations.
    """

    def __init__(self, dictionary: Crosscoder, hook: str, snapshot: int = 0, *,
                 norm_factors: Sequence[float] | np.ndarray | Tensor):
        require(isinstance(dictionary, Crosscoder), "dictionary", type(dictionary).__name__,
                "a crosslib.dictionaries.crosscoder.Crosscoder (an SAE is one with n_snapshots=1)")
        self.dictionary = dictionary
        self.hook = parse_hook(hook).name
        n_snapshots = dictionary.config.n_snapshots
        require(isinstance(snapshot, int) and not isinstance(snapshot, bool) and -n_snapshots <= snapshot < n_snapshots,
                "snapshot", snapshot, f"an index into the dictionary's snapshots, 0..{n_snapshots - 1}")
        self.snapshot = snapshot % n_snapshots
        factors = torch.as_tensor(np.asarray(norm_factors, dtype=np.float64)).reshape(-1)
        require(factors.numel() == n_snapshots and bool(torch.isfinite(factors).all()) and bool((factors > 0).all()),
                "norm_factors", factors.tolist(),
                f"{n_snapshots} positive finite numbers, one per snapshot (ActivationStore.norm_factors)")
        self.norm_factors = factors
        # Snapshot θ's decoder as a standalone S = 1 model (decoding needs only W_D^θ, b_D^θ).
        # (select_snapshots builds the copy in float32: give it the dictionary's dtype back.)
        dtype = next(dictionary.parameters()).dtype
        self.decoder = dictionary.select_snapshots([self.snapshot]).to(dtype=dtype).requires_grad_(False)

    @property
    def n_features(self) -> int:
        return self.dictionary.config.dict_size

    def encode(self, activations: Float[Tensor, "prompt position snapshot d_model"]) -> SpliceState:
        """Features at this snapshot, encoded from all snapshots' raw activations jointly, and the error."""
        config = self.dictionary.config
        require(activations.ndim == 4 and activations.shape[2] == config.n_snapshots
                and activations.shape[3] == config.d_model, "activations", tuple(activations.shape),
                f"[prompt, position, n_snapshots={config.n_snapshots}, d_model={config.d_model}] raw activations of "
                "every snapshot of the dictionary (see snapshot_activations)")
        parameter = next(self.dictionary.parameters())
        factors = self.norm_factors.to(device=parameter.device, dtype=parameter.dtype)
        x = activations.to(device=parameter.device, dtype=parameter.dtype)
        normalised = x * rearrange(factors, "snapshot -> snapshot 1")
        flat = rearrange(normalised, "prompt position snapshot d_model -> (prompt position) snapshot d_model")
        # Encode in row chunks: the dictionary returns every snapshot's features, [rows, S, F].
        all_features = torch.cat([self.dictionary.encode(rows)[:, self.snapshot]
                                  for rows in flat.split(ENCODE_ROWS)])
        features = rearrange(all_features, "(prompt position) feature -> prompt position feature",
                             prompt=activations.shape[0])
        with torch.no_grad():
            error = x[:, :, self.snapshot] - self.reconstruct(features)
        return SpliceState(features.detach(), error.detach())

    def reconstruct(self, features: Float[Tensor, "prompt position feature"]) -> Float[Tensor, "prompt position d_model"]:
        """x̂^θ in the model's units (differentiable in `features`)."""
        parameter = next(self.decoder.parameters())
        flat = rearrange(features.to(parameter.dtype), "prompt position feature -> (prompt position) 1 feature")
        decoded = self.decoder.decode(flat)[:, 0] / self.norm_factors[self.snapshot].item()
        return rearrange(decoded, "(prompt position) d_model -> prompt position d_model", prompt=features.shape[0])

    @contextlib.contextmanager
    def spliced(self, model: Any, state: SpliceState) -> Iterator[None]:
        """Within the block, `model`'s activation at the hook is x̂(state.features) + state.error."""

        def replacement(x: Tensor) -> Tensor:
            if state.features.shape[:2] != x.shape[:2]:
                raise ParameterError(f"state has features for {tuple(state.features.shape[:2])} prompts x positions, "
                                     f"the forward pass has {tuple(x.shape[:2])}")
            reconstruction = self.reconstruct(state.features)
            return (reconstruction + state.error.to(reconstruction)).to(x)  # the model's dtype and device

        with replace_hook(model, self.hook, replacement):
            yield

    def logits(self, model: Any, input_ids: Int[Tensor, "prompt position"], state: SpliceState) -> Tensor:
        with self.spliced(model, state):
            return model(input_ids=input_ids).logits


@torch.no_grad()
def snapshot_activations(models: Sequence[Any], hook: str, input_ids: Int[Tensor, "prompt position"], *,
                         batch_size: int = 32) -> Float[Tensor, "prompt position snapshot d_model"]:
    """Raw activations at `hook` of every model (one per dictionary snapshot, in order) on the same prompts."""
    require(len(models) > 0, "models", len(models), "at least one model")
    positive_int()("batch_size", batch_size)
    per_snapshot = []
    for model in models:
        validate_hook(hook, model)
        device = model_device(model)
        chunks = [capture(model, hook, input_ids[i: i + batch_size].to(device)).cpu()
                  for i in range(0, input_ids.shape[0], batch_size)]
        per_snapshot.append(torch.cat(chunks))
    return torch.stack(per_snapshot, dim=2)


def spliced_metric(splice: Splice, model: Any, task: Task, state: SpliceState, *, corrupted: bool = False,
                   batch_size: int = 32, backward: bool = False) -> float:
    """The task metric with the dictionary spliced in with `state`; ``backward=True`` also accumulates
    the metric's gradient into the `.grad` of state's tensors that require it."""
    ids = task.input_ids(corrupted).to(model_device(model))
    leaves = [t for t in (state.features, state.error) if t.requires_grad]
    require(not backward or len(leaves) > 0, "backward", backward,
            "False, or True with state.features or state.error requiring grad")
    total = 0.0
    with contextlib.nullcontext() if backward else torch.no_grad():
        for start in range(0, task.n_prompts, batch_size):
            chunk = slice(start, start + batch_size)
            logits = splice.logits(model, ids[chunk], SpliceState(state.features[chunk], state.error[chunk]))
            share = task.metric_share(logits, chunk)
            if backward:
                share.backward(inputs=leaves)  # only the state's leaves: no gradients into the model's weights
            total += float(share.detach())
    return total


# --------------------------------------------------------------------------------------------
# Attribution
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SnapshotAttribution:
    """Attribution of a task's metric to the features of one snapshot (arrays indexed by feature).

    metric                    the model's own metric (no splice)
    spliced_metric            the metric with the dictionary spliced in (equal up to float rounding)
    metric_without_features   every feature zeroed, error kept (the integrated-gradients baseline)
    activation                Σ over prompts and real tokens of the feature's activation
    active                    the feature fires on at least one real token of the prompts
    attribution               activation × gradient, summed over prompts and positions
    integrated_gradients      None when ig_steps = 0
    error_attribution         error × gradient, summed over prompts, positions and d_model
    """

    snapshot: int
    step: int
    metric: float
    spliced_metric: float
    metric_without_features: float
    activation: Float[np.ndarray, " feature"]
    active: Bool[np.ndarray, " feature"]
    attribution: Float[np.ndarray, " feature"]
    integrated_gradients: Float[np.ndarray, " feature"] | None
    error_attribution: float

    def scores(self, by: str = "attribution") -> Float[np.ndarray, " feature"]:
        require_choice("by", by, SCORES)
        values = getattr(self, by)
        if values is None:
            raise ParameterError(f"by={by!r} is not available: attribution was run with ig_steps=0; use by='attribution'")
        return values

    def top_features(self, n: int = 10, by: str = "attribution") -> Int[np.ndarray, " feature"]:
        """The n active features with the largest (signed) score, largest first."""
        return _ranked_active(self.scores(by), self.active)[:n]

    def table(self, active_only: bool = True) -> pd.DataFrame:
        frame = pd.DataFrame({
            "step": self.step, "snapshot": self.snapshot, "feature": np.arange(len(self.activation)),
            "activation": self.activation, "active": self.active, "attribution": self.attribution,
            "integrated_gradients": self.integrated_gradients if self.integrated_gradients is not None else np.nan,
        })
        return frame[frame["active"]].reset_index(drop=True) if active_only else frame

    def summary(self) -> dict[str, Any]:
        ig = self.integrated_gradients
        return {
            "step": self.step, "snapshot": self.snapshot, "metric": self.metric, "spliced_metric": self.spliced_metric,
            "metric_without_features": self.metric_without_features,
            "attribution_sum": float(self.attribution.sum()),
            "integrated_gradients_sum": float(ig.sum()) if ig is not None else np.nan,
            "error_attribution": self.error_attribution, "n_active": int(self.active.sum()),
        }


def _ranked_active(scores: np.ndarray, active: np.ndarray) -> np.ndarray:
    candidates = np.flatnonzero(active)
    return candidates[np.argsort(-scores[candidates], kind="stable")]


def _real_token_mask(task: Task) -> Bool[Tensor, "prompt position"]:
    """True at real tokens (clean and corrupted prompts have the same lengths), False at padding."""
    return task.token_mask()


def _feature_sums(values: Float[Tensor, "prompt position feature"]) -> Float[np.ndarray, " feature"]:
    return reduce(values.detach().double(), "prompt position feature -> feature", "sum").cpu().numpy()


def attribute_snapshot(task: Task, splice: Splice, model: Any,
                       activations: Float[Tensor, "prompt position snapshot d_model"], *,
                       config: AttributionConfig = AttributionConfig(), step: int | None = None) -> SnapshotAttribution:
    """Attribute `task`'s metric to the features of `splice.snapshot`, in `model` (that snapshot's model).

    `activations` are the raw activations of all the dictionary's snapshots on the task's clean
    prompts (`snapshot_activations(models, hook, task.clean)`).
    """
    check_task_fits(task, model)
    require(activations.shape[0] == task.n_prompts and activations.shape[1] == task.clean.shape[1], "activations",
            tuple(activations.shape), f"activations of the task's {task.n_prompts} prompts x {task.clean.shape[1]} positions")
    state = splice.encode(activations)
    real = _real_token_mask(task).to(state.features.device)[..., None]
    features = state.features.clone().requires_grad_(True)
    error = state.error.clone().requires_grad_(True)
    batch = config.batch_size
    spliced = spliced_metric(splice, model, task, SpliceState(features, error), batch_size=batch, backward=True)
    attribution = _feature_sums(features * features.grad)
    error_attribution = float((error * error.grad).detach().double().sum())

    zeroed = SpliceState(torch.zeros_like(state.features), state.error)
    without = spliced_metric(splice, model, task, zeroed, batch_size=batch)
    integrated = None
    if config.ig_steps > 0:
        integrated = np.zeros(splice.n_features)
        for k in range(config.ig_steps):
            alpha = (k + 0.5) / config.ig_steps  # midpoint rule: error O(1/steps²) for a smooth path
            scaled = (alpha * state.features).requires_grad_(True)
            spliced_metric(splice, model, task, SpliceState(scaled, state.error), batch_size=batch, backward=True)
            integrated += _feature_sums(state.features * scaled.grad)
        integrated /= config.ig_steps
    return SnapshotAttribution(
        snapshot=splice.snapshot, step=splice.snapshot if step is None else int(step),
        metric=task_metric(model, task, batch_size=batch), spliced_metric=spliced, metric_without_features=without,
        activation=_feature_sums(state.features * real), active=_feature_sums((state.features * real) > 0) > 0,
        attribution=attribution, integrated_gradients=integrated, error_attribution=error_attribution,
    )


@dataclasses.dataclass
class AttributionResult:
    """Attribution at several snapshots of one dictionary, with tidy tables for plotting."""

    task: str
    hook: str
    snapshots: list[SnapshotAttribution]
    config: AttributionConfig

    @property
    def steps(self) -> list[int]:
        return [s.step for s in self.snapshots]

    def at_step(self, step: int) -> SnapshotAttribution:
        require(step in self.steps, "step", step, f"one of the attributed steps {self.steps}")
        return self.snapshots[self.steps.index(step)]

    def scores(self, by: str = "attribution") -> Float[np.ndarray, "snapshot feature"]:
        return np.stack([s.scores(by) for s in self.snapshots])

    def table(self, active_only: bool = True) -> pd.DataFrame:
        """One row per (step, feature): activation, active, attribution, integrated_gradients."""
        return pd.concat([s.table(active_only) for s in self.snapshots], ignore_index=True)

    def summary(self) -> pd.DataFrame:
        """One row per step: metric, spliced_metric, metric_without_features, sums of attributions,
        error_attribution, n_active."""
        return pd.DataFrame([s.summary() for s in self.snapshots])


def attribute(task: Task, dictionary: Crosscoder, models: Sequence[Any], hook: str, *,
              norm_factors: Sequence[float] | np.ndarray | Tensor, snapshots: Sequence[int] | None = None,
              steps: Sequence[int] | None = None, config: AttributionConfig = AttributionConfig(),
              activations: Float[Tensor, "prompt position snapshot d_model"] | None = None,
              progress: bool = False) -> AttributionResult:
    """Attribute `task` to the dictionary's features at each snapshot in `snapshots` (default: all).

    `models` holds one model per snapshot of the dictionary, in its order (a `SnapshotModels` of
    the cache's steps, or a list); `steps` labels them (default: `models.steps`). `norm_factors`
    are the cache's `ActivationStore.norm_factors`. `activations` (all snapshots' raw activations
    on ``task.clean``, from `snapshot_activations`) are computed here when not given.
    """
    n_snapshots = dictionary.config.n_snapshots
    require(len(models) == n_snapshots, "models", f"{len(models)} models",
            f"one model per snapshot of the dictionary ({n_snapshots}), in the dictionary's order")
    labels = model_steps(models, steps)
    chosen = list(range(n_snapshots)) if snapshots is None else list(snapshots)
    require(all(isinstance(i, int) and 0 <= i < n_snapshots for i in chosen) and len(chosen) > 0,
            "snapshots", snapshots, f"indices into the dictionary's snapshots, 0..{n_snapshots - 1}")
    if activations is None:
        activations = snapshot_activations(models, hook, task.clean, batch_size=config.batch_size)
    results = []
    for index in tqdm(chosen, desc=f"attribution ({task.name})", disable=not progress):
        splice = Splice(dictionary, hook, index, norm_factors=norm_factors)
        results.append(attribute_snapshot(task, splice, models[index], activations, config=config, step=labels[index]))
    return AttributionResult(task=task.name, hook=parse_hook(hook).name, snapshots=results, config=config)


# --------------------------------------------------------------------------------------------
# Interventions
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AblationResult:
    """Zero-ablation of the top-k vs k random active features.

    curve: one row per (k, selection) with selection "top" or "random": n_features (≤ k: there may
    be fewer active features), metric, fraction_lost (mean over draws for random) and
    fraction_lost_std (0 for top).
    """

    curve: pd.DataFrame
    spliced_metric: float
    metric_all_ablated: float
    n_active: int

    @property
    def fraction_lost_all(self) -> float:
        return _fraction_lost(self.spliced_metric, self.metric_all_ablated)

    def fraction_lost(self, k: int, selection: str = "top") -> float:
        """The fraction of the metric lost at this k ("top" or "random", the mean over draws)."""
        return _curve_value(self.curve, k, selection, "fraction_lost")

    def smallest_k(self, fraction: float = 0.5) -> int | None:
        """The smallest k in the curve whose top-k ablation loses at least `fraction` of the metric."""
        return _smallest_k(self.curve, "fraction_lost", fraction)


@dataclasses.dataclass
class PatchingResult:
    """Patching the top-k (by `scores`) vs k random features from clean into corrupted prompts.

    curve: one row per (k, selection): n_features, metric, recovery (mean over draws for random),
    recovery_std. recovery_all_features patches every feature (error kept from the corrupted run);
    recovery_all_features_and_error also patches the error, which restores the clean run exactly (1).
    scores [feature]: the estimated effect of patching each feature (InterventionConfig.rank_by);
    with integrated gradients they add up to the effect of patching them all.
    """

    curve: pd.DataFrame
    clean_metric: float
    corrupted_metric: float
    recovery_all_features: float
    recovery_all_features_and_error: float
    n_candidates: int
    scores: Float[np.ndarray, " feature"] | None = None

    def recovery(self, k: int, selection: str = "top") -> float:
        """The recovery at this k ("top" or "random", the mean over draws)."""
        return _curve_value(self.curve, k, selection, "recovery")

    def smallest_k(self, recovery: float = 0.5) -> int | None:
        """The smallest k in the curve whose top-k patch recovers at least `recovery` of the clean metric."""
        return _smallest_k(self.curve, "recovery", recovery)


def _curve_value(curve: pd.DataFrame, k: int, selection: str, column: str) -> float:
    require_choice("selection", selection, ("top", "random"))
    rows = curve[(curve["k"] == k) & (curve["selection"] == selection)]
    require(len(rows) == 1, "k", k, f"one of the curve's ks {sorted(set(curve['k']))}")
    return float(rows[column].iloc[0])


def _smallest_k(curve: pd.DataFrame, column: str, threshold: float) -> int | None:
    top = curve[curve["selection"] == "top"].sort_values("k")
    reached = top[top[column] >= threshold]
    return int(reached["k"].iloc[0]) if len(reached) else None


def _fraction_lost(base: float, ablated: float) -> float:
    return (base - ablated) / base if abs(base) > 1e-12 else float("nan")


def _zeroed(state: SpliceState, features: np.ndarray) -> SpliceState:
    modified = state.features.clone()
    modified[..., torch.as_tensor(features, dtype=torch.long)] = 0.0
    return state.with_features(modified)


def _draws(rng: np.random.Generator, candidates: np.ndarray, k: int, n: int) -> list[np.ndarray]:
    return [rng.choice(candidates, size=min(k, len(candidates)), replace=False) for _ in range(n)]


def ablation_curve(task: Task, splice: Splice, model: Any, activations: Float[Tensor, "prompt position snapshot d_model"],
                   scores: Float[np.ndarray, " feature"], *, config: InterventionConfig = InterventionConfig(),
                   progress: bool = False) -> AblationResult:
    """Fraction of the metric lost when zero-ablating the top-k features (by `scores`) vs k random active ones.

    `scores` is one snapshot's attribution (e.g. ``result.at_step(s).attribution``); `activations`
    are all snapshots' raw activations on the clean prompts, as for `attribute_snapshot`. The
    fraction 1 − m(ablated)/m(spliced) is meaningful where the model does the task (m > 0);
    the curve's `metric` column holds the raw values either way.
    """
    check_task_fits(task, model)
    scores = np.asarray(scores, dtype=float)
    require(scores.shape == (splice.n_features,), "scores", scores.shape, f"one score per feature ({splice.n_features})")
    state = splice.encode(activations)
    real = _real_token_mask(task).to(state.features.device)[..., None]
    active = _feature_sums((state.features * real) > 0) > 0
    ranked = _ranked_active(scores, active)
    base = spliced_metric(splice, model, task, state, batch_size=config.batch_size)
    all_ablated = spliced_metric(splice, model, task, _zeroed(state, np.flatnonzero(active)),
                                 batch_size=config.batch_size)
    rng = np.random.default_rng(config.seed)
    rows = []
    for k in tqdm(config.ks, desc=f"zero-ablation ({task.name})", unit="k", disable=not progress):
        top = ranked[:k]
        metric = spliced_metric(splice, model, task, _zeroed(state, top), batch_size=config.batch_size)
        rows.append({"k": k, "selection": "top", "n_features": len(top), "metric": metric,
                     "fraction_lost": _fraction_lost(base, metric), "fraction_lost_std": 0.0})
        lost = []
        metrics = []
        for draw in _draws(rng, np.flatnonzero(active), k, config.random_draws):
            metrics.append(spliced_metric(splice, model, task, _zeroed(state, draw), batch_size=config.batch_size))
            lost.append(_fraction_lost(base, metrics[-1]))
        rows.append({"k": k, "selection": "random", "n_features": min(k, int(active.sum())),
                     "metric": float(np.mean(metrics)), "fraction_lost": float(np.mean(lost)),
                     "fraction_lost_std": float(np.std(lost))})
    return AblationResult(curve=pd.DataFrame(rows), spliced_metric=base, metric_all_ablated=all_ablated,
                          n_active=int(active.sum()))


def _recovery(metric: float, clean: float, corrupted: float) -> float:
    gap = clean - corrupted
    return (metric - corrupted) / gap if abs(gap) > 1e-12 else float("nan")


def patching_curve(task: Task, splice: Splice, model: Any,
                   clean_activations: Float[Tensor, "prompt position snapshot d_model"],
                   corrupted_activations: Float[Tensor, "prompt position snapshot d_model"], *,
                   config: InterventionConfig = InterventionConfig(), progress: bool = False) -> PatchingResult:
    """Recovery of the clean metric when the top-k features are patched from clean into corrupted prompts.

    Activations are all snapshots' raw activations on ``task.clean`` and ``task.corrupted``.
    """
    check_task_fits(task, model)
    batch = config.batch_size
    clean = splice.encode(clean_activations)
    corrupted = splice.encode(corrupted_activations)
    clean_metric = spliced_metric(splice, model, task, clean, batch_size=batch)
    difference = clean.features - corrupted.features
    leaf = corrupted.features.clone().requires_grad_(True)
    corrupted_metric = spliced_metric(splice, model, task, corrupted.with_features(leaf), corrupted=True,
                                      batch_size=batch, backward=True)
    gradient = leaf.grad  # attribution patching: first order at the corrupted run
    if config.rank_by == "integrated_gradients":
        gradient = torch.zeros_like(difference)
        for step in range(config.ig_steps):
            alpha = (step + 0.5) / config.ig_steps
            leaf = (corrupted.features + alpha * difference).detach().requires_grad_(True)
            spliced_metric(splice, model, task, corrupted.with_features(leaf), corrupted=True, batch_size=batch,
                           backward=True)
            gradient += leaf.grad / config.ig_steps
    scores = _feature_sums(difference * gradient)
    real = _real_token_mask(task).to(clean.features.device)[..., None]
    candidates_mask = _feature_sums(((clean.features > 0) | (corrupted.features > 0)) & real) > 0
    ranked = _ranked_active(scores, candidates_mask)
    candidates = np.flatnonzero(candidates_mask)

    def patched(features: np.ndarray, with_error: bool = False) -> float:
        index = torch.as_tensor(features, dtype=torch.long)
        mixed = corrupted.features.clone()
        mixed[..., index] = clean.features[..., index]
        state = SpliceState(mixed, clean.error if with_error else corrupted.error)
        return spliced_metric(splice, model, task, state, corrupted=True, batch_size=batch)

    rng = np.random.default_rng(config.seed)
    rows = []
    for k in tqdm(config.ks, desc=f"patching ({task.name})", unit="k", disable=not progress):
        metric = patched(ranked[:k])
        rows.append({"k": k, "selection": "top", "n_features": min(k, len(ranked)), "metric": metric,
                     "recovery": _recovery(metric, clean_metric, corrupted_metric), "recovery_std": 0.0})
        metrics = [patched(draw) for draw in _draws(rng, candidates, k, config.random_draws)]
        recoveries = [_recovery(m, clean_metric, corrupted_metric) for m in metrics]
        rows.append({"k": k, "selection": "random", "n_features": min(k, len(candidates)),
                     "metric": float(np.mean(metrics)), "recovery": float(np.mean(recoveries)),
                     "recovery_std": float(np.std(recoveries))})
    every = np.arange(splice.n_features)
    return PatchingResult(
        curve=pd.DataFrame(rows), clean_metric=clean_metric, corrupted_metric=corrupted_metric,
        recovery_all_features=_recovery(patched(every), clean_metric, corrupted_metric),
        recovery_all_features_and_error=_recovery(patched(every, with_error=True), clean_metric, corrupted_metric),
        n_candidates=len(candidates), scores=scores,
    )


# --------------------------------------------------------------------------------------------
# Evolution across snapshots
# --------------------------------------------------------------------------------------------


def dominant_features(result: AttributionResult, *, top_n: int = 5, by: str = "attribution") -> pd.DataFrame:
    """Which features dominate at each step: step, rank (1 = largest), feature, score, share.

    share = the feature's score / the sum of |scores| of all features at that step (how much of
    the total attribution it carries).
    """
    positive_int()("top_n", top_n)
    rows = []
    for snapshot in result.snapshots:
        scores = snapshot.scores(by)
        total = float(np.abs(scores).sum())
        for rank, feature in enumerate(snapshot.top_features(top_n, by), start=1):
            rows.append({"step": snapshot.step, "rank": rank, "feature": int(feature), "score": float(scores[feature]),
                         "share": float(scores[feature]) / total if total > 0 else np.nan})
    return pd.DataFrame(rows, columns=["step", "rank", "feature", "score", "share"])


def evolution_table(result: AttributionResult, performance: pd.DataFrame | None = None, *, top_n: int = 10,
                    by: str = "attribution") -> pd.DataFrame:
    """Attribution of the features that are in some step's top `top_n`, at every step (tidy, long).

    Columns: step, feature, score, activation, rank (at that step among active features; NaN if
    inactive), is_top (in that step's top `top_n`), and — when `performance` (from
    `performance_curve`) is given — the task's metric and corrupted_metric at that step.
    """
    positive_int()("top_n", top_n)
    features = sorted({int(f) for s in result.snapshots for f in s.top_features(top_n, by)})
    rows = []
    for snapshot in result.snapshots:
        scores = snapshot.scores(by)
        ranked = _ranked_active(scores, snapshot.active)
        rank_of = {int(f): r for r, f in enumerate(ranked, start=1)}
        for feature in features:
            rank = rank_of.get(feature)
            rows.append({"step": snapshot.step, "feature": feature, "score": float(scores[feature]),
                         "activation": float(snapshot.activation[feature]),
                         "rank": float(rank) if rank is not None else np.nan,
                         "is_top": rank is not None and rank <= top_n})
    table = pd.DataFrame(rows, columns=["step", "feature", "score", "activation", "rank", "is_top"])
    if performance is not None:
        require("step" in performance and "metric" in performance, "performance", list(performance.columns),
                "a table with columns step and metric (from crosslib.analyses.tasks.performance_curve)")
        table = table.merge(performance, on="step", how="left")
    return table


def attribution_onsets(result: AttributionResult, features: Sequence[int] | None = None, *, fraction: float = 0.5,
                       by: str = "attribution", top_n: int = 10) -> pd.DataFrame:
    """When each feature starts to matter for the task: feature, onset_step (first step whose score
    reaches `fraction` of the final step's score), peak_step, peak_score, final_score.

    `features` defaults to the final step's top `top_n`. Compare onset_step with the task's
    `turn_on_step(performance.step, performance.metric)` and the features' emergence steps.
    """
    scores = result.scores(by)  # [snapshot, feature]
    if features is None:
        features = result.snapshots[-1].top_features(top_n, by)
    rows = []
    for feature in features:
        series = scores[:, int(feature)]
        rows.append({"feature": int(feature), "onset_step": turn_on_step(result.steps, series, fraction),
                     "peak_step": int(result.steps[int(np.argmax(series))]), "peak_score": float(series.max()),
                     "final_score": float(series[-1])})
    return pd.DataFrame(rows, columns=["feature", "onset_step", "peak_step", "peak_score", "final_score"])
