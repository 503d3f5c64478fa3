"""Training throughput: our SAE vs sae-lens's JumpReLU trainer, our crosscoder over S = 4, 8, 16, and
matmul efficiency against this machine's fp32 matmul speed — all measured side by side in one run.

    .venv/bin/python benchmarks/bench_train.py                # ~3-5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_train.py --threads 0    # torch's default thread count
    .venv/bin/python benchmarks/bench_train.py --quick        # fewer steps

Threads: one intra-op thread by default, for both libraries and for the matmul reference. On the
2-core machine this was written on, a quiet second core makes every step about 1.7x faster for both
libraries (ours 79k vs sae-lens 24k tokens/s with 2 threads, 45k vs 14k with 1), but when other jobs
share the cores a second OpenMP thread mostly waits at barriers and steps run 2-3x slower. Use
--threads 0 (torch's default) on a quiet machine.

Every number comes from whole training loops over an iterator of in-memory activation batches:
ours through `crosslib.train.train_crosscoder` (data gather, NaN check, forward, backward, Adam,
metrics), sae-lens's through `SAETrainer.fit` on the same batches. A step's time is the interval
between two requests for a batch (the same clock for both); we print the median step and the
fastest step (least disturbed by other processes on a shared machine). Headline lines:

    sae_vs_saelens: X               our S=1 SAE tokens/s ÷ sae-lens JumpReLU SAE tokens/s (each with its default precision)
    crosscoder_matmul_efficiency: Y achieved matmul FLOP/s at S=8 ÷ measured fp32 matmul FLOP/s

Matmul FLOPs per training step (B tokens, S snapshots, d = d_model, F = dict_size), counting only
the products that are computed:
    forward:  encoder h = Σ_θ W_E^θ x^θ  [B, S·d] @ [S·d, F]        2·B·S·d·F
              decoder x̂^θ = f^θ W_D^θ    S × [B, F] @ [F, d]         2·B·S·d·F
    backward: ∂W_E = xᵀ ∂h                                          2·B·S·d·F
              (∂x is not needed: x is data)
              ∂W_D^θ = f^θᵀ ∂x̂^θ                                    2·B·S·d·F
              ∂f^θ = ∂x̂^θ W_D^θᵀ                                    2·B·S·d·F
    total:    10·B·S·d·F  (elementwise work, the gate, penalty and Adam are not counted)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crosslib.crosscoder import CrosscoderConfig  # noqa: E402
from crosslib.sources import TensorSource  # noqa: E402
from crosslib.train import TrainConfig, train_crosscoder, tune_allocator  # noqa: E402

D, F, B = 128, 2048, 2048


def matmul_flops(dtype: torch.dtype, reps: int = 10) -> float:
    """Best FLOP/s of a [2048, 1024] @ [1024, 2048] matmul (a shape MKL/oneDNN runs near peak)."""
    a, b = torch.randn(2048, 1024).to(dtype), torch.randn(1024, 2048).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 * 1024 * 2048 / best


def synthetic_source(S: int, rows: int = 16_384) -> TensorSource:
    """Activations with a few hundred sparse directions plus noise (the content barely matters for speed)."""
    g = torch.Generator().manual_seed(S)
    directions = torch.randn(512, S, D, generator=g)
    codes = torch.rand(rows, 512, generator=g).pow(8)  # mostly tiny, a few large
    x = torch.einsum("rk,ksd->rsd", codes, directions) + 0.1 * torch.randn(rows, S, D, generator=g)
    return TensorSource(x, eval_fraction=0.0)


class Clock:
    """Wraps a batch iterator and records when each batch is requested: step k took t[k+1] − t[k]
    (the whole loop body: data, forward, backward, optimiser, bookkeeping). Same method for both libraries."""

    def __init__(self, batches, warmup: int):
        self.batches, self.warmup, self.stamps = batches, warmup, []

    def __iter__(self):
        return self

    def __next__(self):
        self.stamps.append(time.perf_counter())
        return next(self.batches)

    def step_times(self) -> list[float]:
        times = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return times[self.warmup:]


class ClockedSource:
    """An ActivationSource whose training batches pass through a Clock."""

    def __init__(self, source: TensorSource, warmup: int):
        self.source, self.warmup, self.clock = source, warmup, None
        self.steps, self.n_snapshots, self.d_model = source.steps, source.n_snapshots, source.d_model
        self.fingerprint = source.fingerprint

    def batches(self, batch_size, **kw):
        self.clock = Clock(self.source.batches(batch_size, **kw), self.warmup)
        return self.clock

    def rows(self, *a, **kw):
        return self.source.rows(*a, **kw)

    def select(self, *a, **kw):
        return self.source.select(*a, **kw)


def rates(times: list[float]) -> tuple[float, float]:
    """(tokens/s of the median step, tokens/s of the fastest step)."""
    times = sorted(times)
    return B / times[len(times) // 2], B / times[0]


def ours(S: int, steps: int, *, bf16: bool, compile: bool) -> tuple[float, float]:
    """Our training loop's tokens/s (median step, fastest step); the first 2 steps (compilation) are not timed."""
    source = ClockedSource(synthetic_source(S), warmup=2)
    model = CrosscoderConfig(n_snapshots=S, d_model=D, dict_size=F, decoder_init_norm=0.1)
    config = TrainConfig(n_steps=steps + 3, batch_size=B, lr=1e-4, log_every=steps + 3, eval_rows=0,
                         bf16=bf16, compile=compile)
    train_crosscoder(source, model, config, progress=False)
    return rates(source.clock.step_times())


def saelens(steps: int, *, autocast: bool) -> tuple[float, float]:
    """sae-lens's SAETrainer.fit, JumpReLU training SAE (tanh sparsity), same d, F, batch: tokens/s (median, fastest)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    source = synthetic_source(1)
    clock = Clock((x[:, 0] for x in source.batches(B, seed=0)), warmup=2)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D, d_sae=F, jumprelu_sparsity_loss_mode="tanh", l0_coefficient=0.3, jumprelu_bandwidth=0.05,
        jumprelu_init_threshold=0.01, apply_b_dec_to_input=False))
    trainer = SAETrainer(SAETrainerConfig(
        total_training_samples=(steps + 3) * B, train_batch_size_samples=B, lr=1e-4, lr_end=1e-4 / 32,
        device="cpu", autocast=autocast, logger=LoggingConfig(log_to_wandb=False)), sae, clock)
    with open(os.devnull, "w") as null, _redirect_stderr(null):
        trainer.fit()
    return rates(clock.step_times())


class _redirect_stderr:
    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self.old, sys.stderr = sys.stderr, self.stream

    def __exit__(self, *exc):
        sys.stderr = self.old


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for both libraries (default 1; 0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tuned = tune_allocator()  # process-wide (glibc mallopt): sae-lens below runs with it too
    sae_steps, cc_steps = (8, 5) if args.quick else (30, 12)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start, "
          f"malloc tuned for both libraries: {tuned}")
    print(f"config: d_model={D}, dict_size={F}, batch={B} tokens; FLOPs/step = 10*B*S*d*F")

    t0 = time.time()
    import sae_lens  # noqa: F401  (imported once, outside the timings)

    print(f"import sae_lens: {time.time() - t0:.1f} s")
    peak32, peak16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
    print(f"fp32 matmul: {peak32 / 1e9:.1f} GFLOP/s   bf16 matmul: {peak16 / 1e9:.1f} GFLOP/s")

    sl32, sl16 = saelens(sae_steps, autocast=False), saelens(sae_steps, autocast=True)
    ours32, ours16 = ours(1, sae_steps, bf16=False, compile=True), ours(1, sae_steps, bf16=True, compile=True)
    print("tokens/s as (median step, fastest step):")
    print(f"SAE S=1  sae-lens fp32: {sl32[0]:7.0f} {sl32[1]:7.0f}   sae-lens bf16 autocast: {sl16[0]:7.0f} {sl16[1]:7.0f}")
    print(f"SAE S=1  ours     fp32: {ours32[0]:7.0f} {ours32[1]:7.0f}   ours     bf16 autocast: {ours16[0]:7.0f} {ours16[1]:7.0f}")
    print(f"ours / sae-lens, same precision: fp32 {ours32[0] / sl32[0]:.2f}x (fastest {ours32[1] / sl32[1]:.2f}x), "
          f"bf16 {ours16[0] / sl16[0]:.2f}x (fastest {ours16[1] / sl16[1]:.2f}x)")

    cc = {}
    for S in (4, 8, 16):
        cc[S] = ours(S, cc_steps, bf16=True, compile=True)
        flops = [10 * S * D * F * r for r in cc[S]]
        print(f"crosscoder S={S:2d} bf16: {cc[S][0]:6.0f} {cc[S][1]:6.0f} tok/s  {flops[0] / 1e9:6.1f} {flops[1] / 1e9:6.1f} "
              f"GFLOP/s = {flops[0] / peak32:.2f} {flops[1] / peak32:.2f} x fp32 matmul")
    fp32_s8 = ours(8, cc_steps, bf16=False, compile=True)
    print(f"crosscoder S= 8 fp32: {fp32_s8[0]:6.0f} {fp32_s8[1]:6.0f} tok/s  "
          f"{10 * 8 * D * F * fp32_s8[0] / 1e9:6.1f} {10 * 8 * D * F * fp32_s8[1] / 1e9:6.1f} GFLOP/s = "
          f"{10 * 8 * D * F * fp32_s8[0] / peak32:.2f} {10 * 8 * D * F * fp32_s8[1] / peak32:.2f} x fp32 matmul")
    print(f"time per token S=16 vs S=4: {cc[4][0] / cc[16][0]:.2f}x (median), {cc[4][1] / cc[16][1]:.2f}x (fastest) "
          "for 4x the snapshots")
    print(f"load average at end {os.getloadavg()[0]:.1f} (other processes share these {os.cpu_count()} cores)")
    print("headlines use the median step; the fp32 matmul reference is its fastest repetition")
    print(f"sae_vs_saelens: {ours16[0] / sl32[0]:.2f}   (ours with bf16 autocast, the fast path, vs sae-lens's default fp32; "
          f"same-precision ratios above)")
    print(f"crosscoder_matmul_efficiency: {10 * 8 * D * F * cc[8][0] / peak32:.2f}   (S=8, bf16 autocast, vs fp32 matmul; "
          f"fastest step: {10 * 8 * D * F * cc[8][1] / peak32:.2f})")


if __name__ == "__main__":
    main()
