"""The language-modelling loss of the suite trainer: the reference on one line, a fast path beside it.

The loss of a causal LM is the mean cross-entropy of its logits `hidden @ W_U.T` against the next
tokens (`linear_cross_entropy_reference`). Written that way it materialises [token, vocab] logits, their
log-softmax and its gradient: for the tiny suite's batch (4064 predicted tokens × 4096 vocabulary)
three 64 MB tensors per step, and a logits matmul that streams its output to memory at about half
the CPU's matmul rate. `linear_cross_entropy` computes the same loss and gradients over chunks of
rows whose logits stay in cache, and takes the gradients during the forward pass, so the logits
are never stored or recomputed. That saves memory everywhere, and time where the three tensors would
be page-faulted in anew each step (glibc's default allocator: ~35% less time for this part of a step);
with crosslib's allocator tuning (`crosslib.runtime`) both take about as long
(benchmarks/bench_suite.py). tests/models/test_cross_entropy.py holds it to the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

# Rows per chunk: 1024 rows × 4096 logits (16 MB in fp32) stay in a laptop's last-level cache. A
# constant, not tuned per machine: the chunks set the order in which W_U's gradient is summed, so a
# different size rounds differently.
CHUNK_ROWS = 1024


def linear_cross_entropy_reference(hidden: Float[Tensor, "token d"], weight: Float[Tensor, "vocab d"],
                                   targets: Int[Tensor, " token"]) -> Float[Tensor, ""]:
    """Mean over tokens of -log softmax(hidden @ weight.T)[target]: the oracle for `linear_cross_entropy`."""
    return F.cross_entropy(hidden @ weight.T, targets)


def linear_cross_entropy(hidden: Float[Tensor, "token d"], weight: Float[Tensor, "vocab d"],
                         targets: Int[Tensor, " token"]) -> Float[Tensor, ""]:
    """`linear_cross_entropy_reference`'s value and gradients, computed chunk by chunk (see the module)."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward only scales them by the loss's gradient.

    Per chunk of rows: logits z = h W.T, loss = logsumexp(z) - z[target], and ∂loss/∂z = (softmax(z) -
    onehot(target)) / n_tokens, from which ∂/∂h = (∂/∂z) W and ∂/∂W += (∂/∂z).T h. Under CPU autocast
    the matmuls run in the autocast dtype and the softmax in fp32, as autocast runs the reference.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        device = hidden.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tokens = targets.numel()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        with torch.autocast(device, enabled=False):
            weight_low = weight.to(low)
            for start in range(0, n_tokens, CHUNK_ROWS):
                rows = slice(start, start + CHUNK_ROWS)
                h, t = hidden[rows].to(low), targets[rows, None]
                z = (h @ weight_low.T).float()  # [row, vocab]
                top = z.amax(1, keepdim=True)
                target_logit = z.gather(1, t)
                z.sub_(top).exp_()  # z is exp(logit - top) from here on
                norm = z.sum(1, keepdim=True)
                total += (norm.log() + top - target_logit).sum()
                if not (need_hidden or need_weight):
                    continue
                z.mul_(1.0 / (norm * n_tokens))  # softmax / n_tokens
                z.scatter_add_(1, t, torch.full(t.shape, -1.0 / n_tokens, device=z.device))
                dz = z.to(low)
                if need_hidden:
                    grad_hidden[rows] = dz @ weight_low
                if need_weight:
                    grad_weight += (dz.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if need_weight else None)
        return (total / n_tokens).to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss if grad_hidden is not None else None,
                grad_weight * grad_loss if grad_weight is not None else None, None)
