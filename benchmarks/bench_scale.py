"""Real-scale costs at Pythia-70m's shape, measured on this machine (random weights, no hub needed).

Builds a suite with Pythia-70m's configuration (GPT-NeoX, d_model 512, 6 layers, 8 heads, vocabulary
50,304, rotary on 25% of each head, parallel residual) as `step0/ step1000/ step143000/` folders
written by `save_pretrained`, plus one shared `tokenizer/` (a 4,096-token BPE trained on Brown: ids
fit Pythia's vocabulary; the real tokenizer only changes how many tokens a text has). Then it
measures, one `name: value` line each:

* load_seconds_first / load_seconds — `load_snapshot` of one step, the first time (weights hashed
  once and remembered) and after;
* forward_tokens_per_second — a full forward pass (to the 50k-way logits) of one snapshot;
* cache_tokens_per_second — `activation_store` at blocks.3.hook_resid_post over the three snapshots,
  in (token, snapshot) pairs per second, snapshot loading included; cache_vs_forward is its ratio to
  the full forward;
* bytes_per_token — the store's bytes on disk per (token, snapshot);
* rss_1x_mb / rss_5x_mb / rss_growth_ratio — peak RSS of a fresh process caching N and 5N tokens;
* crosscoder_tokens_per_second — training a 16,384-feature crosscoder over the three snapshots
  (eager, bf16 autocast, batches of 1,024 tokens);
* sharded_tokens_per_second / single_tokens_per_second / sharded_vs_single — `torchrun` with two
  gloo ranks (head parallelism) against one process, 4,096 features;

and finally the paper's configuration (Pythia-160M blocks.6.hook_resid_post, 32x expansion, all 154
snapshots, 800M tokens each) in disk and hours, scaled from these numbers by FLOPs and bytes.

    nice -n 10 .venv/bin/python benchmarks/bench_scale.py            # about 4-5 minutes on 2 cores
    nice -n 10 .venv/bin/python benchmarks/bench_scale.py --tokens 65536 --work /tmp/bench-scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

STEPS = (0, 1000, 143000)
HOOK = "blocks.3.hook_resid_post"
PYTHIA_70M = dict(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25,
                  use_parallel_residual=True, tie_word_embeddings=False)
# The paper's configuration (Ge et al. 2025): Pythia-160M, layer 6, 32x expansion, every snapshot.
PAPER = dict(d_model=768, hook_layer=6, expansion=32, n_snapshots=154, tokens=800_000_000)
MEASURED = dict(d_model=512, hook_layer=3, n_snapshots=len(STEPS), dict_size=16384)


def log(name: str, value) -> None:
    print(f"{name}: {value}", flush=True)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_suite(folder: Path) -> Path:
    """step{N}/ folders with Pythia-70m's configuration and distinct random weights, one shared tokenizer."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from crosslib.models.snapshots import step_dir
    from crosslib.text.corpus import CorpusConfig, load_corpus
    from crosslib.text.tokenizer import train_tokenizer

    if all((step_dir(folder, step) / "config.json").is_file() for step in STEPS) and (folder / "tokenizer").is_dir():
        return folder
    config = GPTNeoXConfig(**PYTHIA_70M)
    for step in STEPS:
        torch.manual_seed(step)
        GPTNeoXForCausalLM(config).save_pretrained(step_dir(folder, step))
    train_tokenizer(load_corpus(CorpusConfig()).train, 4096, folder / "tokenizer")
    return folder


def cache_rss_child(suite: str, n_tokens: int) -> None:
    """In a fresh process: cache `n_tokens` at one snapshot and print the peak RSS."""
    from crosslib.book.pipeline import activation_store

    activation_store(suite, HOOK, [STEPS[-1]], n_tokens=n_tokens, seed=7, progress=False)
    print(json.dumps({"peak_rss": peak_rss_bytes()}))


def run_child(args: list[str], env: dict) -> dict:
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def allocated_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def main() -> None:
    from crosslib.runtime import configure_process

    configure_process()  # an entry point: the allocator tuning the trainer's big batches need (process-wide)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/crosslib-bench-scale", help="suite and data directory (reused)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens cached (N; the RSS check also caches 5N)")
    parser.add_argument("--steps", type=int, default=6, help="crosscoder training steps timed at 16k features")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    suite = work / "pythia-70m-shape"
    env = {**os.environ, "CROSSLIB_DATA": str(work / "data")}
    os.environ["CROSSLIB_DATA"] = env["CROSSLIB_DATA"]
    downloads = Path(__file__).resolve().parent.parent / "data" / "downloads"
    if downloads.is_dir() and not (work / "data" / "downloads").exists():  # reuse the fetched corpora
        (work / "data").mkdir(parents=True, exist_ok=True)
        (work / "data" / "downloads").symlink_to(downloads)
    if args.rss_child is not None:
        cache_rss_child(str(suite), args.rss_child)
        return

    import torch

    from crosslib.book.pipeline import activation_store
    from crosslib.dictionaries.crosscoder import CrosscoderConfig
    from crosslib.dictionaries.train import TrainConfig, train_crosscoder
    from crosslib.models.snapshots import load_snapshot
    from crosslib.models.suite import suite_token_streams, token_windows

    t0 = time.perf_counter()
    build_suite(suite)
    log("suite_build_seconds", round(time.perf_counter() - t0, 1))
    log("threads", torch.get_num_threads())

    for name in ("load_seconds_first", "load_seconds"):
        t0 = time.perf_counter()
        model, _ = load_snapshot(suite, STEPS[-1])
        log(name, round(time.perf_counter() - t0, 2))

    heldout = suite_token_streams(suite)["heldout"]
    log("heldout_tokens", len(heldout))
    windows = torch.from_numpy(token_windows(heldout, 24, 128, seed=1))
    with torch.no_grad():
        model(input_ids=windows[:8])  # warm-up
        t0 = time.perf_counter()
        for batch in windows[8:].split(8):
            model(input_ids=batch)
        forward = 16 * 128 / (time.perf_counter() - t0)
    del model
    log("forward_tokens_per_second", round(forward))

    t0 = time.perf_counter()
    store = activation_store(str(suite), HOOK, list(STEPS), n_tokens=args.tokens, progress=False)
    seconds = time.perf_counter() - t0
    pairs = store.n_tokens * store.n_snapshots
    cache = pairs / seconds
    log("cache_tokens_per_second", round(cache))
    log("cache_vs_forward", round(cache / forward, 2))
    bytes_per_token = allocated_bytes(store.path) / pairs
    log("bytes_per_token", round(bytes_per_token))

    rss = [run_child([sys.executable, __file__, "--work", str(work), "--rss-child", str(n)], env)["peak_rss"]
           for n in (args.tokens, 5 * args.tokens)]
    log("rss_1x_mb", round(rss[0] / 2**20))
    log("rss_5x_mb", round(rss[1] / 2**20))
    log("rss_growth_ratio", round(rss[1] / rss[0], 3))

    model_config = CrosscoderConfig(n_snapshots=store.n_snapshots, d_model=store.d_model, dict_size=MEASURED["dict_size"])
    train_config = TrainConfig(n_steps=args.steps, batch_size=1024, eval_rows=0, init_norm_grid=(0.1,),
                               init_search_rows=1024, log_every=args.steps, compile=False)
    result = train_crosscoder(store, model_config, train_config, progress=False)
    crosscoder = result.tokens_per_second
    log("crosscoder_tokens_per_second", round(crosscoder))

    torchrun = str(Path(sys.executable).parent / "torchrun")
    speeds = {}
    for nproc in (1, 2):
        command = [torchrun, "--nproc_per_node", str(nproc), "-m", "crosslib.dictionaries.distributed", "--source", str(store.path),
                   "--model", json.dumps({"dict_size": 4096}), "--heads", str(nproc), "--backend", "gloo",
                   "--no-progress", "--train", json.dumps({"n_steps": 20, "batch_size": 1024, "eval_rows": 0,
                                                           "init_norm_grid": [0.1], "init_search_rows": 1024,
                                                           "log_every": 10, "compile": False})]
        speeds[nproc] = run_child(command, env)["tokens_per_second"]
    log("single_tokens_per_second", round(speeds[1]))
    log("sharded_tokens_per_second", round(speeds[2]))
    log("sharded_vs_single", round(speeds[2] / speeds[1], 2))

    # ---- the paper's configuration, scaled from the measurements above
    # Caching: per-token FLOPs of the truncated forward ∝ layers run × d² (12 d² per layer).
    cache_flops = lambda d, layers: (layers + 1) * 12 * d * d  # noqa: E731
    paper_cache_rate = cache * cache_flops(512, MEASURED["hook_layer"]) / cache_flops(PAPER["d_model"], PAPER["hook_layer"])
    paper_pairs = PAPER["tokens"] * PAPER["n_snapshots"]
    paper_bytes = paper_pairs * bytes_per_token * PAPER["d_model"] / MEASURED["d_model"]
    # Crosscoder: per-token FLOPs ∝ snapshots × d × features (encoder and decoder, forward and backward).
    paper_features = PAPER["expansion"] * PAPER["d_model"]
    paper_train_rate = crosscoder * (MEASURED["n_snapshots"] * MEASURED["d_model"] * MEASURED["dict_size"]) / (
        PAPER["n_snapshots"] * PAPER["d_model"] * paper_features)
    weights_gb = 162_322_944 * 2 * PAPER["n_snapshots"] / 1e9  # Pythia-160M's parameters in fp16, every snapshot
    parameters_gb = 2 * PAPER["n_snapshots"] * PAPER["d_model"] * paper_features * 4 / 1e9  # W_E, W_D fp32
    print()
    print("| the paper's configuration (Pythia-160M layer 6, 32x = 24,576 features, 154 snapshots, 800M tokens each) "
          "| on this machine |")
    print("| --- | --- |")
    print(f"| snapshot weights (fp16, 154 checkpoints) | {weights_gb:,.0f} GB |")
    print(f"| activation cache (fp16, {bytes_per_token * PAPER['d_model'] / MEASURED['d_model']:,.0f} B per token "
          f"and snapshot) | {paper_bytes / 1e12:,.0f} TB |")
    print(f"| caching: {paper_pairs:.3g} (token, snapshot) forwards at {paper_cache_rate:,.0f}/s "
          f"| {paper_pairs / paper_cache_rate / 3600:,.0f} hours |")
    print(f"| crosscoder parameters (fp32 W_E and W_D) | {parameters_gb:,.0f} GB (x4 with Adam's moments) |")
    print(f"| crosscoder training: 800M tokens at {paper_train_rate:,.1f} tokens/s | "
          f"{PAPER['tokens'] / paper_train_rate / 3600:,.0f} hours |")


if __name__ == "__main__":
    main()
