"""Training throughput: our SAE vs sae-lens's JumpReLU trainer, our crosscoder over S = 4, 8, 16, and
matmul efficiency against this machine's fp32 matmul speed — all measured side by side in one run.

    .venv/bin/python benchmarks/bench_train.py                # ~7 minutes on 2 cores
    .venv/bin/python benchmarks/bench_train.py --threads 0    # torch's default thread count
    .venv/bin/python benchmarks/bench_train.py --quick        # fewer steps (noisier)

Data: synthetic activations made of planted sparse features (each row is 32 of 1024 unit directions
with exponential magnitudes, plus noise; per-snapshot directions are perturbed copies of shared ones),
normalised like real activations. Our speed depends on how sparse the SAE is: once few features fire,
training runs the decoder and the W_E/W_D gradients over the active positions only (see
crosslib.dictionaries.kernels, "sparse products"). So our SAE is timed where a real run spends its steps,
after it has settled: each run trains `warm` steps and the last `timed` steps are clocked, and the L0
and explained variance printed are those of the timed steps (low: 200 steps is far from converged,
which does not matter for speed). The sparsity coefficient λ sets the L0; the headline uses λ = 1,
where these SAEs settle near L0 = 24 (1.2% of the 2048 features; published SAEs run at L0 of tens to
about a hundred over thousands to millions of features, and the tiny book's own SAEs, with 512
features, settle at L0 10-20). A sweep over λ shows the L0 dependence, and the same run with the
sparse products switched off shows the dense floor. sae-lens's trainer computes every product
densely, so its speed does not depend on L0; it trains on the same data.

Threads: one intra-op thread by default, for both libraries and for the matmul reference. On the
2-core machine this was written on, a quiet second core makes every step about 1.7x faster for both
libraries, but when other jobs share the cores a second OpenMP thread mostly waits at barriers and
steps run 2-3x slower. Use --threads 0 (torch's default) on a quiet machine.

Every number comes from whole training loops over an iterator of in-memory activation batches:
ours through `crosslib.dictionaries.train.train_crosscoder` (data gather, NaN check, forward, backward, Adam,
metrics), sae-lens's through `SAETrainer.fit` on the same batches. A step's time is the interval
between two requests for a batch (the same clock for both); we print the median step and the
fastest step (least disturbed by other processes on a shared machine). Headline lines:

    sae_vs_saelens: X               our S=1 SAE tokens/s (bf16 autocast, λ = 1) ÷ sae-lens JumpReLU SAE tokens/s (fp32, its default)
    crosscoder_matmul_efficiency: Y achieved matmul FLOP/s at S=8, dense products ÷ measured fp32 matmul FLOP/s
    crosscoder_bf16_efficiency: Z   a crosscoder step as the chapters train it (S=16, d=128, F=1024, batch
                                    2048, every core, default settings) in matmul FLOP/s ÷ this CPU's bf16
                                    matmul FLOP/s at the same thread count (the machine's own limit)

at d_model = 128, dict_size = 2048, batch 2048, and the same two at the tiny preset's own shape
(d_model = 128, dict_size = 512).

Matmul FLOPs per training step (B tokens, S snapshots, d = d_model, F = dict_size), all products dense:
    forward:  encoder h = Σ_θ W_E^θ x^θ  [B, S·d] @ [S·d, F]        2·B·S·d·F
              decoder x̂^θ = f^θ W_D^θ    S × [B, F] @ [F, d]         2·B·S·d·F
    backward: ∂W_E = xᵀ ∂h                                          2·B·S·d·F
              (∂x is not needed: x is data)
              ∂W_D^θ = f^θᵀ ∂x̂^θ                                    2·B·S·d·F
              ∂f^θ = ∂x̂^θ W_D^θᵀ                                    2·B·S·d·F
    total:    10·B·S·d·F  (elementwise work, the gate, penalty and Adam are not counted)
The efficiency line therefore runs with the sparse products switched off (they skip most of the
decoder's and the gradients' FLOPs, which would inflate a FLOP/s figure).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crosslib.activations.sources import TensorSource  # noqa: E402
from crosslib.dictionaries.crosscoder import CrosscoderConfig  # noqa: E402
from crosslib.dictionaries.kernels import KernelOptions  # noqa: E402
from crosslib.dictionaries.train import TrainConfig, train_crosscoder  # noqa: E402
from crosslib.machine import native_bf16  # noqa: E402
from crosslib.runtime import THREADS_ENV, configure_process  # noqa: E402

D, F, B = 128, 2048, 2048
TINY_DICT_SIZE = 512  # the tiny preset's dictionaries (its d_model is 128 too)


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


def planted_source(S: int, rows: int = 16_384, n_directions: int = 1024, per_row: int = 32) -> TensorSource:
    """Rows of `per_row` planted unit directions (exponential magnitudes) plus noise; snapshot θ's directions
    are perturbed copies of shared ones, so a crosscoder has shared structure to find."""
    g = torch.Generator().manual_seed(S)
    shared = torch.randn(n_directions, 1, D, generator=g)
    directions = shared + 0.3 * torch.randn(n_directions, S, D, generator=g)
    directions /= directions.norm(dim=-1, keepdim=True)
    which = torch.randint(n_directions, (rows * per_row,), generator=g)
    row = torch.arange(rows).repeat_interleave(per_row)
    magnitude = torch.empty(rows * per_row).exponential_(1.0, generator=g)
    codes = torch.sparse_coo_tensor(torch.stack([row, which]), magnitude, (rows, n_directions)).coalesce()
    x = torch.sparse.mm(codes, directions.reshape(n_directions, S * D)).view(rows, S, D)
    return TensorSource(x + 0.05 * torch.randn(rows, S, D, generator=g), eval_fraction=0.0)


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


def matmul_flops_per_token(S: int, dict_size: int = F) -> int:
    """The five products' FLOPs per token of a training step (see the module docstring)."""
    return 10 * S * D * dict_size


def rates(times: list[float]) -> tuple[float, float]:
    """(tokens/s of the median step, tokens/s of the fastest step)."""
    times = sorted(times)
    return B / times[len(times) // 2], B / times[0]


class Run(NamedTuple):
    median: float  # tokens/s of the median timed step
    fastest: float  # tokens/s of the fastest timed step
    l0: float  # mean active features per token (and snapshot) over the timed steps
    explained_variance: float  # mean over snapshots, over the timed steps


def ours(S: int, *, warm: int, timed: int, bf16: bool, sparse: bool = True, sparsity_coefficient: float = 1.0,
         lr: float = 1e-3, dict_size: int = F) -> Run:
    """Our training loop: `warm` untimed steps (compilation, and the SAE settling to its L0), then `timed` clocked ones."""
    source = ClockedSource(planted_source(S), warmup=warm)
    model = CrosscoderConfig(n_snapshots=S, d_model=D, dict_size=dict_size)
    config = TrainConfig(n_steps=warm + timed, batch_size=B, lr=lr, sparsity_coefficient=sparsity_coefficient,
                         log_every=timed, eval_rows=0, bf16=bf16, compile=True)
    kernels = KernelOptions(sparse=None if sparse else False)  # sparse: once f is sparse enough, as in training
    result = train_crosscoder(source, model, config, progress=False, kernels=kernels)
    last = result.history[-1]  # exactly the timed steps (warm is a multiple of timed)
    times = source.clock.step_times()[-timed:]
    return Run(*rates(times), sum(last["l0"]) / S, sum(last["explained_variance"]) / S)


def bf16_efficiency(*, warm: int, timed: int, S: int = 16, dict_size: int = 1024) -> None:
    """The chapters' own training settings, on every core, against this CPU's bf16 matmul speed.

    Default settings: TrainConfig's defaults (the sparse products switched on once f is sparse enough;
    compiled kernels if a default-length run of this shape, `TrainConfig().n_steps` steps, would compile
    them: the timed run is too short for the automatic choice to) and bf16 where the CPU multiplies it
    natively, as the chapters pick it (`crosslib.machine.native_bf16`). FLOPs are counted as if every
    product were dense (10·B·S·d·F per step), so sparse products, where they kick in, count as speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        peak_before = matmul_flops(torch.bfloat16)
        source = ClockedSource(planted_source(S), warmup=warm)
        model_config = CrosscoderConfig(n_snapshots=S, d_model=D, dict_size=dict_size)
        compile_kernels = TrainConfig(batch_size=B).use_compile(model_config)
        config = TrainConfig(n_steps=warm + timed, batch_size=B, log_every=timed, eval_rows=0, bf16=native_bf16(),
                             compile=compile_kernels)
        result = train_crosscoder(source, model_config, config, progress=False)
        # the CPU's speed is the best seen before and after the run: another process can only lower it
        peak = max(peak_before, matmul_flops(torch.bfloat16))
        median, fastest = rates(source.clock.step_times()[-timed:])
        flops = matmul_flops_per_token(S, dict_size)
        l0 = sum(result.history[-1]["l0"]) / S
        print(f"crosscoder S={S} d={D} F={dict_size} batch {B}, {torch.get_num_threads()} threads, bf16 {config.bf16}, "
              f"compiled {compile_kernels}, default settings: {median:6.0f} {fastest:6.0f} tok/s = {flops * median / 1e9:6.1f} GFLOP/s "
              f"(L0 {l0:.1f}); bf16 matmul at {torch.get_num_threads()} threads: {peak / 1e9:.1f} GFLOP/s (best before and after)")
        print(f"crosscoder_bf16_efficiency: {flops * median / peak:.2f}   (median step; fastest step "
              f"{flops * fastest / peak:.2f})")
    finally:
        torch.set_num_threads(threads)


def saelens(steps: int, *, autocast: bool, dict_size: int = F) -> tuple[float, float]:
    """sae-lens's SAETrainer.fit, JumpReLU training SAE (tanh sparsity), same d, F, batch: tokens/s (median, fastest)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    source = planted_source(1)
    clock = Clock((x[:, 0] for x in source.batches(B, seed=0)), warmup=2)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D, d_sae=dict_size, jumprelu_sparsity_loss_mode="tanh", l0_coefficient=0.3, jumprelu_bandwidth=0.05,
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
    parser.add_argument("--only-efficiency", action="store_true", help="only the crosscoder_bf16_efficiency line")
    args = parser.parse_args()
    # every measurement here sets its own thread count: keep it (crosslib's default follows the load)
    os.environ[THREADS_ENV] = "fixed"
    if args.only_efficiency:
        configure_process()
        bf16_efficiency(warm=8 if args.quick else 24, timed=4 if args.quick else 12)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tuned = configure_process()  # process-wide (glibc mallopt): sae-lens below runs with it too
    sae_steps = 8 if args.quick else 30
    timed, warm = (10, 40) if args.quick else (40, 160)  # ours: steps clocked after the SAE has settled
    cc_timed, cc_warm = (4, 4) if args.quick else (12, 12)  # crosscoders, dense products: L0 does not matter
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start, "
          f"malloc tuned for both libraries: {tuned}")
    print(f"config: d_model={D}, dict_size={F}, batch={B} tokens; FLOPs/step = 10*B*S*d*F")

    t0 = time.time()
    import sae_lens  # noqa: F401  (imported once, outside the timings)

    print(f"import sae_lens: {time.time() - t0:.1f} s")
    peak32, peak16 = matmul_flops(torch.float32), matmul_flops(torch.bfloat16)
    print(f"fp32 matmul: {peak32 / 1e9:.1f} GFLOP/s   bf16 matmul: {peak16 / 1e9:.1f} GFLOP/s")

    # the headline's two measurements are the better of two runs each: other processes on a
    # shared machine can slow a whole 40-step window, never speed it up
    sl32 = max(saelens(sae_steps, autocast=False), saelens(sae_steps, autocast=False))
    sl16 = saelens(sae_steps, autocast=True)
    print("tokens/s as (median step, fastest step); ours after its warm-up, with the L0 and EV of the timed steps:")
    print(f"SAE S=1  sae-lens fp32: {sl32[0]:7.0f} {sl32[1]:7.0f}   sae-lens bf16 autocast: {sl16[0]:7.0f} {sl16[1]:7.0f}")
    runs = {}
    for label, kw in [("fp32", dict(bf16=False)), ("bf16", dict(bf16=True)),
                      ("bf16, dense products", dict(bf16=True, sparse=False))]:
        runs[label] = r = max((ours(1, warm=warm, timed=timed, **kw) for _ in range(2 if label == "bf16" else 1)),
                              key=lambda run: run.median)
        print(f"SAE S=1  ours {label:21s}: {r.median:7.0f} {r.fastest:7.0f}   L0 {r.l0:5.1f}  EV {r.explained_variance:.3f}")
    print(f"ours / sae-lens, same precision: fp32 {runs['fp32'].median / sl32[0]:.2f}x, "
          f"bf16 {runs['bf16'].median / sl16[0]:.2f}x (dense products: {runs['bf16, dense products'].median / sl16[0]:.2f}x)")
    print("L0 dependence (ours bf16; sparsity coefficient λ sets the L0):")
    for lam in (0.3, 1.0, 3.0):
        r = runs["bf16"] if lam == 1.0 else ours(1, warm=warm, timed=timed, bf16=True, sparsity_coefficient=lam)
        print(f"  λ = {lam:3.1f}: L0 {r.l0:5.1f} ({100 * r.l0 / F:4.1f}% of features)  {r.median:7.0f} tok/s  "
              f"= {r.median / sl32[0]:.2f}x sae-lens fp32")

    cc = {}
    for S in (4, 8, 16):
        cc[S] = ours(S, warm=cc_warm, timed=cc_timed, bf16=True, sparse=False)
        flops = [matmul_flops_per_token(S) * r for r in cc[S][:2]]
        print(f"crosscoder S={S:2d} bf16 dense: {cc[S].median:6.0f} {cc[S].fastest:6.0f} tok/s  {flops[0] / 1e9:6.1f} "
              f"{flops[1] / 1e9:6.1f} GFLOP/s = {flops[0] / peak32:.2f} {flops[1] / peak32:.2f} x fp32 matmul")
    fp32_s8 = ours(8, warm=cc_warm, timed=cc_timed, bf16=False, sparse=False)
    flops = [matmul_flops_per_token(8) * r for r in fp32_s8[:2]]
    print(f"crosscoder S= 8 fp32 dense: {fp32_s8.median:6.0f} {fp32_s8.fastest:6.0f} tok/s  {flops[0] / 1e9:6.1f} "
          f"{flops[1] / 1e9:6.1f} GFLOP/s = {flops[0] / peak32:.2f} {flops[1] / peak32:.2f} x fp32 matmul")
    print(f"time per token S=16 vs S=4: {cc[4].median / cc[16].median:.2f}x (median), "
          f"{cc[4].fastest / cc[16].fastest:.2f}x (fastest) for 4x the snapshots")
    settled = ours(8, warm=warm // 2, timed=timed // 2, bf16=True, sparsity_coefficient=3.0)
    print(f"crosscoder S= 8 bf16, λ = 3, after {warm // 2} steps: {settled.median:6.0f} tok/s at L0 "
          f"{settled.l0:.1f} per snapshot (EV {settled.explained_variance:.3f}) = "
          f"{settled.median / cc[8].median:.2f}x the dense products")
    print(f"the tiny preset's shape: d_model={D}, dict_size={TINY_DICT_SIZE} (batch {B}; ours at λ = 0.3)")
    tiny_sl = max(saelens(sae_steps, autocast=False, dict_size=TINY_DICT_SIZE) for _ in range(2))
    # λ = 0.3: with 512 features for 1024 planted directions, λ = 1 leaves L0 ≈ 6 and EV ≈ 0.03
    tiny = max((ours(1, warm=warm, timed=timed, bf16=True, sparsity_coefficient=0.3, dict_size=TINY_DICT_SIZE)
                for _ in range(2)), key=lambda run: run.median)
    tiny_dense = ours(1, warm=warm, timed=timed, bf16=True, sparse=False, sparsity_coefficient=0.3,
                      dict_size=TINY_DICT_SIZE)
    tiny_cc = ours(8, warm=cc_warm, timed=cc_timed, bf16=True, sparse=False, dict_size=TINY_DICT_SIZE)
    tiny_efficiency = matmul_flops_per_token(8, TINY_DICT_SIZE) * tiny_cc.median / peak32
    print(f"SAE S=1  sae-lens fp32: {tiny_sl[0]:7.0f}   ours bf16: {tiny.median:7.0f} at L0 {tiny.l0:.1f} "
          f"({100 * tiny.l0 / TINY_DICT_SIZE:.1f}%), EV {tiny.explained_variance:.3f}   ours bf16, dense products: "
          f"{tiny_dense.median:7.0f}")
    print(f"crosscoder S= 8 bf16 dense: {tiny_cc.median:6.0f} tok/s = {tiny_efficiency:.2f} x fp32 matmul")
    print(f"load average at end {os.getloadavg()[0]:.1f} (other processes share these {os.cpu_count()} cores)")
    print("headlines use the median step (the better of two runs for the sae_vs_saelens pairs); "
          "the fp32 matmul reference is its fastest repetition")
    print(f"sae_vs_saelens: {runs['bf16'].median / sl32[0]:.2f}   (ours with bf16 autocast at L0 {runs['bf16'].l0:.1f}, "
          f"vs sae-lens's default fp32; same-precision and L0 ratios above)")
    print(f"crosscoder_matmul_efficiency: {matmul_flops_per_token(8) * cc[8].median / peak32:.2f}   (S=8, bf16 "
          f"autocast, dense products, vs fp32 matmul; fastest step: {matmul_flops_per_token(8) * cc[8].fastest / peak32:.2f})")
    print(f"sae_vs_saelens at the tiny preset's dict_size={TINY_DICT_SIZE}: {tiny.median / tiny_sl[0]:.2f}   "
          f"(L0 {tiny.l0:.1f}; dense products {tiny_dense.median / tiny_sl[0]:.2f})")
    print(f"crosscoder_matmul_efficiency at the tiny preset's dict_size={TINY_DICT_SIZE}: {tiny_efficiency:.2f}")
    bf16_efficiency(warm=cc_warm * 2, timed=cc_timed)


if __name__ == "__main__":
    main()
