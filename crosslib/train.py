"""Training crosscoders and SAEs: the paper's recipe, resumable, deterministic, cached by content.

    result = train_crosscoder(source, CrosscoderConfig(n_snapshots=S, d_model=d, dict_size=F),
                              TrainConfig(n_steps=2000), out_dir="runs/cc")        # resumes if killed
    result = train_crosscoder_cached(source, model_config, train_config)           # keyed by content
    result.model, result.history, result.eval, result.path

Recipe (the book's Methods page, section Initialisation and optimiser): Adam (0.9, 0.999), no weight
decay; lr warms up linearly over the first `lr_warmup_fraction` of the steps, stays constant, then
decays linearly over the last `lr_decay_fraction` (20%) to lr/32; the log-thresholds learn at
`threshold_lr_factor` (0.1) × lr; λ warms up linearly over the first 10% of the steps.
Initialisation: one random decoder direction per feature shared by all snapshots, W_E = W_Dᵀ,
biases zero, and the decoder norm picked from `init_norm_grid` by the smallest reconstruction MSE
on `init_search_rows` rows.

Scale: the authors used lr 5e-5, λ 0.3 and batch 2048 for 800M tokens per snapshot (~400k steps).
Our tiny runs take a few thousand steps, so the default lr is higher (1e-3, as is usual for SAEs
trained for ~1e3–1e4 steps); λ and batch keep the paper's values.

bf16 (`bf16=True`, the default): the matmuls (encoder, decoder and their gradients) run under
`torch.autocast(dtype=bfloat16)`: their inputs are rounded to bf16 (8-bit mantissa, ~0.4% relative
error), h and f are held in bf16; the gate, the penalty and the reconstruction error are computed
in fp32 from those values, and the weights, gradients and Adam state stay fp32. On CPUs with
AVX512-BF16/AMX the matmuls run ~2x faster. Measured on the same data (S=4, d=128, F=1024, 400
steps): loss within 0.02%, explained variance within 0.002 and L0 within 0.4 of the fp32 run.
`compile` (automatic for big runs) fuses the elementwise gate/penalty/error passes with torch.compile;
it sets `compiled` in the run's `crosslib.kernels.KernelOptions`, the model's one kernel switch.

Sparse products (CPU, automatic): once at most `crosslib.kernels.sparse_density_limit()` of f's
entries are non-zero (3.5% with one thread, 1.75% with two), a step computes the decoder, the W_D
gradient (and, for SAEs, the W_E gradient), the penalty and most of the gate's gradients over the
active positions only, in fp32 accumulators; the encoder and ∂f stay dense. Same values as the dense
products to rounding (tests/test_crosscoder.py); at d=128, F=2048 and L0 ≈ 25 an SAE step takes
about half the time (benchmarks/bench_train.py). `train_crosscoder(..., kernels=KernelOptions(sparse=False))`
turns them off.

Exact resume: batch k of the source is a pure function of (seed, k), the schedule is a function of
the step, and a checkpoint holds the weights, Adam's state, the step, the metric history and the
running metric window; so a run killed and resumed from its last checkpoint ends bit-for-bit equal
to an uninterrupted one (on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import safetensors.torch
import torch
from torch import Tensor
from crosslib.progress import progress as tqdm

from crosslib.artifacts import (ArtifactError, atomic_write_bytes, atomic_write_json, build_artifact, read_json,
                                sha256_bytes)
from crosslib.config import Config, ParameterError, require, require_fraction, require_positive
from crosslib.crosscoder import Crosscoder, CrosscoderConfig, model_fingerprint
from crosslib.kernels import KernelOptions
from crosslib.sources import source_fingerprint

CHECKPOINT_JSON = "checkpoint.json"
# compile=None compiles when steps × batch × snapshots × features reaches this: eager kernels cost ~10 ns
# per element-step more than compiled ones on a laptop core, so 2e9 (~20 s) pays back a ~20 s compilation
# (an SAE with F=2048 on 1500 batches of 2048 is 6e9; a 16-snapshot crosscoder 1e11; unit tests ≤ 1e8).
COMPILE_AUTO_ELEMENTS = 2_000_000_000
METRICS_FILE = "metrics.json"
FIRING_FILE = "firing_counts.safetensors"  # evaluate()'s firing counts per (snapshot, feature)
FIRING_COUNTS = "firing_counts"
TRAIN_FILE = "train.json"
ARTIFACT_KIND = "dictionaries"


class DataError(ValueError):
    """The activations read from a source are unusable (NaN or infinite values)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; `step` says when. The last good checkpoint is kept."""

    def __init__(self, message: str, step: int, checkpoint_step: int | None):
        super().__init__(message)
        self.step = step
        self.checkpoint_step = checkpoint_step


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """How to train a crosscoder (every field changes the result, so every field is in its cache key)."""

    n_steps: int = 2000
    n_tokens: int | None = None  # if set, n_steps = ceil(n_tokens / batch_size)
    batch_size: int = 2048
    lr: float = 1e-3
    lr_warmup_fraction: float = 0.01
    lr_decay_fraction: float = 0.2
    lr_end_factor: float = 1 / 32
    sparsity_coefficient: float = 0.3  # λ
    sparsity_warmup_fraction: float = 0.1
    threshold_lr_factor: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    seed: int = 0
    init_norm_grid: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    init_search_rows: int = 4096
    log_every: int = 50
    checkpoint_every: int = 500
    eval_rows: int = 8192  # held-out rows for the final metrics (0: skip)
    bf16: bool = True  # matmuls under bf16 autocast (see the module docstring; same loss/EV as fp32 to ~0.1%)
    compile: bool | None = None  # torch.compile the fused elementwise kernels: ~3x faster steps for ~20 s of
    # compilation per process and shape (cached on disk). None: only when the run is big enough to gain
    # (see COMPILE_AUTO_ELEMENTS) and a C++ compiler is installed; eager otherwise.

    def validate(self) -> None:
        for name in ("n_steps", "batch_size", "log_every", "checkpoint_every", "init_search_rows"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                    "a positive integer")
        require(self.n_tokens is None or (isinstance(self.n_tokens, int) and self.n_tokens > 0), "n_tokens",
                self.n_tokens, "None or a positive integer")
        require_positive("lr", self.lr)
        require(isinstance(self.sparsity_coefficient, (int, float)) and math.isfinite(self.sparsity_coefficient)
                and self.sparsity_coefficient >= 0, "sparsity_coefficient", self.sparsity_coefficient, "a number >= 0")
        for name in ("lr_warmup_fraction", "lr_decay_fraction", "sparsity_warmup_fraction"):
            require_fraction(name, getattr(self, name), open_interval=False)
        require(self.lr_warmup_fraction + self.lr_decay_fraction <= 1, "lr_decay_fraction", self.lr_decay_fraction,
                "at most 1 - lr_warmup_fraction")
        require(0 < self.lr_end_factor <= 1, "lr_end_factor", self.lr_end_factor, "a number in (0, 1]")
        require_positive("threshold_lr_factor", self.threshold_lr_factor)
        for name in ("adam_beta1", "adam_beta2"):
            require_fraction(name, getattr(self, name), open_interval=False)
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        require(isinstance(self.init_norm_grid, tuple) and len(self.init_norm_grid) > 0
                and all(isinstance(v, (int, float)) and v > 0 for v in self.init_norm_grid),
                "init_norm_grid", self.init_norm_grid, "a non-empty tuple of positive numbers")
        require(isinstance(self.eval_rows, int) and self.eval_rows >= 0, "eval_rows", self.eval_rows, "an integer >= 0")
        require(self.compile is None or isinstance(self.compile, bool), "compile", self.compile,
                "None (automatic), True or False")
        require(isinstance(self.bf16, bool), "bf16", self.bf16, "True or False")

    def use_compile(self, model_config: CrosscoderConfig) -> bool:
        """Whether this run compiles its kernels (`compile`, or for None: big enough and a compiler present)."""
        if self.compile is not None:
            return self.compile
        elements = self.total_steps * self.batch_size * model_config.n_snapshots * model_config.dict_size
        return elements >= COMPILE_AUTO_ELEMENTS and any(shutil.which(c) for c in ("c++", "g++", "clang++"))

    def kernel_options(self, model_config: CrosscoderConfig, kernels: KernelOptions = KernelOptions()) -> KernelOptions:
        """The kernels this run trains with: `kernels` (fused, sparse) with `compiled` per `compile`."""
        return kernels.replace(compiled=self.use_compile(model_config))

    @property
    def total_steps(self) -> int:
        return self.n_steps if self.n_tokens is None else math.ceil(self.n_tokens / self.batch_size)

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) step `step`: warmup → constant → linear decay to lr·lr_end_factor."""
        n = self.total_steps
        warmup = round(self.lr_warmup_fraction * n)
        decay = round(self.lr_decay_fraction * n)
        if warmup and step < warmup:
            return self.lr * (step + 1) / warmup
        if decay and step >= n - decay:
            progress = (step - (n - decay) + 1) / decay  # reaches 1 at the last step
            return self.lr * (1 - progress * (1 - self.lr_end_factor))
        return self.lr

    def sparsity_coefficient_at(self, step: int) -> float:
        warmup = round(self.sparsity_warmup_fraction * self.total_steps)
        return self.sparsity_coefficient * min(1.0, (step + 1) / warmup) if warmup else self.sparsity_coefficient


@dataclasses.dataclass
class TrainResult:
    model: Crosscoder
    history: list[dict[str, Any]]  # one entry every log_every steps
    eval: dict[str, Any]  # metrics on held-out rows at the end ({} if eval_rows=0)
    path: Path | None  # where the model and metrics are saved
    init: dict[str, Any]  # the decoder-norm search: {"decoder_norm": chosen, "mse": {norm: mse}}
    seconds: float = 0.0  # wall time of this call's training loop (no init search, no eval)
    steps_run: int = 0  # steps this call ran (fewer than n_steps when resumed or stopped)
    tokens_per_second: float = 0.0  # rows (tokens) per second of that loop; from the stored record on a cache hit
    firing_counts: Tensor | None = None  # [snapshot, feature]: held-out rows on which each feature fires (evaluate)


# ----------------------------------------------------------------------------------- helpers

def _check_compatible(source: Any, config: CrosscoderConfig, parallel: Any = None) -> None:
    s_source = parallel.n_snapshots_total if parallel is not None else source.n_snapshots
    if s_source != config.n_snapshots:
        raise ParameterError(f"n_snapshots={config.n_snapshots} (model) does not match the source's "
                             f"{s_source} snapshots (steps {getattr(source, 'steps', '?')}): make them equal")
    if source.d_model != config.d_model:
        raise ParameterError(f"d_model={config.d_model} (model) does not match the source's d_model={source.d_model}")


def check_finite(batch: Tensor, what: str, steps: list[int] | None = None) -> None:
    """Raise DataError naming the snapshots with NaN/inf values in `batch` [rows, snapshot, d_model]."""
    if bool(torch.isfinite(batch.sum())):  # one pass: any NaN/inf makes the sum non-finite
        return
    finite = torch.isfinite(batch)
    if bool(finite.all()):  # the sum overflowed, the values are fine
        return
    bad = (~finite).sum(dim=(0, 2))
    where = [(steps[i] if steps else i) for i in range(batch.shape[1]) if bad[i] > 0]
    raise DataError(f"{what} contains {int(bad.sum())} NaN/inf values at snapshot step(s) {where}: "
                    "the activations are unusable (rebuild the activation cache, or check the model that made them)")


@contextlib.contextmanager
def _eager(model: Crosscoder):
    """Run the kernels eagerly (one-off shapes such as the init search and the evaluation would recompile)."""
    kernels, model.kernels = model.kernels, model.kernels.eager()
    try:
        yield model
    finally:
        model.kernels = kernels


@torch.no_grad()
def search_decoder_norm(model: Crosscoder, x: Tensor, grid: tuple[float, ...], parallel: Any = None
                        ) -> dict[str, Any]:
    """Set the decoder norm (shared by all features and snapshots) to the grid value of least MSE on `x`."""
    with _eager(model):
        return _search_decoder_norm(model, x, grid, parallel)


def _search_decoder_norm(model: Crosscoder, x: Tensor, grid: tuple[float, ...], parallel: Any) -> dict[str, Any]:
    mse: dict[str, float] = {}
    for norm in grid:
        model.set_decoder_norm(float(norm))
        loss = model(x, sparsity_coefficient=0.0, parallel=parallel).reconstruction_loss
        mse[repr(float(norm))] = float(parallel.sum_scalar(loss, over="all") if parallel is not None else loss)
    best = min(grid, key=lambda v: mse[repr(float(v))])
    model.set_decoder_norm(float(best))
    return {"decoder_norm": float(best), "mse": mse}


class MetricWindow:
    """Running sums over the steps since the last log: loss terms, per-snapshot error/variance/L0, firing."""

    def __init__(self, n_snapshots: int, dict_size: int, device: Any):
        self.shape = (n_snapshots, dict_size)
        self.device = device
        self.reset()

    def reset(self) -> None:
        S, F = self.shape
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=self.device)  # noqa: E731
        self.tensors: dict[str, Tensor] = {
            "loss": z(()), "reconstruction_loss": z(()), "sparsity_loss": z(()), "steps": z(()), "rows": z(()),
            "squared_error": z(S), "variance": z(S), "active": z(S), "fired": z(S, F),
        }

    @torch.no_grad()
    def add(self, out: Any, x: Tensor) -> None:
        t = self.tensors
        t["loss"] += out.loss.detach().double()
        t["reconstruction_loss"] += out.reconstruction_loss.detach().double()
        t["sparsity_loss"] += out.sparsity_loss.detach().double()
        t["steps"] += 1
        t["rows"] += x.shape[0]
        t["squared_error"] += out.squared_error.double()
        t["variance"] += out.total_variance.double()
        t["active"] += out.active.sum(1).double()
        t["fired"] += (out.active > 0).double()

    def summary(self, parallel: Any = None) -> dict[str, Any]:
        """Means over the window (reduced over processes when sharded)."""
        t = dict(self.tensors)
        if parallel is not None:
            t = parallel.reduce_metric_window(t)
        steps, rows = float(t["steps"]), float(t["rows"])
        ev = 1 - t["squared_error"] / t["variance"].clamp_min(1e-30)
        return {
            "loss": float(t["loss"]) / steps, "reconstruction_loss": float(t["reconstruction_loss"]) / steps,
            "sparsity_loss": float(t["sparsity_loss"]) / steps,
            "explained_variance": [round(float(v), 6) for v in ev],
            "l0": [round(float(v), 4) for v in t["active"] / rows],
            "dead_fraction": [round(float(v), 6) for v in (t["fired"] == 0).double().mean(1)],
            "dead_fraction_all": round(float((t["fired"].sum(0) == 0).double().mean()), 6),
        }


@torch.no_grad()
def evaluate(model: Crosscoder, source: Any, *, split: str = "eval", limit: int | None = None, batch_size: int = 4096,
             parallel: Any = None, device: Any = None, bf16: bool = False) -> dict[str, Any]:
    """Per-snapshot explained variance 1 − Σ‖x̂−x‖²/Σ‖x−x̄‖², L0 and dead fraction on a split's rows, and
    `firing_counts` [snapshot, feature]: on how many of those rows each feature fires at each snapshot
    (the evidence that a feature exists there; its decoder norm alone is not: see emergence.firing_norms)."""
    device = device if device is not None else model.W_E.device
    x_all = source.rows(split, limit=limit, normalise=True, device="cpu")
    if x_all.shape[0] == 0:
        return {}
    check_finite(x_all, f"the {split} rows", getattr(source, "steps", None))
    S, F = model.config.n_snapshots, model.config.dict_size
    sums = {"squared_error": torch.zeros(S, dtype=torch.float64), "active": torch.zeros(S, dtype=torch.float64),
            "fired": torch.zeros(S, F, dtype=torch.float64), "loss": torch.zeros((), dtype=torch.float64)}
    mean = x_all.double().mean(0)
    variance = ((x_all.double() - mean) ** 2).sum(dim=(0, 2))
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start:start + batch_size].to(device)
        with _autocast(device, bf16), _eager(model):
            out = model(x, sparsity_coefficient=0.0, parallel=parallel)
        sums["squared_error"] += out.squared_error.double().cpu()
        sums["active"] += out.active.sum(1).double().cpu()
        sums["fired"] += out.active.double().cpu()  # rows on which each (snapshot, feature) fires
    rows = x_all.shape[0]
    if parallel is not None:
        sums = parallel.gather_snapshot_metrics(sums)
        variance = parallel.gather_snapshot_metrics({"v": variance})["v"]
    ev = 1 - sums["squared_error"] / variance.clamp_min(1e-30)
    return {
        "rows": rows, "split": split,
        "explained_variance": [round(float(v), 6) for v in ev],
        "mse": [round(float(v), 6) for v in sums["squared_error"] / rows],
        "l0": [round(float(v), 4) for v in sums["active"] / rows],
        "dead_fraction": [round(float(v), 6) for v in (sums["fired"] == 0).double().mean(1)],
        "dead_fraction_all": round(float((sums["fired"].sum(0) == 0).double().mean()), 6),
        FIRING_COUNTS: sums["fired"].to(torch.int64),  # [snapshot, feature]; saved as its own file, not in JSON
    }


_ALLOCATOR_TUNED: list[bool] = []


def tune_allocator() -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS (Linux, once per process).

    By default glibc serves every block above a dynamic threshold (≤ 32 MB) with a fresh mmap and
    unmaps it when freed, so each training step's big temporaries ([snapshot, feature, batch] of
    ~10^8 bytes) are page-faulted in anew: on a 2-core machine that doubled the time of the fused
    gate kernels. Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD keeps that memory mapped for reuse
    (the process keeps its peak memory). Set CROSSLIB_MALLOC_TUNING=0 to leave malloc alone.
    """
    if _ALLOCATOR_TUNED or sys.platform != "linux" or os.environ.get("CROSSLIB_MALLOC_TUNING") == "0":
        return bool(_ALLOCATOR_TUNED and _ALLOCATOR_TUNED[0])
    ok = False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        pass
    _ALLOCATOR_TUNED.append(ok)
    return ok


def _autocast(device: Any, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _make_optimizer(model: Crosscoder, config: TrainConfig) -> torch.optim.Adam:
    groups = [
        {"params": [model.W_E, model.b_E, model.W_D, model.b_D], "lr": config.lr, "name": "weights", "lr_factor": 1.0},
        {"params": [model.log_threshold], "lr": config.lr * config.threshold_lr_factor, "name": "threshold",
         "lr_factor": config.threshold_lr_factor},
    ]
    return torch.optim.Adam(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=1e-8,
                            weight_decay=0.0, fused=True)


OPTIMIZER_PARAMS = ("W_E", "b_E", "W_D", "b_D", "log_threshold")


def optimizer_tensors(model: Crosscoder, optimizer: torch.optim.Adam) -> dict[str, Tensor]:
    """Adam's state as named tensors: optim.<param>.{step, exp_avg, exp_avg_sq}."""
    out = {}
    for name in OPTIMIZER_PARAMS:
        state = optimizer.state.get(getattr(model, name), {})
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if key in state:
                out[f"optim.{name}.{key}"] = state[key].detach().reshape(state[key].shape).cpu()
    return out


def load_optimizer_tensors(model: Crosscoder, optimizer: torch.optim.Adam, tensors: dict[str, Tensor]) -> None:
    for name in OPTIMIZER_PARAMS:
        param = getattr(model, name)
        if f"optim.{name}.step" not in tensors:
            continue
        optimizer.state[param] = {
            "step": tensors[f"optim.{name}.step"].clone().to(torch.float32),
            "exp_avg": tensors[f"optim.{name}.exp_avg"].clone().to(param.device),
            "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"].clone().to(param.device),
        }


# ----------------------------------------------------------------------------------- checkpoints

def _run_identity(model_config: CrosscoderConfig, train_config: TrainConfig, source_id: str | None,
                  init_id: str | None) -> dict[str, Any]:
    return {"model": model_config.to_dict(), "train": train_config.to_dict(), "source": source_id, "init": init_id}


def save_checkpoint(directory: Path, step: int, state: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Atomically publish a checkpoint: tensors first under a fresh name, then the JSON that points at them."""
    data = safetensors.torch.save({k: v.contiguous() for k, v in state.items()})
    name = f"checkpoint-{step}.safetensors"
    atomic_write_bytes(directory / name, data)
    atomic_write_json(directory / CHECKPOINT_JSON, {**info, "step": step, "tensors": name, "sha256": sha256_bytes(data)})
    for old in directory.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    if not (directory / CHECKPOINT_JSON).is_file():
        return None
    info = read_json(directory / CHECKPOINT_JSON)
    path = directory / info["tensors"]
    if not path.is_file():
        raise ArtifactError(f"{directory / CHECKPOINT_JSON} points at {path.name}, which is missing; delete {directory}")
    data = path.read_bytes()
    if sha256_bytes(data) != info["sha256"]:
        raise ArtifactError(f"{path} is corrupted (sha256 mismatch); delete {directory} to start over")
    return info, safetensors.torch.load(data)


def _remove_checkpoints(directory: Path) -> None:
    for p in list(directory.glob("checkpoint-*.safetensors")) + [directory / CHECKPOINT_JSON]:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- training

def train_crosscoder(
    source: Any,
    model_config: CrosscoderConfig,
    train_config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    init: Crosscoder | None = None,
    device: Any = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    parallel: Any = None,
    kernels: KernelOptions = KernelOptions(),
) -> TrainResult:
    """Train a crosscoder (an SAE when n_snapshots = 1) on `source`; resume from `out_dir` if it holds a checkpoint.

    `init`: start from these weights (e.g. SAE-Track's previous SAE) instead of the paper's
    initialisation. `stop_after`: stop (with a checkpoint) after that many steps in total, as if
    killed; calling again resumes. `parallel`: a `crosslib.distributed.ShardContext` when this is
    one process of a sharded run (the source then yields this process's snapshots). `kernels`: the
    fused and sparse kernel choices (every choice trains the same model, to rounding); whether they
    compile is `train_config.compile`'s to decide.
    """
    train_config = train_config or TrainConfig()
    if not isinstance(model_config, CrosscoderConfig):
        raise ParameterError(f"model_config={type(model_config).__name__} is not allowed: a CrosscoderConfig")
    if not isinstance(train_config, TrainConfig):
        raise ParameterError(f"train_config={type(train_config).__name__} is not allowed: a TrainConfig")
    require(isinstance(kernels, KernelOptions), "kernels", kernels, "a crosslib.kernels.KernelOptions")
    _check_compatible(source, model_config, parallel)
    if torch.device(device).type == "cpu":
        tune_allocator()
    is_main = parallel is None or parallel.rank == 0
    n_steps = train_config.total_steps
    out = Path(out_dir) if out_dir is not None else None
    source_id = parallel.source_id if parallel is not None else _try(source_fingerprint, source)
    init_id = model_fingerprint(init) if init is not None else None
    identity = _run_identity(model_config, train_config, source_id, init_id)
    if init is not None:
        require(init.config.replace(decoder_init_norm=model_config.decoder_init_norm) == model_config, "init",
                "a model of another shape", f"a Crosscoder with config {model_config}")

    if out is not None and (out / METRICS_FILE).is_file():  # already finished here
        if read_json(out / TRAIN_FILE).get("identity") != identity:
            raise ParameterError(f"out_dir={str(out)!r} holds a finished run of another configuration: use a new out_dir")
        return load_result(out)

    # ---- the model (this process's shard) and its optimizer
    local_config = model_config if parallel is None else parallel.local_config(model_config)
    kernels = train_config.kernel_options(model_config, kernels)
    if init is not None:
        model = init if parallel is None else parallel.shard_model(init)
        model = Crosscoder.from_state(local_config, model.state_dict(), kernels=kernels)
    elif parallel is None:
        model = Crosscoder(model_config, seed=train_config.seed, kernels=kernels)
    else:
        model = parallel.shard_model(Crosscoder(model_config, seed=train_config.seed, kernels=kernels))
    model = model.to(device)
    optimizer = _make_optimizer(model, train_config)
    window = MetricWindow(local_config.n_snapshots, local_config.dict_size, device)
    history: list[dict[str, Any]] = []
    init_info: dict[str, Any] = {"decoder_norm": model_config.decoder_init_norm, "mse": {}}
    start = 0

    checkpoint = load_checkpoint(out) if out is not None else None
    if checkpoint is not None:
        info, tensors = checkpoint
        if info.get("identity") != identity:
            raise ParameterError(f"out_dir={str(out)!r} holds a checkpoint of another run (different configs or "
                                 "data): use a new out_dir or delete it")
        if parallel is not None:
            tensors = parallel.shard_state(tensors, model_config)
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        load_optimizer_tensors(model, optimizer, tensors)
        for k, v in window.tensors.items():
            v.copy_(tensors[f"window.{k}"] if parallel is None else parallel.shard_window(k, tensors[f"window.{k}"], v))
        history, init_info, start = info["history"], info["init"], int(info["step"])
    elif init is None and model_config.decoder_init_norm == "search":
        x = next(source.batches(train_config.init_search_rows, seed=train_config.seed + 1, device="cpu"))
        check_finite(x, "the rows for the decoder-norm search", getattr(source, "steps", None))
        x = parallel.local_rows(x) if parallel is not None else x
        with _autocast(device, train_config.bf16):
            init_info = search_decoder_norm(model, x.to(device), train_config.init_norm_grid, parallel)

    def checkpoint_now(step: int) -> None:
        state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
        state.update(optimizer_tensors(model, optimizer))
        state.update({f"window.{k}": v.cpu() for k, v in window.tensors.items()})
        if parallel is not None:
            state = parallel.gather_state(state, model_config)
        if is_main and out is not None:
            save_checkpoint(out, step, state, {"identity": identity, "history": history, "init": init_info})
        if parallel is not None:
            parallel.barrier()

    # ---- the loop
    steps = getattr(source, "steps", None)
    batches: Iterator[Tensor] = source.batches(train_config.batch_size, seed=train_config.seed, start_batch=start,
                                               device="cpu")
    last_checkpoint = start if checkpoint is not None else None
    kind = (f"{model_config.n_snapshots} SAEs" if model_config.independent else
            "SAE" if model_config.n_snapshots == 1 else f"crosscoder ({model_config.n_snapshots} snapshots)")
    bar = tqdm(total=n_steps, initial=start, disable=not (progress and is_main), unit="step", dynamic_ncols=True,
               desc=f"{kind}, {model_config.dict_size} features, λ = {train_config.sparsity_coefficient:g}")
    model.train()
    loop_start, steps_run = time.perf_counter(), 0
    try:
        for step in range(start, n_steps):
            if stop_after is not None and step >= stop_after:
                break
            x = next(batches)
            if parallel is not None:
                x = parallel.local_rows(x)
            x = x.to(device, non_blocking=True)
            lr = train_config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_factor"]
            lam = train_config.sparsity_coefficient_at(step)
            with _autocast(device, train_config.bf16):
                output = model(x, sparsity_coefficient=lam, parallel=parallel)
            finite = bool(torch.isfinite(output.total_variance).all())  # NaN/inf in x shows up in its statistics
            if parallel is not None:
                finite = parallel.all_ok(finite)
            if not finite:
                check_finite(x, f"batch {step} of the source (training step {step})", steps)
                if parallel is not None:
                    raise DataError(f"batch {step} of the source (training step {step}) contains NaN/inf values "
                                    "in another process's snapshots")
            loss = output.loss.detach() if parallel is None else parallel.sum_scalar(output.loss.detach(), over="all")
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                where = (f"the last good checkpoint (step {last_checkpoint}) is kept in {out}" if last_checkpoint
                         is not None and out is not None else "no checkpoint had been written yet")
                raise TrainingDiverged(
                    f"the loss became {loss_value} at step {step} (lr={lr:.3g}, λ={lam:.3g}); training stopped and "
                    f"{where}. Lower lr, or check the activations.", step, last_checkpoint)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            if parallel is not None:
                parallel.sync_gradients(model)
            optimizer.step()
            window.add(output, x)
            done = step + 1
            steps_run += 1
            if done % train_config.log_every == 0 or done == n_steps:
                entry = {"step": done, "tokens": done * train_config.batch_size, "lr": lr, "sparsity_coefficient": lam,
                         **window.summary(parallel)}
                history.append(entry)
                window.reset()
                bar.set_postfix(refresh=False, loss=f"{entry['loss']:.4g}", ev=f"{sum(entry['explained_variance']) / len(entry['explained_variance']):.3f}",
                                l0=f"{sum(entry['l0']) / len(entry['l0']):.1f}")
            bar.update(1)
            if out is not None and (done % train_config.checkpoint_every == 0 or
                                    (stop_after is not None and done == stop_after and done < n_steps)):
                checkpoint_now(done)
                last_checkpoint = done
    finally:
        bar.close()
    seconds = time.perf_counter() - loop_start
    speed = {"seconds": seconds, "steps_run": steps_run,
             "tokens_per_second": steps_run * train_config.batch_size / seconds if seconds > 0 else 0.0}

    # compiled kernels are specialised to the training batch shape; analyses run eagerly
    model.kernels = model.kernels.eager()
    finished = (stop_after is None or stop_after >= n_steps)
    if not finished:
        return TrainResult(model=model, history=history, eval={}, path=out, init=init_info, **speed)

    model.eval()
    eval_metrics = {}
    if train_config.eval_rows > 0:
        eval_metrics = evaluate(model, source, split="eval", limit=train_config.eval_rows, parallel=parallel,
                                device=device, bf16=train_config.bf16)
    firing_counts = eval_metrics.pop(FIRING_COUNTS, None)
    full_model = model if parallel is None else parallel.gather_model(model, model_config)
    if out is not None and is_main:
        full_model.save(out)
        atomic_write_json(out / TRAIN_FILE, {"identity": identity, "init": init_info,
                                             "source_steps": list(steps) if steps is not None else None, **speed})
        if firing_counts is not None:
            data = safetensors.torch.save({FIRING_COUNTS: firing_counts.contiguous()})
            atomic_write_bytes(out / FIRING_FILE, data)
            eval_metrics[FIRING_COUNTS + "_sha256"] = sha256_bytes(data)
        atomic_write_json(out / METRICS_FILE, {"history": history, "eval": eval_metrics})
        _remove_checkpoints(out)
    if parallel is not None:
        parallel.barrier()
    return TrainResult(model=full_model if is_main else model, history=history, eval=eval_metrics, path=out,
                       init=init_info, firing_counts=firing_counts, **speed)


def _try(fn, *args):
    try:
        return fn(*args)
    except ParameterError:
        return None


def _load_firing_counts(directory: Path, eval_metrics: dict[str, Any]) -> Tensor | None:
    expected = eval_metrics.get(FIRING_COUNTS + "_sha256")
    if expected is None:
        return None  # trained with eval_rows=0
    path = directory / FIRING_FILE
    data = path.read_bytes() if path.is_file() else b""
    if sha256_bytes(data) != expected:
        raise ArtifactError(f"{path} is missing or corrupted (its sha256 does not match metrics.json); "
                            f"delete {directory} and run again")
    return safetensors.torch.load(data)[FIRING_COUNTS]


def load_result(directory: str | os.PathLike) -> TrainResult:
    """Read a finished training (model, metrics history, eval metrics) from its directory."""
    directory = Path(directory)
    metrics = read_json(directory / METRICS_FILE)
    info = read_json(directory / TRAIN_FILE)
    return TrainResult(model=Crosscoder.load(directory), history=metrics["history"], eval=metrics["eval"],
                       path=directory, init=info.get("init", {}), firing_counts=_load_firing_counts(directory, metrics["eval"]),
                       **{name: info.get(name, 0) for name in ("seconds", "steps_run", "tokens_per_second")})


@dataclasses.dataclass(frozen=True)
class DictionaryKey(Config):
    """What determines a trained dictionary: both configs, the data's identity and the starting weights."""

    model: dict
    train: dict
    source: str
    init: str | None = None
    # the training code's version where it changes results without changing a config: 2 = the reconstruction
    # term averages over snapshots, and held-out firing counts are saved (dictionaries cached before are retrained)
    objective: int = 2


def train_crosscoder_cached(
    source: Any,
    model_config: CrosscoderConfig,
    train_config: TrainConfig | None = None,
    *,
    init: Crosscoder | None = None,
    root: str | os.PathLike | None = None,
    device: Any = "cpu",
    progress: bool = True,
) -> TrainResult:
    """`train_crosscoder` through the artifact cache: the same configs on the same data give the same
    directory (`<data>/dictionaries/<key>/`), trained once; an interrupted build resumes from its checkpoint."""
    train_config = train_config or TrainConfig()
    _check_compatible(source, model_config)
    key = DictionaryKey(model=model_config.to_dict(), train=train_config.to_dict(), source=source_fingerprint(source),
                        init=model_fingerprint(init) if init is not None else None)

    def build(partial: Path) -> None:
        train_crosscoder(source, model_config, train_config, partial, init=init, device=device, progress=progress)

    return load_result(build_artifact(ARTIFACT_KIND, key, build, root))
