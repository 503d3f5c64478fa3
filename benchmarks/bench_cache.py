"""Activation-cache throughput and memory, side by side in one run on the same model and tokens.

    .venv/bin/python benchmarks/bench_cache.py                 # a random model of the tiny preset's shape
    .venv/bin/python benchmarks/bench_cache.py --suite data/suite/<key> --step 512

Measures, on one snapshot, the same token windows and the same batch size:

* cache      `crosslib.activations.cache.build_store`, end to end: load the checkpoint, run it up to the hook,
             convert, checksum and write the store (tokens/s);
* forward    a plain `transformers` full forward pass (logits) over the same batches;
* reference  TransformerLens on the same weights: ``run_with_cache(tokens, names_filter=[hook])``,
             its standard caching call (a full forward that keeps only the hook); also the call
             sae-lens's ActivationsStore makes, which adds ``stop_at_layer=L + 1`` (printed as
             ``cache_vs_saelens_style``);
* the two ways `crosslib.models.hooks.capture` stops early (own modules vs. an exception from a hook),
  and bf16 autocast against fp32 (speed and relative error);
* peak RSS (VmHWM) of building stores of two sizes, each in a fresh subprocess, and the anonymous
  memory (RssAnon) of streaming batches from each (the memory map's pages are page cache,
  shared and reclaimable, so they are reported apart).

Headline lines: ``cache_vs_forward: X`` and ``cache_vs_reference: Y`` (best of --repeats each,
measurements interleaved so that load from other processes hits all of them alike). One torch
thread by default: on a small shared machine a second thread mostly waits for the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from crosslib.runtime import THREADS_ENV, configure_process  # noqa: E402

TINY_SHAPE = dict(  # the tiny preset's shape (crosslib.models.suite.SUITE_PRESETS["tiny"])
    vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
    max_position_embeddings=128, rotary_pct=0.25, use_parallel_residual=True,
)


def make_random_suite(folder: Path, steps=(0, 1)) -> Path:
    """Random GPT-NeoX checkpoints of the tiny preset's shape, saved as step folders with checksums."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from crosslib.artifacts import sha256_file

    for step in steps:
        torch.manual_seed(step)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**TINY_SHAPE))
        out = folder / f"step{step}"
        model.save_pretrained(out, safe_serialization=True)
        sums = {name: sha256_file(out / name) for name in ("model.safetensors", "config.json")}
        (out / "checksums.json").write_text(json.dumps(sums))
    return folder


def tl_model(hf):
    """A TransformerLens HookedTransformer with the HF model's weights, unprocessed (same activations)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_neox_weights

    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, use_attn_scale=True, use_local_attn=False, scale_attn_by_inverse_layer_idx=False,
        parallel_attn_mlp=c.use_parallel_residual, positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=round(rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0)) * d_head),
        rotary_base=rope.get("rope_theta", getattr(c, "rotary_emb_base", 10000)), normalization_type="LN",
        default_prepend_bos=False, original_architecture="GPTNeoXForCausalLM", dtype=torch.float32, device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_neox_weights(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False,
    )
    return model.eval()


def batched(tokens: np.ndarray, batch_size: int):
    for start in range(0, len(tokens), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(tokens[start : start + batch_size], dtype=np.int64))


def _status(field: str) -> float:
    """A /proc/self/status memory field in MiB (VmHWM = this process's peak RSS since exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(args) -> None:
    """Build a store of --tokens tokens in a temp root, then stream batches; report memory."""
    from crosslib.activations.cache import CacheConfig, build_store

    torch.set_num_threads(args.threads)
    model_config = json.loads((Path(args.suite) / f"step{args.step}" / "config.json").read_text())
    context, vocab = int(model_config["max_position_embeddings"]), int(model_config["vocab_size"])
    tokens = np.random.default_rng(1).integers(0, vocab, size=(args.tokens // context, context), dtype=np.int32)
    with tempfile.TemporaryDirectory(dir=args.tmp) as root:
        config = CacheConfig(suite=args.suite, steps=(args.step,), hook=args.hook, dtype=args.dtype,
                             batch_size=args.batch_size)
        before = _status("VmRSS")  # imports, the model's config, the token windows (the input)
        store = build_store(config, tokens, root=root, progress=False)
        build_peak = _status("VmHWM")
        anon_before = _status("RssAnon")
        batches = store.batches(4096, seed=0)
        for _ in range(20):
            next(batches)
        print(json.dumps({"tokens": int(tokens.size), "build_peak_mib": build_peak, "before_mib": before,
                          "loader_anon_mib": _status("RssAnon") - anon_before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", help="folder of step{N}/ checkpoints (default: a random tiny-shape model)")
    parser.add_argument("--step", type=int, help="which step to use (default: the last)")
    parser.add_argument("--hook", default="blocks.2.hook_resid_post")
    parser.add_argument("--windows", type=int, default=256, help="context windows to cache")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-tokens", default="65536,524288", help="two token counts for the peak-RSS runs")
    parser.add_argument("--tmp", default=None, help="where temporary stores go")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ[THREADS_ENV] = "fixed"  # the thread count is this benchmark's to set
    configure_process()  # crosslib's allocator tuning, as `crosslib book` runs
    if args.rss_child:
        return rss_child(args)

    from crosslib.activations.cache import CacheConfig, build_store
    from crosslib.models.hooks import capture, parse_hook
    from crosslib.models.snapshots import list_steps, load_snapshot

    torch.set_num_threads(args.threads)
    workdir = tempfile.TemporaryDirectory(dir=args.tmp)
    suite = args.suite or str(make_random_suite(Path(workdir.name) / "suite"))
    step = args.step if args.step is not None else list_steps(suite)[-1]
    hf, _ = load_snapshot(suite, step, with_tokenizer=False)
    context = int(hf.config.max_position_embeddings)
    tokens = np.random.default_rng(0).integers(0, hf.config.vocab_size, size=(args.windows, context))
    n_tokens = tokens.size
    point = parse_hook(args.hook)
    print(f"model: {suite}@step{step}  d_model={hf.config.hidden_size} n_layers={hf.config.num_hidden_layers} "
          f"context={context}  hook={args.hook}")
    print(f"tokens: {args.windows} windows x {context} = {n_tokens:,}, batch {args.batch_size} windows, "
          f"{torch.get_num_threads()} threads, store dtype {args.dtype}")

    # -- correctness first: TransformerLens on the same weights gives the same logits and activation
    ref = tl_model(hf)
    probe = next(batched(tokens, 4))
    with torch.inference_mode():
        hf_logits = hf(probe).logits
        tl_logits, tl_cache = ref.run_with_cache(probe, names_filter=[args.hook])
        ours = capture(hf, args.hook, probe)
    logit_err = (hf_logits - tl_logits).abs().max().item()
    act_err = (ours - tl_cache[args.hook]).abs().max().item()
    print(f"check: max |logits HF - TL| = {logit_err:.2e}, max |activation ours - TL| = {act_err:.2e}")
    if logit_err > 1e-3 or act_err > 1e-3:
        sys.exit("TransformerLens and transformers disagree: the comparison would be meaningless")

    # -- timed runs, interleaved
    def run_cache() -> float:
        with tempfile.TemporaryDirectory(dir=args.tmp) as root:
            config = CacheConfig(suite=suite, steps=(step,), hook=args.hook, dtype=args.dtype,
                                 batch_size=args.batch_size)
            t0 = time.perf_counter()
            build_store(config, tokens, root=root, verify=False, progress=False)
            return time.perf_counter() - t0

    @torch.inference_mode()
    def run_forward() -> float:
        t0 = time.perf_counter()
        for ids in batched(tokens, args.batch_size):
            hf(ids, use_cache=False).logits
        return time.perf_counter() - t0

    @torch.inference_mode()
    def run_reference(saelens_style: bool = False) -> float:
        kwargs = dict(stop_at_layer=point.layer + 1) if saelens_style else {}  # as sae-lens computes it
        t0 = time.perf_counter()
        for ids in batched(tokens, args.batch_size):
            _, cache = ref.run_with_cache(ids, names_filter=[args.hook], prepend_bos=False, **kwargs)
            cache[args.hook].to(torch.float16)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def run_capture(method: str, autocast: bool = False) -> float:
        t0 = time.perf_counter()
        for ids in batched(tokens, args.batch_size):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                capture(hf, args.hook, ids, method=method).to(torch.float16)
        return time.perf_counter() - t0

    runs = {
        "cache": run_cache,
        "forward": run_forward,
        "reference": run_reference,
        "reference_saelens_style": lambda: run_reference(saelens_style=True),
        "capture_truncate": lambda: run_capture("truncate"),
        "capture_stop": lambda: run_capture("stop"),
        "capture_truncate_bf16": lambda: run_capture("truncate", autocast=True),
    }
    for fn in runs.values():  # warm up
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], fn())
    rate = {name: n_tokens / seconds for name, seconds in best.items()}
    print()
    print(f"{'path':<24}{'tokens/s':>12}")
    for name in runs:
        print(f"{name:<24}{rate[name]:>12,.0f}")

    # bf16 autocast: is it still the same activation?
    with torch.inference_mode():
        ids = next(batched(tokens, args.batch_size))
        exact = capture(hf, args.hook, ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approx = capture(hf, args.hook, ids).float()
    row_err = (approx - exact).norm(dim=-1) / exact.norm(dim=-1)
    elem_err = ((approx - exact).abs().max() / exact.abs().max()).item()
    fp16_err = ((exact.half().float() - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    print(f"bf16 autocast: x{rate['capture_truncate_bf16'] / rate['capture_truncate']:.2f} speed; relative error "
          f"per row max {row_err.max().item():.2e} (mean {row_err.mean().item():.2e}), max |err|/max|x| "
          f"{elem_err:.2e}; fp16 storage rounding alone: {fp16_err:.2e}")

    # peak RSS of building at two token counts, each in a fresh process
    rss = []
    for count in (int(x) for x in args.rss_tokens.split(",")):
        cmd = [sys.executable, __file__, "--rss-child", "--suite", suite, "--step", str(step), "--hook", args.hook,
               "--tokens", str(count), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
               "--threads", str(args.threads)] + (["--tmp", args.tmp] if args.tmp else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
        rss.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print()
    for r in rss:
        print(f"{r['tokens']:>10,} tokens: peak RSS building {r['build_peak_mib']:.0f} MiB "
              f"({r['build_peak_mib'] - r['before_mib']:+.0f} MiB over the process before the build); "
              f"anonymous memory added by 20 batches of 4096 rows {r['loader_anon_mib']:+.1f} MiB")
    item = 4 if args.dtype == "float32" else 2
    extra_activations = (rss[1]["tokens"] - rss[0]["tokens"]) * hf.config.hidden_size * item
    print(f"rss_growth: {rss[1]['build_peak_mib'] - rss[0]['build_peak_mib']:+.0f} MiB peak RSS for "
          f"{rss[1]['tokens'] / rss[0]['tokens']:.0f}x the tokens (the activations would be "
          f"{extra_activations / 2**20:.0f} MiB more)")
    print()
    print(f"capture_truncate_vs_stop: {rate['capture_truncate'] / rate['capture_stop']:.2f}")
    print(f"cache_vs_saelens_style: {rate['cache'] / rate['reference_saelens_style']:.2f}")
    print(f"cache_vs_forward: {rate['cache'] / rate['forward']:.2f}")
    print(f"cache_vs_reference: {rate['cache'] / rate['reference']:.2f}")
    workdir.cleanup()


if __name__ == "__main__":
    main()
