"""Sharded training: 2 gloo processes under torchrun give the losses and weights of 1 process.

Tolerance: weights within 1e-6 (absolute; weights are O(0.1–1)) and logged losses within a relative
1e-5. The sharded runs sum the encoder's snapshot terms and the penalty's statistics with all-reduces,
in a different order than one process's matmul, so they agree to float32 rounding, not bit for bit.
One torchrun launch (~10 s) runs three trainings: data-parallel, head-parallel stopped half way
(resumed here in one process: checkpoints are layout-independent) and head-parallel through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from crosslib.activations.sources import planted_features
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from crosslib.dictionaries.distributed import SINGLE_PROCESS, ShardContext, ShardingContext, SingleProcess, split_evenly
from crosslib.dictionaries.train import TrainConfig, load_result, train_crosscoder

REPO = Path(__file__).resolve().parents[2]
MODEL = {"n_snapshots": 4, "d_model": 8, "dict_size": 16}
TRAIN = {"n_steps": 20, "batch_size": 32, "lr": 0.003, "log_every": 5, "checkpoint_every": 5, "eval_rows": 64,
         "init_search_rows": 64, "bf16": False, "compile": False}  # fp32: the comparison is to float32 rounding


def _source():
    return planted_features(n_rows=1200, n_snapshots=4, d_model=8, n_shared=4, n_partial=4, seed=3)[0]


def _close(a: Crosscoder, b: Crosscoder, atol=1e-6) -> None:
    for name, value in a.state_dict().items():
        assert torch.allclose(value, b.state_dict()[name], atol=atol, rtol=0), (
            name, float((value - b.state_dict()[name]).abs().max()))


def _losses(history):
    return [h["loss"] for h in history]


def test_split_evenly():
    assert split_evenly(5, 2) == [[0, 1, 2], [3, 4]]
    assert split_evenly(4, 4) == [[0], [1], [2], [3]]


def test_both_contexts_implement_the_sharding_protocol():
    """The model and the trainer call only ShardingContext's members; SingleProcess's leave every value as it is."""
    config = CrosscoderConfig(**MODEL)
    sharded = ShardContext(config=config, n_heads=2, rank=1, world_size=2, shards=split_evenly(4, 2))
    assert isinstance(sharded, ShardingContext) and isinstance(SINGLE_PROCESS, ShardingContext)
    assert sharded.is_sharded and not sharded.is_main and sharded.local_config(config).n_snapshots == 2
    alone = SingleProcess()
    x = torch.randn(6, 4, 8)
    assert not alone.is_sharded and alone.is_main and alone.penalty_replicas == 1
    assert alone.local_rows(x) is x and alone.sum_over_heads(x) is x and alone.global_rows(6) == 6
    assert alone.local_config(config) is config and alone.snapshots_per_dictionary(config) == 4
    assert alone.source_snapshots(_source()) == 4 and alone.identify_source(object()) is None


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_processes_match_one(tmp_path, one_thread):
    source = _source()
    safetensors.torch.save_file({"activations": source.rows("all", normalise=False).contiguous()},
                                str(tmp_path / "acts.safetensors"))
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        torch.set_num_threads(1)
        from crosslib.activations.sources import TensorSource
        from crosslib.dictionaries.crosscoder import CrosscoderConfig
        from crosslib.dictionaries.distributed import init_distributed, train_sharded, main
        from crosslib.dictionaries.train import TrainConfig
        import safetensors.torch
        init_distributed("gloo")
        source = TensorSource(safetensors.torch.load_file({str(tmp_path / "acts.safetensors")!r})["activations"])
        model, train = CrosscoderConfig(**{MODEL!r}), TrainConfig(**{TRAIN!r})
        train_sharded(source, model, train, {str(tmp_path / "data")!r}, n_heads=1, progress=False)
        train_sharded(source, model, train, {str(tmp_path / "half")!r}, n_heads=2, progress=False, stop_after=10)
        main(["--source", {str(tmp_path / "acts.safetensors")!r}, "--out", {str(tmp_path / "heads")!r},
              "--heads", "2", "--model", json.dumps({MODEL!r}), "--train", json.dumps({TRAIN!r}), "--no-progress"])
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["n_heads"] == 2

    reference = train_crosscoder(source, CrosscoderConfig(**MODEL), TrainConfig(**TRAIN), tmp_path / "one",
                                 progress=False)
    for name in ("heads", "data"):
        sharded = load_result(tmp_path / name)
        _close(sharded.model, reference.model)
        assert _losses(sharded.history) == pytest.approx(_losses(reference.history), rel=1e-5)
        assert sharded.eval["explained_variance"] == pytest.approx(reference.eval["explained_variance"], abs=1e-5)

    # a 2-process checkpoint resumes in 1 process
    assert json.loads((tmp_path / "half" / "checkpoint.json").read_text())["step"] == 10
    resumed = train_crosscoder(source, CrosscoderConfig(**MODEL), TrainConfig(**TRAIN), tmp_path / "half",
                               progress=False)
    _close(resumed.model, reference.model)
    assert _losses(resumed.history) == pytest.approx(_losses(reference.history), rel=1e-5)
