"""The crosscoder: one sparse dictionary shared by S pre-training snapshots
(see the book's Methods page, section Crosscoder).

For snapshots θ = 1..S with normalised activations x̃^θ ∈ R^d at the same token:

    h       = Σ_θ W_E^θ x̃^θ + b_E                          encoder sums over snapshots      [batch, feature]
    f_i^θ   = h_i · H(h_i ‖W_D,i^θ‖ − e^{t_i})             JumpReLU gated per snapshot      [batch, snapshot, feature]
    x̂^θ     = W_D^θ f^θ + b_D^θ                             decoder per snapshot            [batch, snapshot, d_model]
    L       = mean_θ ‖x̂^θ − x̃^θ‖²  +  λ Σ_i p̂_i (1 + p̂_i / s)   (mean over the batch)
    p̂_i     = mean over batch and θ of tanh(c · f_i^θ ‖W_D,i^θ‖)     ("tanh-quad": a smooth L0)

Both terms average over the snapshots, as the authors' library computes the loss (a crosscoder's
per-snapshot errors are averaged like tokens), so one λ puts the same pressure per snapshot on a
crosscoder as on an S = 1 SAE, and a crosscoder over S copies of one snapshot has exactly that
snapshot's SAE loss.

A feature whose decoder norm is small at θ is off there. The gate acts on z = h‖W_D,i^θ‖ (the
norm of the feature's contribution to x̂^θ): f = JumpReLU_θ(z)/‖W_D‖ with JumpReLU_θ(z) = z·H(z − θ),
θ = e^t. The threshold learns through the straight-through estimator of Rajamanoharan et al. (2024)
with a rectangle kernel of width ε (`bandwidth`), ∂JumpReLU_θ(z)/∂θ := −(θ/ε)·1[|z − θ| < ε/2, z > 0]
(z ≤ 0 gives 0 for every θ > 0, so it carries no signal). Hence

    ∂f_i^θ/∂h_i = H(z − θ),   ∂f_i^θ/∂‖W_D,i^θ‖ = 0,
    ∂f_i^θ/∂t_i = −θ² / (ε ‖W_D,i^θ‖) · 1[|z − θ| < ε/2, z > 0]      (θ = e^{t_i}, z = h_i‖W_D,i^θ‖).

The window is measured in units of h‖W_D‖, i.e. of the norm of a feature's contribution to the
reconstruction. With the paper's normalisation every snapshot's rows have mean norm √d, so the
authors' ε = 4.0 is ≈ 0.14 of a row's norm at d = 768 and ≈ 0.35 at our tiny d = 128: wide
windows that give every near-threshold activation a say in moving the threshold. We keep 4.0 as the
default (the paper's value) and expose it as `bandwidth`.

Variants: `relu` (f = ReLU(h) in every snapshot) with the Anthropic penalty λ Σ_i f_i Σ_θ‖W_D,i^θ‖
(`sparsity="l1"`; as in Anthropic's crosscoder note both terms then *sum* over snapshots:
L = Σ_θ ‖x̂^θ − x̃^θ‖² + λ Σ_θ Σ_i f_i^θ ‖W_D,i^θ‖, mean over the batch), and `topk` (the k features
with the largest h_i Σ_θ‖W_D,i^θ‖ per token; its reconstruction term averages over snapshots).

One implementation serves three uses:
  * a crosscoder over S snapshots;
  * a per-snapshot SAE: the same module with S = 1;
  * S independent SAEs trained in one pass (`independent=True`): each snapshot has its own
    dictionary (b_E and log_threshold gain a leading snapshot axis), the encoder does not sum over
    snapshots and p̂ averages within each dictionary. The loss is the sum of the S SAE losses, whose
    parameters are disjoint, so (with Adam) this is S separate trainings over one read of the data.
    `model.sae(θ)` extracts snapshot θ's SAE as a standalone S = 1 Crosscoder.

Internally a "dictionary" axis of size G (1, or S when independent) groups the snapshots that share
a dictionary, and activations are kept batch-last (h [dictionary, feature, batch], f [snapshot,
feature, batch]): each snapshot's decoder is one slice of a batched matmul and every per-feature sum
runs along contiguous memory. The gate's straight-through estimator and the fast paths (a fused
gate + penalty kernel, torch.compile, sparse products once f is sparse) live in `crosslib.dictionaries.kernels`;
one `KernelOptions` (`model.kernels`) chooses among them, and every choice computes the same values
and gradients as the one-screen `crosslib.dictionaries.reference` (tests/dictionaries/test_reference.py).

The default penalty, measured on planted features (tests/dictionaries/test_train.py): at the tiny preset's
settings (d = 128, 512 features, 600 steps of 1024 rows, lr 1e-3) tanh-quad recovers every one of
256 planted features (cosine ≥ 0.9) at an L0 1.6x the planted one (λ = 1; 2x at λ = 0.3). It fails
where a run is short and most rows hold no feature (d = 32, 24 features firing 1% of the time, 800
steps: L0 1.4 against 0.2 planted, ~1 of 24 recovered), for a measured reason: the threshold learns
at 0.1x the base lr (the authors' value, for ~400k steps), so in 800 Adam steps log e^t can move by
at most ~0.24 and the threshold stays near its initial 0.1, far below the activations of noise-only
rows; with `threshold_lr_factor=10` the same run recovers 23 of 24 at L0 0.14. The bandwidth ε and
the threshold's initial value are not the cause (ε = 0.25..4 and e^t = 1 change nothing). The
default stays the paper's; Anthropic's l1 (no threshold to learn) is the robust choice for very
short runs on sparse data.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import safetensors.torch
import torch
from einops import einsum, rearrange, reduce
from jaxtyping import Float, Int
from torch import Tensor, nn

from crosslib.artifacts import (ArtifactError, atomic_write_bytes, atomic_write_json, read_json_object,
                                sha256_bytes)
from crosslib.config import (Check, Config, ParameterError, boolean, choice, is_int, is_number, positive,
                             positive_int, require, require_positive)
from crosslib.dictionaries.distributed import SINGLE_PROCESS, ShardingContext
from crosslib.dictionaries.kernels import (Encode, JumpReLU, JumpReLUTanh, KernelOptions, SparsePlan, SquaredError,
                                           jumprelu_gate, sparse_decode)

ACTIVATIONS = ("jumprelu", "relu", "topk")
SPARSITIES = ("tanh-quad", "l1")
FORMAT = "crosslib.crosscoder/1"  # a file-format name, fixed since the first release (not an import path)
WEIGHTS_FILE = "crosscoder.safetensors"
CONFIG_FILE = "crosscoder.json"
PLACEHOLDER_DECODER_NORM = 0.1  # used at construction when decoder_init_norm="search" (the trainer searches)


@dataclasses.dataclass(frozen=True)
class CrosscoderConfig(Config):
    """Shape and functional form of a crosscoder (paper defaults)."""

    n_snapshots: Annotated[int, positive_int()]
    d_model: Annotated[int, positive_int()]
    dict_size: Annotated[int, positive_int()]
    activation: Annotated[str, choice(*ACTIVATIONS)] = "jumprelu"
    k: int = 32  # active features per token, topk only
    sparsity: Annotated[str, choice(*SPARSITIES)] = "tanh-quad"
    tanh_scale: Annotated[float, positive()] = 4.0  # c in tanh(c · f‖W_D‖)
    quad_scale: Annotated[float, positive()] = 0.01  # s in p̂(1 + p̂/s)
    bandwidth: Annotated[float, positive()] = 4.0  # ε, the STE rectangle window, in units of h‖W_D‖
    threshold_init: Annotated[float, positive()] = 0.1  # e^t at initialisation
    # per-snapshot decoder norm at init, or "search" (grid, min MSE)
    decoder_init_norm: Annotated[float | str, Check(lambda norm: norm == "search" or is_number(norm) and norm > 0,
                                                    'a positive number or "search"')] = "search"
    independent: Annotated[bool, boolean()] = False  # one dictionary per snapshot (S SAEs in one pass)

    def validate(self) -> None:
        if self.activation == "topk":
            require(is_int(self.k) and 1 <= self.k <= self.dict_size, "k", self.k,
                    f"an integer in 1..dict_size={self.dict_size}")

    @property
    def n_dictionaries(self) -> int:
        return self.n_snapshots if self.independent else 1

    @property
    def snapshots_per_dictionary(self) -> int:
        return 1 if self.independent else self.n_snapshots


class CrosscoderOutput(NamedTuple):
    reconstruction: Float[Tensor, "batch snapshot d_model"]
    features: Float[Tensor, "batch snapshot feature"]
    loss: Tensor  # reconstruction_loss + λ · sparsity_loss (this process's share when sharded)
    reconstruction_loss: Tensor  # ‖x̂^θ − x̃^θ‖², mean over the batch and θ (sum over θ for sparsity="l1")
    sparsity_loss: Tensor  # Σ_i ψ(p̂_i), without λ
    squared_error: Float[Tensor, " snapshot"]  # Σ_batch ‖x̂^θ − x̃^θ‖² (detached)
    active: Int[Tensor, "snapshot feature"]  # rows of the batch where f_i^θ > 0 (detached)
    total_variance: Float[Tensor, " snapshot"]  # Σ_batch ‖x̃^θ − mean_batch x̃^θ‖²: EV = 1 − squared_error/total_variance


def _empty_encoder(config: CrosscoderConfig) -> Tensor:
    """An uninitialised W_E [snapshot, d_model, feature], laid out in memory as the encoder's matmul reads it:
    [dictionary, feature, snapshot·d_model] row-major. The bf16 copy for each step's matmul is then a plain
    cast, and the gradient accumulates without a transposing copy (each was a few ms per step); values and
    saved files are as with the plain layout (a crosscoder has one dictionary, an SAE stack one snapshot
    per dictionary)."""
    G, Sg, d, F = config.n_dictionaries, config.snapshots_per_dictionary, config.d_model, config.dict_size
    if G == 1:
        return torch.empty(F, Sg, d).permute(1, 2, 0)
    if Sg == 1:
        return torch.empty(G, F, d).permute(0, 2, 1)
    return torch.empty(G * Sg, d, F)


class Crosscoder(nn.Module):
    """A crosscoder over `config.n_snapshots` snapshots (an SAE when n_snapshots = 1).

    Parameters (crosscoder; with independent=True b_E and log_threshold are [snapshot, feature]):
      W_E [snapshot, d_model, feature], b_E [feature], W_D [snapshot, feature, d_model],
      b_D [snapshot, d_model], log_threshold [feature].
    """

    def __init__(self, config: CrosscoderConfig, *, seed: int | None = 0, kernels: KernelOptions = KernelOptions(),
                 initialise: bool = True):
        super().__init__()
        if not isinstance(config, CrosscoderConfig):
            raise ParameterError(f"config={type(config).__name__} is not allowed: a CrosscoderConfig")
        if not isinstance(kernels, KernelOptions):
            raise ParameterError(f"kernels={kernels!r} is not allowed: a crosslib.dictionaries.kernels.KernelOptions")
        self.config = config
        self.kernels = kernels  # which kernels compute the math below (same values; see crosslib.dictionaries.kernels)
        S, d, F = config.n_snapshots, config.d_model, config.dict_size
        shared = (F,) if not config.independent else (S, F)
        self.W_E = nn.Parameter(_empty_encoder(config))
        self.b_E = nn.Parameter(torch.zeros(shared))
        self.W_D = nn.Parameter(torch.empty(S, F, d))
        self.b_D = nn.Parameter(torch.zeros(S, d))
        self.log_threshold = nn.Parameter(torch.full(shared, math.log(config.threshold_init)))
        if initialise:  # (skipped when the weights are about to be overwritten: load, shards, stacks)
            norm = config.decoder_init_norm if config.decoder_init_norm != "search" else PLACEHOLDER_DECODER_NORM
            self.initialise(float(norm), seed=seed)

    # ---- initialisation (paper): one direction per feature shared by all snapshots, W_E = W_Dᵀ, biases 0

    @torch.no_grad()
    def initialise(self, decoder_norm: float, *, seed: int | None = 0) -> None:
        cfg = self.config
        G, Sg, F, d = cfg.n_dictionaries, cfg.snapshots_per_dictionary, cfg.dict_size, cfg.d_model
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        directions = torch.randn(G, F, d, generator=generator)
        directions /= directions.norm(dim=-1, keepdim=True)
        self.W_D.copy_(rearrange(directions[:, None].expand(G, Sg, F, d),
                                 "dictionary snapshot feature d_model -> (dictionary snapshot) feature d_model"))
        self.set_decoder_norm(decoder_norm)
        self.b_E.zero_()
        self.b_D.zero_()
        self.log_threshold.fill_(math.log(cfg.threshold_init))

    @torch.no_grad()
    def set_decoder_norm(self, decoder_norm: float) -> None:
        """Rescale every decoder row to norm `decoder_norm` (per snapshot) and tie W_E = W_Dᵀ."""
        require_positive("decoder_norm", decoder_norm)
        self.W_D.mul_(decoder_norm / self.W_D.norm(dim=-1, keepdim=True).clamp_min(1e-30))
        self.W_E.copy_(rearrange(self.W_D, "snapshot feature d_model -> snapshot d_model feature"))

    # ---- the math

    def decoder_norms(self) -> Float[Tensor, "snapshot feature"]:
        return self.W_D.norm(dim=-1)

    def pre_activation(self, x: Float[Tensor, "batch snapshot d_model"], *,
                       parallel: ShardingContext = SINGLE_PROCESS) -> Float[Tensor, "dictionary feature batch"]:
        """h = Σ_θ W_E^θ x̃^θ + b_E [dictionary, feature, batch]."""
        h = self.encoder_sum(x, parallel=parallel)
        return h + self.b_E.view(h.shape[0], -1, 1).to(h.dtype)  # keep h in the matmul's dtype (bf16 under autocast)

    def encoder_sum(self, x: Float[Tensor, "batch snapshot d_model"], *, parallel: ShardingContext = SINGLE_PROCESS,
                    plan: SparsePlan | None = None) -> Float[Tensor, "dictionary feature batch"]:
        """Σ_θ W_E^θ x̃^θ (no bias): one [feature, S·d] @ [S·d, batch] matmul per dictionary (batch-last).

        With a `plan`, the gradient of W_E may be computed over the active positions only (see `Encode`)."""
        G = self.config.n_dictionaries
        x_grouped = rearrange(x, "batch (dictionary snapshot) d_model -> dictionary (snapshot d_model) batch", dictionary=G)
        W_E = rearrange(self.W_E, "(dictionary snapshot) d_model feature -> dictionary feature (snapshot d_model)", dictionary=G)
        if plan is not None:
            h = Encode.apply(W_E, x_grouped, plan)
        else:
            h = einsum(W_E, x_grouped, "dictionary feature input, dictionary input batch -> dictionary feature batch")
        return parallel.sum_over_heads(h)  # other processes may hold other snapshots' terms

    def activate(self, h: Float[Tensor, "dictionary feature batch"], norms: Float[Tensor, "snapshot feature"],
                 *, add_bias: bool = False, plan: SparsePlan | None = None, penalty: bool = True
                 ) -> tuple[Float[Tensor, "snapshot feature batch"],
                            Float[Tensor, "dictionary feature"] | None, Int[Tensor, "snapshot feature"]]:
        """f^θ; Σ over batch and the dictionary's snapshots of φ(f‖W_D‖); #active rows per (snapshot, feature).

        φ(u) = tanh(c u) for tanh-quad, u for l1. With `add_bias`, `h` lacks b_E and it is added here.
        `penalty=False` skips φ's sum (None in its place): encoding needs f only, and the tanh is most of
        the gate's cost.
        """
        cfg = self.config
        G, F, B = h.shape
        norms = norms.view(G, -1, F)
        t = self.log_threshold.view(G, F)
        if cfg.activation == "jumprelu" and cfg.sparsity == "tanh-quad" and self.kernels.fused:
            bias = self.b_E.view(G, F) if add_bias else torch.zeros((G, F), dtype=h.dtype, device=h.device)
            if penalty:
                f, phi, active = JumpReLUTanh.apply(h, bias, norms, t, cfg.bandwidth, cfg.tanh_scale,
                                                    self.kernels.compiled, plan)
            else:
                (f, active), phi = jumprelu_gate(h, bias, norms, t, self.kernels.compiled), None
        else:
            if add_bias:
                h = h + self.b_E.view(G, F, 1).to(h.dtype)
            if cfg.activation == "jumprelu":
                f = JumpReLU.apply(h, norms, t, cfg.bandwidth)
            elif cfg.activation == "relu":
                f = h.relu()[:, None].expand(G, norms.shape[1], F, B)
            else:  # topk by decoder-weighted activation, so the choice is invariant to rescaling W_D vs f
                score = h.relu() * norms.sum(1)[..., None]
                keep = torch.zeros_like(h, dtype=torch.bool).scatter_(1, score.topk(cfg.k, dim=1).indices, True)
                f = torch.where(keep, h.relu(), 0.0)[:, None].expand(G, norms.shape[1], F, B)
            f_norm = f * norms[..., None]  # f_i^θ ‖W_D,i^θ‖
            phi = reduce((torch.tanh(cfg.tanh_scale * f_norm) if cfg.sparsity == "tanh-quad" else f_norm).float(),
                         "dictionary snapshot feature batch -> dictionary snapshot feature", "sum") if penalty else None
            active = (f.detach() > 0).sum(3, dtype=torch.int32)
        f = rearrange(f, "dictionary snapshot feature batch -> (dictionary snapshot) feature batch")
        phi_sum = reduce(phi, "dictionary snapshot feature -> dictionary feature", "sum") if penalty else None
        return f, phi_sum, active.view(-1, F)

    def decode_batch_last(self, f: Float[Tensor, "snapshot feature batch"]) -> Float[Tensor, "snapshot d_model batch"]:
        """x̂^θ = W_D^θ f^θ + b_D^θ, one batched matmul over snapshots."""
        # einsum(W_D, f, "snapshot feature d_model, snapshot feature batch -> snapshot d_model batch") + b_D
        W_D = rearrange(self.W_D, "snapshot feature d_model -> snapshot d_model feature")
        return torch.baddbmm(self.b_D[..., None], W_D, f)

    def sparsity_penalty(self, phi_sum: Float[Tensor, "dictionary feature"], n_rows: int, n_snapshots: int) -> Tensor:
        """Σ_i ψ(p̂_i) with p̂_i = φ_sum_i / (rows · snapshots per dictionary); ψ(p) = p(1 + p/s) or, for l1, S·p."""
        p = phi_sum / (n_rows * n_snapshots)
        if self.config.sparsity == "tanh-quad":
            return (p * (1 + p / self.config.quad_scale)).sum()
        return n_snapshots * p.sum()  # Σ_θ mean_batch Σ_i f_i^θ ‖W_D,i^θ‖ (Anthropic's penalty)

    def forward(self, x: Float[Tensor, "batch snapshot d_model"], *, sparsity_coefficient: float = 1.0,
                parallel: ShardingContext = SINGLE_PROCESS, penalty: bool = True) -> CrosscoderOutput:
        """Reconstruct `x` (already normalised) and compute the loss.

        `parallel` (a crosslib.dictionaries.distributed.ShardingContext; one process by default) makes this process
        compute its share of a model sharded over snapshots and/or data; the shares' losses sum to the
        full loss. `penalty=False` measures the reconstruction alone (initialisation, evaluation): the
        penalty's tanh, most of an eager forward's time, is skipped, `sparsity_loss` is NaN and `loss` is
        the reconstruction term.
        """
        self._check_input(x)
        cfg = self.config
        rows = parallel.global_rows(x.shape[0])
        snapshots = parallel.snapshots_per_dictionary(cfg)

        # sparse products (training on CPU, one process): decided once f is known, see crosslib.dictionaries.kernels
        plan = SparsePlan.for_step(self.kernels, x, cfg.snapshots_per_dictionary == 1, parallel.is_sharded,
                                   self.training)
        h = self.encoder_sum(x, parallel=parallel, plan=plan)  # Σ_θ W_E^θ x̃^θ; b_E is added inside activate()
        norms = self.decoder_norms()
        f, phi_sum, active = self.activate(h, norms, add_bias=True, plan=plan,  # the fused gate may fill the plan
                                           penalty=penalty)
        if plan is not None and plan.covers(active, f):
            x_hat = sparse_decode(f, self.W_D, self.b_D, plan)
        else:
            x_hat = self.decode_batch_last(f)

        x_batch_last = rearrange(x, "batch snapshot d_model -> snapshot d_model batch")
        # Σ_batch ‖x̂^θ − x̃^θ‖², and the data's sums for the explained variance
        error, x_square_sum, x_sum = SquaredError.apply(x_hat, x_batch_last, self.kernels.compiled)
        # the paper's objective (tanh-quad, and topk) averages the squared error over the batch and the
        # snapshots, like the authors' library; Anthropic's l1 objective sums it over snapshots
        reconstruction_loss = error.sum() / (rows if cfg.sparsity == "l1" else rows * snapshots)
        if penalty:
            phi_sum = parallel.sum_penalty_statistic(phi_sum)  # p̂ averages over every process's rows and snapshots
            sparsity_loss = self.sparsity_penalty(phi_sum, rows, snapshots)
            # each of the penalty_replicas processes that compute the same penalty holds 1/penalty_replicas of it
            loss = reconstruction_loss + sparsity_coefficient * sparsity_loss / parallel.penalty_replicas
        else:
            sparsity_loss, loss = torch.full_like(reconstruction_loss, float("nan")), reconstruction_loss
        return CrosscoderOutput(
            reconstruction=rearrange(x_hat, "snapshot d_model batch -> batch snapshot d_model"),
            features=rearrange(f, "snapshot feature batch -> batch snapshot feature"),
            loss=loss, reconstruction_loss=reconstruction_loss, sparsity_loss=sparsity_loss,
            squared_error=error.detach(), active=active.detach(),
            total_variance=x_square_sum - (x_sum * x_sum).sum(-1) / x.shape[0],
        )

    # ---- convenience views

    @torch.no_grad()
    def encode(self, x: Float[Tensor, "batch snapshot d_model"]) -> Float[Tensor, "batch snapshot feature"]:
        """Feature activations f^θ (no gradient; use forward() for training)."""
        self._check_input(x)
        f, _, _ = self.activate(self.pre_activation(x), self.decoder_norms(), penalty=False)
        return rearrange(f, "snapshot feature batch -> batch snapshot feature")

    def decode(self, f: Float[Tensor, "batch snapshot feature"]) -> Float[Tensor, "batch snapshot d_model"]:
        f = rearrange(f, "batch snapshot feature -> snapshot feature batch")
        return rearrange(self.decode_batch_last(f), "snapshot d_model batch -> batch snapshot d_model")

    def _check_input(self, x: Tensor) -> None:
        cfg = self.config
        if x.ndim != 3 or x.shape[1] != cfg.n_snapshots or x.shape[2] != cfg.d_model:
            raise ParameterError(
                f"x.shape={tuple(x.shape)} is not allowed: expected [batch, n_snapshots={cfg.n_snapshots}, "
                f"d_model={cfg.d_model}]")

    # ---- per-snapshot SAEs and shards

    def sae(self, snapshot: int) -> "Crosscoder":
        """Snapshot `snapshot`'s SAE as a standalone S = 1 Crosscoder (independent models, or S = 1)."""
        cfg = self.config
        if not (cfg.independent or cfg.n_snapshots == 1):
            raise ParameterError("sae() needs an independent model (independent=True) or one with n_snapshots=1; "
                                 "a crosscoder's snapshots share one dictionary")
        require(isinstance(snapshot, int) and -cfg.n_snapshots <= snapshot < cfg.n_snapshots, "snapshot", snapshot,
                f"an index in 0..{cfg.n_snapshots - 1}")
        return self.select_snapshots([snapshot % cfg.n_snapshots])

    def select_snapshots(self, indices: list[int]) -> "Crosscoder":
        """A model over some snapshots (a shard): their W_E, W_D, b_D slices; shared b_E, log_threshold copied."""
        cfg = self.config
        indices = list(indices)
        require(len(indices) > 0 and all(isinstance(i, int) and 0 <= i < cfg.n_snapshots for i in indices),
                "indices", indices, f"a non-empty list of indices in 0..{cfg.n_snapshots - 1}")
        independent = cfg.independent and len(indices) > 1
        part = Crosscoder(cfg.replace(n_snapshots=len(indices), independent=independent), initialise=False,
                          kernels=self.kernels)
        with torch.no_grad():
            part.W_E.copy_(self.W_E[indices])
            part.W_D.copy_(self.W_D[indices])
            part.b_D.copy_(self.b_D[indices])
            shared = (lambda p: p[indices].reshape(part.b_E.shape)) if cfg.independent else (lambda p: p)
            part.b_E.copy_(shared(self.b_E))
            part.log_threshold.copy_(shared(self.log_threshold))
        return part.to(self.W_E.device)

    @classmethod
    def stack(cls, saes: list["Crosscoder"]) -> "Crosscoder":
        """S standalone SAEs (S = 1 models with equal configs) → one independent model over S snapshots."""
        require(len(saes) > 0 and all(isinstance(s, Crosscoder) and s.config.n_snapshots == 1 for s in saes),
                "saes", f"{len(saes)} models", "a non-empty list of n_snapshots=1 Crosscoders")
        base = saes[0].config
        for s in saes:
            if s.config.replace(decoder_init_norm=base.decoder_init_norm) != base:
                raise ParameterError("saes have different configs: stack() needs equal d_model, dict_size and activation")
        out = cls(base.replace(n_snapshots=len(saes), independent=len(saes) > 1), initialise=False,
                  kernels=saes[0].kernels)
        with torch.no_grad():
            for name in ("W_E", "W_D", "b_D"):
                getattr(out, name).copy_(torch.cat([getattr(s, name) for s in saes]))
            for name in ("b_E", "log_threshold"):
                getattr(out, name).copy_(torch.stack([getattr(s, name) for s in saes]).reshape(getattr(out, name).shape))
        return out

    @classmethod
    def from_state(cls, config: CrosscoderConfig, state: dict[str, Tensor], *,
                   kernels: KernelOptions = KernelOptions()) -> "Crosscoder":
        """A new model with `config` and a copy of the weights in `state` (names and shapes must match)."""
        model = cls(config, initialise=False, kernels=kernels)
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        return model

    # ---- save / load (safetensors + JSON)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.state_dict().items()}
        data = safetensors.torch.save(tensors, metadata={"format": FORMAT})
        atomic_write_bytes(directory / WEIGHTS_FILE, data)
        atomic_write_json(directory / CONFIG_FILE, {
            "format": FORMAT, "config": self.config.to_dict(), "sha256": sha256_bytes(data),
            "shapes": {name: list(t.shape) for name, t in tensors.items()},
        })
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: Any = "cpu") -> "Crosscoder":
        directory = Path(directory)
        meta = read_json_object(directory / CONFIG_FILE, ("format", "config", "sha256"), parameter="directory")
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{directory / CONFIG_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
        model = cls(CrosscoderConfig.from_dict(meta["config"]), initialise=False)
        model.load_state_dict(load_tensors(directory / WEIGHTS_FILE, meta.get("sha256"), model.state_dict()))
        return model.to(device)


def load_tensors(path: Path, sha256: str | None, expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """Read a safetensors file, verifying its checksum and that it holds exactly `expected`'s names and shapes."""
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    data = path.read_bytes()
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise ArtifactError(f"{path} is corrupted (its sha256 does not match the one recorded beside it); "
                            "delete the directory and train again")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({e})") from None
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{path} holds the wrong tensors (missing {missing}, unexpected {extra})")
    for name, t in expected.items():
        if tuple(tensors[name].shape) != tuple(t.shape):
            raise ArtifactError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                f"the config says {tuple(t.shape)}")
    return tensors


def read_model_config(directory: str | Path) -> CrosscoderConfig:
    return CrosscoderConfig.from_dict(read_json_object(Path(directory) / CONFIG_FILE, ("config",), parameter="directory")["config"])


def model_fingerprint(model: Crosscoder) -> str:
    """sha256 of a model's config and weights (for caching trainings that start from it)."""
    import hashlib

    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]
