"""The fast path (fused, sparse, compiled kernels; bf16 autocast) equals the one-screen reference
(crosslib/dictionaries/reference.py) in values and gradients, over the configurations the book trains."""

from __future__ import annotations

import shutil

import pytest
import torch

from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from crosslib.dictionaries.kernels import KernelOptions
from crosslib.dictionaries.reference import crosscoder_loss

HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _model(S: int, F: int = 48, d: int = 16, seed: int = 1, kernels: KernelOptions = KernelOptions()) -> Crosscoder:
    """Varied decoder norms, thresholds and biases, so gates open and close and windows catch."""
    m = Crosscoder(CrosscoderConfig(n_snapshots=S, d_model=d, dict_size=F, decoder_init_norm=0.5), seed=seed,
                   kernels=kernels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.W_D.mul_(torch.rand(S, F, 1, generator=g) * 2 + 0.05)
        m.log_threshold.copy_(torch.rand(F, generator=g) * 3 - 2.5)
        m.b_E.copy_(torch.randn(F, generator=g) * 0.3)
        m.b_D.copy_(torch.randn(S, d, generator=g) * 0.3)
    return m


def _run(m: Crosscoder, x: torch.Tensor, fast: bool, bf16: bool = False):
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = m(x, sparsity_coefficient=0.7) if fast else crosscoder_loss(m, x, 0.7)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters()}


# fp32: the fast path reorders sums, nothing else (tolerances: float32 rounding over ~100-term sums).
# KernelOptions() is the default fast path; fused=False, sparse=False the plainest kernels; sparse=True
# takes the sparse products whatever the density.
NEEDS_COMPILER = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")


@pytest.mark.parametrize("S, kernels", [
    (1, KernelOptions()), (1, KernelOptions(fused=False, sparse=False)), (1, KernelOptions(sparse=False)),
    (1, KernelOptions(sparse=True)),
    (3, KernelOptions()), (3, KernelOptions(fused=False, sparse=False)), (3, KernelOptions(sparse=False)),
    (3, KernelOptions(sparse=True)),
    pytest.param(3, KernelOptions(compiled=True, sparse=True), marks=NEEDS_COMPILER),
    pytest.param(1, KernelOptions(compiled=True, sparse=False), marks=NEEDS_COMPILER),
], ids=str)
def test_fast_path_equals_the_reference(S, kernels):
    m = _model(S, kernels=kernels)
    x = torch.randn(70, S, 16, generator=torch.Generator().manual_seed(2))
    ref, ref_grads = _run(m, x, fast=False)
    out, grads = _run(m, x, fast=True)
    assert 0 < (ref.features > 0).float().mean() < 1  # some gates open, some shut
    assert torch.allclose(out.features, ref.features, atol=1e-6)
    assert torch.allclose(out.reconstruction, ref.reconstruction, atol=1e-5)
    for name in ("loss", "reconstruction_loss", "sparsity_loss"):
        assert getattr(out, name).item() == pytest.approx(getattr(ref, name).item(), rel=1e-5), name
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-5), name
    assert ref_grads["log_threshold"].abs().sum() > 0  # the estimator's gradient is there and compared


def test_bf16_fast_path_matches_the_fp32_reference_to_bf16_precision():
    """Training's default (bf16 autocast on the matmuls): within bf16's ~3 significant digits."""
    m = _model(3, F=96, d=32)
    x = torch.randn(200, 3, 32, generator=torch.Generator().manual_seed(3))
    ref, ref_grads = _run(m, x, fast=False)
    out, grads = _run(m, x, fast=True, bf16=True)
    # measured over three seeds on AVX-512 and AVX2: loss within 5e-4, gates agree on ≥ 99.93% of entries,
    # gradient errors ≤ 0.085 (W_E: bf16 x times bf16 ∂h), ≤ 0.016 for the others; the bounds leave 3x
    assert out.loss.float().item() == pytest.approx(ref.loss.item(), rel=1e-2)
    agree = ((out.features.float() > 0) == (ref.features > 0)).float().mean()
    assert agree > 0.99  # a gate can flip where z sits within bf16 rounding of the threshold
    for name, bound in (("W_E", 0.25), ("b_E", 0.05), ("W_D", 0.05), ("b_D", 0.05), ("log_threshold", 0.05)):
        error = (grads[name].float() - ref_grads[name]).norm() / ref_grads[name].norm()
        assert error < bound, (name, float(error))
