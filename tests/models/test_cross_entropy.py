"""The chunked cross-entropy against its one-line reference: value and both gradients."""

from __future__ import annotations

import pytest
import torch

from crosslib.models import cross_entropy
from crosslib.models.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


def _loss_and_grads(loss_fn, hidden, weight, targets, bf16=False):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _inputs(n_tokens=300, d=24, vocab=97, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, d, generator=generator) * scale
    weight = torch.randn(vocab, d, generator=generator) / d**0.5
    return hidden, weight, torch.randint(0, vocab, (n_tokens,), generator=generator)


def _relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("chunk_rows", [7, 64, 4096])  # partial last chunk, several chunks, one chunk
@pytest.mark.parametrize("scale", [1.0, 100.0])  # 100: logits of ±1000, where exp without the max overflows
def test_same_loss_and_gradients_as_the_reference(monkeypatch, chunk_rows, scale):
    monkeypatch.setattr(cross_entropy, "CHUNK_ROWS", chunk_rows)
    inputs = _inputs(scale=scale)
    ours = _loss_and_grads(linear_cross_entropy, *inputs)
    reference = _loss_and_grads(linear_cross_entropy_reference, *inputs)
    assert torch.isfinite(ours[0])
    assert ours[0].item() == pytest.approx(reference[0].item(), rel=1e-6)
    assert _relative_error(ours[1], reference[1]) < 1e-5
    assert _relative_error(ours[2], reference[2]) < 1e-5


def test_under_bf16_autocast_it_rounds_as_the_reference_does():
    inputs = _inputs(n_tokens=2000, d=64, vocab=512)
    ours = _loss_and_grads(linear_cross_entropy, *inputs, bf16=True)
    reference = _loss_and_grads(linear_cross_entropy_reference, *inputs, bf16=True)
    exact = _loss_and_grads(linear_cross_entropy_reference, *inputs)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32
    assert ours[0].item() == pytest.approx(reference[0].item(), rel=1e-3)
    for ours_grad, reference_grad, exact_grad in zip(ours[1:], reference[1:], exact[1:]):
        # as close to autocast's reference as that is to the fp32 one: both round the matmuls to bf16
        assert _relative_error(ours_grad, reference_grad) < 2 * _relative_error(reference_grad, exact_grad) + 1e-3


def test_a_wrong_target_or_a_scaled_loss_is_caught():
    """The comparison can fail: the same kernel with shifted targets, or a loss scaled by 2, is far off."""
    hidden, weight, targets = _inputs()
    reference = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets)
    shifted = _loss_and_grads(linear_cross_entropy, hidden, weight, (targets + 1) % weight.shape[0])
    assert _relative_error(shifted[1], reference[1]) > 0.1
    hidden_, weight_ = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (2 * linear_cross_entropy(hidden_, weight_, targets)).backward()
    assert _relative_error(weight_.grad, reference[2]) > 0.5


def test_without_gradients_it_only_computes_the_loss():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert loss.item() == pytest.approx(linear_cross_entropy_reference(hidden, weight, targets).item(), rel=1e-6)
    frozen = weight.clone().requires_grad_(False)
    moving = hidden.clone().requires_grad_()
    linear_cross_entropy(moving, frozen, targets).backward()
    assert moving.grad is not None and frozen.grad is None
