"""The crosscoder on one screen: the paper's equations as plain tensor code.

`Crosscoder.forward` computes the same thing through fused, compiled and sparse kernels (fast on
a CPU, hard to read); this module is the readable version, and the tests use it as the oracle
the fast path must match, values and gradients. It covers the paper's objective: a JumpReLU gate
per snapshot, one threshold per feature, the tanh-quad penalty, both terms averaged over the batch
and the snapshots (see the book's Methods page). An SAE is the same with one snapshot.

    h        = Σ_θ W_E^θ x^θ + b_E                         [batch, feature]
    f^θ      = h · H(h ‖W_D^θ‖ − e^t)                      [batch, snapshot, feature]
    x̂^θ      = W_D^θ f^θ + b_D^θ                           [batch, snapshot, d_model]
    L        = mean_{batch, θ} ‖x̂^θ − x^θ‖² + λ Σ_i p̂_i (1 + p̂_i / s)
    p̂_i      = mean_{batch, θ} tanh(c · f_i^θ ‖W_D,i^θ‖)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import einsum, reduce
from jaxtyping import Float
from torch import Tensor


class ReferenceOutput(NamedTuple):
    loss: Tensor
    reconstruction_loss: Tensor
    sparsity_loss: Tensor
    reconstruction: Float[Tensor, "batch snapshot d_model"]
    features: Float[Tensor, "batch snapshot feature"]


def jumprelu(h: Tensor, decoder_norms: Tensor, log_threshold: Tensor, bandwidth: float) -> Tensor:
    """f = h · H(z − θ) with z = h‖W_D‖, θ = e^t, and the straight-through estimator for t:
    ∂f/∂h = H(z − θ), ∂f/∂‖W_D‖ = 0, ∂f/∂θ = −(θ / (ε ‖W_D‖)) · 1[|z − θ| < ε/2, z > 0]."""
    theta = log_threshold.exp()
    z = (h * decoder_norms).detach()
    gate = (z > theta).to(h.dtype)
    window = (((z - theta).abs() < bandwidth / 2) & (z > 0)).to(h.dtype)
    # a term whose value is 0 and whose θ-gradient is the estimator's (every other factor detached)
    surrogate = -theta * (theta.detach() / (bandwidth * decoder_norms.detach())) * window
    return h * gate + (surrogate - surrogate.detach())


def crosscoder_loss(model, x: Float[Tensor, "batch snapshot d_model"], sparsity_coefficient: float) -> ReferenceOutput:
    """The loss of `model` (a `crosslib.dictionaries.crosscoder.Crosscoder`, jumprelu + tanh-quad) on normalised `x`."""
    cfg = model.config
    h = einsum(x, model.W_E, "batch snapshot d_model, snapshot d_model feature -> batch feature") + model.b_E
    norms = model.W_D.norm(dim=-1)  # [snapshot, feature]
    f = jumprelu(h[:, None, :], norms, model.log_threshold, cfg.bandwidth)  # [batch, snapshot, feature]
    x_hat = einsum(f, model.W_D, "batch snapshot feature, snapshot feature d_model -> batch snapshot d_model") + model.b_D
    reconstruction = reduce((x_hat - x) ** 2, "batch snapshot d_model -> batch snapshot", "sum").mean()
    p = reduce(torch.tanh(cfg.tanh_scale * f * norms), "batch snapshot feature -> feature", "mean")
    sparsity = (p * (1 + p / cfg.quad_scale)).sum()
    return ReferenceOutput(reconstruction + sparsity_coefficient * sparsity, reconstruction, sparsity, x_hat, f)
