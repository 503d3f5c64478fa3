"""The crosscoder's speed machinery: hand-written autograd functions, torch.compile and sparse products.

`crosslib.dictionaries.crosscoder.Crosscoder` reads as the model; the functions here compute the same values and
gradients faster on a CPU (the one-screen `crosslib.dictionaries.reference.crosscoder_loss` is the oracle the tests
hold them to; see the book's Methods page, section Crosscoder). One switch chooses among them, a
`KernelOptions` held by the model as `model.kernels`:

  * `fused` (default on): the JumpReLU gate, the encoder bias and the tanh penalty's sum are one
    hand-derived autograd function (`JumpReLUTanh`) that recomputes the gate in the backward pass
    instead of storing [snapshot, feature, batch] intermediates. It computes the same function and
    gradients as `JumpReLU` + the penalty written out (tests/dictionaries/test_crosscoder.py checks both against
    each other and against a loop over the equations).
  * `compiled` (default off; the trainer turns it on per `TrainConfig.compile`): torch.compile fuses
    each of the fused gate's passes, and the reconstruction error's, into one loop (falling back to
    eager, with one warning, if compilation fails).
  * `sparse` (default None, automatic): in training on CPU, once f is sparse (`sparse_density_limit`),
    the decoder and the W_E/W_D gradients run over f's active positions only ("sparse products"
    below). True takes them whatever the density (the tests' way to exercise them), False never.

Activations are kept batch-last (h [dictionary, feature, batch], f [dictionary, snapshot, feature,
batch], where a "dictionary" groups the snapshots that share one: 1, or S for independent SAEs), so
each snapshot's decoder is one slice of a batched matmul and every per-feature sum runs along
contiguous memory.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from crosslib.config import Config, require


@dataclasses.dataclass(frozen=True)
class KernelOptions(Config):
    """Which kernels a model runs; every choice computes the same values and gradients (to rounding)."""

    fused: bool = True  # the fused JumpReLU + tanh-quad kernel (same math, less memory traffic)
    compiled: bool = False  # torch.compile the fused kernels (falls back to eager if it fails)
    sparse: bool | None = None  # training's sparse products: None when f is sparse enough, True always, False never

    def validate(self) -> None:
        for name in ("fused", "compiled"):
            require(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        require(self.sparse is None or isinstance(self.sparse, bool), "sparse", self.sparse,
                "None (automatic), True or False")

    def eager(self) -> "KernelOptions":
        """These options without compilation: for one-off shapes (init search, evaluation, analyses), where a
        compiled kernel would be specialised and compiled anew."""
        return self.replace(compiled=False)


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
# the same code on AVX2, AVX-512 and AMX machines; tests/dictionaries/test_kernels.py runs every kernel against the
# eager one over many shapes, in a process that aborts on heap corruption.
COMPILE_SIMD_BITS = 256
COMPILE_RECOMPILE_LIMIT = 64  # compiled shapes per kernel before dynamo falls back to eager (see _kernel)
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
        # sizes in one process needs more than dynamo's default 8. Past the limit dynamo runs the kernel
        # eagerly, which rounds differently: a dictionary's weights would depend on what the process
        # compiled before. So these kernels get their own limit (this compile call's, not the
        # process-wide torch._dynamo.config, which is left as it is).
        _COMPILED[name] = torch.compile(eager, dynamic=False, options={"cpp.simdlen": COMPILE_SIMD_BITS},
                                        recompile_limit=max(torch._dynamo.config.recompile_limit,
                                                            COMPILE_RECOMPILE_LIMIT))
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


def jumprelu_gate(h: Tensor, bias: Tensor, norms: Tensor, log_threshold: Tensor, compiled: bool
                  ) -> tuple[Tensor, Tensor]:
    """f [dictionary, snapshot, feature, batch] and #active rows [dictionary, snapshot, feature]: the fused
    gate's forward pass without the penalty's sum (what encoding needs; `JumpReLUTanh` adds the sum)."""
    G, F, B = h.shape
    if compiled:
        return _run_kernel("gate", True, h, bias, norms, log_threshold)
    f = h.new_empty(G, norms.shape[1], F, B)
    active = torch.empty(norms.shape, dtype=torch.int32, device=h.device)
    for i in _chunks(F, norms.shape[1] * B):
        f[:, :, i], active[:, :, i] = _gate_forward(h[:, i], bias[:, i], norms[:, :, i], log_threshold[:, i])
    return f, active


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
        f, active = jumprelu_gate(h, bias, norms, log_threshold, compiled)
        ctx.plan = plan if plan is not None and plan.sparse_enough(active, f) else None
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
#
# The limit is one number, not one per thread count: the sparse and dense products round differently,
# so a limit that moved with the thread count made a dictionary's weights depend on it (and the thread
# count follows the machine's load under `crosslib.runtime.follow_load`). 1.75% is the break-even's
# lower end, the two-thread one, what the chapters' 2-core default machine used before.

SPARSE_MAX_DENSITY = 0.0175  # f's largest fraction of non-zero entries for the sparse products


def sparse_density_limit() -> float:
    """The fraction of non-zero entries of f up to which training uses the sparse products (any thread count:
    the choice changes rounding, and a result must not depend on how many threads computed it)."""
    return SPARSE_MAX_DENSITY


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

    def __init__(self, encoder_sparse: bool, always: bool = False) -> None:
        self.encoder_sparse = encoder_sparse  # ∂h has f's pattern: one snapshot per dictionary (SAEs)
        self.always = always  # take the sparse products whatever f's density (KernelOptions(sparse=True))
        self.pattern: ActivePattern | None = None
        self.f_values: Tensor | None = None  # f at pattern.flat, when the gate computed them
        self.active_values: tuple[Tensor, ...] = ()  # the gate's `_active_values` at pattern.flat
        self.grad_h_values: Tensor | None = None  # ∂L/∂h at pattern.flat, when the gate's backward computed them

    @classmethod
    def for_step(cls, options: KernelOptions, x: Tensor, encoder_sparse: bool, sharded: bool, training: bool
                 ) -> "SparsePlan | None":
        """A plan when this forward pass may take the sparse products: a training step (gradients on, x data
        without a gradient) on CPU in one process (not `sharded`), with `options.sparse` not False; None
        otherwise."""
        if (options.sparse is False or not training or not torch.is_grad_enabled() or sharded
                or x.device.type != "cpu" or x.requires_grad):
            return None
        return cls(encoder_sparse, always=options.sparse is True)

    def sparse_enough(self, active: Tensor, f: Tensor) -> bool:
        """Whether f, with `active` non-zero entries per (snapshot, feature), is for the sparse products."""
        return self.always or int(active.sum()) <= sparse_density_limit() * f.numel()

    def covers(self, active: Tensor, f: Float[Tensor, "snapshot feature batch"]) -> bool:
        """Whether this step's decoder runs over f's active positions: the fused gate found f sparse (and
        recorded where), or f is sparse enough now (its pattern is recorded here)."""
        if self.pattern is None and self.sparse_enough(active, f):
            self.pattern = ActivePattern.of(f)
        return self.pattern is not None


def sparse_decode(f: Float[Tensor, "snapshot feature batch"], W_D: Tensor, b_D: Tensor, plan: SparsePlan
                  ) -> Float[Tensor, "snapshot d_model batch"]:
    """x̂^θ = W_D^θ f^θ + b_D^θ over f's active positions (`SparseDecode`), batch-last like the dense decoder."""
    x_hat = SparseDecode.apply(f, W_D, b_D, plan)  # [snapshot, batch, d_model]
    # a view, not a copy: the error kernels read either layout, and the gradient then comes back
    # [snapshot, batch, d_model] contiguous, as SparseDecode's backward reads it
    return rearrange(x_hat, "snapshot batch d_model -> snapshot d_model batch")


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
            h = torch.bmm(W_E.to(dtype).contiguous(), x)  # row-major W_E (its stored layout): ~15% faster than transposed
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


