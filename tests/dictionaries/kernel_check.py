"""Run every compiled crosscoder kernel (crosslib/dictionaries/kernels.py) against its eager twin over many shapes (a
script, run by tests/dictionaries/test_kernels.py in a fresh process per CPU instruction set, with glibc's heap checks on).

Exit status 0 and the line `kernels ok: N cases` when every output matches; a heap overflow in a
compiled kernel aborts the process (exit 134), a mismatch exits 1 naming the case.
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings

import torch

from crosslib.dictionaries import kernels

# (dictionaries G, snapshots per dictionary, features F, batch B): S = 1 SAEs and crosscoders, F and B not
# multiples of any vector width, batch 1 and 4096; (1, 1, 512, 2048) in bf16 overflowed a buffer before
SHAPES = [(1, 1, 512, 2048), (1, 1, 515, 37), (1, 3, 17, 4096), (3, 1, 100, 1), (1, 2, 1, 999)]
DENSITIES = {0.0: 1e4, 0.4: 0.5 + 1 / 256, 1.0: 1e-6}  # e^t: above every z, between grid points, below every z


def cases(quick: bool):
    shapes = SHAPES[:3] if quick else SHAPES
    for shape, dtype, density in itertools.product(shapes, (torch.bfloat16, torch.float32), DENSITIES):
        if quick and density == 0.0:
            continue
        yield shape, dtype, density


def inputs(shape, dtype, density, seed=0):
    # h, b_E and ‖W_D‖ on coarse binary grids: z = (h + b)‖W_D‖ is exact in fp32 and in bf16's h, so eager
    # and compiled kernels agree on every gate (a threshold between grid points has no ties)
    G, Sg, F, B = shape
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(G, F, B, generator=g) * 8).round().div(8).to(dtype)
    bias = (torch.randn(G, F, generator=g) * 6).round().div(64)
    norms = torch.randint(2, 32, (G, Sg, F), generator=g).float().div(16)
    log_t = torch.full((G, F), math.log(DENSITIES[density]))
    grad_f = torch.randn(G, Sg, F, B, generator=g).to(dtype)
    grad_tanh_sum = torch.randn(G, Sg, F, generator=g)
    x_hat = torch.randn(G * Sg, 7, B, generator=g).to(dtype)
    x = torch.randn(G * Sg, 7, B, generator=g)
    return {
        "gate": (h, bias, norms, log_t),
        "tanh_sum": (h, bias, norms, log_t, 4.0),
        "backward": (h, bias, norms, log_t, grad_f, grad_tanh_sum, 4.0, 4.0),
        "shut_window": (h, bias, norms, log_t, grad_f, grad_tanh_sum, 4.0, 4.0),
        "error_forward": (x_hat, x),
        "error_backward": (x_hat, x, torch.randn(G * Sg, generator=g)),
    }


def main(quick: bool) -> int:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    n = 0
    for shape, dtype, density in cases(quick):
        for name, args in inputs(shape, dtype, density).items():
            eager = kernels._kernel(name, False)(*args)
            compiled = kernels._kernel(name, True)(*args)
            assert not kernels._COMPILE_FAILED, kernels._COMPILE_FAILED
            eager = eager if isinstance(eager, tuple) else (eager,)
            compiled = compiled if isinstance(compiled, tuple) else (compiled,)
            for i, (e, c) in enumerate(zip(eager, compiled)):
                e, c = e.float(), c.float()
                scale = 1 + float(e.abs().max())
                # outputs in bf16 differ by one rounding of bf16 (8 bits); fp32 ones by summation order
                tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
                if e.shape != c.shape or not torch.isfinite(c).all() or float((e - c).abs().max()) > tol * scale:
                    print(f"MISMATCH kernel={name} output={i} shape={shape} dtype={dtype} density={density}: "
                          f"max |eager - compiled| = {float((e - c).abs().max()):.3g}", flush=True)
                    return 1
            n += 1
    print(f"kernels ok: {n} cases", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv))
