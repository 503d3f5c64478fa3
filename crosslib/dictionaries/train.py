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
it sets `compiled` in the run's `crosslib.dictionaries.kernels.KernelOptions`, the model's one kernel switch.

Sparse products (CPU, automatic): once at most `crosslib.dictionaries.kernels.sparse_density_limit()` of f's
entries are non-zero (1.75%, at any thread count), a step computes the decoder, the W_D
gradient (and, for SAEs, the W_E gradient), the penalty and most of the gate's gradients over the
active positions only, in fp32 accumulators; the encoder and ∂f stay dense. Same values as the dense
products to rounding (tests/dictionaries/test_crosscoder.py); at d=128, F=2048 and L0 ≈ 25 an SAE step takes
about half the time (benchmarks/bench_train.py). `train_crosscoder(..., kernels=KernelOptions(sparse=False))`
turns them off.

Exact resume: batch k of the source is a pure function of (seed, k), the schedule is a function of
the step, and a checkpoint holds the weights, Adam's state, the step, the metric history and the
running metric window; so a run killed and resumed from its last checkpoint ends bit-for-bit equal
to an uninterrupted one (on the same machine; at any thread count, which may change on the way:
`crosslib.runtime.follow_load`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import safetensors.torch
import torch
from torch import Tensor
from crosslib.progress import progress as tqdm

from crosslib.activations.sources import ActivationSource, source_fingerprint
from crosslib.artifacts import (ArtifactError, atomic_write_bytes, atomic_write_json, build_artifact, read_json,
                                sha256_bytes)
from crosslib.config import Config, ParameterError, require, require_fraction, require_positive
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig, model_fingerprint
from crosslib.dictionaries.distributed import SINGLE_PROCESS, ShardingContext
from crosslib.dictionaries.kernels import KernelOptions

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

def _check_compatible(source: ActivationSource, config: CrosscoderConfig,
                      parallel: ShardingContext = SINGLE_PROCESS) -> None:
    s_source = parallel.source_snapshots(source)
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
def search_decoder_norm(model: Crosscoder, x: Tensor, grid: tuple[float, ...],
                        parallel: ShardingContext = SINGLE_PROCESS) -> dict[str, Any]:
    """Set the decoder norm (shared by all features and snapshots) to the grid value of least MSE on `x`."""
    with _eager(model):
        return _search_decoder_norm(model, x, grid, parallel)


def _search_decoder_norm(model: Crosscoder, x: Tensor, grid: tuple[float, ...], parallel: ShardingContext
                         ) -> dict[str, Any]:
    mse: dict[str, float] = {}
    for norm in grid:
        model.set_decoder_norm(float(norm))
        loss = model(x, parallel=parallel, penalty=False).reconstruction_loss
        mse[repr(float(norm))] = float(parallel.sum_scalar(loss, over="all"))
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

    def summary(self, parallel: ShardingContext = SINGLE_PROCESS) -> dict[str, Any]:
        """Means over the window (reduced over processes when sharded)."""
        t = parallel.reduce_metric_window(dict(self.tensors))
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
def evaluate(model: Crosscoder, source: ActivationSource, *, split: str = "eval", limit: int | None = None,
             batch_size: int = 4096, parallel: ShardingContext = SINGLE_PROCESS, device: Any = None,
             bf16: bool = False) -> dict[str, Any]:
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
            out = model(x, parallel=parallel, penalty=False)
        sums["squared_error"] += out.squared_error.double().cpu()
        sums["active"] += out.active.sum(1).double().cpu()
        sums["fired"] += out.active.double().cpu()  # rows on which each (snapshot, feature) fires
    rows = x_all.shape[0]
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
        # Adam's moments in the parameter's memory layout (W_E is stored transposed:
        # crosslib.dictionaries.crosscoder._empty_encoder): the fused step pairs elements by memory position
        optimizer.state[param] = {
            "step": tensors[f"optim.{name}.step"].clone().to(torch.float32),
            "exp_avg": torch.empty_like(param).copy_(tensors[f"optim.{name}.exp_avg"]),
            "exp_avg_sq": torch.empty_like(param).copy_(tensors[f"optim.{name}.exp_avg_sq"]),
        }


# ----------------------------------------------------------------------------------- checkpoints

def _run_identity(source: ActivationSource, model_config: CrosscoderConfig, train_config: TrainConfig,
                  init: Crosscoder | None, parallel: ShardingContext) -> dict[str, Any]:
    """What a run's checkpoints and finished files record, and a resumed run must match: configs, data, start."""
    return {"model": model_config.to_dict(), "train": train_config.to_dict(), "source": parallel.identify_source(source),
            "init": model_fingerprint(init) if init is not None else None}


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
    source: ActivationSource,
    model_config: CrosscoderConfig,
    train_config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    init: Crosscoder | None = None,
    device: Any = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    parallel: ShardingContext = SINGLE_PROCESS,
    kernels: KernelOptions = KernelOptions(),
) -> TrainResult:
    """Train a crosscoder (an SAE when n_snapshots = 1) on `source`; resume from `out_dir` if it holds a checkpoint.

    `init`: start from these weights (e.g. SAE-Track's previous SAE) instead of the paper's
    initialisation. `stop_after`: stop (with a checkpoint) after that many steps in total, as if
    killed; calling again resumes. `parallel`: this process's `crosslib.dictionaries.distributed.ShardingContext`
    (a `ShardContext` when this is one process of a sharded run, whose source then yields this
    process's snapshots; one process by default). `kernels`: the fused and sparse kernel choices
    (every choice trains the same model, to rounding); whether they compile is `train_config.compile`'s
    to decide.

    The steps: `_build` the model, optimizer and metric window from the configs; `_resume_or_init` them
    from out_dir's checkpoint or the paper's initialisation; `_train_loop`; `_finalise` (evaluation,
    firing counts, the artifact's files). Changes no process-wide setting (see crosslib.runtime).
    """
    train_config = train_config or TrainConfig()
    _check_arguments(source, model_config, train_config, init=init, parallel=parallel, kernels=kernels)
    identity = _run_identity(source, model_config, train_config, init, parallel)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and (out / METRICS_FILE).is_file():  # already finished here
        return _finished_result(out, identity)

    run = _build(source, model_config, train_config, out, identity, init=init, device=device, parallel=parallel,
                 kernels=kernels)
    _resume_or_init(run, from_weights=init is not None)
    speed = _train_loop(run, progress=progress, stop_after=stop_after)
    return _finalise(run, speed, stopped_early=stop_after is not None and stop_after < train_config.total_steps)


@dataclasses.dataclass
class _TrainingRun:
    """One call of `train_crosscoder`: what it trains on and with, and the state its steps share."""

    source: ActivationSource
    model_config: CrosscoderConfig  # the full model's
    train_config: TrainConfig
    out: Path | None  # the run's directory (checkpoints, then the artifact's files); None: nothing is written
    identity: dict[str, Any]  # what a checkpoint or finished run in `out` must have been trained with
    parallel: ShardingContext
    device: Any
    model: Crosscoder  # this process's share
    optimizer: torch.optim.Adam
    window: MetricWindow  # the metrics' running sums since the last log
    init_info: dict[str, Any]  # the decoder-norm search's record (TrainResult.init)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    start: int = 0  # the first step this call runs
    last_checkpoint: int | None = None  # the step of the newest checkpoint in `out`

    def checkpoint(self, step: int) -> None:
        """Save the state after `step` steps (collective: every process gathers, the main one writes)."""
        state = {f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        state.update(optimizer_tensors(self.model, self.optimizer))
        state.update({f"window.{k}": v.cpu() for k, v in self.window.tensors.items()})
        state = self.parallel.gather_state(state)
        if self.parallel.is_main and self.out is not None:
            save_checkpoint(self.out, step, state, {"identity": self.identity, "history": self.history,
                                                    "init": self.init_info})
        self.parallel.barrier()
        self.last_checkpoint = step


def _check_arguments(source: ActivationSource, model_config: CrosscoderConfig, train_config: TrainConfig, *,
                     init: Crosscoder | None, parallel: ShardingContext, kernels: KernelOptions) -> None:
    """Refuse arguments of the wrong kind or shape, naming the parameter, before anything is built."""
    if not isinstance(model_config, CrosscoderConfig):
        raise ParameterError(f"model_config={type(model_config).__name__} is not allowed: a CrosscoderConfig")
    if not isinstance(train_config, TrainConfig):
        raise ParameterError(f"train_config={type(train_config).__name__} is not allowed: a TrainConfig")
    require(isinstance(kernels, KernelOptions), "kernels", kernels, "a crosslib.dictionaries.kernels.KernelOptions")
    require(isinstance(parallel, ShardingContext), "parallel", parallel, "a crosslib.dictionaries.distributed.ShardingContext")
    _check_compatible(source, model_config, parallel)
    if init is not None:
        require(init.config.replace(decoder_init_norm=model_config.decoder_init_norm) == model_config, "init",
                "a model of another shape", f"a Crosscoder with config {model_config}")


def _finished_result(out: Path, identity: dict[str, Any]) -> TrainResult:
    """The run finished before in `out`: its result, if it was trained with the same configs and data."""
    if read_json(out / TRAIN_FILE).get("identity") != identity:
        raise ParameterError(f"out_dir={str(out)!r} holds a finished run of another configuration: use a new out_dir")
    return load_result(out)


def _build(source: ActivationSource, model_config: CrosscoderConfig, train_config: TrainConfig, out: Path | None,
           identity: dict[str, Any], *, init: Crosscoder | None, device: Any, parallel: ShardingContext,
           kernels: KernelOptions) -> _TrainingRun:
    """Step 1: this process's share of the model, from `init`'s weights or the paper's initialisation with
    `train_config.seed`, with the kernels the run trains with, on `device`; its Adam optimizer (the
    book's Methods page, section Initialisation and optimiser) and an empty metric window."""
    local_config = parallel.local_config(model_config)
    kernels = train_config.kernel_options(model_config, kernels)
    if init is not None:
        model = Crosscoder.from_state(local_config, parallel.shard_model(init).state_dict(), kernels=kernels)
    else:
        model = parallel.shard_model(Crosscoder(model_config, seed=train_config.seed, kernels=kernels))
    model = model.to(device)
    return _TrainingRun(
        source=source, model_config=model_config, train_config=train_config, out=out, identity=identity,
        parallel=parallel, device=device, model=model, optimizer=_make_optimizer(model, train_config),
        window=MetricWindow(local_config.n_snapshots, local_config.dict_size, device),
        init_info={"decoder_norm": model_config.decoder_init_norm, "mse": {}})


def _resume_or_init(run: _TrainingRun, *, from_weights: bool) -> None:
    """Step 2: continue from out_dir's checkpoint (weights, Adam's state, metric window, history and step;
    it must be this run's), or start at step 0, where a model not `from_weights` with
    `decoder_init_norm="search"` takes the decoder norm of least reconstruction error on
    `init_search_rows` rows (`search_decoder_norm`; the book's Methods page, section Initialisation and
    optimiser)."""
    checkpoint = load_checkpoint(run.out) if run.out is not None else None
    if checkpoint is not None:
        info, tensors = checkpoint
        if info.get("identity") != run.identity:
            raise ParameterError(f"out_dir={str(run.out)!r} holds a checkpoint of another run (different configs "
                                 "or data): use a new out_dir or delete it")
        tensors = run.parallel.shard_state(tensors)
        run.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        load_optimizer_tensors(run.model, run.optimizer, tensors)
        for k, v in run.window.tensors.items():
            v.copy_(run.parallel.shard_window(k, tensors[f"window.{k}"], v))
        run.history, run.init_info, run.start = info["history"], info["init"], int(info["step"])
        run.last_checkpoint = run.start
    elif not from_weights and run.model_config.decoder_init_norm == "search":
        train_config = run.train_config
        x = next(run.source.batches(train_config.init_search_rows, seed=train_config.seed + 1, device="cpu"))
        check_finite(x, "the rows for the decoder-norm search", getattr(run.source, "steps", None))
        x = run.parallel.local_rows(x)
        with _autocast(run.device, train_config.bf16):
            run.init_info = search_decoder_norm(run.model, x.to(run.device), train_config.init_norm_grid,
                                                run.parallel)


def _train_loop(run: _TrainingRun, *, progress: bool, stop_after: int | None) -> dict[str, Any]:
    """Step 3: steps `run.start` to the last (or to `stop_after`): batch k of the source, lr and λ from the
    schedule, forward, NaN checks, backward, Adam; a history entry every `log_every` steps and a checkpoint
    every `checkpoint_every` (and at `stop_after`). Returns this call's wall time, steps and tokens/s."""
    train_config, model_config, parallel = run.train_config, run.model_config, run.parallel
    model, optimizer, window = run.model, run.optimizer, run.window
    n_steps = train_config.total_steps
    steps = getattr(run.source, "steps", None)
    batches: Iterator[Tensor] = run.source.batches(train_config.batch_size, seed=train_config.seed,
                                                   start_batch=run.start, device="cpu")
    kind = (f"{model_config.n_snapshots} SAEs" if model_config.independent else
            "SAE" if model_config.n_snapshots == 1 else f"crosscoder ({model_config.n_snapshots} snapshots)")
    bar = tqdm(total=n_steps, initial=run.start, disable=not (progress and parallel.is_main), unit="step",
               dynamic_ncols=True,
               desc=f"{kind}, {model_config.dict_size} features, λ = {train_config.sparsity_coefficient:g}")
    model.train()
    loop_start, steps_run = time.perf_counter(), 0
    try:
        for step in range(run.start, n_steps):
            if stop_after is not None and step >= stop_after:
                break
            x = parallel.local_rows(next(batches)).to(run.device, non_blocking=True)
            lr = train_config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_factor"]
            lam = train_config.sparsity_coefficient_at(step)
            with _autocast(run.device, train_config.bf16):
                output = model(x, sparsity_coefficient=lam, parallel=parallel)
            # NaN/inf in x shows up in its statistics; every process learns whether any process's did
            if not parallel.all_ok(bool(torch.isfinite(output.total_variance).all())):
                check_finite(x, f"batch {step} of the source (training step {step})", steps)
                if parallel.is_sharded:  # this process's rows are fine: another's are not
                    raise DataError(f"batch {step} of the source (training step {step}) contains NaN/inf values "
                                    "in another process's snapshots")
            loss_value = float(parallel.sum_scalar(output.loss.detach(), over="all"))
            if not math.isfinite(loss_value):
                where = (f"the last good checkpoint (step {run.last_checkpoint}) is kept in {run.out}"
                         if run.last_checkpoint is not None and run.out is not None
                         else "no checkpoint had been written yet")
                raise TrainingDiverged(
                    f"the loss became {loss_value} at step {step} (lr={lr:.3g}, λ={lam:.3g}); training stopped and "
                    f"{where}. Lower lr, or check the activations.", step, run.last_checkpoint)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            parallel.sync_gradients(model)
            optimizer.step()
            window.add(output, x)
            done = step + 1
            steps_run += 1
            if done % train_config.log_every == 0 or done == n_steps:
                entry = {"step": done, "tokens": done * train_config.batch_size, "lr": lr, "sparsity_coefficient": lam,
                         **window.summary(parallel)}
                run.history.append(entry)
                window.reset()
                bar.set_postfix(refresh=False, loss=f"{entry['loss']:.4g}",
                                ev=f"{sum(entry['explained_variance']) / len(entry['explained_variance']):.3f}",
                                l0=f"{sum(entry['l0']) / len(entry['l0']):.1f}")
            bar.update(1)
            if run.out is not None and (done % train_config.checkpoint_every == 0 or
                                        (stop_after is not None and done == stop_after and done < n_steps)):
                run.checkpoint(done)
    finally:
        bar.close()
    seconds = time.perf_counter() - loop_start
    return {"seconds": seconds, "steps_run": steps_run,
            "tokens_per_second": steps_run * train_config.batch_size / seconds if seconds > 0 else 0.0}


def _finalise(run: _TrainingRun, speed: dict[str, Any], *, stopped_early: bool) -> TrainResult:
    """Step 4: the result. Stopped early (`stop_after`), the model as it stands (its checkpoint is on disk);
    finished, also the held-out metrics and firing counts (`evaluate`), and in out_dir the full model,
    train.json, the firing counts and metrics.json (the checkpoints removed)."""
    model, parallel, train_config = run.model, run.parallel, run.train_config
    # compiled kernels are specialised to the training batch shape; analyses run eagerly
    model.kernels = model.kernels.eager()
    if stopped_early:
        return TrainResult(model=model, history=run.history, eval={}, path=run.out, init=run.init_info, **speed)

    model.eval()
    eval_metrics = {}
    if train_config.eval_rows > 0:
        eval_metrics = evaluate(model, run.source, split="eval", limit=train_config.eval_rows, parallel=parallel,
                                device=run.device, bf16=train_config.bf16)
    firing_counts = eval_metrics.pop(FIRING_COUNTS, None)
    full_model = parallel.gather_model(model)
    if run.out is not None and parallel.is_main:
        out, steps = run.out, getattr(run.source, "steps", None)
        full_model.save(out)
        atomic_write_json(out / TRAIN_FILE, {"identity": run.identity, "init": run.init_info,
                                             "source_steps": list(steps) if steps is not None else None, **speed})
        if firing_counts is not None:
            data = safetensors.torch.save({FIRING_COUNTS: firing_counts.contiguous()})
            atomic_write_bytes(out / FIRING_FILE, data)
            eval_metrics[FIRING_COUNTS + "_sha256"] = sha256_bytes(data)
        atomic_write_json(out / METRICS_FILE, {"history": run.history, "eval": eval_metrics})
        _remove_checkpoints(out)
    parallel.barrier()
    return TrainResult(model=full_model if parallel.is_main else model, history=run.history, eval=eval_metrics,
                       path=run.out, init=run.init_info, firing_counts=firing_counts, **speed)


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
    source: ActivationSource,
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
