"""Training one crosscoder in several processes: sharded over snapshots and/or over tokens.

Head parallelism (the paper's): the S snapshots are split into contiguous blocks, one per "head"
rank. A rank holds only its snapshots' W_E^θ, W_D^θ, b_D^θ (and Adam state); b_E and the
log-thresholds are replicated. The forward pass needs two reductions:

* the encoder's sum over snapshots, h = Σ_ranks (Σ_{θ ∈ rank} W_E^θ x̃^θ) + b_E — an all-reduce;
* the penalty's p̂_i = mean over batch and all snapshots of tanh(c f‖W_D‖) — an all-reduce of the
  per-rank sums.

Both are differentiable all-reduces whose backward is again an all-reduce (sum): each rank's loss
term L_r (its snapshots' reconstruction error plus 1/R of the replicated penalty) depends on h, so
∂L/∂(rank r's partial h) = Σ_r' ∂L_r'/∂h — every rank's W_E^θ gradient needs the full ∂L/∂h. The
ranks' losses sum to the single-process loss, so the gradients are the single-process gradients;
the replicated parameters' gradients (b_E, t) are summed over head ranks after backward so the
replicas stay identical. Data parallelism splits each batch's rows over "data" ranks: their
gradients are summed (the loss is already normalised by the global batch), and p̂ is reduced over
all ranks. With R = n_heads × n_data processes, rank = data_rank · n_heads + head_rank.

Backends: gloo on CPU, NCCL on GPUs (chosen automatically). Run with

    torchrun --nproc_per_node 2 -m crosslib.dictionaries.distributed --source acts.safetensors \\
        --model '{"dict_size": 2048}' --train '{"n_steps": 1000}' --out runs/cc --heads 2

Checkpoints and the final model are gathered to rank 0 and saved in the single-process format,
so a run can be resumed with another number of processes, and loaded without torch.distributed.

The model and the trainer see a run's distribution through one interface, `ShardingContext` (a
typing.Protocol): `ShardContext` implements it for a sharded run, `SingleProcess` (the default
everywhere, `SINGLE_PROCESS`) for one process, with every hook the identity or a no-op. So
`Crosscoder.forward` and `crosslib.dictionaries.train` have no single-process special cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

from crosslib.activations.sources import ActivationSource, source_fingerprint
from crosslib.config import ParameterError, require

if TYPE_CHECKING:  # crosslib.dictionaries.crosscoder imports this module (the model's forward takes a ShardingContext)
    from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
    from crosslib.dictionaries.train import TrainConfig


def split_evenly(n: int, parts: int) -> list[list[int]]:
    """Contiguous blocks of range(n), sizes differing by at most one."""
    base, extra = divmod(n, parts)
    blocks, start = [], 0
    for p in range(parts):
        size = base + (p < extra)
        blocks.append(list(range(start, start + size)))
        start += size
    return blocks


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x (in fp32), and ∂L/∂x = Σ_ranks ∂L_r/∂y."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group, ctx.dtype = group, x.dtype
        y = x.detach().float().contiguous().clone()
        dist.all_reduce(y, group=group)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        g = grad.float().contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g.to(ctx.dtype), None


def init_distributed(backend: str | None = None) -> torch.device:
    """Initialise the default process group from torchrun's environment; return this rank's device."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


@runtime_checkable
class ShardingContext(Protocol):
    """How a run is distributed over processes: the hooks `Crosscoder.forward` and `crosslib.dictionaries.train` call.

    Every tensor hook returns its input when the run is one process (`SingleProcess`); `ShardContext`
    reduces, gathers or splits over the head and data process groups (this module's docstring)."""

    # ---- read by Crosscoder.forward
    @property
    def is_sharded(self) -> bool:
        """Whether the model or the batch is split over processes (the sparse products need one process)."""
        ...

    @property
    def penalty_replicas(self) -> int:
        """How many processes compute the same penalty term (each adds 1/replicas of it)."""
        ...

    def global_rows(self, local_rows: int) -> int:
        """The batch's rows over all processes, from this process's."""
        ...

    def snapshots_per_dictionary(self, local: CrosscoderConfig) -> int:
        """The snapshots one dictionary spans in the full model (`local`: this process's model config)."""
        ...

    def sum_over_heads(self, h: Tensor) -> Tensor:
        """The encoder's sum over snapshots, adding the terms of the snapshots other processes hold."""
        ...

    def sum_penalty_statistic(self, phi_sum: Tensor) -> Tensor:
        """The penalty's per-feature sums over every process's rows and snapshots."""
        ...

    # ---- read by the trainer
    @property
    def is_main(self) -> bool:
        """Whether this process writes the files and shows the progress bar."""
        ...

    def source_snapshots(self, source: ActivationSource) -> int:
        """The full source's number of snapshots (`source` may hold this process's share only)."""
        ...

    def identify_source(self, source: ActivationSource) -> str | None:
        """The full source's fingerprint (None when it has none), which checkpoints are tied to."""
        ...

    def local_config(self, config: CrosscoderConfig) -> CrosscoderConfig:
        """The config of this process's share of a model with `config`."""
        ...

    def shard_model(self, model: Crosscoder) -> Crosscoder:
        """This process's share of a full model."""
        ...

    def shard_state(self, full: dict[str, Tensor]) -> dict[str, Tensor]:
        """This process's share of a full checkpoint's model.* and optim.* tensors."""
        ...

    def shard_window(self, key: str, full: Tensor, local: Tensor) -> Tensor:
        """This process's part of a checkpoint's metric-window sum `key` (inverse of reduce_metric_window)."""
        ...

    def local_rows(self, x: Tensor) -> Tensor:
        """This process's rows of a batch [row, snapshot, d_model]."""
        ...

    def sync_gradients(self, model: Crosscoder) -> None:
        """Sum the gradients that several processes hold parts of (after backward)."""
        ...

    def sum_scalar(self, t: Tensor, over: str = "all") -> Tensor:
        """A 0-d tensor summed over the processes `over` ("all", "heads" or "data")."""
        ...

    def all_ok(self, ok: bool) -> bool:
        """Whether `ok` holds in every process."""
        ...

    def barrier(self) -> None:
        """Wait for every process."""
        ...

    def reduce_metric_window(self, window: dict[str, Tensor]) -> dict[str, Tensor]:
        """The trainer's metric-window sums over every process (every snapshot's, every row's)."""
        ...

    def gather_snapshot_metrics(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-snapshot sums of this process's snapshots → [n_snapshots, ...] over the full model."""
        ...

    def gather_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """This process's checkpoint tensors → the full model's (collective: every process calls it)."""
        ...

    def gather_model(self, model: Crosscoder) -> Crosscoder:
        """The full model from every process's share (collective)."""
        ...


@dataclasses.dataclass(frozen=True)
class SingleProcess:
    """The `ShardingContext` of a run in one process: the model and every batch are whole, so each
    reduction, gather and split is the identity and each synchronisation does nothing."""

    is_sharded = False
    is_main = True
    penalty_replicas = 1

    def global_rows(self, local_rows: int) -> int:
        return local_rows

    def snapshots_per_dictionary(self, local: CrosscoderConfig) -> int:
        return local.snapshots_per_dictionary

    def sum_over_heads(self, h: Tensor) -> Tensor:
        return h

    def sum_penalty_statistic(self, phi_sum: Tensor) -> Tensor:
        return phi_sum

    def source_snapshots(self, source: ActivationSource) -> int:
        return source.n_snapshots

    def identify_source(self, source: ActivationSource) -> str | None:
        return _fingerprint_or_none(source)

    def local_config(self, config: CrosscoderConfig) -> CrosscoderConfig:
        return config

    def shard_model(self, model: Crosscoder) -> Crosscoder:
        return model

    def shard_state(self, full: dict[str, Tensor]) -> dict[str, Tensor]:
        return full

    def shard_window(self, key: str, full: Tensor, local: Tensor) -> Tensor:
        return full

    def local_rows(self, x: Tensor) -> Tensor:
        return x

    def sync_gradients(self, model: Crosscoder) -> None:
        pass

    def sum_scalar(self, t: Tensor, over: str = "all") -> Tensor:
        return t

    def all_ok(self, ok: bool) -> bool:
        return ok

    def barrier(self) -> None:
        pass

    def reduce_metric_window(self, window: dict[str, Tensor]) -> dict[str, Tensor]:
        return window

    def gather_snapshot_metrics(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        return sums

    def gather_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state

    def gather_model(self, model: Crosscoder) -> Crosscoder:
        return model


def _fingerprint_or_none(source: ActivationSource) -> str | None:
    try:
        return source_fingerprint(source)
    except ParameterError:  # a source without a fingerprint: its checkpoints are tied to the configs only
        return None


SINGLE_PROCESS = SingleProcess()  # the default context of the model's forward pass and of the trainer


@dataclasses.dataclass
class ShardContext:
    """This process's place in a sharded run: the `ShardingContext` whose hooks reduce over processes."""

    config: CrosscoderConfig  # the full model
    n_heads: int
    rank: int
    world_size: int
    shards: list[list[int]]  # snapshot indices of each head rank
    head_group: Any = None
    data_group: Any = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    source_id: str | None = None  # identity of the full (unsharded) source, for checkpoints

    @classmethod
    def create(cls, config: CrosscoderConfig, n_heads: int | None = None, *, device: Any = "cpu",
               source_id: str | None = None) -> "ShardContext":
        """Build the head/data process groups (every rank must call this, in the same order)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        n_heads = min(world, config.n_snapshots) if n_heads is None else n_heads
        require(isinstance(n_heads, int) and 1 <= n_heads <= config.n_snapshots and world % n_heads == 0,
                "n_heads", n_heads, f"a divisor of the number of processes ({world}) between 1 and "
                f"n_snapshots={config.n_snapshots}")
        n_data = world // n_heads
        head_groups = [[d * n_heads + h for h in range(n_heads)] for d in range(n_data)]
        data_groups = [[d * n_heads + h for d in range(n_data)] for h in range(n_heads)]
        head_group = data_group = None
        for ranks in head_groups:  # new_group is collective: all ranks create all groups
            g = dist.new_group(ranks) if 1 < n_heads < world else (dist.group.WORLD if n_heads == world else None)
            if rank in ranks:
                head_group = g
        for ranks in data_groups:
            g = dist.new_group(ranks) if 1 < n_data < world else (dist.group.WORLD if n_data == world else None)
            if rank in ranks:
                data_group = g
        return cls(config=config, n_heads=n_heads, rank=rank, world_size=world,
                   shards=split_evenly(config.n_snapshots, n_heads), head_group=head_group, data_group=data_group,
                   device=torch.device(device), source_id=source_id)

    # ---- layout
    @property
    def n_data(self) -> int:
        return self.world_size // self.n_heads

    @property
    def head_rank(self) -> int:
        return self.rank % self.n_heads

    @property
    def data_rank(self) -> int:
        return self.rank // self.n_heads

    @property
    def snapshot_indices(self) -> list[int]:
        return self.shards[self.head_rank]

    @property
    def n_snapshots_total(self) -> int:
        return self.config.n_snapshots

    def snapshots_per_dictionary(self, local: CrosscoderConfig | None = None) -> int:
        return 1 if self.config.independent else self.config.n_snapshots

    is_sharded = True  # even with one process: the hooks go through torch.distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def source_snapshots(self, source: ActivationSource) -> int:
        return self.n_snapshots_total  # `source` is this rank's selection of the snapshots

    def identify_source(self, source: ActivationSource) -> str | None:
        return self.source_id

    @property
    def penalty_replicas(self) -> int:
        """How many processes compute the same penalty term (each adds 1/replicas of it)."""
        return self.n_data if self.config.independent else self.world_size

    def local_config(self, config: CrosscoderConfig | None = None) -> CrosscoderConfig:
        config = config or self.config
        k = len(self.snapshot_indices)
        return config.replace(n_snapshots=k, independent=config.independent and k > 1)

    # ---- hooks used by Crosscoder.forward
    def sum_over_heads(self, h: Tensor) -> Tensor:
        if self.config.independent or self.n_heads == 1:
            return h  # each snapshot's dictionary is local
        return _AllReduceSum.apply(h, self.head_group)

    def sum_penalty_statistic(self, phi_sum: Tensor) -> Tensor:
        group = self.data_group if self.config.independent else dist.group.WORLD
        size = self.n_data if self.config.independent else self.world_size
        return phi_sum if size == 1 else _AllReduceSum.apply(phi_sum, group)

    def global_rows(self, local_rows: int) -> int:
        return local_rows * self.n_data

    # ---- hooks used by the trainer
    def local_rows(self, x: Tensor) -> Tensor:
        if self.n_data == 1:
            return x
        require(x.shape[0] % self.n_data == 0, "batch_size", x.shape[0],
                f"a multiple of the number of data-parallel groups ({self.n_data})")
        b = x.shape[0] // self.n_data
        return x[self.data_rank * b:(self.data_rank + 1) * b]

    def sync_gradients(self, model: Crosscoder) -> None:
        if not self.config.independent and self.n_heads > 1:
            for p in (model.b_E, model.log_threshold):  # replicated: sum the heads' contributions
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.head_group)
        if self.n_data > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.data_group)

    def sum_scalar(self, t: Tensor, over: str = "all") -> Tensor:
        group, size = {"all": (dist.group.WORLD, self.world_size), "heads": (self.head_group, self.n_heads),
                       "data": (self.data_group, self.n_data)}[over]
        t = self._comm(t.detach().double().reshape(()))
        if size > 1:
            dist.all_reduce(t, group=group)
        return t.cpu()

    def all_ok(self, ok: bool) -> bool:
        flag = self._comm(torch.tensor(0.0 if ok else 1.0, dtype=torch.float64))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return float(flag) == 0.0

    def barrier(self) -> None:
        dist.barrier()

    # ---- metrics
    WINDOW_REDUCTION = {"loss": "all", "reconstruction_loss": "all", "sparsity_loss": "same", "steps": "same",
                        "rows": "data", "squared_error": "snapshots", "variance": "snapshots", "active": "snapshots",
                        "fired": "snapshots"}

    def reduce_metric_window(self, window: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for key, value in window.items():
            how = self.WINDOW_REDUCTION[key]
            if how in ("all", "data"):
                out[key] = self.sum_scalar(value, over=how)
            elif how == "snapshots":
                out[key] = self.gather_heads(self._sum_data(value))
            else:
                out[key] = value.cpu()
        return out

    def shard_window(self, key: str, full: Tensor, local: Tensor) -> Tensor:
        """Inverse of reduce_metric_window for resuming: put sums on one rank of their group."""
        how = self.WINDOW_REDUCTION[key]
        if how == "same":
            return full
        if how == "all":
            return full if self.rank == 0 else torch.zeros_like(full)
        if how == "data":
            return full if self.data_rank == 0 else torch.zeros_like(full)
        mine = full[self.snapshot_indices]
        return mine if self.data_rank == 0 else torch.zeros_like(mine)

    def gather_snapshot_metrics(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-snapshot sums computed by every head on the same rows → full [n_snapshots, ...] tensors."""
        return {k: (self.gather_heads(v) if v.ndim > 0 else v) for k, v in sums.items()}

    # ---- moving shards
    def gather_heads(self, t: Tensor) -> Tensor:
        """Concatenate every head's [its snapshots, ...] tensor along dim 0 (padded all-gather)."""
        if self.n_heads == 1:
            return t.cpu()
        longest = max(len(s) for s in self.shards)
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype)
        padded[:t.shape[0]] = t.detach().cpu()
        parts = [self._comm(torch.empty_like(padded)) for _ in range(self.n_heads)]
        dist.all_gather(parts, self._comm(padded), group=self.head_group)
        return torch.cat([p[:len(s)].cpu() for p, s in zip(parts, self.shards)])

    def _sum_data(self, t: Tensor) -> Tensor:
        if self.n_data == 1:
            return t.cpu()
        t = self._comm(t.detach().clone())
        dist.all_reduce(t, group=self.data_group)
        return t.cpu()

    def _comm(self, t: Tensor) -> Tensor:
        return t.to(self.device) if self.device.type != "cpu" else t

    def _is_sharded(self, name: str) -> bool:
        """Parameter names (or optimizer entries) whose first axis is the snapshot axis."""
        param = name.split(".")[1] if name.startswith(("model.", "optim.")) else name
        if name.endswith(".step"):
            return False
        return param in ("W_E", "W_D", "b_D") or (self.config.independent and param in ("b_E", "log_threshold"))

    def gather_state(self, state: dict[str, Tensor], config: CrosscoderConfig | None = None) -> dict[str, Tensor]:
        """This rank's checkpoint tensors → the full model's (collective; every rank gets the result)."""
        out = {}
        for name, value in state.items():
            if name.startswith("window."):
                out[name] = self.reduce_metric_window({name[7:]: value})[name[7:]]
            elif self._is_sharded(name):
                k = len(self.snapshot_indices)
                gathered = self.gather_heads(value.reshape(k, -1))
                out[name] = gathered.reshape(self.config.n_snapshots, *_tail_shape(name, self.config))
            else:
                out[name] = value
        return out

    def shard_state(self, full: dict[str, Tensor], config: CrosscoderConfig | None = None) -> dict[str, Tensor]:
        """The full model's checkpoint tensors → this rank's (model.* and optim.*; window.* as is)."""
        local = self.local_config()
        out = {}
        for name, value in full.items():
            if self._is_sharded(name):
                part = value[self.snapshot_indices]
                out[name] = part.reshape(_local_shape(name, local, len(self.snapshot_indices)))
            else:
                out[name] = value
        return out

    def shard_model(self, model: Crosscoder) -> Crosscoder:
        part = model.select_snapshots(self.snapshot_indices)
        assert part.config == self.local_config(model.config)
        return part

    def gather_model(self, model: Crosscoder, config: CrosscoderConfig | None = None) -> Crosscoder:
        state = self.gather_state({f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()})
        return type(model).from_state(self.config, {k[6:]: v for k, v in state.items()}, kernels=model.kernels)


def _tail_shape(name: str, config: CrosscoderConfig) -> tuple[int, ...]:
    """Shape after the snapshot axis of a sharded tensor of the full model."""
    param = name.split(".")[1] if "." in name else name
    d, F = config.d_model, config.dict_size
    return {"W_E": (d, F), "W_D": (F, d), "b_D": (d,), "b_E": (F,), "log_threshold": (F,)}[param]


def _local_shape(name: str, local: CrosscoderConfig, k: int) -> tuple[int, ...]:
    param = name.split(".")[1] if "." in name else name
    d, F = local.d_model, local.dict_size
    if param in ("b_E", "log_threshold"):
        return (F,) if not local.independent else (k, F)
    return (k, *{"W_E": (d, F), "W_D": (F, d), "b_D": (d,)}[param])


# ----------------------------------------------------------------------------------- entry point

def _load_source(path: str) -> Any:
    from crosslib.activations.sources import TensorSource

    p = Path(path)
    if p.is_dir():
        from crosslib.activations.store import open_store

        return open_store(p)
    if p.suffix == ".safetensors":
        import safetensors.torch

        tensors = safetensors.torch.load_file(str(p))
        if "activations" not in tensors:
            raise ParameterError(f"source={path!r} has no tensor named 'activations' [row, snapshot, d_model]")
        steps = tensors["steps"].tolist() if "steps" in tensors else None
        return TensorSource(tensors["activations"], steps=steps)
    raise ParameterError(f"source={path!r} is not allowed: an activation-cache directory or a .safetensors file "
                         "holding 'activations' [row, snapshot, d_model]")


def train_sharded(source: ActivationSource, model_config: CrosscoderConfig, train_config: TrainConfig, out_dir: str | None,
                  *, n_heads: int | None = None, device: Any = None, progress: bool = True, stop_after: int | None = None):
    """Train under an initialised process group; every rank calls this with the full source."""
    from crosslib.dictionaries.train import train_crosscoder

    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    source_id = _fingerprint_or_none(source)
    if source.n_snapshots != model_config.n_snapshots:
        raise ParameterError(f"n_snapshots={model_config.n_snapshots} (model) does not match the source's "
                             f"{source.n_snapshots} snapshots")
    ctx = ShardContext.create(model_config, n_heads, device=device, source_id=source_id)
    local_source = source.select(indices=ctx.snapshot_indices)
    return train_crosscoder(local_source, model_config, train_config, out_dir, device=device, progress=progress,
                            parallel=ctx, stop_after=stop_after), ctx


def main(argv: list[str] | None = None) -> int:
    from crosslib.dictionaries.crosscoder import CrosscoderConfig
    from crosslib.dictionaries.train import TrainConfig
    from crosslib.runtime import configure_process

    parser = argparse.ArgumentParser(prog="python -m crosslib.dictionaries.distributed",
                                     description="Train a crosscoder sharded over snapshots (run under torchrun).")
    parser.add_argument("--source", required=True, help="activation-cache directory or .safetensors with 'activations'")
    parser.add_argument("--model", default="{}", help="CrosscoderConfig fields as JSON (n_snapshots/d_model default to the source's)")
    parser.add_argument("--train", default="{}", help="TrainConfig fields as JSON")
    parser.add_argument("--out", default=None, help="output directory (checkpoints, model, metrics)")
    parser.add_argument("--heads", type=int, default=None, help="head-parallel ranks (default: all processes)")
    parser.add_argument("--backend", default=None, choices=["gloo", "nccl"])
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    device = init_distributed(args.backend)
    if device.type == "cpu":
        configure_process()  # an entry point: the process-wide allocator settings CPU training wants
    try:
        source = _load_source(args.source)
        model_fields = {"n_snapshots": source.n_snapshots, "d_model": source.d_model, **json.loads(args.model)}
        train_fields = json.loads(args.train)
        if "init_norm_grid" in train_fields:
            train_fields["init_norm_grid"] = tuple(train_fields["init_norm_grid"])
        model_config = CrosscoderConfig.from_dict(model_fields)
        train_config = TrainConfig.from_dict(train_fields)
        result, ctx = train_sharded(source, model_config, train_config, args.out, n_heads=args.heads, device=device,
                                    progress=not args.no_progress, stop_after=args.stop_after)
        if ctx.rank == 0:
            last = result.history[-1] if result.history else {}
            print(json.dumps({"world_size": ctx.world_size, "n_heads": ctx.n_heads, "path": str(result.path),
                              "loss": last.get("loss"), "eval": result.eval, "seconds": round(result.seconds, 2),
                              "steps_run": result.steps_run,
                              "tokens_per_second": round(result.tokens_per_second, 1)}))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
