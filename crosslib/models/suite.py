"""Snapshot suites: a small Pythia-architecture model trained from scratch, saved on Pythia's schedule.

A suite is a folder of `step{N}/` Hugging Face checkpoints (safetensors + config + tokenizer +
checksums), the tokenized train/held-out corpus, the training log and `suite.json`. It is an
artifact keyed by its `SuiteConfig`, so asking for the same config again returns it at once,
and a killed training run resumes from its last checkpoint to the same weights.

    path = resolve_suite("tiny")              # trains on first use (about 10 minutes on 2 cores)
    model, tokenizer = load_snapshot(path, 512)

The same notebooks accept a hub id (``"EleutherAI/pythia-160m-deduped"``) or any local folder of
`step{N}/` checkpoints in place of a preset name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from crosslib.progress import progress as tqdm

from crosslib.artifacts import atomic_write_json, atomic_write_text, build_artifact, read_json, sha256_file
from crosslib.config import Config, ParameterError, content_hash, require, require_choice, require_fraction, require_positive
from crosslib.constants import pythia_schedule
from crosslib.machine import machine_description
from crosslib.models.cross_entropy import linear_cross_entropy
from crosslib.models.snapshots import CHECKSUMS_FILE, check_distinct_snapshots, is_local_suite, list_steps, step_dir
from crosslib.text.corpus import CorpusConfig, load_corpus
from crosslib.text.tokenizer import encode_documents, train_tokenizer

SUITE_FILE = "suite.json"
REPEAT_MODES = ("random-tokens", "random-span", "second-half")
PERIOD_SPACINGS = ("log", "linear")
LOG_FILE = "training_log.jsonl"
STATE_DIR = "train_state"
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass(frozen=True)
class SuiteConfig(Config):
    """Everything that determines a trained suite: corpus, tokenizer, model shape and training."""

    corpus: CorpusConfig = CorpusConfig()
    vocab_size: int = 4096
    # Model: GPT-NeoX as in Pythia (rotary on a quarter of each head, parallel residual).
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    context_length: int = 128
    rotary_pct: float = 0.25
    parallel_residual: bool = True
    # Training: AdamW, linear warmup then cosine decay to min_lr_ratio * lr.
    total_steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Share of training sequences that hold a repeated sequence. Plain Brown text does not grow an
    # induction head within a laptop budget (see chapter 1).
    repeat_fraction: float = 0.5
    # "random-tokens" (default): from a random place to the end of the window, a random sequence of
    #     frequent tokens (a period of ctx/32 to `repeat_period_max` × ctx tokens, log-uniform) repeats at
    #     least twice;
    # "random-span": a span of the text (1/8 to 1/2 of the window) copied to a random later place;
    # "second-half": the second half repeats the first (a fixed distance: teaches positional copying).
    repeat_mode: str = "random-tokens"
    # "random-tokens" draws from this many most frequent tokens of the training split.
    repeat_vocab: int = 256
    # The longest "random-tokens" period as a share of the context, and how periods are drawn between
    # the shortest and it: "log" (log-uniform: as many periods of 4-8 tokens as of 32-64) or "linear".
    repeat_period_max: float = 0.5
    repeat_period_spacing: str = "log"
    # Checkpoints: 0, 1, 2, 4, ..., 512, then every `linear_every` steps (Pythia's schedule).
    linear_every: int = 250
    checkpoint_every: int = 100  # resumable training state, independent of the snapshots
    # fp32 by default: bf16 autocast is 1.35x faster on an AVX-512-BF16 core, but 12x slower on an
    # AVX2-only one (no bf16 instructions), and its rounding differs between AMX, AVX-512 and AVX2.
    bf16: bool = False
    seed: int = 0

    # The training code's version, where it changes the weights without changing a field (suites trained
    # before are trained again): 2 = the loss computed chunk by chunk (`next_token_loss`) and SDPA attention.
    TRAINING_CODE: ClassVar[int] = 2

    def key(self) -> str:
        return content_hash({"type": type(self).__name__, "config": self.to_dict(), "training_code": self.TRAINING_CODE})

    def validate(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "d_mlp", "context_length",
                     "total_steps", "batch_size", "linear_every", "checkpoint_every", "lr"):
            require_positive(name, getattr(self, name))
        require(self.d_model % self.n_heads == 0, "n_heads", self.n_heads, f"a divisor of d_model={self.d_model}")
        require(self.context_length % 2 == 0, "context_length", self.context_length, "an even number")
        require(0 <= self.repeat_fraction <= 1, "repeat_fraction", self.repeat_fraction, "a number in [0, 1]")
        require_choice("repeat_mode", self.repeat_mode, REPEAT_MODES)
        require_choice("repeat_period_spacing", self.repeat_period_spacing, PERIOD_SPACINGS)
        require(isinstance(self.repeat_vocab, int) and 2 <= self.repeat_vocab <= self.vocab_size, "repeat_vocab",
                self.repeat_vocab, f"an integer in 2..vocab_size={self.vocab_size}")
        require_fraction("rotary_pct", self.rotary_pct, open_interval=False)
        require(0 < self.repeat_period_max <= 0.5, "repeat_period_max", self.repeat_period_max,
                "a share of the context in (0, 0.5] (a repeat needs two copies)")
        require(0 <= self.warmup_steps < self.total_steps, "warmup_steps", self.warmup_steps,
                f"0 <= warmup_steps < total_steps={self.total_steps}")
        require(self.vocab_size >= 300, "vocab_size", self.vocab_size, "at least 300 (256 bytes + merges)")

    @property
    def steps(self) -> list[int]:
        return pythia_schedule(self.total_steps, self.linear_every)

    def model_config(self, eos_token_id: int):
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.d_model,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            intermediate_size=self.d_mlp,
            max_position_embeddings=self.context_length,
            rotary_pct=self.rotary_pct,
            use_parallel_residual=self.parallel_residual,
            tie_word_embeddings=False,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
        )


SUITE_PRESETS: dict[str, SuiteConfig] = {
    "tiny": SuiteConfig(),
    "smoke": SuiteConfig(
        corpus=CorpusConfig(max_documents=40),
        vocab_size=512, n_layers=2, d_model=32, n_heads=2, d_mlp=128, context_length=32,
        total_steps=48, batch_size=8, lr=3e-3, warmup_steps=4, linear_every=16, checkpoint_every=8,
    ),
}


def lr_at(step: int, config: SuiteConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def frequent_tokens(tokens: np.ndarray, n: int) -> np.ndarray:
    """The `n` most frequent token ids of a stream, most frequent first (ties: smaller id first)."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    return np.argsort(-counts, kind="stable")[:n]


def repeat_periods(config: SuiteConfig) -> tuple[int, int]:
    """The shortest and longest period of a "random-tokens" repeat: ctx/32 to `repeat_period_max` × ctx tokens.

    Both ends matter (each measured on the tiny suite). With periods up to ctx/8 only (our first
    default), the induction score dipped below zero just before induction formed, as if the model first
    learnt to copy from short distances, which fails on chapter 1's longer test repeats (ctx/4 tokens);
    on an AMX CPU one run stayed there (-2.5 nats at step 2000). With periods drawn uniformly up to
    ctx/2, no induction head formed in 2000 steps (two seeds): short repeats with many copies are
    what starts it. Log-uniform periods (`repeat_period_spacing="log"`) keep both.
    """
    ctx = config.context_length
    shortest = max(2, ctx // 32)
    return shortest, max(shortest, int(ctx * config.repeat_period_max))


def training_batch(tokens: np.ndarray, step: int, config: SuiteConfig, pool: np.ndarray | None = None) -> torch.Tensor:
    """The batch of training step `step`: a pure function of (seed, step), so resuming is exact.

    Random windows of the training stream; a `repeat_fraction` share of them hold a repeat
    (`repeat_mode`). Copying pays off there, which is what grows an induction head; the distance
    between copies varies, so a fixed-offset shortcut does not work (with the copy always at half
    the window, our first suite learnt to copy from exactly that distance and nothing else).

    "random-tokens" repeats random tokens rather than text: nothing but a copy predicts them, so
    the gradient towards copying is not diluted by what n-grams already predict, and a small pool
    of frequent tokens (`repeat_vocab`, `pool` when precomputed) gives each token's matching enough
    practice. On the tiny suite this turns induction on within the 2000 steps; repeated text did not.
    """
    rng = np.random.default_rng([config.seed, step])
    ctx, n = config.context_length, config.batch_size
    starts = rng.integers(0, len(tokens) - ctx, size=n)
    batch = np.stack([tokens[s : s + ctx] for s in starts]).astype(np.int64)
    repeated = rng.random(n) < config.repeat_fraction
    # Draw every row's span and places (used or not) so the random stream does not depend on which rows repeat.
    lengths = rng.integers(max(1, ctx // 8), ctx // 2 + 1, size=n)
    source = (rng.random(n) * (ctx - 2 * lengths + 1)).astype(np.int64)
    target = source + lengths + (rng.random(n) * (ctx - source - 2 * lengths + 1)).astype(np.int64)
    if config.repeat_mode == "random-tokens":
        pool = frequent_tokens(tokens, config.repeat_vocab) if pool is None else pool
        shortest, longest = repeat_periods(config)
        if config.repeat_period_spacing == "log":
            periods = np.exp(rng.uniform(np.log(shortest), np.log(longest + 1), size=n)).astype(np.int64)
        else:
            periods = rng.integers(shortest, longest + 1, size=n)
        begin = (rng.random(n) * (ctx - 2 * periods + 1)).clip(0).astype(np.int64)  # at least 2 periods fit
        motifs = pool[rng.integers(0, len(pool), size=(n, ctx))]
        for row in np.flatnonzero(repeated):
            batch[row, begin[row]:] = np.resize(motifs[row, : periods[row]], ctx - begin[row])
        return torch.from_numpy(batch)
    if config.repeat_mode == "second-half":
        lengths, source, target = np.full(n, ctx // 2), np.zeros(n, np.int64), np.full(n, ctx // 2)
    for row in np.flatnonzero(repeated):
        length, a, b = lengths[row], source[row], target[row]
        batch[row, b : b + length] = batch[row, a : a + length]
    return torch.from_numpy(batch)


def suite_optimizer(model: torch.nn.Module, config: SuiteConfig) -> torch.optim.AdamW:
    """AdamW as the suite trains: weight decay on matrices only (not on biases or layer-norm gains)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


class _LayerNormColumnSums(torch.autograd.Function):
    """torch's layer norm with its γ and β gradients computed as column sums.

    torch's own backward splits those sums over the rows among threads, so their rounding, and after
    2000 steps the whole suite, depended on the thread count. Column sums run one column per thread,
    the same at any count; so does every other product of a training step (tests/models/test_suite.py).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, weight.shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, _, _ = torch.ops.aten.native_layer_norm_backward(grad_out, x, weight.shape, mean, rstd, weight,
                                                                 bias, [True, False, False])  # row by row
        rows = grad_out.reshape(-1, weight.numel())
        normalized = ((x - mean) * rstd).reshape(-1, weight.numel())
        return grad_x, (rows * normalized).sum(0), rows.sum(0), None


def thread_invariant_layer_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model`'s LayerNorms train the same at any thread count (`_LayerNormColumnSums`); same forward
    values, same weights and state dict, so checkpoints are unchanged in form."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.forward = lambda x, m=module: _LayerNormColumnSums.apply(x, m.weight, m.bias, m.eps)
    return model


def initial_model(config: SuiteConfig, eos_token_id: int, *, thread_invariant: bool = True):
    """The untrained model of `config`, as its training starts (seeded; `thread_invariant_layer_norms`
    unless `thread_invariant=False`, the tests' control)."""
    from transformers import GPTNeoXForCausalLM

    model_config = config.model_config(eos_token_id)
    # SDPA attention in fp32 (no [batch, head, position, position] scores in memory; as fast as eager here);
    # eager with bf16 autocast, where SDPA's CPU backward is slow
    model_config._attn_implementation = "eager" if config.bf16 else "sdpa"
    torch.manual_seed(config.seed)
    model = GPTNeoXForCausalLM(model_config)
    return thread_invariant_layer_norms(model) if thread_invariant else model


def next_token_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The suite's training loss: `model(input_ids=ids, labels=ids).loss` (each position predicts the next
    token; mean cross-entropy), with the output projection and the cross-entropy in one chunked pass
    (`crosslib.models.cross_entropy`) instead of [token, vocab] logits in memory."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # [batch, position, d]
    predicting = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # the last position has no next token
    return linear_cross_entropy(predicting, model.get_output_embeddings().weight, input_ids[:, 1:].reshape(-1))


def training_step(model, optimizer: torch.optim.Optimizer, batch: torch.Tensor, config: SuiteConfig
                  ) -> tuple[float, float]:
    """One update of the suite's training on `batch` (loss, backward, gradient clipping, AdamW); returns the loss
    and the gradient norm before clipping. A loss that is not finite raises FloatingPointError before any update."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        loss = next_token_loss(model, batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()}")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), grad_norm.item()


def _save_snapshot(model, tokenizer_dir: Path, out: Path) -> None:
    """Write `out` (a step{N} folder) atomically: model, tokenizer, then checksums of both."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp / f.name)
    sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    atomic_write_json(tmp / CHECKSUMS_FILE, sums)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _save_state(model, optimizer, step: int, folder: Path) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    atomic_write_json(tmp / "state.json", {"step": step})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _load_state(model, optimizer, folder: Path) -> int:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(folder / "model.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return int(read_json(folder / "state.json")["step"])


def _read_log(path: Path, before_step: int) -> list[str]:
    if not path.is_file():
        return []
    return [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < before_step]


class _Interrupted(Exception):
    pass


def _build_suite(folder: Path, config: SuiteConfig, progress: bool, interrupt_after: int | None) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar for training, not one per saved checkpoint

    tokenizer_dir = folder / TOKENIZER_DIR
    if not (tokenizer_dir / "tokenizer.json").is_file() or not (folder / "tokens_heldout.npy").is_file():
        corpus = load_corpus(config.corpus)
        tmp = folder / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = train_tokenizer(corpus.train, config.vocab_size, tmp)
        for split, docs in (("train", corpus.train), ("heldout", corpus.heldout)):
            np.save(folder / f"tokens_{split}.npy", encode_documents(tokenizer, docs))
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
        os.replace(tmp, tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_tokens = np.load(folder / "tokens_train.npy", mmap_mode="r")
    if len(train_tokens) < 2 * config.context_length:
        raise ParameterError(f"corpus={config.corpus.source!r} is too small for context_length={config.context_length}")

    model = initial_model(config, tokenizer.eos_token_id)
    optimizer = suite_optimizer(model, config)
    start = 0
    if (folder / STATE_DIR / "state.json").is_file():
        start = _load_state(model, optimizer, folder / STATE_DIR)
    log_lines = _read_log(folder / LOG_FILE, start)
    snapshots = set(config.steps)
    pool = frequent_tokens(train_tokens, config.repeat_vocab)
    t0 = time.perf_counter()
    bar = tqdm(range(start, config.total_steps + 1), initial=start, total=config.total_steps + 1,
               desc="training suite", disable=not progress, mininterval=1.0)
    model.train()
    for step in bar:
        if step in snapshots:  # weights after `step` optimizer updates
            _save_snapshot(model, tokenizer_dir, step_dir(folder, step))
        if step == config.total_steps:
            break
        if step % config.checkpoint_every == 0 and step > start:
            atomic_write_text(folder / LOG_FILE, "".join(line + "\n" for line in log_lines))
            _save_state(model, optimizer, step, folder / STATE_DIR)
        if interrupt_after is not None and step >= start + interrupt_after:
            raise _Interrupted(step)
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            loss, grad_norm = training_step(model, optimizer, training_batch(train_tokens, step, config, pool), config)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} at step {step}; last checkpoint kept") from None
        log_lines.append(json.dumps({"step": step, "loss": round(loss, 5), "lr": lr, "grad_norm": round(grad_norm, 4)}))
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    atomic_write_text(folder / LOG_FILE, "".join(line + "\n" for line in log_lines))
    shutil.rmtree(folder / STATE_DIR, ignore_errors=True)
    n_params = sum(p.numel() for p in model.parameters())
    atomic_write_json(folder / SUITE_FILE, {
        "steps": config.steps, "n_parameters": n_params,
        "train_tokens": int(len(train_tokens)),
        "heldout_tokens": int(len(np.load(folder / "tokens_heldout.npy", mmap_mode="r"))),
        "tokens_seen": config.total_steps * config.batch_size * config.context_length,
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        # the same seed can train differently on another CPU (bf16 kernels round differently): say where it ran
        "precision": "bf16 autocast" if config.bf16 else "fp32",
        "machine": machine_description(),
    })


def describe_training(suite: str | os.PathLike) -> str:
    """One sentence on how a crosslib suite was trained (precision, CPU): bf16 kernels round differently on
    AVX2, AVX-512 and AMX, so a run's numbers can differ from another machine's. Not the thread count,
    which changes no weight (`thread_invariant_layer_norms`)."""
    record = suite_record(suite)
    machine = record.get("machine")
    if not machine:
        return "" if not is_local_suite(suite) else "Its training precision and CPU were not recorded."
    cpu = f"ATen {machine['aten_cpu_capability']} kernels" + (
        f", oneDNN capped at {machine['onednn_max_cpu_isa']}" if machine.get("onednn_max_cpu_isa") else "")
    features = ", ".join(name for name, on in (("AMX", machine.get("amx_bf16")), ("AVX-512-BF16", machine.get("avx512_bf16"))) if on)
    return (f"It was trained with {record.get('precision', 'unrecorded precision')} on a CPU with {cpu}"
            f"{' (' + features + ')' if features else ''}.")


def suite_record(suite: str | os.PathLike) -> dict[str, Any]:
    """A crosslib-trained suite's `suite.json` (parameters, tokens, precision, machine); {} for other suites."""
    path = Path(suite) / SUITE_FILE
    return read_json(path) if is_local_suite(suite) and path.is_file() else {}


def train_suite(config: SuiteConfig, *, root: str | os.PathLike | None = None, progress: bool = True,
                interrupt_after: int | None = None) -> Path:
    """Train (or find) the suite for `config`; returns its folder of `step{N}/` checkpoints.

    `interrupt_after` stops the run after that many optimizer steps, as a kill would (for tests).
    """
    try:
        return build_artifact("suite", config,
                              lambda folder: _build_suite(folder, config, progress, interrupt_after), root)
    except _Interrupted as stopped:
        raise KeyboardInterrupt(f"suite training interrupted at step {stopped.args[0]}") from None


def resolve_suite(suite: str | os.PathLike, overrides: dict[str, Any] | None = None,
                  root: str | os.PathLike | None = None) -> str:
    """A suite reference as notebooks take it → something `load_snapshot` accepts.

    A preset name (``"tiny"``, ``"smoke"``) is trained on first use, with `overrides` applied to
    its config; a folder of `step{N}/` checkpoints or a hub id is returned as it is.
    """
    name = str(suite)
    if name in SUITE_PRESETS:
        return str(train_suite(SUITE_PRESETS[name].replace(**(overrides or {})), root=root))
    if overrides:
        raise ParameterError(f"suite_overrides only apply to the presets {sorted(SUITE_PRESETS)}, not to {name!r}")
    if is_local_suite(name) or "/" in name and not name.startswith((".", "/")):
        list_steps(name)  # fails early with a clear message
        return name
    raise ParameterError(
        f"suite={name!r} is not allowed: use a preset {sorted(SUITE_PRESETS)}, a folder of step{{N}}/ "
        "checkpoints, or a hub id such as 'EleutherAI/pythia-70m-deduped'"
    )


def suite_config(suite: str | os.PathLike) -> SuiteConfig | None:
    """The config a crosslib-trained suite was built from (None for other suites)."""
    path = Path(suite) / "config.json"
    return SuiteConfig.from_dict(read_json(path)) if is_local_suite(suite) and path.is_file() else None


def training_log(suite: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(suite) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def corpus_tokens(suite: str | os.PathLike, split: str = "heldout") -> np.ndarray:
    """The token stream of a crosslib suite's corpus split (memory-mapped)."""
    if split not in ("train", "heldout"):
        raise ParameterError(f"split={split!r} is not allowed: choose 'train' or 'heldout'")
    path = Path(suite) / f"tokens_{split}.npy"
    if not path.is_file():
        raise ParameterError(
            f"suite={str(suite)!r} has no tokenized corpus (tokens_{split}.npy); for hub suites tokenize a "
            "corpus with crosslib.text.tokenizer.encode_documents and pass the windows yourself"
        )
    return np.load(path, mmap_mode="r", allow_pickle=False)


@dataclasses.dataclass(frozen=True)
class TokenStreamKey(Config):
    corpus: CorpusConfig
    tokenizer: str  # sha256 of the tokenizer's serialised form


def suite_token_streams(suite: str | os.PathLike, corpus: "CorpusConfig | str | dict[str, Any] | None" = None
                        ) -> dict[str, np.ndarray]:
    """Train and held-out token streams for `suite` (`corpus` as `as_corpus_config` takes it).

    A crosslib suite with no `corpus` given uses its own corpus and tokenization. Otherwise the
    corpus (default: Brown) is tokenized with the suite's own tokenizer (for Pythia, Pythia's) and
    cached by content.
    """
    corpus = as_corpus_config(corpus)
    if corpus is None and (Path(suite) / "tokens_heldout.npy").is_file():
        return {split: corpus_tokens(suite, split) for split in ("train", "heldout")}
    from crosslib.artifacts import sha256_bytes
    from crosslib.models.snapshots import load_tokenizer

    tokenizer = load_tokenizer(suite)
    corpus = corpus or CorpusConfig()
    key = TokenStreamKey(corpus, sha256_bytes(tokenizer.backend_tokenizer.to_str().encode()))

    def build(folder: Path) -> None:
        documents = load_corpus(corpus)
        for split, docs in (("train", documents.train), ("heldout", documents.heldout)):
            np.save(folder / f"tokens_{split}.npy", encode_documents(tokenizer, docs))

    folder = build_artifact("tokens", key, build)
    return {split: np.load(folder / f"tokens_{split}.npy", mmap_mode="r", allow_pickle=False)
            for split in ("train", "heldout")}


def token_windows(tokens: np.ndarray, n_windows: int, context_length: int, seed: int = 0) -> np.ndarray:
    """`n_windows` non-overlapping windows of `context_length` tokens, at seeded random places."""
    require_positive("n_windows", n_windows)
    available = len(tokens) // context_length
    require(n_windows <= available, "n_windows", n_windows,
            f"at most {available} windows of {context_length} tokens fit in this split")
    chosen = np.sort(np.random.default_rng(seed).choice(available, size=n_windows, replace=False))
    return np.stack([tokens[i * context_length : (i + 1) * context_length] for i in chosen]).astype(np.int64)


def iter_steps(suite: str | os.PathLike, steps: list[int] | None = None, *,
               on_duplicate: str | None = None) -> Iterator[int]:
    """The requested steps of `suite` (default: all), checked to exist and to be distinct snapshots.

    Two steps with an identical weight file are refused, or only warned about with
    `on_duplicate="warn"` (see `crosslib.models.snapshots.check_distinct_snapshots`).
    """
    available = list_steps(suite)
    chosen = list(steps if steps is not None else available)
    for step in chosen:
        if step not in available:
            raise ParameterError(f"steps contains {step!r}, which suite {str(suite)!r} lacks: available {available}")
    check_distinct_snapshots(suite, chosen, on_duplicate=on_duplicate)
    yield from chosen


# Documents read from a streamed `hf:` corpus given by name alone (pass a mapping to choose).
HF_DEFAULT_DOCUMENTS = 50_000


def as_corpus_config(corpus: "str | dict[str, Any] | CorpusConfig | None") -> CorpusConfig | None:
    """A chapter's `corpus` parameter → a `CorpusConfig` (None: the suite's own corpus, Brown for others).

    Accepts a registry corpus name (``"brown"``, ``"sotu"``, ``"kjv"``), a local ``.txt``/``.jsonl``
    file or folder of ``.txt`` files, ``"hf:<dataset>"`` (streamed; its first
    `HF_DEFAULT_DOCUMENTS` documents), or a mapping of `CorpusConfig` fields such as
    ``{"source": "hf:monology/pile-uncopyrighted", "max_documents": 200000}``.
    """
    if corpus is None or isinstance(corpus, CorpusConfig):
        return corpus
    allowed = ("None (the suite's own corpus), a registry corpus ('brown', 'sotu', 'kjv'), a local .txt/.jsonl "
               "file or folder, 'hf:<dataset>', or a mapping of CorpusConfig fields")
    if isinstance(corpus, str):
        fields: dict[str, Any] = {"source": corpus}
        if corpus.startswith("hf:"):
            fields["max_documents"] = HF_DEFAULT_DOCUMENTS
    elif isinstance(corpus, dict):
        fields = dict(corpus)
        unknown = sorted(set(fields) - set(CorpusConfig.field_names()))
        require(not unknown, "corpus", corpus, f"a mapping with fields from {CorpusConfig.field_names()}")
        if str(fields.get("source", "")).startswith("hf:"):
            fields.setdefault("max_documents", HF_DEFAULT_DOCUMENTS)
    else:
        raise ParameterError(f"corpus={corpus!r} is not allowed: use {allowed}")
    try:
        return CorpusConfig(**fields)
    except ParameterError as e:
        raise ParameterError(f"corpus={corpus!r} is not allowed ({e})") from None


def corpus_name(suite: str | os.PathLike, corpus: CorpusConfig | None) -> str:
    """How messages name the corpus a suite's token streams come from."""
    own = suite_config(suite) if corpus is None else None
    return f"corpus {(corpus or (own.corpus if own else CorpusConfig())).source!r}"


def windows_for_tokens(tokens: np.ndarray, n_tokens: int, context_length: int, seed: int = 0, *,
                       split: str = "heldout", corpus_name: str = "the suite's corpus") -> np.ndarray:
    """`n_tokens // context_length` seeded random windows of a split, or one error naming `n_tokens`
    that says how many tokens the split holds and how to get more."""
    n_windows = n_tokens // context_length
    if n_windows < 2:
        raise ParameterError(f"n_tokens={n_tokens} is not allowed: at least two windows of {context_length} tokens "
                             f"({2 * context_length} tokens)")
    available = len(tokens) // context_length
    if n_windows > available:
        other = "'train'" if split == "heldout" else "'heldout'"
        raise ParameterError(
            f"n_tokens={n_tokens:,} is not allowed: the {split!r} split of {corpus_name} holds {len(tokens):,} "
            f"tokens ({available:,} windows of {context_length}), so at most n_tokens={available * context_length:,}. "
            f"Use a larger corpus (corpus='hf:monology/pile-uncopyrighted' streamed, or a local .jsonl/.txt file or "
            f"folder), the other split (split={other}), or fewer tokens"
        )
    return token_windows(tokens, n_windows, context_length, seed)
