"""The suite's training step: ours against transformers' own, and against this CPU's fp32 matmul speed,
measured side by side in one run.

    .venv/bin/python benchmarks/bench_suite.py            # ~2 minutes on 2 cores; run it on a quiet machine
    .venv/bin/python benchmarks/bench_suite.py --quick    # fewer steps (noisier)

Three steps train the tiny preset's model (`crosslib.models.suite.SUITE_PRESETS["tiny"]`: GPT-NeoX, 4 layers,
d_model 128, MLP 512, vocabulary 4096, 32 windows of 128 tokens) from the same initial weights on the same
batches (`training_batch` over a random token stream), with AdamW and gradient clipping, the first two in fp32 as
the preset trains:

* ours: `crosslib.models.suite.training_step` as the suite's trainer runs it (the loss over the output
  projection in chunks, `crosslib.models.cross_entropy`; SDPA attention);
* transformers: the same step written the usual way, `model(input_ids=ids, labels=ids).loss` with eager
  attention (what the suite's trainer ran before it computed the loss in chunks);
* ours, bf16: ours under bf16 autocast (eager attention), as `suite_overrides={"bf16": True}` trains: where the
  CPU multiplies bf16 natively it is faster; where it does not (`ONEDNN_MAX_CPU_ISA=AVX2
  ATEN_CPU_CAPABILITY=avx2` shows an AVX2-only CPU on this one) it is emulated and slow.

They alternate, `--repeats` rounds of `--steps` steps each; the headlines use each one's median round (the
best round is printed too). All run with crosslib's process settings (`crosslib.runtime.configure_process`, as
`crosslib book` runs the chapters), glibc's allocator tuning included. Without it (`--untuned`, or crosslib
used as a library without that call) every step's large temporaries are page-faulted in anew, which costs
the full-logits loss most: it allocates [token, vocabulary] tensors three times a step.

Matmul FLOPs per token are counted as for any transformer (Kaplan et al. 2020): 6 per weight of every matmul
(forward 2, backward 4: the input's and the weight's gradients), output projection included, embedding lookup
not, plus attention's two products, 4 · context · d_model per layer forward (the full square, as a dense
kernel computes it), × 3 for training. Headline lines:

    suite_step_vs_transformers: X   transformers' step time ÷ ours (same run; > 1: ours is faster)
    suite_fp32_efficiency: Y        our step's matmul FLOP/s ÷ this CPU's fp32 matmul FLOP/s at the same
                                    thread count (the machine's own limit for the preset's precision)
    suite_bf16_speedup: Z           our fp32 step's time ÷ our bf16 autocast step's

and what a whole suite (the preset's `total_steps`) takes at our step's speed and at the fp32 matmul
limit: the floor no fp32 implementation of this schedule gets under on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS.parent), str(BENCHMARKS)]

from bench_train import matmul_flops  # noqa: E402
from crosslib.models.suite import (SUITE_PRESETS, SuiteConfig, frequent_tokens, initial_model,  # noqa: E402
                                   next_token_loss, suite_optimizer, training_batch, training_step)
from crosslib.runtime import MALLOC_TUNING_ENV, THREADS_ENV, configure_process  # noqa: E402


def matmul_flops_per_token(config: SuiteConfig) -> int:
    """Training matmul FLOPs per token (see the module docstring)."""
    d, L = config.d_model, config.n_layers
    weights = L * (4 * d * d + 2 * d * config.d_mlp) + d * config.vocab_size  # QKV, output, MLP in/out; unembedding
    attention = L * 4 * config.context_length * d
    return 6 * weights + 3 * attention


def counted_flops(model, config: SuiteConfig) -> int:
    """Matmul FLOPs of one loss and backward as torch's FLOP counter counts them (a check on the formula; it does
    not count SDPA's CPU kernel, so `model` should run eager attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = torch.zeros(config.batch_size, config.context_length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        next_token_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def transformers_step(model, optimizer, batch: torch.Tensor, config: SuiteConfig) -> None:
    """The step written the usual way: the model's own loss over full logits."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: one per core)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 6; --quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per implementation (default 10; --quick 2)")
    parser.add_argument("--untuned", action="store_true", help="leave glibc's allocator as it is (CROSSLIB_MALLOC_TUNING=0)")
    args = parser.parse_args()
    os.environ[THREADS_ENV] = "fixed"  # the thread count is this benchmark's to set
    if args.untuned:
        os.environ[MALLOC_TUNING_ENV] = "0"
    tuned = configure_process()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    steps = args.steps or (2 if args.quick else 6)
    repeats = args.repeats or (2 if args.quick else 10)
    config = SUITE_PRESETS["tiny"]
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=2_000_000)
    pool = frequent_tokens(tokens, config.repeat_vocab)  # the repeats' tokens, drawn as the trainer draws them
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start, allocator tuned: {tuned}")
    print(f"suite: the tiny preset, {config.batch_size} windows of {config.context_length} tokens a step")

    runs = {}  # name: (model, optimizer, step function, config)
    for name, run_config, run_step in [("ours", config, training_step), ("transformers", config, transformers_step),
                                       ("ours, bf16", config.replace(bf16=True), training_step)]:
        model = initial_model(run_config, eos_token_id=0).train()
        if run_step is transformers_step:
            model.set_attn_implementation("eager")
        runs[name] = (model, suite_optimizer(model, run_config), run_step, run_config)
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    peak = matmul_flops(torch.float32)
    step = 0
    for _ in range(repeats):
        for name, (model, optimizer, run_step, run_config) in runs.items():
            run_step(model, optimizer, training_batch(tokens, step, config, pool), run_config)  # untimed: warm caches
            batches = [training_batch(tokens, step + 1 + i, config, pool) for i in range(steps)]
            start = time.perf_counter()
            for batch in batches:
                run_step(model, optimizer, batch, run_config)
            rounds[name].append((time.perf_counter() - start) / steps)
        step += steps + 1
    peak = max(peak, matmul_flops(torch.float32))  # the CPU's speed: the best before and after
    flops = matmul_flops_per_token(config) * config.batch_size * config.context_length
    counted = counted_flops(runs["transformers"][0], config)
    print(f"matmul FLOPs per step: {flops / 1e9:.1f} G (torch's FLOP counter: {counted / 1e9:.1f} G"
          f" over one loss and backward, eager attention); fp32 matmul at {torch.get_num_threads()} threads: "
          f"{peak / 1e9:.1f} GFLOP/s (best before and after)")
    median = {name: statistics.median(times) for name, times in rounds.items()}
    for name, times in rounds.items():
        print(f"{name:12s}: {median[name]:.3f} s per step (median of {repeats} rounds of {steps} steps; best "
              f"{min(times):.3f}) = {flops / median[name] / 1e9:6.1f} GFLOP/s")
    total = config.total_steps
    print(f"a whole suite ({total} steps, snapshots not counted): {total * median['ours'] / 60:.1f} min at our step, "
          f"{total * flops / peak / 60:.1f} min at the fp32 matmul limit")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print(f"suite_step_vs_transformers: {median['transformers'] / median['ours']:.2f}   (best rounds: "
          f"{min(rounds['transformers']) / min(rounds['ours']):.2f})")
    print(f"suite_fp32_efficiency: {flops / median['ours'] / peak:.2f}   (best round: "
          f"{flops / min(rounds['ours']) / peak:.2f})")
    print(f"suite_bf16_speedup: {median['ours'] / median['ours, bf16']:.2f}   (our fp32 step ÷ the same step under bf16 "
          f"autocast, eager attention, as `suite_overrides={{'bf16': True}}` trains)")


if __name__ == "__main__":
    main()
