"""The book's first build on a busy machine: how much each stage slows down when another CPU-bound
process takes a core, at 1 and 2 torch threads, with the thread count following the load (what
crosslib runs with), and with OpenMP's default and passive waiting.

    .venv/bin/python benchmarks/bench_busy.py            # sized for < 10 minutes on 2 cores; run it on a quiet machine
    .venv/bin/python benchmarks/bench_busy.py --quick    # sized for < 1 minute: checks that it runs, timings are noisy

Stages, each a short slice of what the first build does (sizes are options):

* suite       training steps of the tiny preset's model (`crosslib.models.suite.SUITE_PRESETS["tiny"]`: its
              GPT-NeoX config, `training_batch` over a random token stream, AdamW, gradient clipping),
              at the preset's precision (fp32);
* cache       `crosslib.activations.cache.build_store` of a few random snapshots of the tiny shape (benchmarks/
              bench_cache.py's random suite), at the chapters' hook, from start to finish;
* crosscoder  `crosslib.dictionaries.train.train_crosscoder` steps at the chapters' shape (S = the tiny suite's 19
              snapshots, d = 128, F = 512, batch 1024, λ 0.3: `crosslib.book.defaults`), bf16 where
              `crosslib.machine.native_bf16()` says so, compiled where the chapters' 600-step run would
              be; on benchmarks/bench_train.py's planted activations, step time only (its Clock).

Each setting (torch threads × OpenMP wait policy) runs in a fresh process, because OpenMP reads
OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when torch loads it. In it every stage is timed quiet, then
busy (while a competitor, a tight pure-Python loop in a process of its own, runs), alternately,
`--repeats` times; the best of each is kept (other processes can slow a run, never speed it up).
"follow" is `CROSSLIB_THREADS=follow` (`crosslib.runtime.follow_load`): each step of a stage's
progress bar sets torch's thread count to the cores other processes leave free, judged from the last
second's CPU accounting; the numbers are fixed counts under `CROSSLIB_THREADS=fixed`. Before each
timed run the machine is left as it will be during it (competitor started or stopped) for
`SETTLE_SECONDS`, so the follower's first look sees it: the timings are a long stage's steady state,
not the one-second reaction.
The competitor is started for each busy run and stopped after it; it also stops by itself as soon
as the process that started it is gone, so an interrupted run leaves none behind.

Why the wait policy: torch's OpenMP is libgomp, whose threads spin ~300,000 times (a few ms) at each
barrier before sleeping. With a competitor on a core, a spinning thread takes time the others need.
OMP_WAIT_POLICY=PASSIVE makes them sleep at once. In libgomp GOMP_SPINCOUNT=0 does exactly the same
(both set the spin counts to 0: libgomp/env.c), so it is not in the default comparison
(`--policies unset,PASSIVE,spincount0` adds it).

Prints a table (seconds quiet and busy, their ratio, and busy ÷ the default setting's quiet time, which
says whether a setting beats the default under load) and the headline lines

    busy_over_quiet_max[threads=T, W]: X    the worst stage's busy ÷ quiet, for each setting tried
    busy_over_quiet_max: X                  the same at the setting crosslib runs with (threads following
                                            the load, OMP_WAIT_POLICY unset); goal ≤ 1.5
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(REPO), str(BENCHMARKS)]  # crosslib, and the helpers of bench_cache and bench_train

STAGES = ("suite", "cache", "crosscoder")
# An OpenMP wait policy: the environment it sets (every other OpenMP wait variable is removed)
POLICIES = {
    "unset": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "spincount0": {"GOMP_SPINCOUNT": "0"},
}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
DEFAULT_POLICY = "unset"  # what crosslib runs with: it sets no OpenMP variable
FOLLOW = "follow"  # the thread setting crosslib runs with (crosslib.runtime.follow_load)
SETTLE_SECONDS = 2.0  # the machine's state before a timed run: > crosslib.runtime.FOLLOW_INTERVAL
# Sizes: (full run, --quick)
SIZES = {
    "suite_steps": (8, 1),  # suite training steps per measurement (~0.3 s each on 2 quiet cores)
    "suite_tokens": (200_000, 50_000),  # the random token stream the batches are drawn from
    "cache_snapshots": (4, 2),
    "cache_windows": (128, 16),  # context windows (128 tokens) per snapshot
    "crosscoder_steps": (10, 2),  # timed crosscoder steps per measurement (after one untimed)
    "crosscoder_rows": (8192, 2048),  # planted activation rows the batches cycle through
    "repeats": (3, 1),
}
PR_SET_PDEATHSIG = 1  # prctl(2)
CROSSCODER_WARM_STEPS = 1  # untimed steps at the start of each crosscoder measurement (first-step allocations)


def policy_label(policy: str) -> str:
    env = POLICIES[policy]
    return ", ".join(f"{k}={v}" for k, v in env.items()) or "OMP_WAIT_POLICY unset"


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# -- the competitor ------------------------------------------------------------------------------

def compete(parent_pid: int) -> None:
    """Keep one core busy with a pure-Python loop until stopped, or until `parent_pid` is no longer
    this process's parent (it exited or was killed: nobody would stop us)."""
    print("ready", flush=True)
    counter = 0
    with contextlib.suppress(KeyboardInterrupt):
        while os.getppid() == parent_pid:
            for _ in range(100_000):  # a few ms between checks
                counter += 1


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def competitors(count: int):
    """`count` competitor processes, running from the moment the block starts until it ends (however it ends)."""
    running: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            process = subprocess.Popen([sys.executable, __file__, "--competitor", "--parent-pid", str(os.getpid())],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            running.append(process)
            process.stdout.readline()  # its loop has started
        yield
        if any(process.poll() is not None for process in running):
            raise RuntimeError("a competitor stopped during a busy measurement: it was not busy throughout")
    finally:
        for process in running:
            _stop(process)
            process.stdout.close()


# -- the stages (each returns a function that runs one measurement and returns its seconds) ------

def suite_stage(args):
    """Training steps of the tiny preset's model, as crosslib.models.suite trains it."""
    import numpy as np

    from crosslib.models.suite import (SUITE_PRESETS, frequent_tokens, initial_model, suite_optimizer,
                                       training_batch, training_step)
    from crosslib.progress import progress

    config = SUITE_PRESETS["tiny"]
    model = initial_model(config, eos_token_id=0).train()
    optimizer = suite_optimizer(model, config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=args.suite_tokens, dtype=np.int32)
    pool = frequent_tokens(tokens, config.repeat_vocab)
    done = [0]  # steps so far: each measurement draws new batches

    def run() -> float:
        start = time.perf_counter()
        # through a (silent) progress bar, as the suite's trainer loops: its steps follow the load
        for step in progress(range(done[0], done[0] + args.suite_steps), disable=True):
            training_step(model, optimizer, training_batch(tokens, step, config, pool), config)
        done[0] += args.suite_steps
        return time.perf_counter() - start

    return run


def cache_stage(args):
    """`build_store` from start to finish (load, checksums, forward to the hook, writes) into a fresh folder."""
    import numpy as np
    from bench_cache import TINY_SHAPE

    from crosslib.activations.cache import CacheConfig, build_store
    from crosslib.book import defaults as book_defaults

    config = CacheConfig(suite=args.random_suite, steps=tuple(range(args.cache_snapshots)), hook=book_defaults.hook)
    windows = np.random.default_rng(0).integers(
        0, TINY_SHAPE["vocab_size"], size=(args.cache_windows, TINY_SHAPE["max_position_embeddings"]))

    def run() -> float:
        # its disk-space line would print at every measurement
        with tempfile.TemporaryDirectory(dir=args.tmp) as root, contextlib.redirect_stderr(io.StringIO()):
            start = time.perf_counter()
            build_store(config, windows, root=root, progress=False)
            return time.perf_counter() - start

    return run


def crosscoder_stage(args):
    """`train_crosscoder` steps at the chapters' shape; the time of the steps after the first."""
    from bench_train import ClockedSource, planted_source

    from crosslib.book import defaults as book_defaults
    from crosslib.dictionaries.crosscoder import CrosscoderConfig
    from crosslib.dictionaries.train import TrainConfig, train_crosscoder
    from crosslib.machine import native_bf16
    from crosslib.models.suite import SUITE_PRESETS

    tiny = SUITE_PRESETS["tiny"]
    model_config = CrosscoderConfig(n_snapshots=len(tiny.steps), d_model=tiny.d_model,
                                    dict_size=book_defaults.dict_size)
    # compile where the chapters' run would (their step count decides), unless told
    chapters_run = TrainConfig(n_steps=book_defaults.n_steps, batch_size=book_defaults.batch_size)
    compile_kernels = args.compile == "on" if args.compile != "auto" else chapters_run.use_compile(model_config)
    n_steps = CROSSCODER_WARM_STEPS + args.crosscoder_steps + 1  # + 1: a step's time ends at the next batch request
    train_config = TrainConfig(n_steps=n_steps, batch_size=book_defaults.batch_size, log_every=n_steps,
                               sparsity_coefficient=book_defaults.sparsity_coefficient, eval_rows=0,
                               bf16=native_bf16(), compile=compile_kernels)
    activations = planted_source(model_config.n_snapshots, rows=args.crosscoder_rows)
    log(f"  crosscoder: S={model_config.n_snapshots} d={model_config.d_model} F={model_config.dict_size} "
        f"batch {train_config.batch_size}, bf16 {train_config.bf16}, compiled {compile_kernels}")

    def run() -> float:
        source = ClockedSource(activations, warmup=CROSSCODER_WARM_STEPS)
        train_crosscoder(source, model_config, train_config, progress=False)
        return sum(source.clock.step_times())

    return run


STAGE_BUILDERS = {"suite": suite_stage, "cache": cache_stage, "crosscoder": crosscoder_stage}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that `finally` blocks stop what this process started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def terminate_with_parent() -> None:
    """Linux: have the kernel send this process SIGTERM when the driver dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def measure_setting(args) -> None:
    """In a fresh process with this setting's environment: time each stage quiet and busy; print JSON."""
    terminate_with_parent()
    import torch

    from crosslib.runtime import configure_process

    if args.threads != FOLLOW:
        torch.set_num_threads(int(args.threads))
    configure_process()  # as `crosslib book` does for its notebook kernels (CROSSLIB_THREADS: see the setting)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # from bench_train's planted activations
    results = {}
    for name in args.stages:
        run = STAGE_BUILDERS[name](args)
        run()  # warm-up: first-call allocations, compilation
        quiet, busy, used = [], [], {"quiet": set(), "busy": set()}  # used: torch's thread count after each run
        for _ in range(args.repeats):  # alternate, so that drift hits both alike
            time.sleep(SETTLE_SECONDS)
            quiet.append(run())
            used["quiet"].add(torch.get_num_threads())
            with competitors(args.competitors):
                time.sleep(SETTLE_SECONDS)
                busy.append(run())
                used["busy"].add(torch.get_num_threads())
        results[name] = {"quiet": quiet, "busy": busy, "threads": {k: sorted(v) for k, v in used.items()}}
        log(f"  {name}: quiet {min(quiet):.2f} s, busy {min(busy):.2f} s")
    print(json.dumps({"torch_threads": torch.get_num_threads(), "stages": results}))


# -- the driver ----------------------------------------------------------------------------------

def setting_environment(threads: str, policy: str) -> dict[str, str]:
    from crosslib.runtime import THREADS_ENV

    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES + (THREADS_ENV,)}
    count = {} if threads == FOLLOW else {"OMP_NUM_THREADS": threads}
    return {**env, **count, THREADS_ENV: FOLLOW if threads == FOLLOW else "fixed", **POLICIES[policy]}


def run_setting(args, threads: str, policy: str) -> dict:
    """One setting in a fresh process; stop it (and so its competitors) if we are interrupted."""
    command = [sys.executable, __file__, "--measure", "--threads", str(threads), "--stages", ",".join(args.stages),
               "--competitors", str(args.competitors), "--compile", args.compile]
    command += [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SIZES]
    command += ["--random-suite", str(args.random_suite)] if args.random_suite else []
    command += ["--tmp", args.tmp] if args.tmp else []
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=setting_environment(threads, policy),
                             cwd=REPO)
    try:
        out, _ = child.communicate()
    finally:
        _stop(child)
    if child.returncode != 0:
        sys.exit(f"the run at threads={threads}, {policy_label(policy)} failed (exit code {child.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and one repeat (about a minute): noisy")
    parser.add_argument("--threads", default=f"1,2,{FOLLOW}",
                        help=f"torch thread counts to try, and {FOLLOW!r} (following the load: always added)")
    parser.add_argument("--policies", default="unset,PASSIVE",
                        help=f"OpenMP wait policies to try: {', '.join(POLICIES)} (unset is always tried)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"stages to time: {', '.join(STAGES)}")
    parser.add_argument("--competitors", type=int, default=1, help="competing CPU-bound processes while busy")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default=None,
                        help="compile the crosscoder's kernels (auto: as the chapters' run would; --quick: off)")
    for name, (full, quick) in SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default {full} ({quick} with --quick)")
    parser.add_argument("--tmp", default=None, help="where temporary suites and stores go")
    # internal: a setting's fresh process, a competitor
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--random-suite", help=argparse.SUPPRESS)
    parser.add_argument("--competitor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, sizes in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, sizes[args.quick])
    args.compile = args.compile or ("off" if args.quick else "auto")
    args.stages = [s for s in args.stages.split(",") if s]
    args.policies = [p for p in args.policies.split(",") if p]
    args.threads = [t for t in args.threads.split(",") if t]
    for threads in args.threads:
        if threads != FOLLOW and not (threads.isdigit() and int(threads) > 0):
            parser.error(f"--threads: {threads!r} is not a positive thread count or {FOLLOW!r}")
    for stage in args.stages:
        if stage not in STAGES:
            parser.error(f"--stages: {stage!r} is not one of {', '.join(STAGES)}")
    for policy in args.policies:
        if policy not in POLICIES:
            parser.error(f"--policies: {policy!r} is not one of {', '.join(POLICIES)}")
    return args


def main() -> None:
    args = parse_args()
    exit_on_sigterm()
    if args.competitor:
        return compete(args.parent_pid)
    if args.measure:
        args.threads = args.threads[0]
        return measure_setting(args)

    import torch
    from bench_cache import make_random_suite
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per saved random snapshot otherwise

    default_threads = torch.get_num_threads()  # the most threads the follower gives (one per free core)
    threads = sorted(set(args.threads) - {FOLLOW}, key=int) + [FOLLOW]
    policies = [DEFAULT_POLICY] + [p for p in args.policies if p != DEFAULT_POLICY]
    settings = [(t, p) for t in threads for p in policies]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} (default {default_threads} threads), "
          f"load average {load_average():.1f} at start; {args.competitors} competitor(s) while busy")
    print(f"sizes: {', '.join(f'{name}={getattr(args, name)}' for name in SIZES)}, crosscoder compile {args.compile}")
    if load_average() > 0.5:
        print("warning: other processes are running, so the quiet timings are not quiet")

    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as work:
        if "cache" in args.stages:
            args.random_suite = make_random_suite(Path(work) / "suite", steps=tuple(range(args.cache_snapshots)))
        for t, p in settings:
            print(f"threads={t}, {policy_label(p)}:", flush=True)
            results[t, p] = run_setting(args, t, p)

    best = {(t, p, stage): (min(r["quiet"]), min(r["busy"]))
            for (t, p), result in results.items() for stage, r in result["stages"].items()}

    def used(t: str, p: str, stage: str) -> str:  # the thread counts the runs ended with, quiet / busy
        threads = results[t, p]["stages"][stage]["threads"]
        return "/".join(",".join(map(str, threads[k])) for k in ("quiet", "busy"))

    print()
    print(f"{'stage':<12}{'threads':>8}  {'OpenMP waiting':<24}{'quiet s':>9}{'busy s':>9}{'busy/quiet':>12}"
          f"{'busy/default quiet':>20}{'threads quiet/busy':>20}")
    for stage in args.stages:
        default_quiet = best[FOLLOW, DEFAULT_POLICY, stage][0]
        for t, p in settings:
            quiet, busy = best[t, p, stage]
            print(f"{stage:<12}{t:>8}  {policy_label(p):<24}{quiet:>9.2f}{busy:>9.2f}{busy / quiet:>12.2f}"
                  f"{busy / default_quiet:>20.2f}{used(t, p, stage):>20}")
    print(f"best of {args.repeats} per cell; load average {load_average():.1f} at the end")
    print()

    def worst(t: int, p: str) -> tuple[float, str]:
        return max((best[t, p, stage][1] / best[t, p, stage][0], stage) for stage in args.stages)

    for t, p in settings:
        ratio, stage = worst(t, p)
        print(f"busy_over_quiet_max[threads={t}, {policy_label(p)}]: {ratio:.2f}   (worst stage: {stage})")
    ratio, stage = worst(FOLLOW, DEFAULT_POLICY)
    print(f"busy_over_quiet_max: {ratio:.2f}   (threads following the load, up to {default_threads}, and "
          f"OMP_WAIT_POLICY unset: what crosslib runs with; worst stage: {stage}; goal <= 1.5)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every process of the run gets it; each stops what it started on the way out
        sys.exit(130)
