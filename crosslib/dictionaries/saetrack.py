"""SAE-Track: a chain of warm-started SAEs along pre-training (Wang, Xu, Wang; arXiv 2412.17626;
the book's Methods page, section SAE-Track).

Instead of one dictionary shared by all snapshots (the crosscoder), SAE-Track trains one SAE per
snapshot, in step order, and starts each from the previous one:

    SAE_0        trained from scratch on snapshot 0 for `n_steps`
    SAE_k        initialised from SAE_{k−1}, trained on snapshot k for warm_fraction × n_steps
                 at warm_lr_factor × lr with a fresh optimiser (authors: ~15M tokens, 10× lower lr)

Because SAE_k starts where SAE_{k−1} ended and moves only a little, feature i of SAE_k is "the same"
feature as feature i of SAE_{k−1}: indices stay aligned along the chain, so a feature can be
followed through training without any matching step. This module trains the chain and its baseline:

- `train_chain`: the chain itself; every link is its own cached artifact keyed by its starting
  weights, so an interrupted chain resumes link by link (`SAETrackChain`).
- `train_cold_saes` / `warm_versus_cold` / `warm_cold_gap`: each warm link against an SAE trained
  from scratch on the same snapshot with the same number of tokens as the link (explained variance
  and L0, a tidy table); the paper shows this only qualitatively.

What the chain shows about its features (when they form, how they drift, how they compare with a
crosscoder's) is read by `crosslib.analyses.saetrack_analysis`.

Why crosslib's S = 1 Crosscoder and trainer rather than sae-lens's `SAETrainer`: one implementation
for every dictionary in the book. The chain's SAEs use exactly the crosscoder's recipe (JumpReLU
gated on the decoder-weighted activation, tanh-quad sparsity, the same normalisation, schedule and
initialisation search), so comparing SAE-Track features with crosscoder features compares two ways of
following features, not two training codes. crosslib's trainer also gives what the chain needs
out of the box: starting from given weights with a fresh optimiser (`init=`), content-keyed caching
that includes those weights, and exact resume. Every link can still be exported to sae-lens with
`crosslib.dictionaries.saelens`.

Definitions chosen here (the paper gives no exact thresholds; all are `SAETrackConfig` fields):

- Centring (`bias_init="mean"`, an addition to the paper's recipe): the mean of the residual
  stream moves a lot between early snapshots (on a small suite it can grow from ~0 to most of a
  row's norm while the spread around it shrinks), and a short link at a tenth of the lr cannot move
  its decoder bias that far, so every link would be judged on a bias it had no time to learn. Each
  SAE therefore starts centred on its own snapshot's mean (a warm link shifts its biases by the
  change of the mean and keeps everything else), and the cold SAEs start centred too, so warm and
  cold differ only in the dictionary they start from. `bias_init="zero"` is the plain recipe.
- Warm links train with no λ warm-up (`warm_sparsity_warmup_fraction = 0`): the SAE they start
  from is already sparse, and ramping λ up from 0 would first let it become dense.
- Cold SAEs train on the same snapshot for the same number of steps and batch size as the warm link
  (equal tokens), at the full lr with the usual warm-ups, from the same seed as SAE_0.

What warm starts cannot do cheaply: a feature that appears only at snapshot k must be learnt by a
short, slow link from a latent that was dead or doing something else. On synthetic data the default
links (20% of the steps at 0.1× lr) learn such late features only partly, while a cold SAE with the
same budget at the full lr learns them; warm links win where the dictionary drifts slowly. Both
effects show in `warm_versus_cold`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any, Sequence

import pandas as pd
import torch
from einops import einsum
from jaxtyping import Float
from torch import Tensor

from crosslib.activations.sources import ActivationSource
from crosslib.config import (Config, ParameterError, boolean, choice, fraction, integer, is_int, non_negative, positive,
                             positive_int, require)
from crosslib.dictionaries.crosscoder import ACTIVATIONS, SPARSITIES, Crosscoder, CrosscoderConfig
from crosslib.dictionaries.train import (TrainConfig, TrainResult, check_finite, evaluate, search_decoder_norm, train_crosscoder,
                                         train_crosscoder_cached)
from crosslib.progress import progress as tqdm

METHODS = ("warm", "cold")
BIAS_INITS = ("mean", "zero")
MATCH_BY = ("activation", "decoder")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SAETrackConfig(Config):
    """Everything that determines an SAE-Track run (the chapter's parameters map onto these fields).

    The SAEs (shape and recipe, shared by every link and by the cold baselines):
        dict_size, activation ("jumprelu" | "relu" | "topk"), k (topk only), sparsity
        ("tanh-quad" | "l1"), sparsity_coefficient (λ).
    The first SAE, from scratch: n_steps, batch_size, lr, seed, bf16, eval_rows (held-out rows for
        explained variance and L0).
    Warm links: warm_fraction (each link trains warm_fraction × n_steps steps), warm_lr_factor
        (its lr is warm_lr_factor × lr; the paper uses 0.1), warm_sparsity_warmup_fraction (λ warm-up
        of a link, 0 by default because the SAE it starts from is already sparse).
    bias_init: "mean" (default) starts every SAE centred on its snapshot's data mean (from scratch:
        decoder bias = the mean, encoder bias = −W_Eᵀ mean; a warm link: both biases shifted by the
        change of the mean since the previous snapshot, so every feature reads the same centred
        input as before); "zero" is the plain recipe (biases 0 from scratch, links copied unchanged).
    Formation: n_top (top-activating rows per feature), n_random (rows of the random baseline),
        formation_rows (eval rows searched and encoded), formation_fraction (share of the final
        score that counts as formed), min_final_score (features below it never count as formed).
    Drift: n_trajectory_features (features drawn in the PCA trajectories).
    Two lenses: match_by ("activation": features match by the correlation of their activations on
        the same eval rows at the final snapshot, at least min_match_correlation; "decoder": by the
        cosine of their final decoder directions, at least min_match_cosine).
    """

    dict_size: Annotated[int, positive_int()] = 512
    activation: Annotated[str, choice(*ACTIVATIONS)] = "jumprelu"
    k: int = 32
    sparsity: Annotated[str, choice(*SPARSITIES)] = "tanh-quad"
    sparsity_coefficient: Annotated[float, non_negative()] = 0.3
    n_steps: Annotated[int, positive_int()] = 1000
    batch_size: Annotated[int, positive_int()] = 2048
    lr: Annotated[float, positive()] = 1e-3
    seed: Annotated[int, integer(0)] = 0
    bf16: Annotated[bool, boolean()] = False
    eval_rows: Annotated[int, positive_int()] = 8192
    warm_fraction: Annotated[float, fraction("(0, 1]", allowed="a number in (0, 1] (the share of the first SAE's "
                                                              "steps each warm link trains)")] = 0.2
    warm_lr_factor: Annotated[float, positive()] = 0.1
    warm_sparsity_warmup_fraction: Annotated[float, fraction("[0, 1]")] = 0.0
    bias_init: Annotated[str, choice(*BIAS_INITS)] = "mean"
    n_top: Annotated[int, integer(2, allowed="an integer >= 2 (a mean pairwise cosine needs two rows)")] = 16
    n_random: Annotated[int, integer(2)] = 256
    formation_rows: Annotated[int, positive_int()] = 8192
    formation_fraction: Annotated[float, fraction()] = 0.5
    min_final_score: Annotated[float, fraction("[0, 1]")] = 0.1
    n_trajectory_features: Annotated[int, positive_int()] = 24
    match_by: Annotated[str, choice(*MATCH_BY)] = "activation"
    min_match_correlation: Annotated[float, fraction("[0, 1]")] = 0.5
    min_match_cosine: Annotated[float, fraction("[0, 1]")] = 0.7

    def validate(self) -> None:
        if self.activation == "topk":
            require(is_int(self.k) and 1 <= self.k <= self.dict_size, "k", self.k,
                    f"an integer in 1..dict_size={self.dict_size}")

    # ---- the configs of the trainings this run asks for

    def model_config(self, d_model: int) -> CrosscoderConfig:
        """The SAE shape: crosslib's crosscoder over one snapshot."""
        return CrosscoderConfig(n_snapshots=1, d_model=d_model, dict_size=self.dict_size, activation=self.activation,
                                k=self.k, sparsity=self.sparsity)

    @property
    def warm_steps(self) -> int:
        return max(1, round(self.warm_fraction * self.n_steps))

    def first_train_config(self) -> TrainConfig:
        """SAE_0, from scratch with the full budget."""
        return TrainConfig(n_steps=self.n_steps, batch_size=self.batch_size, lr=self.lr,
                           sparsity_coefficient=self.sparsity_coefficient, seed=self.seed, bf16=self.bf16,
                           eval_rows=self.eval_rows)

    def warm_train_config(self) -> TrainConfig:
        """A warm link: warm_fraction of the steps at warm_lr_factor × lr (the optimiser is always fresh)."""
        return self.first_train_config().replace(n_steps=self.warm_steps, lr=self.lr * self.warm_lr_factor,
                                                 sparsity_warmup_fraction=self.warm_sparsity_warmup_fraction)

    def cold_train_config(self) -> TrainConfig:
        """The cold baseline: from scratch with the recipe of SAE_0 but the token budget of a warm link."""
        return self.first_train_config().replace(n_steps=self.warm_steps)


def check_config(config: Any) -> SAETrackConfig:
    """`config` if it is an SAETrackConfig, else a ParameterError naming it."""
    if not isinstance(config, SAETrackConfig):
        raise ParameterError(f"config={type(config).__name__} is not allowed: an SAETrackConfig")
    return config


# --------------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SAETrackChain:
    """The warm-started SAEs, one per snapshot in step order (saes[k] belongs to steps[k])."""

    config: SAETrackConfig
    steps: list[int]
    results: list[TrainResult]  # results[0] from scratch, results[k > 0] warm-started from results[k − 1]

    @property
    def saes(self) -> list[Crosscoder]:
        return [r.model for r in self.results]

    def __len__(self) -> int:
        return len(self.results)

    def decoders(self) -> Float[Tensor, "snapshot feature d_model"]:
        """Every link's decoder rows; feature i of every link is the same tracked feature."""
        return torch.stack([sae.W_D.detach()[0].cpu() for sae in self.saes])

    def metrics(self) -> pd.DataFrame:
        """One row per link: snapshot, step, how it was trained (scratch / warm), steps, tokens, lr, EV, L0, dead."""
        records = []
        for k, (step, result) in enumerate(zip(self.steps, self.results)):
            train = self.config.first_train_config() if k == 0 else self.config.warm_train_config()
            records.append({"snapshot": k, "step": step, "method": "scratch" if k == 0 else "warm",
                            "n_steps": train.n_steps, "tokens": train.n_steps * train.batch_size, "lr": train.lr,
                            **_eval_numbers(result.eval)})
        return pd.DataFrame(records)


def _eval_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    if not metrics:
        return {"explained_variance": math.nan, "l0": math.nan, "dead_fraction": math.nan}
    return {"explained_variance": float(metrics["explained_variance"][0]), "l0": float(metrics["l0"][0]),
            "dead_fraction": float(metrics["dead_fraction"][0])}


def _train(source: ActivationSource, model_config: CrosscoderConfig, train_config: TrainConfig, *,
           init: Crosscoder | None, cache: bool, root: Any, device: Any, progress: bool) -> TrainResult:
    if cache:
        return train_crosscoder_cached(source, model_config, train_config, init=init, root=root, device=device,
                                       progress=progress)
    return train_crosscoder(source, model_config, train_config, None, init=init, device=device, progress=progress)


def check_source(source: ActivationSource, minimum_snapshots: int = 1) -> None:
    """A ParameterError unless `source` is an activation source with steps in increasing order and enough snapshots."""
    for name in ("steps", "n_snapshots", "d_model", "select", "rows", "batches"):
        if not hasattr(source, name):
            raise ParameterError(f"source={type(source).__name__} is not allowed: an ActivationSource "
                                 f"(TensorSource or ActivationStore); it lacks {name!r}")
    require(list(source.steps) == sorted(source.steps), "source.steps", list(source.steps),
            "steps in increasing order (the chain follows training forwards)")
    require(source.n_snapshots >= minimum_snapshots, "source.n_snapshots", source.n_snapshots,
            f"at least {minimum_snapshots} snapshots")


@torch.no_grad()
def snapshot_rows_and_mean(source: ActivationSource, train_config: TrainConfig
                           ) -> tuple[Float[Tensor, "row 1 d_model"], Float[Tensor, " d_model"]]:
    """The rows the trainer's decoder-norm search reads (same seed) and their mean, for one snapshot."""
    x = next(source.batches(train_config.init_search_rows, seed=train_config.seed + 1, device="cpu"))
    check_finite(x, "the rows for the data mean", getattr(source, "steps", None))
    return x, x[:, 0].double().mean(dim=0).float()


@torch.no_grad()
def shift_biases(model: Crosscoder, shift: Float[Tensor, " d_model"]) -> Crosscoder:
    """A copy of an SAE for data moved by `shift`: x̂ gains the shift, and b_E loses W_Eᵀ·shift, so every
    feature's pre-activation on (x + shift) equals the original's on x."""
    moved = Crosscoder.from_state(model.config, model.state_dict())
    moved.b_D.add_(shift.to(moved.b_D.dtype)[None, :])
    # W_E[0] in [d_model, feature] memory order: a matrix-vector product's rounding depends on the matrix's
    # layout, and W_E is stored feature-major for training (crosslib.dictionaries.crosscoder._empty_encoder)
    encoder_shift = einsum(moved.W_E[0].contiguous(), shift.to(moved.W_E.dtype), "d_model feature, d_model -> feature")
    moved.b_E.sub_(encoder_shift.view(moved.b_E.shape))
    return moved


@torch.no_grad()
def centred_initialisation(source: ActivationSource, model_config: CrosscoderConfig,
                           train_config: TrainConfig) -> Crosscoder:
    """The trainer's initialisation (random directions, W_E = W_Dᵀ, decoder norm of least MSE) fitted to
    the centred rows, then shifted onto the data mean: an SAE from scratch that starts centred."""
    x, mean = snapshot_rows_and_mean(source, train_config)
    model = Crosscoder(model_config, seed=train_config.seed)
    search_decoder_norm(model, x - mean, train_config.init_norm_grid)
    return shift_biases(model, mean)


def train_chain(
    source: ActivationSource,
    config: SAETrackConfig = SAETrackConfig(),
    *,
    cache: bool = True,
    root: str | Path | None = None,
    device: Any = "cpu",
    progress: bool = True,
) -> SAETrackChain:
    """Train the SAE-Track chain over every snapshot of `source`, in step order.

    With `cache=True` (default) each link is a content-keyed artifact under `root` (default: the
    data directory) whose key includes the weights it starts from, so a chain that was interrupted
    resumes where it stopped: finished links load from disk, the unfinished one resumes from its
    checkpoint. `cache=False` trains everything in memory (tests).
    """
    config = check_config(config)
    check_source(source)
    model_config = config.model_config(source.d_model)
    results: list[TrainResult] = []
    previous_mean: Tensor | None = None
    for k in tqdm(range(source.n_snapshots), desc="SAE-Track chain", unit="SAE", disable=not progress):
        snapshot = source.select(indices=[k])
        train_config = config.first_train_config() if k == 0 else config.warm_train_config()
        if config.bias_init == "zero":
            init = results[-1].model if results else None
        else:
            mean = snapshot_rows_and_mean(snapshot, train_config)[1]
            init = (centred_initialisation(snapshot, model_config, train_config) if not results
                    else shift_biases(results[-1].model, mean - previous_mean))
            previous_mean = mean
        results.append(_train(snapshot, model_config, train_config, init=init, cache=cache, root=root, device=device,
                              progress=progress))
    return SAETrackChain(config=config, steps=list(source.steps), results=results)


# --------------------------------------------------------------------------------------------
# Warm versus cold
# --------------------------------------------------------------------------------------------


def train_cold_saes(
    source: ActivationSource,
    config: SAETrackConfig = SAETrackConfig(),
    *,
    snapshots: Sequence[int] | None = None,
    cache: bool = True,
    root: str | Path | None = None,
    device: Any = "cpu",
    progress: bool = True,
) -> dict[int, TrainResult]:
    """SAEs trained from scratch with a warm link's token budget, one per snapshot index (default: 1..S−1)."""
    config = check_config(config)
    check_source(source)
    snapshots = list(range(1, source.n_snapshots)) if snapshots is None else list(snapshots)
    require(all(is_int(k) and 0 <= k < source.n_snapshots for k in snapshots), "snapshots", snapshots,
            f"indices in 0..{source.n_snapshots - 1}")
    model_config = config.model_config(source.d_model)
    train_config = config.cold_train_config()
    results = {}
    for k in tqdm(snapshots, desc="cold SAEs", unit="SAE", disable=not progress):
        snapshot = source.select(indices=[k])
        init = centred_initialisation(snapshot, model_config, train_config) if config.bias_init == "mean" else None
        results[k] = _train(snapshot, model_config, train_config, init=init, cache=cache, root=root, device=device,
                            progress=progress)
    return results


def warm_versus_cold(
    source: ActivationSource,
    chain: SAETrackChain,
    *,
    cold: dict[int, TrainResult] | None = None,
    cache: bool = True,
    root: str | Path | None = None,
    device: Any = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Explained variance and L0 of each warm link against a cold SAE with the same token budget.

    One row per (snapshot, method) for snapshots 1..S−1 (snapshot 0 has no warm link: SAE_0 is
    trained from scratch with the full budget). Columns: snapshot, step, method ("warm" | "cold"),
    n_steps, tokens, lr, explained_variance, l0, dead_fraction, all measured on the eval rows.
    The cold SAEs are trained here (cached) unless given as `cold` (from `train_cold_saes`).
    """
    check_source(source, minimum_snapshots=2)
    require(isinstance(chain, SAETrackChain) and chain.steps == list(source.steps), "chain", type(chain).__name__,
            f"an SAETrackChain trained on this source's steps {list(source.steps)}")
    config = chain.config
    snapshots = list(range(1, source.n_snapshots))
    if cold is None:
        cold = train_cold_saes(source, config, snapshots=snapshots, cache=cache, root=root, device=device,
                               progress=progress)
    missing = [k for k in snapshots if k not in cold]
    require(not missing, "cold", sorted(cold), f"one result per snapshot index in {snapshots} (missing {missing})")
    warm_train, cold_train = config.warm_train_config(), config.cold_train_config()
    records = []
    for k in snapshots:
        for method, result, train in (("warm", chain.results[k], warm_train), ("cold", cold[k], cold_train)):
            metrics = result.eval or evaluate(result.model, source.select(indices=[k]), split="eval",
                                              limit=config.eval_rows)
            records.append({"snapshot": k, "step": chain.steps[k], "method": method, "n_steps": train.n_steps,
                            "tokens": train.n_steps * train.batch_size, "lr": train.lr, **_eval_numbers(metrics)})
    return pd.DataFrame(records)


def warm_cold_gap(table: pd.DataFrame) -> pd.DataFrame:
    """The warm-versus-cold table side by side: one row per snapshot with warm − cold differences."""
    require(isinstance(table, pd.DataFrame) and set(METHODS) <= set(table.get("method", [])), "table",
            type(table).__name__, "the DataFrame returned by warm_versus_cold")
    wide = table.pivot(index=["snapshot", "step"], columns="method", values=["explained_variance", "l0"])
    out = pd.DataFrame({
        "warm_explained_variance": wide[("explained_variance", "warm")],
        "cold_explained_variance": wide[("explained_variance", "cold")],
        "warm_l0": wide[("l0", "warm")],
        "cold_l0": wide[("l0", "cold")],
    })
    out["explained_variance_gap"] = out["warm_explained_variance"] - out["cold_explained_variance"]
    out["l0_gap"] = out["warm_l0"] - out["cold_l0"]
    return out.reset_index()
