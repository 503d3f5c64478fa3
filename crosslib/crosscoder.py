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
runs along contiguous memory. With `fused=True` (the default) the JumpReLU gate, the encoder bias and
the tanh penalty's sum are one hand-derived autograd function (`JumpReLUTanh`) that recomputes the
gate in the backward pass instead of storing [snapshot, feature, batch] intermediates; it computes
the same function and gradients as `JumpReLU` + the penalty written out (tests/test_crosscoder.py
checks both against each other and against a loop over the equations). With `compiled=True`
torch.compile fuses each of its passes into one loop (falling back to eager if compilation fails).
In training on CPU, once f is sparse (`sparse_density_limit`), the decoder and the W_E/W_D gradients run
over f's active positions only ("sparse products" below; `sparse=False` turns them off).

The default penalty, measured on planted features (tests/test_train.py): at the tiny preset's
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
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors.torch
import torch
from einops import einsum, rearrange, reduce
from jaxtyping import Float, Int
from torch import Tensor, nn

from crosslib.artifacts import (ArtifactError, atomic_write_bytes, atomic_write_json, read_json_object,
                                sha256_bytes)
from crosslib.config import Config, ParameterError, require, require_choice, require_positive

ACTIVATIONS = ("jumprelu", "relu", "topk")
SPARSITIES = ("tanh-quad", "l1")
FORMAT = "crosslib.crosscoder/1"
WEIGHTS_FILE = "crosscoder.safetensors"
CONFIG_FILE = "crosscoder.json"
PLACEHOLDER_DECODER_NORM = 0.1  # used at construction when decoder_init_norm="search" (the trainer searches)


@dataclasses.dataclass(frozen=True)
class CrosscoderConfig(Config):
    """Shape and functional form of a crosscoder (paper defaults)."""

    n_snapshots: int
    d_model: int
    dict_size: int
    activation: str = "jumprelu"  # "jumprelu" | "relu" | "topk"
    k: int = 32  # active features per token, topk only
    sparsity: str = "tanh-quad"  # "tanh-quad" | "l1"
    tanh_scale: float = 4.0  # c in tanh(c · f‖W_D‖)
    quad_scale: float = 0.01  # s in p̂(1 + p̂/s)
    bandwidth: float = 4.0  # ε, the STE rectangle window, in units of h‖W_D‖
    threshold_init: float = 0.1  # e^t at initialisation
    decoder_init_norm: float | str = "search"  # per-snapshot decoder norm at init, or "search" (grid, min MSE)
    independent: bool = False  # one dictionary per snapshot (S SAEs in one pass)

    def validate(self) -> None:
        for name in ("n_snapshots", "d_model", "dict_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                    "a positive integer")
        require_choice("activation", self.activation, ACTIVATIONS)
        require_choice("sparsity", self.sparsity, SPARSITIES)
        if self.activation == "topk":
            require(isinstance(self.k, int) and 1 <= self.k <= self.dict_size, "k", self.k,
                    f"an integer in 1..dict_size={self.dict_size}")
        for name in ("tanh_scale", "quad_scale", "bandwidth", "threshold_init"):
            require_positive(name, getattr(self, name))
        norm = self.decoder_init_norm
        require(norm == "search" or (isinstance(norm, (int, float)) and not isinstance(norm, bool)
                                     and math.isfinite(norm) and norm > 0),
                "decoder_init_norm", norm, 'a positive number or "search"')
        require(isinstance(self.independent, bool), "independent", self.independent, "True or False")

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


# ----------------------------------------------------------------------------------- the gate
# Inside the module, activations are "batch-last": h [dictionary, feature, batch] and
# f [dictionary, snapshot, feature, batch]. Every per-feature reduction (over the batch) then runs
# along contiguous memory, so the gate, the penalty's sum and the activity counts fuse into one loop.

class JumpReLU(torch.autograd.Function):
    """f = h · H(h‖W_D‖ − e^t) with the rectangle-window straight-through estimator for t.

    h [dictionary, feature, batch], norms [dictionary, snapshot, feature], log_threshold
    [dictionary, feature] → f [dictionary, snapshot, feature, batch].
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, norms: Tensor, log_threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(h, norms, log_threshold)
        ctx.bandwidth = bandwidth
        h4, z, threshold = _gate_inputs(h, norms, log_threshold)
        return torch.where(z > threshold, h4, 0.0).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad_f: Tensor) -> tuple[Tensor, None, Tensor, None]:
        h, norms, log_threshold = ctx.saved_tensors
        h4, z, threshold = _gate_inputs(h, norms, log_threshold)
        grad_f = grad_f.float()
        grad_h = torch.where(z > threshold, grad_f, 0.0).sum(1)  # ∂f/∂h = H(z − θ)
        grad_log_threshold = (grad_f * _threshold_ste(z, threshold, norms, ctx.bandwidth)).sum((1, 3))
        return grad_h.to(h.dtype), None, grad_log_threshold.to(log_threshold.dtype), None


def _threshold_ste(z: Tensor, threshold: Tensor, norms: Tensor, bandwidth: float) -> Tensor:
    """∂f/∂t = −θ²/(ε‖W_D‖) · 1[|z − θ| < ε/2, z > 0]  [dictionary, snapshot, feature, batch]."""
    in_window = ((z - threshold).abs() < bandwidth / 2) & (z > 0)
    return torch.where(in_window, -(threshold * threshold) / (bandwidth * norms[..., None].float()), 0.0)


def _gate_inputs(h: Tensor, norms: Tensor, log_threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """h as [dictionary, 1, feature, batch]; z = h‖W_D‖ [dictionary, snapshot, feature, batch]; e^t (fp32)."""
    h4 = h[:, None].float()
    z = h4 * norms[..., None].float()
    return h4, z, log_threshold.float().exp()[:, None, :, None]


def _tanh_and_sech2(u: Tensor) -> tuple[Tensor, Tensor]:
    """tanh(u) and 1 − tanh²(u) for u ≥ 0 from one exp (2–3× faster than torch.tanh on CPU; exact at u = 0)."""
    e = torch.exp(-2 * u)
    return (1 - e) / (1 + e), 4 * e / ((1 + e) * (1 + e))


def _gate_forward(h: Tensor, bias: Tensor, norms: Tensor, log_threshold: Tensor) -> tuple[Tensor, Tensor]:
    """f (in h's dtype) and #active rows [dictionary, snapshot, feature].

    `h` comes without the encoder bias, `bias` [dictionary, feature] is added here (saves a pass)."""
    h4, z, threshold = _gate_inputs(h.float() + bias.float()[..., None], norms, log_threshold)
    on = z > threshold  # so f‖W_D‖ = z ≥ 0 where on, and 0 elsewhere
    return torch.where(on, h4, 0.0).to(h.dtype), on.sum(3, dtype=torch.int32)


def _tanh_sum_forward(h: Tensor, bias: Tensor, norms: Tensor, log_threshold: Tensor, c: float) -> Tensor:
    """Σ_batch tanh(c f‖W_D‖) [dictionary, snapshot, feature]: tanh(c z) where the gate is open, 0 elsewhere."""
    _, z, threshold = _gate_inputs(h.float() + bias.float()[..., None], norms, log_threshold)
    return _tanh_and_sech2(c * torch.where(z > threshold, z, 0.0))[0].sum(3)


def _shut_window_backward(h: Tensor, bias: Tensor, norms: Tensor, log_threshold: Tensor, grad_f: Tensor,
                          grad_tanh_sum: Tensor, c: float, bandwidth: float) -> Tensor:
    """∂L/∂t [dictionary, feature] with the penalty's slope at f = 0 (c‖W_D‖ ∂L/∂tanh_sum) everywhere: exact where
    the gate is shut; the sparse backward corrects the open positions."""
    _, z, threshold = _gate_inputs(h.float() + bias.float()[..., None], norms, log_threshold)
    g_shut = grad_f.float() + (grad_tanh_sum * c * norms.float())[..., None]
    return (g_shut * _threshold_ste(z, threshold, norms, bandwidth)).sum(3).sum(1)


def _jumprelu_tanh_backward(
    h: Tensor, bias: Tensor, norms: Tensor, log_threshold: Tensor, grad_f: Tensor, grad_tanh_sum: Tensor, c: float,
    bandwidth: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (f, tanh_sum) above w.r.t. h, bias, norms and log_threshold."""
    h4, z, threshold = _gate_inputs(h.float() + bias.float()[..., None], norms, log_threshold)
    on = z > threshold
    f = torch.where(on, h4, 0.0)
    n4 = norms[..., None].float()
    sech2 = _tanh_and_sech2(c * torch.where(on, z, 0.0))[1]
    d_penalty = grad_tanh_sum[..., None] * c * sech2  # ∂L/∂(f‖W_D‖) from the penalty
    g = grad_f.float() + d_penalty * n4  # total ∂L/∂f
    grad_h = torch.where(on, g, 0.0).sum(1)
    # ∂b_E = Σ_batch ∂h, written as its own expression: reusing grad_h would make torch.compile store
    # an fp32 copy of it and read it back twice (≈2x slower backward)
    grad_bias = (g * on).sum(3).sum(1)
    grad_norms = (d_penalty * f).sum(3)
    grad_log_threshold = (g * _threshold_ste(z, threshold, norms, bandwidth)).sum(3).sum(1)
    return grad_h.to(h.dtype), grad_bias, grad_norms, grad_log_threshold


_COMPILED: dict[str, Any] = {}
# Inductor's C++ code for these kernels is generated for 256-bit vectors; on a CPU with AVX-512 it was
# compiled for 512-bit ones, and a loop stepping 8 floats then stored 16: with bf16 inputs, S = 1 and
# F = 512 or 2048 that wrote 32 bytes past a buffer ("double free or corruption", NaN or inf losses on
# some CPUs). Generating and compiling for 256 bits (AVX2, which every x86-64 CPU we support has) gives
# the same code on AVX2, AVX-512 and AMX machines; tests/test_kernels.py runs every kernel against the
# eager one over many shapes, in a process that aborts on heap corruption.
COMPILE_SIMD_BITS = 256
_COMPILE_FAILED: list[str] = []
EAGER_CHUNK_ELEMENTS = 1 << 22  # eager kernels run over feature chunks of at most this many elements


def _error_forward(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Σ‖x̂ − x‖² per snapshot, and the data's Σ‖x‖² per snapshot and Σ_batch x [snapshot, d_model]."""
    x = x.float()
    diff = x_hat.float() - x
    return (diff * diff).sum((1, 2)), (x * x).sum((1, 2)), x.sum(2)


def _error_backward(x_hat: Tensor, x: Tensor, grad_error: Tensor) -> Tensor:
    return (2 * (x_hat.float() - x.float()) * grad_error[:, None, None]).to(x_hat.dtype)


def _kernel(name: str, compiled: bool):
    eager = {"gate": _gate_forward, "tanh_sum": _tanh_sum_forward, "backward": _jumprelu_tanh_backward,
             "shut_window": _shut_window_backward, "error_forward": _error_forward,
             "error_backward": _error_backward}[name]
    if not compiled or _COMPILE_FAILED:
        return eager
    if name not in _COMPILED:
        # one specialised compilation per shape: a notebook that trains SAEs and crosscoders of several
        # sizes in one process needs more than dynamo's default 8 before it falls back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[name] = torch.compile(eager, dynamic=False, options={"cpp.simdlen": COMPILE_SIMD_BITS})
    return _COMPILED[name]


def _run_kernel(name: str, compiled: bool, *args: Any) -> Any:
    if compiled and not _COMPILE_FAILED:
        try:
            return _kernel(name, True)(*args)
        except Exception as e:  # no C++ compiler, unsupported platform: fall back to eager, say so once
            _COMPILE_FAILED.append(repr(e))
            warnings.warn(f"torch.compile of the crosscoder kernels failed ({type(e).__name__}: {e}); using eager kernels",
                          stacklevel=3)
    return _kernel(name, False)(*args)


class JumpReLUTanh(torch.autograd.Function):
    """(f, Σ_batch tanh(c f‖W_D‖)): the JumpReLU gate fused with the tanh-quad penalty's sum.

    Computes exactly `JumpReLU.apply(h + bias, norms, t, ε)` and `tanh(c · f · norms).sum(batch)`, with the
    same straight-through estimator, but recomputes the gate in the backward pass instead of storing
    [snapshot, feature, batch] intermediates, and (when `compiled`) lets torch.compile fuse each pass
    into one loop. Also returns the number of active rows per (snapshot, feature) (no gradient).

    With a `plan` (training) and f sparse enough (`sparse_density_limit`), the penalty's sum and every
    gradient except the threshold's shut-gate part are computed over the active positions only, and
    the active positions are recorded in the plan for the sparse decoder and encoder gradient.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, bias: Tensor, norms: Tensor, log_threshold: Tensor, bandwidth: float, c: float,
                compiled: bool, plan: "SparsePlan | None") -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(h, bias, norms, log_threshold)
        ctx.bandwidth, ctx.c, ctx.compiled = bandwidth, c, compiled
        G, F, B = h.shape
        if compiled:
            f, active = _run_kernel("gate", True, h, bias, norms, log_threshold)
        else:
            f = h.new_empty(G, norms.shape[1], F, B)
            active = torch.empty(norms.shape, dtype=torch.int32, device=h.device)
            for i in _chunks(F, norms.shape[1] * B):
                f[:, :, i], active[:, :, i] = _gate_forward(h[:, i], bias[:, i], norms[:, :, i], log_threshold[:, i])
        ctx.plan = plan if plan is not None and _sparse_enough(active, f) else None
        if ctx.plan is not None:
            plan.pattern = ActivePattern.of(f.view(-1, F, B))
            plan.active_values = h4, n, _, _ = _active_values(h, bias, norms, plan.pattern)
            plan.f_values = h4.to(f.dtype)
            tanh_sum = _feature_sums([_tanh_and_sech2(c * h4 * n)[0]], plan.pattern).view(norms.shape)
        elif compiled:
            tanh_sum = _run_kernel("tanh_sum", True, h, bias, norms, log_threshold, c)
        else:
            tanh_sum = torch.empty(norms.shape, dtype=torch.float32, device=h.device)
            for i in _chunks(F, norms.shape[1] * B):
                tanh_sum[:, :, i] = _tanh_sum_forward(h[:, i], bias[:, i], norms[:, :, i], log_threshold[:, i], c)
        ctx.mark_non_differentiable(active)
        return f, tanh_sum, active

    @staticmethod
    def backward(ctx: Any, grad_f: Tensor, grad_tanh_sum: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        h, bias, norms, log_threshold = ctx.saved_tensors
        G, F, B = h.shape
        if grad_f is None:
            grad_f = h.new_zeros(G, norms.shape[1], F, B)
        grad_tanh_sum = torch.zeros_like(norms, dtype=torch.float32) if grad_tanh_sum is None else grad_tanh_sum.float()
        grad_f = grad_f.contiguous()
        if ctx.plan is not None:
            grad_h, grad_bias, grad_norms, grad_t = _sparse_gate_backward(
                h, bias, norms, log_threshold, grad_f, grad_tanh_sum, ctx.c, ctx.bandwidth, ctx.plan, ctx.compiled)
        elif ctx.compiled:
            grad_h, grad_bias, grad_norms, grad_t = _run_kernel(
                "backward", True, h, bias, norms, log_threshold, grad_f, grad_tanh_sum, ctx.c, ctx.bandwidth)
        else:
            grad_h = torch.empty_like(h)
            grad_bias = torch.empty(bias.shape, dtype=torch.float32, device=h.device)
            grad_norms = torch.empty(norms.shape, dtype=torch.float32, device=h.device)
            grad_t = torch.empty(log_threshold.shape, dtype=torch.float32, device=h.device)
            for i in _chunks(F, norms.shape[1] * B):
                grad_h[:, i], grad_bias[:, i], grad_norms[:, :, i], grad_t[:, i] = _jumprelu_tanh_backward(
                    h[:, i], bias[:, i], norms[:, :, i], log_threshold[:, i], grad_f[:, :, i], grad_tanh_sum[:, :, i],
                    ctx.c, ctx.bandwidth)
        return (grad_h, grad_bias.to(bias.dtype), grad_norms.to(norms.dtype), grad_t.to(log_threshold.dtype),
                None, None, None, None)


class SquaredError(torch.autograd.Function):
    """Σ_{d, batch} (x̂ − x)² per snapshot in one pass (x̂ [snapshot, d_model, batch] in the matmul's dtype,
    the error in fp32), plus the data's Σ‖x‖² and Σ_batch x (no gradient) for the explained variance."""

    @staticmethod
    def forward(ctx: Any, x_hat: Tensor, x: Tensor, compiled: bool) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(x_hat, x)
        ctx.compiled = compiled
        error, x_square_sum, x_sum = _run_kernel("error_forward", compiled, x_hat, x)
        ctx.mark_non_differentiable(x_square_sum, x_sum)
        return error, x_square_sum, x_sum

    @staticmethod
    def backward(ctx: Any, grad_error: Tensor, *_: Any) -> tuple[Tensor, None, None]:
        x_hat, x = ctx.saved_tensors
        return _run_kernel("error_backward", ctx.compiled, x_hat, x, grad_error.float()), None, None


def _chunks(n_features: int, elements_per_feature: int) -> list[slice]:
    step = max(1, EAGER_CHUNK_ELEMENTS // max(1, elements_per_feature))
    return [slice(i, min(i + step, n_features)) for i in range(0, n_features, step)]


# ----------------------------------------------------------------------------------- sparse products
# Once a dictionary is trained a little, f is mostly zeros (L0 of tens out of thousands of features). Three
# of a training step's five matmuls read f or ∂h = ∂L/∂h, which is zero wherever f is: the decoder
# x̂ = W_D f, its gradient ∂W_D = f ∂x̂ᵀ and the encoder's gradient ∂W_E = x ∂hᵀ. On CPU they then run as
# embedding bags (a weighted sum of table rows per bag) over the active positions, at a cost proportional
# to L0 instead of F. The two other products stay dense: h = W_E x needs every feature, and ∂f = W_Dᵀ ∂x̂
# is needed wherever the threshold's straight-through window is open, which with the paper's wide window
# is most positive pre-activations. The fused gate goes sparse too: its dense passes keep only what the
# shut positions need (the gate itself, and the threshold's window sum with the penalty's slope at 0;
# no exp), and the penalty's tanh, its gradients and the open positions' part run over the active ones.
# The bookkeeping (finding and sorting the active positions) runs on one core while the dense matmuls
# use every thread, so the density below which all this pays shrinks with the thread count. Measured
# per step (batch 2048 tokens, d=128, one thread), the break-even is ~7% (SAE) and ~4.5% (8-snapshot
# crosscoder) at F=2048, ~4% and ~3% at F=512; with two threads ~3% at F=2048. At 1% density a step
# is 1.8x (SAE) and 1.7x (crosscoder) faster at F=2048 with one thread, 1.6x and 1.25x with two.

SPARSE_MAX_DENSITY = 0.035  # with one thread: f's largest fraction of non-zero entries for the sparse products


def sparse_density_limit() -> float:
    """The fraction of non-zero entries of f up to which training uses the sparse products (this thread count)."""
    return SPARSE_MAX_DENSITY / max(1, torch.get_num_threads())


def _sparse_enough(active: Tensor, f: Tensor) -> bool:
    """Whether f, with `active` non-zero entries per (snapshot, feature), is for the sparse products."""
    return int(active.sum()) <= sparse_density_limit() * f.numel()


class ActivePattern(NamedTuple):
    """Where f [snapshot, feature, batch] is non-zero, indexed for the sparse products (nnz positions)."""

    flat: Int[Tensor, " nnz"]  # positions in f.view(-1), ordered by (snapshot, feature, batch)
    snapshot_feature: Int[Tensor, " nnz"]  # snapshot·F + i of each position
    row: Int[Tensor, " nnz"]  # snapshot·B + b of each position (a row of a [snapshot·batch, d] table)
    feature_offsets: Int[Tensor, " snapshot_feature"]  # where each (snapshot, feature)'s positions start
    token_order: Int[Tensor, " nnz"]  # the positions reordered by (snapshot, batch)
    token_feature: Int[Tensor, " nnz"]  # snapshot·F + i of each position in token order
    token_offsets: Int[Tensor, " snapshot_batch"]  # where each (snapshot, batch row)'s positions start

    @classmethod
    def of(cls, f: Float[Tensor, "snapshot feature batch"]) -> "ActivePattern":
        S, F, B = f.shape
        # f is +0.0 exactly where a feature is off, so testing its bits is exact; numpy's test and nonzero
        # on them are ~10x and ~2x faster than torch's f > 0 and nonzero
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[f.element_size()]
        bits = f.detach().contiguous().view(as_int).numpy()
        flat = torch.from_numpy(np.flatnonzero(bits != 0))
        snapshot_feature = flat // B
        row = (snapshot_feature // F) * B + (flat - snapshot_feature * B)
        if S * B <= np.iinfo(np.int16).max:  # numpy sorts 16-bit keys by radix, ~3x faster than torch.sort
            token_order = torch.from_numpy(np.argsort(row.numpy().astype(np.int16), kind="stable"))
        else:
            token_order = torch.sort(row, stable=True).indices
        return cls(flat, snapshot_feature, row, _offsets(snapshot_feature, S * F), token_order,
                   snapshot_feature.index_select(0, token_order), _offsets(row, S * B))


def _offsets(sorted_keys: Tensor, n: int) -> Tensor:
    counts = torch.bincount(sorted_keys, minlength=n)
    return counts.cumsum(0) - counts


def _bag_sum(table: Tensor, index: Tensor, offsets: Tensor, weights: Tensor | None = None) -> Tensor:
    """out[k] = Σ_{j in bag k} weights[j] · table[index[j]] (bags are consecutive runs starting at `offsets`;
    no weights: 1)."""
    return nn.functional.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights)


def _segment_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    """out[k] = Σ values[j] over index[j] = k (fp32; deterministic on CPU)."""
    return torch.zeros(size, dtype=torch.float32, device=values.device).index_add_(0, index, values.float())


def _feature_sums(columns: list[Tensor], pattern: ActivePattern) -> Tensor:
    """Σ over each (snapshot, feature)'s active positions of each column [snapshot·feature, column]: one bag
    sum over the feature-major runs (~4x faster than a scatter-add per column)."""
    table = torch.stack([c.float() for c in columns], dim=1)
    return _bag_sum(table, torch.arange(table.shape[0], device=table.device), pattern.feature_offsets)


def _active_values(h: Tensor, bias: Tensor, norms: Tensor, pattern: ActivePattern
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """At f's active positions: h + b_E and ‖W_D‖ (fp32, the gate kernel's own values), the positions in h
    [dictionary, feature, batch] and the (dictionary, feature) of each. h, bias, norms as in the gate."""
    G, F, B = h.shape
    Sg = norms.shape[1]  # snapshots per dictionary: f's snapshot θ = dictionary · Sg + s reads h[dictionary]
    if Sg == 1:
        h_position, dictionary_feature = pattern.flat, pattern.snapshot_feature
    else:
        h_position = pattern.flat // (Sg * F * B) * (F * B) + pattern.flat % (F * B)
        dictionary_feature = pattern.snapshot_feature // (Sg * F) * F + pattern.snapshot_feature % F
    h_plus_bias = (h.reshape(-1).index_select(0, h_position).float()
                   + bias.float().reshape(-1).index_select(0, dictionary_feature))
    n = norms.float().reshape(-1).index_select(0, pattern.snapshot_feature)
    return h_plus_bias, n, h_position, dictionary_feature


def _sparse_gate_backward(h: Tensor, bias: Tensor, norms: Tensor, log_threshold: Tensor, grad_f: Tensor,
                          grad_tanh_sum: Tensor, c: float, bandwidth: float, plan: "SparsePlan", compiled: bool
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """JumpReLUTanh's gradients (h, bias, norms, log_threshold) when f is sparse.

    Where the gate is shut f = 0, so ∂L/∂h = 0 there, the penalty's slope is its value at 0 and nothing
    reaches ‖W_D‖: only the threshold's window sum needs a dense pass (`_shut_window_backward`, no
    exp). Everything else, and the window sum's correction at open positions, runs over the active
    positions. Same values as `_jumprelu_tanh_backward`, to rounding."""
    G, F, B = h.shape
    pattern = plan.pattern
    if compiled:
        grad_t = _run_kernel("shut_window", True, h, bias, norms, log_threshold, grad_f, grad_tanh_sum, c, bandwidth)
    else:
        grad_t = torch.empty(log_threshold.shape, dtype=torch.float32, device=h.device)
        for i in _chunks(F, norms.shape[1] * B):
            grad_t[:, i] = _shut_window_backward(h[:, i], bias[:, i], norms[:, :, i], log_threshold[:, i],
                                                 grad_f[:, :, i], grad_tanh_sum[:, :, i], c, bandwidth)
    h_plus_bias, n, h_position, dictionary_feature = plan.active_values  # from the forward pass
    z = h_plus_bias * n
    sech2 = _tanh_and_sech2(c * z)[1]
    slope = grad_tanh_sum.reshape(-1).index_select(0, pattern.snapshot_feature) * c  # × sech² = ∂L/∂(f‖W_D‖)
    g = grad_f.reshape(-1).index_select(0, pattern.flat).float() + slope * sech2 * n  # ∂L/∂f where open
    threshold = log_threshold.float().exp().reshape(-1).index_select(0, dictionary_feature)
    in_window = (z - threshold).abs() < bandwidth / 2
    # open positions in the window: the shut pass used slope·n for the penalty's part of ∂L/∂f, it is slope·sech²·n;
    # times ∂f/∂t = −θ²/(ε n) that is a difference of −slope·(sech² − 1)·θ²/ε
    correction = torch.where(in_window, -slope * (sech2 - 1) * threshold * threshold / bandwidth, 0.0)
    sums = _feature_sums([correction, slope * sech2 * h_plus_bias, g], pattern).view(G, -1, F, 3)
    grad_t = grad_t + sums[..., 0].sum(1)  # the dictionary's snapshots share b_E and t
    grad_norms = sums[..., 1].view(norms.shape)
    grad_bias = sums[..., 2].sum(1)
    if plan.encoder_sparse:  # the encoder's gradient reads ∂h at these positions only: hand them over directly
        plan.grad_h_values = g
        grad_h = h.new_zeros(()).expand(h.shape)
    else:  # several snapshots share h: sum their ∂L/∂f into it
        grad_h = _segment_sum(g, h_position, h.numel()).view(h.shape).to(h.dtype)
    return grad_h, grad_bias, grad_norms, grad_t


class SparsePlan:
    """Filled during a training forward pass when f is sparse enough; read by the backward passes."""

    def __init__(self, encoder_sparse: bool) -> None:
        self.encoder_sparse = encoder_sparse  # ∂h has f's pattern: one snapshot per dictionary (SAEs)
        self.pattern: ActivePattern | None = None
        self.f_values: Tensor | None = None  # f at pattern.flat, when the gate computed them
        self.active_values: tuple[Tensor, ...] = ()  # the gate's `_active_values` at pattern.flat
        self.grad_h_values: Tensor | None = None  # ∂L/∂h at pattern.flat, when the gate's backward computed them


class SparseDecode(torch.autograd.Function):
    """x̂^θ = W_D^θ f^θ + b_D^θ over f's active positions; returns [snapshot, batch, d_model].

    Gradients: ∂W_D and ∂b_D exactly (∂W_D summed over active positions, in fp32), ∂f dense
    (= ∂x̂ W_Dᵀ, which the threshold's straight-through estimator reads outside the active set too).
    """

    @staticmethod
    def forward(ctx: Any, f: Tensor, W_D: Tensor, b_D: Tensor, plan: SparsePlan) -> Tensor:
        S, F, B = f.shape
        d = W_D.shape[-1]
        pattern = plan.pattern
        values = plan.f_values  # f at the active positions, feature-major
        if values is None:
            values = f.reshape(-1).index_select(0, pattern.flat)
        W_D_low = W_D.to(f.dtype)  # (bf16 under autocast; kept for ∂f)
        ctx.save_for_backward(values, W_D_low)
        ctx.pattern, ctx.f_shape, ctx.f_dtype, ctx.W_D_dtype = pattern, f.shape, f.dtype, W_D.dtype
        with torch.autocast(f.device.type, enabled=False):
            x_hat = _bag_sum(W_D_low.reshape(S * F, d), pattern.token_feature, pattern.token_offsets,
                             values.index_select(0, pattern.token_order))
            return (x_hat.view(S, B, d) + b_D[:, None].to(f.dtype)).to(f.dtype)

    @staticmethod
    def backward(ctx: Any, grad_x_hat: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        values, W_D_low = ctx.saved_tensors
        pattern: ActivePattern = ctx.pattern
        S, F, B = ctx.f_shape
        d = W_D_low.shape[-1]
        grad = grad_x_hat.contiguous()  # [snapshot, batch, d_model]
        grad_32 = grad.float()
        grad_W_D = _bag_sum(grad_32.view(S * B, d), pattern.row, pattern.feature_offsets, values.float())
        grad_f = torch.bmm(W_D_low.to(grad.dtype), grad.transpose(1, 2))  # dense: [snapshot, feature, batch]
        return (grad_f.to(ctx.f_dtype), grad_W_D.view(S, F, d).to(ctx.W_D_dtype), grad_32.sum(1).to(ctx.W_D_dtype),
                None)


class Encode(torch.autograd.Function):
    """h = W_E x per dictionary ([dictionary, feature, input] @ [dictionary, input, batch]); when the plan
    says ∂h is sparse, ∂W_E = ∂h xᵀ is summed over the active positions only. x gets no gradient."""

    @staticmethod
    def forward(ctx: Any, W_E: Tensor, x: Tensor, plan: SparsePlan) -> Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else W_E.dtype
        x = x.to(dtype)
        with torch.autocast(device, enabled=False):
            h = torch.bmm(W_E.to(dtype).contiguous(), x)  # a row-major W_E: ~15% faster than the transposed view
        ctx.save_for_backward(x)
        ctx.plan, ctx.W_E_dtype = plan, W_E.dtype
        return h

    @staticmethod
    def backward(ctx: Any, grad_h: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        plan: SparsePlan = ctx.plan
        if plan.pattern is not None and plan.encoder_sparse:
            G, F, B = grad_h.shape
            d = x.shape[1]
            rows = rearrange(x.float(), "dictionary input batch -> (dictionary batch) input").contiguous()
            values = plan.grad_h_values
            if values is None:
                values = grad_h.reshape(-1).index_select(0, plan.pattern.flat).float()
            grad_W_E = _bag_sum(rows, plan.pattern.row, plan.pattern.feature_offsets, values).view(G, F, d)
        else:
            grad_W_E = torch.bmm(grad_h, x.transpose(1, 2).to(grad_h.dtype))
        return grad_W_E.to(ctx.W_E_dtype), None, None


# ----------------------------------------------------------------------------------- the model

class Crosscoder(nn.Module):
    """A crosscoder over `config.n_snapshots` snapshots (an SAE when n_snapshots = 1).

    Parameters (crosscoder; with independent=True b_E and log_threshold are [snapshot, feature]):
      W_E [snapshot, d_model, feature], b_E [feature], W_D [snapshot, feature, d_model],
      b_D [snapshot, d_model], log_threshold [feature].
    """

    def __init__(self, config: CrosscoderConfig, *, seed: int | None = 0, fused: bool = True, compiled: bool = False,
                 sparse: bool = True, initialise: bool = True):
        super().__init__()
        if not isinstance(config, CrosscoderConfig):
            raise ParameterError(f"config={type(config).__name__} is not allowed: a CrosscoderConfig")
        self.config = config
        self.fused = fused  # use the fused JumpReLU+tanh kernel (same math, less memory traffic)
        self.compiled = compiled  # torch.compile the fused kernel (falls back to eager if it fails)
        self.sparse = sparse  # in training, run the products that read f over its active positions when it is sparse
        S, d, F = config.n_snapshots, config.d_model, config.dict_size
        shared = (F,) if not config.independent else (S, F)
        self.W_E = nn.Parameter(torch.empty(S, d, F))
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

    def pre_activation(self, x: Float[Tensor, "batch snapshot d_model"], *, parallel: Any = None
                       ) -> Float[Tensor, "dictionary feature batch"]:
        """h = Σ_θ W_E^θ x̃^θ + b_E [dictionary, feature, batch]."""
        h = self.encoder_sum(x, parallel=parallel)
        return h + self.b_E.view(h.shape[0], -1, 1).to(h.dtype)  # keep h in the matmul's dtype (bf16 under autocast)

    def encoder_sum(self, x: Float[Tensor, "batch snapshot d_model"], *, parallel: Any = None,
                    plan: SparsePlan | None = None) -> Float[Tensor, "dictionary feature batch"]:
        """Σ_θ W_E^θ x̃^θ (no bias): one [feature, S·d] @ [S·d, batch] matmul per dictionary (batch-last).

        With a `plan`, the gradient of W_E may be computed over the active positions only (see `Encode`)."""
        G = self.config.n_dictionaries
        x_grouped = rearrange(x, "batch (dictionary snapshot) d_model -> dictionary (snapshot d_model) batch", dictionary=G)
        W_E = rearrange(self.W_E, "(dictionary snapshot) d_model feature -> dictionary feature (snapshot d_model)", dictionary=G)
        if plan is not None:
            return Encode.apply(W_E, x_grouped, plan)
        h = einsum(W_E, x_grouped, "dictionary feature input, dictionary input batch -> dictionary feature batch")
        return h if parallel is None else parallel.sum_over_heads(h)  # other processes hold other snapshots' terms

    def activate(self, h: Float[Tensor, "dictionary feature batch"], norms: Float[Tensor, "snapshot feature"],
                 *, add_bias: bool = False, plan: SparsePlan | None = None
                 ) -> tuple[Float[Tensor, "snapshot feature batch"],
                                                     Float[Tensor, "dictionary feature"], Int[Tensor, "snapshot feature"]]:
        """f^θ; Σ over batch and the dictionary's snapshots of φ(f‖W_D‖); #active rows per (snapshot, feature).

        φ(u) = tanh(c u) for tanh-quad, u for l1. With `add_bias`, `h` lacks b_E and it is added here.
        """
        cfg = self.config
        G, F, B = h.shape
        norms = norms.view(G, -1, F)
        t = self.log_threshold.view(G, F)
        if cfg.activation == "jumprelu" and cfg.sparsity == "tanh-quad" and self.fused:
            bias = self.b_E.view(G, F) if add_bias else torch.zeros((G, F), dtype=h.dtype, device=h.device)
            f, phi, active = JumpReLUTanh.apply(h, bias, norms, t, cfg.bandwidth, cfg.tanh_scale, self.compiled, plan)
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
                         "dictionary snapshot feature batch -> dictionary snapshot feature", "sum")
            active = (f.detach() > 0).sum(3, dtype=torch.int32)
        f = rearrange(f, "dictionary snapshot feature batch -> (dictionary snapshot) feature batch")
        phi_sum = reduce(phi, "dictionary snapshot feature -> dictionary feature", "sum")
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
                parallel: Any = None) -> CrosscoderOutput:
        """Reconstruct `x` (already normalised) and compute the loss.

        `parallel` (see crosslib.distributed.ShardContext) makes this process compute its share of
        a model sharded over snapshots and/or data; the shares' losses sum to the full loss.
        """
        self._check_input(x)
        cfg = self.config
        rows = x.shape[0] if parallel is None else parallel.global_rows(x.shape[0])
        snapshots = cfg.snapshots_per_dictionary if parallel is None else parallel.snapshots_per_dictionary

        # sparse products (training on CPU, one process): decided once f is known, see sparse_density_limit
        plan = SparsePlan(encoder_sparse=cfg.snapshots_per_dictionary == 1) if (
            self.sparse and self.training and torch.is_grad_enabled() and parallel is None
            and x.device.type == "cpu" and not x.requires_grad) else None
        h = self.encoder_sum(x, parallel=parallel, plan=plan)  # Σ_θ W_E^θ x̃^θ; b_E is added inside activate()
        norms = self.decoder_norms()
        f, phi_sum, active = self.activate(h, norms, add_bias=True, plan=plan)  # the fused gate may fill the plan
        if plan is not None and plan.pattern is None and _sparse_enough(active, f):
            plan.pattern = ActivePattern.of(f)
        if plan is not None and plan.pattern is not None:
            x_hat = rearrange(SparseDecode.apply(f, self.W_D, self.b_D, plan),  # (contiguous: one compiled
                              "snapshot batch d_model -> snapshot d_model batch").contiguous()  # error kernel per shape)
        else:
            x_hat = self.decode_batch_last(f)

        x_batch_last = rearrange(x, "batch snapshot d_model -> snapshot d_model batch")
        error, x_square_sum, x_sum = SquaredError.apply(x_hat, x_batch_last, self.compiled)  # Σ_batch ‖x̂^θ − x̃^θ‖²
        # the paper's objective (tanh-quad, and topk) averages the squared error over the batch and the
        # snapshots, like the authors' library; Anthropic's l1 objective sums it over snapshots
        reconstruction_loss = error.sum() / (rows if cfg.sparsity == "l1" else rows * snapshots)
        if parallel is not None:
            phi_sum = parallel.sum_penalty_statistic(phi_sum)  # p̂ averages over every process's rows and snapshots
        sparsity_loss = self.sparsity_penalty(phi_sum, rows, snapshots)
        share = 1 if parallel is None else parallel.penalty_replicas  # each process holds 1/share of the penalty
        loss = reconstruction_loss + sparsity_coefficient * sparsity_loss / share
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
        f, _, _ = self.activate(self.pre_activation(x), self.decoder_norms())
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
                          fused=self.fused, compiled=self.compiled, sparse=self.sparse)
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
                  fused=saes[0].fused, compiled=saes[0].compiled, sparse=saes[0].sparse)
        with torch.no_grad():
            for name in ("W_E", "W_D", "b_D"):
                getattr(out, name).copy_(torch.cat([getattr(s, name) for s in saes]))
            for name in ("b_E", "log_threshold"):
                getattr(out, name).copy_(torch.stack([getattr(s, name) for s in saes]).reshape(getattr(out, name).shape))
        return out

    @classmethod
    def from_state(cls, config: CrosscoderConfig, state: dict[str, Tensor], **kwargs: Any) -> "Crosscoder":
        """A new model with `config` and a copy of the weights in `state` (names and shapes must match)."""
        model = cls(config, initialise=False, **kwargs)
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
